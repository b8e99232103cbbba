"""Proof that the plan that runs is the plan that was asked for: what the
Trainer realised (wrapper, sharding, DeepSpeed JSON), compared with the dist
config, once the model is wrapped (``PlanCheck``)."""

from __future__ import annotations

import logging
from typing import List, Optional

from transformers import TrainerCallback

from fttrain.plan import PlanError, plan_label, plan_of

log = logging.getLogger("fttrain")


def describe_realised_plan(trainer) -> dict:
    """What the Trainer actually built: wrapper class and how parameters are held."""
    model = trainer.model
    wrapped = trainer.model_wrapped
    params = list(model.parameters())
    info = {
        "world_size": trainer.args.world_size,
        "accelerate_distributed_type": str(trainer.accelerator.distributed_type).split(".")[-1],
        "wrapper": type(wrapped).__name__,
        "num_parameters": len(params),
    }
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover - torch < 2.4
        DTensor = ()
    dtensors = [p for p in params if isinstance(p, DTensor)]
    info["dtensor_parameters"] = len(dtensors)
    if dtensors:
        p = dtensors[0]
        info["placements"] = [f"Shard({x.dim})" if x.is_shard() else "Replicate" if x.is_replicate() else str(x)
                              for x in p.placements]
        info["mesh_shape"] = list(p.device_mesh.shape)
        info["local_device"] = str(p.to_local().device)
        info["fsdp_modules"] = sum(1 for m in model.modules() if type(m).__name__.startswith("FSDP"))
        # FSDP-side activation checkpointing wraps each layer in a CheckpointWrapper.
        info["fsdp_checkpointed_layers"] = sum(1 for m in model.modules() if "CheckpointWrapper" in type(m).__name__)
    ds = [p for p in params if hasattr(p, "ds_id")]
    info["zero3_partitioned_parameters"] = sum(1 for p in ds if p.numel() == 0)
    engine_stage = getattr(wrapped, "zero_optimization_stage", None)
    if callable(engine_stage):
        info["zero_stage"] = int(engine_stage())
        info["zero_offload_optimizer"] = bool(wrapped.zero_offload_optimizer())
        info["zero_offload_params"] = bool(wrapped.zero_offload_param())
        info["optimizer"] = type(wrapped.optimizer).__name__
    return info


def verify_plan(dist_cfg, info: dict, num_layers: Optional[int] = None, checkpointing: bool = False) -> List[str]:
    """Mismatches between the plan asked for and what runs (empty: all good)."""
    plan, label = plan_of(dist_cfg), plan_label(dist_cfg)
    world = info["world_size"]
    bad: List[str] = []
    wrapper = info["wrapper"]
    if plan == "single" or (plan == "ddp" and world == 1):
        if info["dtensor_parameters"] or "zero_stage" in info:
            bad.append(f"dist={label} but the model is wrapped as {wrapper}")
    elif plan == "ddp":
        if wrapper != "DistributedDataParallel":
            bad.append(f"dist=ddp with {world} processes but the model is wrapped as {wrapper}, not DistributedDataParallel")
    elif plan == "deepspeed":
        if "zero_stage" not in info:
            bad.append(f"dist={label} but the model is wrapped as {wrapper}, not a DeepSpeed engine "
                       f"(accelerate: {info['accelerate_distributed_type']})")
        else:
            if info["zero_stage"] != dist_cfg.stage:
                bad.append(f"dist={label} but DeepSpeed runs ZeRO stage {info['zero_stage']}")
            if dist_cfg.stage == 3 and info["zero3_partitioned_parameters"] != info["num_parameters"]:
                bad.append(f"dist={label} but only {info['zero3_partitioned_parameters']} of {info['num_parameters']} "
                           "parameters are partitioned")
            if dist_cfg.stage < 3 and info["zero3_partitioned_parameters"]:
                bad.append(f"dist={label} but parameters are partitioned (stage 3 behaviour)")
            if info["zero_offload_optimizer"] != dist_cfg.offload_optimizer:
                bad.append(f"dist={label}: optimizer offload is {info['zero_offload_optimizer']}")
            if info["zero_offload_params"] != dist_cfg.offload_params:
                bad.append(f"dist={label}: parameter offload is {info['zero_offload_params']}")
    elif plan == "fsdp":
        n, total = info["dtensor_parameters"], info["num_parameters"]
        if n != total:
            bad.append(f"dist={label} but {total - n} of {total} parameters are not sharded DTensors "
                       f"(model wrapped as {wrapper}, accelerate: {info['accelerate_distributed_type']})")
        else:
            want = ["Replicate", "Shard(0)"] if dist_cfg.hybrid else ["Shard(0)"]
            if info["placements"] != want:
                bad.append(f"dist={label} expects placements {want}, got {info['placements']}")
            if checkpointing and dist_cfg.activation_checkpointing == "fsdp" and not info.get("fsdp_checkpointed_layers"):
                bad.append("dist.activation_checkpointing=fsdp but no layer is wrapped for checkpointing by FSDP")
            if num_layers is not None and info["fsdp_modules"] < num_layers + 1:
                bad.append(f"dist={label}: {info['fsdp_modules']} FSDP units for {num_layers} layers; "
                           "each decoder layer should be one (check dist.wrap_class)")
    return bad


class PlanCheck(TrainerCallback):
    """Trainer callback: once the model is wrapped, the realised plan must be
    the plan asked for, or the run stops before its first step."""

    def __init__(self, dist_cfg, num_layers: Optional[int], on_verified, checkpointing: bool = False):
        self.dist_cfg, self.num_layers, self.on_verified = dist_cfg, num_layers, on_verified
        self.checkpointing = checkpointing
        self.trainer = None  # set by the recipe once the Trainer exists

    def on_train_begin(self, args, state, control, **kwargs):
        info = describe_realised_plan(self.trainer)
        bad = verify_plan(self.dist_cfg, info, self.num_layers, self.checkpointing)
        if bad:
            raise PlanError(
                "the plan that runs is not the plan asked for:\n" + "\n".join(f"  - {b}" for b in bad)
                + f"\nrealised: {info}"
            )
        self.on_verified(info)


def deepspeed_config_in_use(trainer) -> Optional[dict]:
    """The DeepSpeed JSON after transformers filled its "auto" values."""
    if not trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config
