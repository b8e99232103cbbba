"""Every reason a plan cannot run here, found before a process group starts and
before any model loads: the dist knobs, the launch, and what the PEFT method's
declaration says the plan cannot carry."""

from __future__ import annotations

import os
from typing import List

from fttrain.methods import method_of, optimizer_package
from fttrain.methods.base import LaunchFacts
from fttrain.plan import PlanError, Topology, gradient_accumulation, plan_label, plan_of, shards_weights


def check_plan(cfg, topology: Topology, precision: str, on_gpu: bool) -> None:
    """Every reason this plan cannot run here, found before a process group starts."""
    dist, peft, trainer = cfg.dist, cfg.peft, cfg.trainer
    plan, label = plan_of(dist), plan_label(dist)
    problems: List[str] = []

    # The launcher's accelerate config must not carry a plan of its own.
    launcher = [name for name, var in (("DeepSpeed", "ACCELERATE_USE_DEEPSPEED"), ("FSDP", "ACCELERATE_USE_FSDP"))
                if os.environ.get(var, "false").lower() == "true"]
    wanted = {"deepspeed": "DeepSpeed", "fsdp": "FSDP"}.get(plan)
    if len(launcher) == 2 or (launcher and wanted and launcher[0] != wanted):
        asked = " and ".join(launcher + ([wanted] if wanted and wanted not in launcher else []))
        problems.append(
            f"ZeRO and FSDP together: the launcher's accelerate config asks for {' and '.join(launcher)} while "
            f"dist={label} asks for {wanted or plan} ({asked}); pick one plan with dist=... and launch with a "
            "config from launch/ (distributed_type MULTI_GPU)"
        )
    elif launcher:
        problems.append(
            f"the launcher's accelerate config sets distributed_type {launcher[0].upper()}, but fttrain takes the plan "
            f"from dist= (now dist={label}) and would be overridden by the launcher's settings; launch with a config "
            f"from launch/ (distributed_type MULTI_GPU) and choose dist=zero*/fsdp* instead"
        )

    if plan == "single" and topology.world_size > 1:
        problems.append(f"dist=single but the launcher started WORLD_SIZE={topology.world_size} processes; use dist=ddp")

    if plan == "deepspeed":
        try:
            import deepspeed  # noqa: F401
        except ImportError:
            problems.append(f"dist={label} needs DeepSpeed: pip install 'fttrain[deepspeed]'")
        if dist.stage not in (1, 2, 3):
            problems.append(f"dist.stage={dist.stage} must be 1, 2 or 3")
        if dist.offload_params and dist.stage != 3:
            problems.append(f"dist.offload_params=true needs dist.stage=3 (stage {dist.stage} keeps whole weights on each GPU)")
    if plan == "fsdp":
        if dist.hybrid and topology.num_nodes < 2:
            problems.append(
                f"dist.hybrid=true (dist={label}) shards within a node and replicates across nodes, but this launch has "
                f"one node ({topology.world_size} process(es)); use dist=fsdp on one node"
            )
        if dist.hybrid and topology.local_world_size < 2:
            problems.append("dist.hybrid=true needs at least 2 processes per node to shard over")

    problems += method_plan_problems(peft, dist, label, topology)
    problems += method_of(peft).launch_problems(
        peft, LaunchFacts(label, shards_weights(dist), topology.world_size, on_gpu, precision))

    offloads = (plan == "deepspeed" and (dist.offload_optimizer or dist.offload_params)) or (
        plan == "fsdp" and dist.offload
    )
    # DeepSpeed's and FSDP's CPU offload cannot hold bitsandbytes' or torchao's optimizer
    # state (DeepSpeed replaces the optimizer with its CPU Adam).
    package = optimizer_package(trainer.optim)
    if offloads and package:
        problems.append(
            f"trainer.optim={trainer.optim} keeps its state with {package}, which CPU offload (dist={label}) "
            "cannot hold; use trainer.optim=adamw_torch, or a plan without offload"
        )

    try:
        gradient_accumulation(trainer, topology.world_size)
    except PlanError as e:
        problems.append(str(e))

    if problems:
        raise PlanError("the distributed plan cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


def method_plan_problems(peft, dist, label: str, topology: Topology) -> List[str]:
    """What the PEFT method's declaration says this plan cannot carry."""
    plan, method, out = plan_of(dist), method_of(peft), []
    if plan not in method.plans:
        out.append(f"peft={method.name} with dist={label}: {method.plan_note}; use "
                   + " or ".join(f"dist={p}" for p in method.plans))
    zero3 = method.zero3_problem(peft) if plan == "deepspeed" and dist.stage == 3 else None
    if zero3:
        out.append(f"{zero3} with dist={label}: peft's layers for it read the shapes of base weights that ZeRO-3 "
                   "partitions, and fail; use dist=fsdp (verified), ZeRO-2, or plain LoRA under ZeRO-3")
    if not method.sharded_ok and shards_weights(dist):
        out.append(f"peft={method.name} with dist={label} is not supported yet: fttrain has verified it with "
                   "dist=single and dist=ddp only (sharded plans gather weights per wrapped layer, which these "
                   "methods add to or bypass); use dist=ddp, or LoRA for sharded runs")
    return out
