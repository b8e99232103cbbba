"""The plan translated into what accelerate, DeepSpeed and FSDP take: the
TrainingArguments keywords, the DeepSpeed JSON, the FSDP plugin settings, and
the process-group fixes that make the plan asked for the plan that runs."""

from __future__ import annotations

import logging
import os


from fttrain.methods import method_of
from fttrain.plan import Topology, needs_process_group, plan_of, shards_weights

log = logging.getLogger("fttrain")


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


def sharded_save(dist_cfg, peft_method: str) -> bool:
    """Whether each rank writes its own shard of the final weights. Only full
    weights are ever too big to gather on one rank; an adapter is saved whole.
    Under ZeRO-1/2 every rank holds whole weights, so they are saved whole too."""
    return shards_weights(dist_cfg) and dist_cfg.save_format == "sharded" and method_of(peft_method).whole_model


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
        # A method that freezes layers after DDP has wrapped the model (LISA): their gradients go missing.
        "ddp_find_unused_parameters": getattr(dist, "find_unused_parameters", False) or method_of(cfg.peft).redraws_layers,
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
