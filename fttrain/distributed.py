"""The distributed plan: from ``dist`` and ``precision`` to what accelerate,
DeepSpeed and FSDP need, and the proof that the plan is what runs.

This is the one module that branches on the plan. The recipe calls, in order:

    check_plan(cfg, topology, runtime)   before any process group: invalid combinations
    trainer_args(...)                    TrainingArguments kwargs: DeepSpeed JSON, FSDP plan, DDP knobs
    after_process_group(...)             CPU-only fixes, so that the plan asked for is the plan we get
    PlanCheck (a callback)               once the Trainer has wrapped the model: wrapper and sharding

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

import logging
import os
from dataclasses import dataclass
from typing import List, Optional

from transformers import TrainerCallback

from fttrain.config.schema import value_of
from fttrain.env import LaunchError, is_main_process

log = logging.getLogger("fttrain")

SAVE_FORMATS = ("full", "sharded")
CHECKPOINTING_SOURCES = ("model", "fsdp")
# Optimizers whose state is kept by bitsandbytes: DeepSpeed's and FSDP's CPU
# offload cannot hold it (DeepSpeed replaces the optimizer with its CPU Adam).
EIGHT_BIT_MARKERS = ("8bit", "4bit", "bnb")


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


# ----------------------------------------------------------- before launch
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
        if dist.activation_checkpointing not in CHECKPOINTING_SOURCES:
            problems.append(
                f"dist.activation_checkpointing={dist.activation_checkpointing!r} must be one of {list(CHECKPOINTING_SOURCES)}"
            )
        if dist.hybrid and topology.num_nodes < 2:
            problems.append(
                f"dist.hybrid=true (dist={label}) shards within a node and replicates across nodes, but this launch has "
                f"one node ({topology.world_size} process(es)); use dist=fsdp on one node"
            )
        if dist.hybrid and topology.local_world_size < 2:
            problems.append("dist.hybrid=true needs at least 2 processes per node to shard over")

    if needs_process_group(dist) and dist.save_format not in SAVE_FORMATS:
        problems.append(f"dist.save_format={dist.save_format!r} must be one of {list(SAVE_FORMATS)}")

    problems += method_plan_problems(peft, dist, label, topology)

    if peft.method == "qlora" and shards_weights(dist):
        from fttrain.peft_setup import resolved_compute_dtype

        storage, compute = peft.quant_storage, resolved_compute_dtype(peft, precision)
        if storage is None or storage != compute:
            problems.append(
                f"peft=qlora with dist={label} shards the 4-bit weights, which needs peft.quant_storage equal to "
                f"the compute dtype ({compute}, from peft.compute_dtype={peft.compute_dtype}); it is {storage}. "
                f"Set peft.quant_storage={compute}"
            )
        if peft.bits != 4:
            problems.append(f"peft=qlora with dist={label} needs peft.bits=4 (8-bit weights cannot be sharded)")
    if getattr(peft, "init", None) == "loftq" and not on_gpu:
        problems.append("peft.init=loftq: peft's LoftQ initialisation runs on CUDA only; on CPU use init=default or pissa")

    offloads = (plan == "deepspeed" and (dist.offload_optimizer or dist.offload_params)) or (
        plan == "fsdp" and dist.offload
    )
    if offloads and any(m in trainer.optim for m in EIGHT_BIT_MARKERS):
        problems.append(
            f"trainer.optim={trainer.optim} is an 8-bit (bitsandbytes) optimizer, which CPU offload (dist={label}) "
            "cannot hold; use trainer.optim=adamw_torch, or a plan without offload"
        )

    if precision == "fp16":
        bf16_only = [f"peft.{k}=bfloat16" for k in ("compute_dtype", "quant_storage")
                     if peft.method == "qlora" and getattr(peft, k) == "bfloat16"]
        if bf16_only:
            problems.append(
                f"precision=fp16 with a bf16-only setting ({', '.join(bf16_only)}): set them to float16, "
                "or use precision=bf16"
            )

    try:
        gradient_accumulation(trainer, topology.world_size)
    except PlanError as e:
        problems.append(str(e))

    if problems:
        raise PlanError("the distributed plan cannot run:\n" + "\n".join(f"  - {p}" for p in problems))


def method_plan_problems(peft, dist, label: str, topology: Topology) -> List[str]:
    """PEFT methods that a plan cannot carry."""
    plan, m, out = plan_of(dist), peft.method, []
    if m == "lisa" and plan not in ("single", "ddp"):
        out.append(f"peft=lisa with dist={label}: LISA freezes and unfreezes layers during training, while ZeRO and "
                   "FSDP fix the trainable set when they wrap the model; use dist=single or dist=ddp")
    if m == "galore" and plan not in ("single", "ddp"):
        out.append(f"peft=galore with dist={label}: GaLore's optimizer projects whole gradient matrices, which ZeRO "
                   "and FSDP shard; use dist=single or dist=ddp")
    if m == "galore" and peft.layerwise and topology.world_size > 1:
        out.append("peft.layerwise=true steps the optimizer inside backward, which DDP's gradient averaging cannot "
                   f"follow; it runs on one process only (this launch has {topology.world_size})")
    if m == "adalora" and plan not in ("single", "ddp"):
        out.append(f"peft=adalora with dist={label}: AdaLoRA ranks modules by their gradients after each step, which "
                   "DeepSpeed does not keep and FSDP shards (it fails there); use dist=single or dist=ddp")
    # Tried on 2 CPU ranks: these peft layers read the shapes of base weights
    # that ZeRO-3 has partitioned (size 0 outside a forward pass) and fail.
    # The same methods run under FSDP, which gathers whole layers.
    if plan == "deepspeed" and dist.stage == 3 and (m in ("loha", "lokr", "ia3", "vera") or getattr(peft, "use_dora", False)):
        what = "peft.use_dora=true" if getattr(peft, "use_dora", False) else f"peft={m}"
        out.append(f"{what} with dist={label}: peft's layers for it read the shapes of base weights that ZeRO-3 "
                   "partitions, and fail; use dist=fsdp (verified), ZeRO-2, or plain LoRA under ZeRO-3")
    untested = ("prompt_tuning", "prefix_tuning", "p_tuning", "llama_adapter", "adapter")
    if m in untested and shards_weights(dist):
        out.append(f"peft={m} with dist={label} is not supported yet: fttrain has verified it with dist=single and "
                   "dist=ddp only (sharded plans gather weights per wrapped layer, which these methods add to or "
                   "bypass); use dist=ddp, or LoRA for sharded runs")
    return out


def needs_process_group(dist_cfg) -> bool:
    return plan_of(dist_cfg) in ("deepspeed", "fsdp")


def single_process_rendezvous(dist_cfg) -> None:
    """ZeRO and FSDP need a process group even for one process (one GPU with
    offload, or a quick check). Under a plain `python -m fttrain` there is no
    launcher to provide one, so fttrain sets up a group of one on a free port."""
    if not needs_process_group(dist_cfg) or "LOCAL_RANK" in os.environ:
        return
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1"), ("LOCAL_WORLD_SIZE", "1"),
                       ("MASTER_ADDR", "127.0.0.1"), ("MASTER_PORT", str(port))):
        os.environ.setdefault(key, value)


def cpu_collective_timeout(dist_cfg, use_cpu: bool) -> None:
    """transformers hands ``ddp_timeout`` to accelerate only for GPU runs; a CPU
    run's gloo group got torch's default 30 minutes whatever dist.timeout_minutes
    said. accelerate's state, created here first with the timeout, is the one
    the Trainer then finds."""
    if not use_cpu or int(os.environ.get("WORLD_SIZE", "1")) < 2:
        return
    from datetime import timedelta

    from accelerate.state import PartialState

    PartialState(cpu=True, backend=dist_cfg.backend or "gloo",
                 timeout=timedelta(seconds=max(1, int(round(dist_cfg.timeout_minutes * 60)))))


# ------------------------------------------------------- trainer arguments
def shards_weights(dist_cfg) -> bool:
    """True when no rank holds the whole model (ZeRO-3, FSDP): every forward
    pass is a collective, so all ranks must run the same passes (eval,
    generation), and only these plans can save weights as shards."""
    plan = plan_of(dist_cfg)
    return plan == "fsdp" or (plan == "deepspeed" and dist_cfg.stage == 3)


def sharded_save(dist_cfg, peft_method: str) -> bool:
    """Whether each rank writes its own shard of the final weights. Only full
    weights are ever too big to gather on one rank; an adapter is saved whole.
    Under ZeRO-1/2 every rank holds whole weights, so they are saved whole too."""
    from fttrain.peft_setup import WHOLE_MODEL

    return shards_weights(dist_cfg) and dist_cfg.save_format == "sharded" and peft_method in WHOLE_MODEL


def deepspeed_config(dist, precision: str, trainer_cfg, micro: int, accum: int, world: int, on_gpu: bool,
                     sharded: bool = False) -> dict:
    """A complete DeepSpeed JSON. Batch sizes, accumulation, clipping and
    precision are filled here from the same numbers the Trainer gets (the
    Trainer refuses a mismatch); the three bucket sizes that depend on the
    model's hidden size stay "auto" and transformers fills them when it sees
    the model."""
    zero = {"stage": dist.stage, "overlap_comm": dist.overlap_comm, "contiguous_gradients": True,
            "reduce_bucket_size": "auto"}
    if dist.stage == 3:
        zero.update(
            stage3_prefetch_bucket_size="auto",
            stage3_param_persistence_threshold="auto",
            # full: save_model gathers 16-bit weights on rank 0; sharded: each rank writes its partition
            stage3_gather_16bit_weights_on_model_save=not sharded,
        )
    if dist.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": on_gpu}
    if dist.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": on_gpu}
    config = {
        "train_micro_batch_size_per_gpu": micro,
        "gradient_accumulation_steps": accum,
        "train_batch_size": micro * accum * world,
        "gradient_clipping": trainer_cfg.max_grad_norm,
        "zero_optimization": zero,
        "bf16": {"enabled": precision == "bf16"},
        # loss_scale 0 = dynamic: start at 2^16, halve on overflow (the step is
        # skipped), double after 1000 clean steps.
        "fp16": {"enabled": precision == "fp16", "loss_scale": 0, "initial_scale_power": 16,
                 "loss_scale_window": 1000, "hysteresis": 2, "min_loss_scale": 1},
        "steps_per_print": 10**9,  # the Trainer logs; DeepSpeed's own step prints would repeat it
        "wall_clock_breakdown": False,
    }
    if dist.offload_optimizer:
        # Offloaded states need DeepSpeed's CPU Adam (a torch optimizer would step
        # on CPU at a fraction of the speed); hyperparameters mirror the Trainer's.
        config["optimizer"] = {
            "type": "AdamW",
            "params": {"lr": trainer_cfg.learning_rate, "betas": [0.9, 0.999], "eps": 1e-8,
                       "weight_decay": trainer_cfg.weight_decay},
        }
    return config


def fsdp_config(dist, checkpointing: bool, sharded: bool = False) -> dict:
    config = {
        "version": 2,
        "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
        "reshard_after_forward": dist.reshard_after_forward,
        "cpu_offload": dist.offload,
        "state_dict_type": "SHARDED_STATE_DICT" if sharded else "FULL_STATE_DICT",
        "activation_checkpointing": checkpointing and dist.activation_checkpointing == "fsdp",
        "cpu_ram_efficient_loading": False,
    }
    if dist.wrap_class:
        config["transformer_layer_cls_to_wrap"] = [dist.wrap_class]
    return config


def fill_fsdp_wrap_classes(args, model, dist) -> None:
    """With no dist.wrap_class, FSDP wraps the model's ``_no_split_modules``.
    BERT-style models list their embeddings module there too, and FSDP2 then
    fails on it ("Invariant encountered" in DeviceMesh); the input embeddings
    stay with the root unit instead, as for Llama-style models whose list
    names only the decoder layer. Runs after the model is built, before the
    Trainer reads the plugin arguments."""
    if plan_of(dist) != "fsdp" or dist.wrap_class:
        return
    names = set(getattr(model, "_no_split_modules", None) or ())
    embeddings = model.get_input_embeddings()
    holders = {type(m).__name__ for m in model.modules()
               if type(m).__name__ in names and any(c is embeddings for c in m.modules())}
    if not holders:
        return
    wrap = sorted(names - holders)
    args.fsdp_config["transformer_layer_cls_to_wrap"] = wrap
    args.fsdp_plugin_args["transformer_cls_names_to_wrap"] = ",".join(wrap)


def trainer_args(cfg, precision: str, topology: Topology, accum: int, use_cpu: bool, checkpointing_args) -> dict:
    """TrainingArguments keywords for the plan (and the checkpointing flags,
    which move to FSDP when the plan takes activation checkpointing there)."""
    dist, t = cfg.dist, cfg.trainer
    plan = plan_of(dist)
    multi = topology.world_size > 1 or needs_process_group(dist)
    kwargs = {
        # Only under a multi-process launch: a backend with one process makes
        # accelerate look for a process group that does not exist.
        "ddp_backend": (dist.backend or ("gloo" if use_cpu else None)) if multi else None,
        "ddp_timeout": max(1, int(round(dist.timeout_minutes * 60))),
        # LISA freezes layers after DDP has wrapped the model: their gradients go missing.
        "ddp_find_unused_parameters": getattr(dist, "find_unused_parameters", False) or cfg.peft.method == "lisa",
    }
    checkpointing = bool(t.gradient_checkpointing)
    if plan == "fsdp" and dist.activation_checkpointing == "fsdp":
        kwargs.update(checkpointing_args(False))
    else:
        kwargs.update(checkpointing_args(checkpointing))
    if plan == "deepspeed":
        kwargs["deepspeed"] = deepspeed_config(dist, precision, t, t.micro_batch_size, accum, topology.world_size,
                                               on_gpu=not use_cpu, sharded=sharded_save(dist, cfg.peft.method))
    elif plan == "fsdp":
        kwargs["fsdp"] = True
        kwargs["fsdp_config"] = fsdp_config(dist, checkpointing, sharded=sharded_save(dist, cfg.peft.method))
        if dist.hybrid:
            from accelerate.parallelism_config import ParallelismConfig

            kwargs["parallelism_config"] = ParallelismConfig(
                dp_replicate_size=topology.num_nodes, dp_shard_size=topology.local_world_size
            )
    return kwargs


# ------------------------------------------------------ after the group
def after_process_group(dist_cfg, use_cpu: bool) -> None:
    """CPU-only fixes, applied once the process group exists and before the
    model loads, so the plan asked for is the plan accelerate builds."""
    # FTTRAIN_CPU_PLAN_FIXES=0 shows what accelerate does unaided (a test uses
    # it to prove that PlanCheck stops the fallback to DDP).
    if not use_cpu or os.environ.get("FTTRAIN_CPU_PLAN_FIXES", "1") == "0":
        return
    plan = plan_of(dist_cfg)
    import torch.distributed as tdist

    if plan == "deepspeed" and tdist.is_initialized():
        import deepspeed

        # zero.Init and the engine read ranks from deepspeed.comm; adopt torch's group.
        deepspeed.init_distributed(dist_backend=tdist.get_backend())
    if plan == "fsdp":
        from accelerate.state import PartialState
        from accelerate.utils import DistributedType

        # accelerate enters its FSDP branch only for GPU-like distributed types;
        # the device stays CPU and collectives go through gloo.
        state = PartialState()
        if state.distributed_type == DistributedType.MULTI_CPU:
            PartialState._shared_state["distributed_type"] = DistributedType.MULTI_GPU


# ------------------------------------------------------------ proof
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


def full_trainable_weights(trainer):
    """(name, whole tensor) for every trainable parameter, gathered from the
    shards under FSDP and ZeRO-3. A collective there: every rank must call it."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    named = [(n, p) for n, p in sorted(model.named_parameters()) if p.requires_grad]
    if any(hasattr(p, "ds_id") for _, p in named):  # ZeRO-3 partitions
        import deepspeed

        # The last eval / generation pass may have left prefetched parameters
        # in flight; release them before gathering.
        trainer.model_wrapped.empty_partition_cache()
        with deepspeed.zero.GatheredParameters([p for _, p in named]):
            gathered = [(n, p.detach().clone()) for n, p in named]
        yield from gathered
        return
    for name, p in named:
        if hasattr(p, "full_tensor"):  # FSDP2 DTensor
            # A copy: the gathered tensor can share storage that FSDP later frees.
            yield name, p.full_tensor().detach().clone()
        else:
            yield name, p.detach().clone()


# ------------------------------------------------------------ saving
SHARDED_NOTE = """These weights are sharded: each rank wrote its own part ({kind}).
Merge them into one standard Hugging Face folder (on one machine, CPU only):

    python -m fttrain.consolidate {folder}

"""


def save_model(trainer, out_dir, dist_cfg, peft_method: str, final_dir=None) -> str:
    """Write the final weights; every rank calls this. Returns the format:
    "hf" (a standard folder, loadable without fttrain), "zero_sharded" or
    "fsdp_sharded". (The Trainer's save_model writes nothing at all for FSDP's
    sharded state dict, so fttrain saves that case itself.)"""
    out_dir = str(out_dir)
    if peft_method == "adapter":  # fttrain's bottleneck adapters: their weights only
        from fttrain.bottleneck import adapter_state_dict, save_bottleneck

        weights = adapter_state_dict(full_trainable_weights(trainer))  # collective
        if is_main_process():
            model = trainer.accelerator.unwrap_model(trainer.model)
            save_bottleneck(weights, model._fttrain_bottleneck, out_dir)
            model.config.save_pretrained(out_dir)
        return "bottleneck"
    if not sharded_save(dist_cfg, peft_method):
        trainer.save_model(out_dir)  # gathers to rank 0 under ZeRO-3 / FSDP
        return "hf"
    acc = trainer.accelerator
    if plan_of(dist_cfg) == "fsdp":
        from accelerate.utils import save_fsdp_model

        save_fsdp_model(acc.state.fsdp_plugin, acc, trainer.model, out_dir)
        kind = "fsdp_sharded"
    else:
        trainer.save_model(out_dir)  # the ZeRO-3 checkpoint, one file per rank
        kind = "zero_sharded"
    acc.wait_for_everyone()
    if is_main_process():
        model = acc.unwrap_model(trainer.model)
        model.config.save_pretrained(out_dir)
        if getattr(model, "generation_config", None) is not None:
            model.generation_config.save_pretrained(out_dir)
        from pathlib import Path

        (Path(out_dir) / "SHARDED.md").write_text(SHARDED_NOTE.format(kind=kind, folder=final_dir or out_dir))
    return kind


def deepspeed_config_in_use(trainer) -> Optional[dict]:
    """The DeepSpeed JSON after transformers filled its "auto" values."""
    if not trainer.is_deepspeed_enabled:
        return None
    return trainer.accelerator.state.deepspeed_plugin.deepspeed_config
