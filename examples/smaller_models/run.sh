#!/usr/bin/env bash
# bash examples/smaller_models/run.sh        (in an empty folder; about 3 minutes on 2 CPU cores after the demo, 6 with it)
# The README's "Smaller models" table for the demo's tiny model: the demo (the teacher
# and the base of the rest), its nf4 export, a structured prune of it, that prune
# recovered on the labels and recovered by distillation from the demo (equal steps),
# and a from-scratch half-width student distilled from the demo; then one
# `fttrain compare` table (size, eval loss, exact match, latency).
set -euo pipefail
run() { echo "+ $*" >&2; "$@"; }
here=$(pwd)
[ -f outputs/demo_pretrain/COMPLETE ] || run python -m fttrain +exp=demo_pretrain
[ -f outputs/demo/COMPLETE ] || run python -m fttrain +exp=demo
em="task.generation_eval.exact_match_samples=100 task.generation_eval.max_new_tokens=16"

# Quantised export: nf4 weights, gated on the demo's held-out rows against the fp32 export.
run fttrain export outputs/demo --out outputs/demo/merged-nf4 --quantize nf4 --overwrite
# Structured pruning: one of 2 KV groups (2 of 4 query heads) and half the MLP channels in every layer.
run fttrain prune outputs/demo --out outputs/demo_pruned --heads 1 --mlp-channels 176 --overwrite
# Recovery, 300 LoRA steps each (the demo's recipe): on the labels, and distilled from the unpruned demo.
pruned="model=local model.name_or_path=$here/outputs/demo_pruned"
run python -m fttrain +exp=demo $pruned name=pruned_recovered $em overwrite=true
run python -m fttrain +exp=demo task=distill task.teacher=outputs/demo $pruned name=pruned_distilled $em overwrite=true
for r in pruned_recovered pruned_distilled; do
  run fttrain export outputs/$r --out outputs/$r/merged --overwrite
done
# A student of 1/6 the parameters from scratch, distilled from the demo (tiny_distill's 60 steps).
run python -m fttrain +exp=tiny_distill $em overwrite=true
run fttrain compare outputs/demo outputs/demo/merged-nf4 outputs/demo_pruned outputs/pruned_recovered/merged \
  outputs/pruned_distilled/merged outputs/tiny_distill/model
