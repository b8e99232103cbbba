"""The distributed plan: from ``dist`` and ``precision`` to what accelerate,
DeepSpeed and FSDP need, and the proof that the plan is what runs.

This package is the one place that branches on the plan, one module a job;
the recipe calls, in order:

    check.check_plan(cfg, topology, ...)      before any process group: invalid combinations (no model needed)
    translate.trainer_args(...)               TrainingArguments kwargs: DeepSpeed JSON, FSDP plan, DDP knobs
    translate.after_process_group(...)        CPU-only fixes, so that the plan asked for is the plan we get
    verify.PlanCheck (a callback)             once the Trainer has wrapped the model: wrapper and sharding
    save.save_model(...)                      the final weights, gathered or sharded

This module holds what they share: the plan's name, the launch topology and
the facts every job asks (does the plan shard weights, does it need a group).

Why the last two exist (accelerate 1.15, transformers 5.23, DeepSpeed 0.19):
* On a CPU machine accelerate classifies a multi-process run as MULTI_CPU and
  never enters its FSDP branch, so the Trainer's FSDP quietly becomes DDP.
* DeepSpeed's ``zero.Init`` (ZeRO-3 model loading) reads the world size from
  ``deepspeed.comm``, which accelerate only initialises for GPU runs; without
  it every rank thinks it is alone and the batch-size check fails.
* A launcher config with ``distributed_type: FSDP`` or ``DEEPSPEED`` sets
  environment variables that accelerate obeys over what the Trainer asked.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from fttrain.config.schema import value_of
from fttrain.env import LaunchError


class PlanError(LaunchError):
    """The plan asked for cannot run, or is not the plan that runs."""


@dataclass
class Topology:
    """What the launcher started, read from its environment before any process group exists."""

    world_size: int
    local_world_size: int

    @property
    def num_nodes(self) -> int:
        return max(1, self.world_size // max(1, self.local_world_size))

    @classmethod
    def from_env(cls) -> "Topology":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        return cls(world_size=world, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", str(world))))


def plan_of(dist_cfg) -> str:
    return value_of(dist_cfg.plan)


def plan_label(dist_cfg) -> str:
    """single | ddp | zero1..3[+offload] | fsdp[+options], for logs and errors."""
    plan = plan_of(dist_cfg)
    if plan == "deepspeed":
        off = "_offload" if dist_cfg.offload_optimizer or dist_cfg.offload_params else ""
        return f"zero{dist_cfg.stage}{off}"
    if plan == "fsdp":
        parts = ["fsdp"] + (["grad_op"] if not dist_cfg.reshard_after_forward else [])
        parts += (["hybrid"] if dist_cfg.hybrid else []) + (["offload"] if dist_cfg.offload else [])
        return "_".join(parts)
    return plan


def needs_process_group(dist_cfg) -> bool:
    return plan_of(dist_cfg) in ("deepspeed", "fsdp")


def shards_weights(dist_cfg) -> bool:
    """True when no rank holds the whole model (ZeRO-3, FSDP): every forward
    pass is a collective, so all ranks must run the same passes (eval,
    generation), and only these plans can save weights as shards."""
    plan = plan_of(dist_cfg)
    return plan == "fsdp" or (plan == "deepspeed" and dist_cfg.stage == 3)


def gradient_accumulation(trainer_cfg, world_size: int) -> int:
    """Accumulation steps for this world size; refuses a global batch it cannot reach."""
    t = trainer_cfg
    if t.global_batch_size is None:
        return t.gradient_accumulation_steps
    per_step = t.micro_batch_size * world_size
    if t.global_batch_size % per_step:
        raise PlanError(
            f"trainer.global_batch_size={t.global_batch_size} cannot be reached with "
            f"trainer.micro_batch_size={t.micro_batch_size} x {world_size} rank(s): it must be a multiple of "
            f"{per_step}. Change trainer.micro_batch_size or trainer.global_batch_size, or launch a different "
            "number of processes."
        )
    return t.global_batch_size // per_step
