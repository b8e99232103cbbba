"""The distributed plans without starting processes: what each dist option
translates to (golden files), the combinations refused before launch, and the
check that compares the realised plan with the one asked for."""

import json
import os
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException

from conftest import CONF, REPO, compose, run_cli
from fttrain.plan import PlanError, Topology, gradient_accumulation, plan_label
from fttrain.plan.check import check_plan
from fttrain.plan.translate import trainer_args
from fttrain.plan.verify import verify_plan

GOLDEN = Path(__file__).parent / "golden" / "plans"
DIST_OPTIONS = sorted(p.stem for p in (CONF / "dist").glob("*.yaml"))
# The trainer numbers every golden file is generated from.
TRAINER = ["trainer.micro_batch_size=2", "trainer.global_batch_size=32", "trainer.max_grad_norm=0.5",
           "trainer.learning_rate=1e-4", "trainer.weight_decay=0.01"]


def _checkpointing(on):
    return {"gradient_checkpointing": on}


def plan_args(option, precision="bf16", world=8, local=8, extra=()):
    cfg = compose(["+exp=tiny_sft", f"dist={option}", *TRAINER, *extra])
    topo = Topology(world_size=world, local_world_size=local)
    accum = gradient_accumulation(cfg.trainer, world)
    kwargs = trainer_args(cfg, precision, topo, accum, use_cpu=False, checkpointing_args=_checkpointing)
    pc = kwargs.pop("parallelism_config", None)
    if pc is not None:
        kwargs["parallelism_config"] = {"dp_replicate_size": pc.dp_replicate_size, "dp_shard_size": pc.dp_shard_size}
    return cfg, kwargs


@pytest.mark.parametrize("option", DIST_OPTIONS)
def test_plan_translation_matches_golden_file(option):
    """What each conf/dist option hands to the Trainer, for 2 nodes x 8 GPUs,
    bf16. Regenerate after an intended change with FTTRAIN_UPDATE_GOLDEN=1."""
    _, kwargs = plan_args(option, world=16, local=8)
    path = GOLDEN / f"{option}.json"
    text = json.dumps(kwargs, indent=2, sort_keys=True) + "\n"
    if os.environ.get("FTTRAIN_UPDATE_GOLDEN"):
        path.write_text(text)
    assert path.exists(), f"no golden file for dist={option}; run with FTTRAIN_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"dist={option} now translates differently from {path}"


def test_every_dist_option_has_a_golden_file_and_no_stale_ones():
    assert sorted(p.stem for p in GOLDEN.glob("*.json")) == DIST_OPTIONS


def test_deepspeed_numbers_are_the_trainers_numbers():
    # 32 = 2 micro x 2 accumulation x 8 ranks; DeepSpeed refuses a config whose
    # numbers disagree with each other, transformers one that disagrees with it.
    _, kwargs = plan_args("zero3", world=8)
    ds = kwargs["deepspeed"]
    assert ds["train_micro_batch_size_per_gpu"] * ds["gradient_accumulation_steps"] * 8 == ds["train_batch_size"] == 32
    assert ds["gradient_clipping"] == 0.5
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["zero_optimization"]["stage"] == 3
    _, kwargs = plan_args("zero2_offload", precision="fp16", world=8)
    ds = kwargs["deepspeed"]
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0  # dynamic loss scaling
    assert ds["optimizer"]["params"]["lr"] == 1e-4 and ds["optimizer"]["params"]["weight_decay"] == 0.01


def test_fsdp_takes_activation_checkpointing_when_asked():
    _, model_side = plan_args("fsdp", extra=["trainer.gradient_checkpointing=true"])
    assert model_side["gradient_checkpointing"] is True
    assert model_side["fsdp_config"]["activation_checkpointing"] is False
    _, fsdp_side = plan_args("fsdp", extra=["trainer.gradient_checkpointing=true", "dist.activation_checkpointing=fsdp"])
    assert fsdp_side["gradient_checkpointing"] is False
    assert fsdp_side["fsdp_config"]["activation_checkpointing"] is True


def test_sharded_save_only_shards_full_weights():
    _, lora = plan_args("zero3", extra=["dist.save_format=sharded"])
    assert lora["deepspeed"]["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    cfg = compose(["+exp=tiny_full", "dist=fsdp", "dist.save_format=sharded"])
    kwargs = trainer_args(cfg, "bf16", Topology(8, 8), 1, False, _checkpointing)
    assert kwargs["fsdp_config"]["state_dict_type"] == "SHARDED_STATE_DICT"
    # ZeRO-1/2 ranks hold whole weights: there is nothing to shard, so the save is one HF folder.
    from fttrain.plan.translate import sharded_save

    assert not sharded_save(compose(["+exp=tiny_full", "dist=zero2", "dist.save_format=sharded"]).dist, "full")
    assert sharded_save(compose(["+exp=tiny_full", "dist=zero3", "dist.save_format=sharded"]).dist, "full")


def test_zero_knobs_do_not_compose_on_an_fsdp_plan():
    with pytest.raises(ConfigCompositionException, match="stage"):
        compose(["+exp=tiny_sft", "dist=fsdp", "dist.stage=3"])


# ------------------------------------------------------------ refused plans
def refuse(overrides, world=2, local=2, precision="fp32", env=None, monkeypatch=None, exp="tiny_sft"):
    cfg = compose([f"+exp={exp}", *overrides])
    for k, v in (env or {}).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(PlanError) as e:
        check_plan(cfg, Topology(world, local), precision, on_gpu=False)
    return str(e.value)


def test_zero_and_fsdp_together_are_refused(monkeypatch):
    msg = refuse(["dist=zero3"], env={"ACCELERATE_USE_FSDP": "true"}, monkeypatch=monkeypatch)
    assert "ZeRO and FSDP together" in msg and "dist=zero3" in msg


def test_a_launcher_plan_that_would_override_dist_is_refused(monkeypatch):
    msg = refuse(["dist=ddp"], env={"ACCELERATE_USE_DEEPSPEED": "true"}, monkeypatch=monkeypatch)
    assert "distributed_type DEEPSPEED" in msg and "dist=ddp" in msg


@pytest.mark.parametrize("dist", ["zero3", "fsdp"])
def test_qlora_sharded_needs_matching_quant_storage(dist):
    msg = refuse([f"dist={dist}"], exp="llama8b_qlora", world=8, local=8, precision="bf16")
    assert "peft.quant_storage" in msg and f"dist={dist}" in msg
    cfg = compose(["+exp=llama8b_qlora", f"dist={dist}", "peft.quant_storage=bfloat16"])
    check_plan(cfg, Topology(8, 8), "bf16", on_gpu=True)  # fixed as the message says


@pytest.mark.parametrize("dist", ["zero2_offload", "zero3_offload", "fsdp_offload"])
def test_offload_with_an_8bit_optimizer_is_refused(dist):
    msg = refuse([f"dist={dist}", "trainer.optim=paged_adamw_8bit"])
    assert "trainer.optim=paged_adamw_8bit keeps its state with bitsandbytes" in msg and f"dist={dist}" in msg
    assert "keeps its state with torchao" in refuse([f"dist={dist}", "trainer.optim=adamw_torch_8bit"])


def test_fp16_with_a_bf16_only_setting_is_refused():
    cfg = compose(["+exp=llama8b_qlora", "precision=fp16"])
    with pytest.raises(PlanError, match=r"precision=fp16 with a bf16-only setting \(peft.compute_dtype=bfloat16\)"):
        check_plan(cfg, Topology(1, 1), "fp16", on_gpu=True)


def test_unreachable_global_batch_is_refused_for_this_world_size():
    msg = refuse(["trainer.micro_batch_size=2", "trainer.global_batch_size=8"], world=3, local=3)
    assert "trainer.global_batch_size=8" in msg and "3 rank(s)" in msg and "multiple of 6" in msg
    cfg = compose(["+exp=tiny_sft", "trainer.micro_batch_size=2", "trainer.global_batch_size=8"])
    assert gradient_accumulation(cfg.trainer, 2) == 2


def test_hybrid_sharding_on_one_node_is_refused():
    msg = refuse(["dist=fsdp_hybrid"], world=8, local=8)
    assert "dist.hybrid=true" in msg and "one node" in msg
    cfg = compose(["+exp=tiny_sft", "dist=fsdp_hybrid"])
    check_plan(cfg, Topology(16, 8), "fp32", on_gpu=False)  # two nodes: fine


def test_single_under_a_multi_process_launch_is_refused():
    assert "dist=single" in refuse(["dist=single"], world=2)


def test_offload_params_needs_stage_3():
    assert "dist.offload_params=true needs dist.stage=3" in refuse(["dist=zero2", "dist.offload_params=true"])


def test_all_problems_are_reported_at_once():
    msg = refuse(["dist=fsdp_hybrid", "trainer.optim=adamw_8bit", "dist.offload=true", "trainer.global_batch_size=7"])
    assert msg.count("\n  - ") >= 3


@pytest.mark.slow
def test_cli_refuses_an_invalid_plan_before_any_process_group(tmp_path):
    proc = run_cli(["+exp=tiny_sft", "dist=fsdp_hybrid"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "fttrain: error: the distributed plan cannot run" in proc.stderr
    assert "Traceback" not in proc.stderr


# ------------------------------------------------------- realised vs asked
def realised(**kw):
    info = {"world_size": 2, "accelerate_distributed_type": "MULTI_CPU", "wrapper": "DistributedDataParallel",
            "num_parameters": 10, "dtensor_parameters": 0, "zero3_partitioned_parameters": 0}
    info.update(kw)
    return info


def test_fsdp_that_became_ddp_is_caught():
    cfg = compose(["+exp=tiny_sft", "dist=fsdp"])
    bad = verify_plan(cfg.dist, realised())
    assert bad and "not sharded DTensors" in bad[0]


def test_zero3_without_partitioned_parameters_is_caught():
    cfg = compose(["+exp=tiny_sft", "dist=zero3"])
    info = realised(wrapper="DeepSpeedEngine", zero_stage=3, zero_offload_optimizer=False, zero_offload_params=False,
                    zero3_partitioned_parameters=4)
    assert any("only 4 of 10 parameters are partitioned" in b for b in verify_plan(cfg.dist, info))
    info["zero3_partitioned_parameters"] = 10
    assert verify_plan(cfg.dist, info) == []


def test_wrong_zero_stage_and_missing_offload_are_caught():
    cfg = compose(["+exp=tiny_sft", "dist=zero3_offload"])
    info = realised(wrapper="DeepSpeedEngine", zero_stage=2, zero_offload_optimizer=False, zero_offload_params=False)
    bad = "\n".join(verify_plan(cfg.dist, info))
    assert "stage 2" in bad and "optimizer offload is False" in bad and "parameter offload is False" in bad


def test_hybrid_needs_a_two_dimensional_placement():
    cfg = compose(["+exp=tiny_sft", "dist=fsdp_hybrid"])
    flat = realised(dtensor_parameters=10, placements=["Shard(0)"], fsdp_modules=5, wrapper="FSDPLlamaForCausalLM")
    assert verify_plan(cfg.dist, flat, num_layers=4)
    flat["placements"] = ["Replicate", "Shard(0)"]
    assert verify_plan(cfg.dist, flat, num_layers=4) == []


def test_ddp_that_did_not_wrap_is_caught():
    cfg = compose(["+exp=tiny_sft", "dist=ddp"])
    assert verify_plan(cfg.dist, realised(wrapper="LlamaForCausalLM"))
    assert verify_plan(cfg.dist, realised(wrapper="LlamaForCausalLM", world_size=1)) == []


def test_plan_labels_name_the_conf_option():
    for option in DIST_OPTIONS:
        assert plan_label(compose(["+exp=tiny_sft", f"dist={option}"]).dist) == option


@pytest.mark.parametrize("path", sorted((REPO / "launch").glob("*.yaml")), ids=lambda p: p.name)
def test_launch_configs_only_start_processes(path):
    """accelerate can read each file, and none carries a plan of its own."""
    from accelerate.commands.config.config_args import load_config_from_file

    text = path.read_text()
    assert text.startswith("# ") and "accelerate launch --config_file launch/" + path.name in text
    cfg = load_config_from_file(str(path))
    assert str(cfg.distributed_type).split(".")[-1] in ("NO", "MULTI_GPU")
    assert cfg.mixed_precision in ("no", "NO") or str(cfg.mixed_precision).endswith("NO")


def test_bf16_on_a_gpu_without_it_is_refused(monkeypatch):
    """The GPU branch of the precision check, with torch's CUDA probes stubbed
    as a pre-Ampere card reports them (this machine has no GPU)."""
    import torch

    from fttrain.env import LaunchError, resolve_precision

    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: False)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a, **k: "Tesla V100-SXM2-16GB")
    with pytest.raises(LaunchError, match="precision=bf16 but Tesla V100-SXM2-16GB has no bf16 support"):
        resolve_precision("bf16", on_gpu=True)
    assert resolve_precision("auto", on_gpu=True) == "fp32"
    assert resolve_precision("fp16", on_gpu=True) == "fp16"
    with pytest.raises(LaunchError, match="precision=fp16 needs a GPU"):
        resolve_precision("fp16", on_gpu=False)
