"""Numerics check: the same few steps under variants that must agree.

    python -m fttrain.numerics +exp=NAME [fttrain overrides] [--check accum ranks plans packing]
                               [--plans ddp zero2 zero3 fsdp] [--nproc 2] [--steps 4] [--rtol R]

Each check runs the experiment a few steps in two or more ways that should
give the same per-step loss and gradient norm, prints one table, and exits 1
when any pair disagrees beyond the tolerance:

    accum    micro batch m with accumulation k  vs  one micro batch of m*k
    ranks    1 process with accumulation N      vs  N processes, same global batch
    plans    dist=ddp vs zero2 vs zero3 vs fsdp (N processes each)
    packing  packed vs padded rows; each step takes the whole (capped) data set,
             so both see the same samples and only the batching differs

Runs go to ``--workdir`` (default ``outputs/numerics/<name>``), one run
directory per variant, so a disagreement can be inspected. Dropout is set to
0 (it draws different masks in different layouts); eval, generation and
checkpoints are off.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import List, Optional, Sequence

CHECKS = ("accum", "ranks", "plans", "packing")
# Relative tolerance by precision: fp32 differs only by summation order
# (~1e-6 seen on CPU); bf16 keeps 8 bits of mantissa, so reductions in a
# different order move the loss in its third digit.
DEFAULT_RTOL = {"fp32": 1e-4, "bf16": 2e-2, "fp16": 5e-3}


@dataclass
class Variant:
    label: str
    overrides: List[str]
    nproc: int = 1
    losses: List[float] = field(default_factory=list)
    grad_norms: List[float] = field(default_factory=list)
    error: Optional[str] = None


def variants_for(check: str, cfg, nproc: int, plans: Sequence[str], pack_rows: int) -> List[Variant]:
    t = cfg.trainer
    m = t.micro_batch_size
    if check == "accum":
        return [Variant(f"micro {m} x accum 2", [f"trainer.micro_batch_size={m}", "trainer.gradient_accumulation_steps=2"]),
                Variant(f"micro {2 * m} x accum 1", [f"trainer.micro_batch_size={2 * m}",
                                                     "trainer.gradient_accumulation_steps=1"])]
    if check == "ranks":
        return [Variant(f"1 rank, accum {nproc}", [f"trainer.micro_batch_size={m}",
                                                   f"trainer.gradient_accumulation_steps={nproc}", "dist=single"]),
                Variant(f"{nproc} ranks, accum 1", [f"trainer.micro_batch_size={m}",
                                                    "trainer.gradient_accumulation_steps=1", "dist=ddp"], nproc)]
    if check == "plans":
        return [Variant(f"{p} x{nproc}", [f"trainer.micro_batch_size={m}", "trainer.gradient_accumulation_steps=1",
                                          f"dist={p}"], nproc) for p in plans]
    if check == "packing":
        base = [f"data.max_samples={pack_rows}", f"trainer.micro_batch_size={pack_rows}",
                "trainer.gradient_accumulation_steps=1"]
        return [Variant("packed", base + ["data.packing=true"]), Variant("padded", base + ["data.packing=false"])]
    raise ValueError(f"unknown check {check!r}; choose from {CHECKS}")


def launcher(nproc: int, port: int) -> List[str]:
    if nproc == 1:
        return [sys.executable]
    # --multi_gpu is what starts N processes; on a CPU machine fttrain sets use_cpu (gloo).
    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(nproc),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            "--main_process_port", str(port)]


def run_variant(v: Variant, common: List[str], run_dir: Path, port: int, log_dir: Path) -> None:
    cmd = launcher(v.nproc, port) + ["-m", "fttrain"] + common + v.overrides + [
        f"hydra.run.dir={run_dir}", "overwrite=true", f"dist.expected_world_size={v.nproc}"]
    log_file = log_dir / (run_dir.name + ".log")
    with open(log_file, "w") as f:
        proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True,
                              env={**os.environ, "PYTHONUNBUFFERED": "1"})
    if proc.returncode != 0:
        tail = log_file.read_text().strip().splitlines()[-3:]
        v.error = f"exit {proc.returncode}, see {log_file}: " + " | ".join(tail)
        return
    rows = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "loss" in r]
    v.losses = [r["loss"] for r in steps]
    v.grad_norms = [r.get("grad_norm", float("nan")) for r in steps]


def disagreements(ref: Variant, other: Variant, rtol: float, atol: float = 1e-6) -> List[str]:
    """Per-step loss and grad-norm mismatches between two variants."""
    if other.error or ref.error:
        return [other.error or ref.error]
    bad = []
    if len(ref.losses) != len(other.losses):
        return [f"{other.label}: {len(other.losses)} logged steps, reference has {len(ref.losses)}"]
    for what, a, b in (("loss", ref.losses, other.losses), ("grad_norm", ref.grad_norms, other.grad_norms)):
        for step, (x, y) in enumerate(zip(a, b), start=1):
            if not (math.isfinite(x) and math.isfinite(y)) or abs(x - y) > atol + rtol * abs(x):
                bad.append(f"{other.label}: step {step} {what} {y:.6g} vs {x:.6g} ({ref.label})")
    return bad


def table(check: str, vs: List[Variant], rtol: float) -> str:
    ref = vs[0]
    lines = [f"== {check} (rtol {rtol:g}; reference: {ref.label})"]
    n = max((len(v.losses) for v in vs), default=0)
    head = f"{'variant':<26}" + "".join(f"{'loss@' + str(i + 1):>12}" for i in range(n)) + \
        "".join(f"{'gnorm@' + str(i + 1):>12}" for i in range(n)) + f"{'max rel diff':>14}"
    lines.append(head)
    for v in vs:
        if v.error:
            lines.append(f"{v.label:<26}  FAILED: {v.error}")
            continue
        rel = 0.0
        if v is not ref and len(v.losses) == len(ref.losses):
            pairs = list(zip(ref.losses + ref.grad_norms, v.losses + v.grad_norms))
            rel = max((abs(a - b) / max(abs(a), 1e-12) for a, b in pairs), default=0.0)
        lines.append(f"{v.label:<26}" + "".join(f"{x:>12.6f}" for x in v.losses) +
                     "".join(f"{x:>12.5f}" for x in v.grad_norms) + (f"{rel:>14.2e}" if v is not ref else f"{'-':>14}"))
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m fttrain.numerics",
                                     description="Run a few steps under variants that must agree; exit 1 if not.")
    parser.add_argument("--check", nargs="+", default=["accum", "ranks", "packing"], choices=CHECKS)
    parser.add_argument("--plans", nargs="+", default=["ddp", "zero2", "zero3", "fsdp"])
    parser.add_argument("--nproc", type=int, default=2, help="processes for the ranks and plans checks")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--rtol", type=float, default=None, help="default by precision: fp32 1e-4, bf16 2e-2")
    parser.add_argument("--pack-rows", type=int, default=16, help="samples per step in the packing check")
    parser.add_argument("--port", type=int, default=29555)
    parser.add_argument("--workdir", type=Path, default=None)
    args, overrides = parser.parse_known_args(argv)
    bad_flags = [o for o in overrides if o.startswith("--")]
    if bad_flags:
        parser.error(f"unknown option(s) {bad_flags}; fttrain overrides look like key=value")

    from fttrain.config.checks import check_config
    from fttrain.config.compose import compose_config

    cfg = compose_config(overrides)
    check_config(cfg)
    precision = str(getattr(cfg.precision.dtype, "value", cfg.precision.dtype))
    if precision == "auto":
        import torch

        precision = "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "fp32"
    rtol = args.rtol if args.rtol is not None else DEFAULT_RTOL[precision]
    common = list(overrides) + [
        f"trainer.max_steps={args.steps}", "trainer.logging_steps=1", "trainer.global_batch_size=null",
        "trainer.eval_steps=null", "trainer.save_steps=null", "trainer.rank_records=false",
        "data.eval=null", "data.eval_fraction=0", "logger.progress_bar=false", "logger.report_to=[]",
    ]
    if hasattr(cfg.task, "generation_eval"):
        common.append("task.generation_eval.num_samples=0")
        common.append("task.generation_eval.exact_match_samples=0")
    if hasattr(cfg.peft, "dropout"):
        common.append("peft.dropout=0.0")
    workdir = args.workdir or Path(cfg.output_root) / "numerics" / cfg.name
    workdir.mkdir(parents=True, exist_ok=True)

    failed: List[str] = []
    port = args.port
    for check in args.check:
        vs = variants_for(check, cfg, args.nproc, args.plans, args.pack_rows)
        for i, v in enumerate(vs):
            port += 1
            slug = f"{check}_{i}_" + "".join(c if c.isalnum() else "_" for c in v.label)
            run_variant(v, common, workdir.resolve() / slug, port, workdir)
        print(table(check, vs, rtol), flush=True)
        for v in vs[1:]:
            failed += disagreements(vs[0], v, rtol)
        if vs[0].error:
            failed.append(f"{vs[0].label}: {vs[0].error}")
    print()
    if failed:
        print("numerics check FAILED:\n" + "\n".join(f"  - {f}" for f in failed))
        return 1
    print(f"numerics check passed: {', '.join(args.check)} agree within rtol {rtol:g}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
