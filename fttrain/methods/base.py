"""What a PEFT method is, declared once.

Each module of ``fttrain.methods`` declares its family's methods as ``Method``
objects in a module-level ``METHODS`` tuple: the config class (its schema,
typed at compose time), how it is applied to a model, what it needs from the
trainer, and the facts the rest of fttrain reads (config checks, plan checks,
the recipe, saving, export and loading). Nothing outside this package names a
method by its string.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, List, Optional, Tuple

from omegaconf import MISSING

ALL_PLANS = ("single", "ddp", "deepspeed", "fsdp")


@dataclass
class PeftConfig:
    """The schema every ``peft`` option extends; ``method`` names its ``Method``."""

    method: str = MISSING


@dataclass
class ApplyContext:
    """What applying a method may need besides the model and its config."""

    gradient_checkpointing: bool = False
    task_type: str = "CAUSAL_LM"  # peft's TaskType name
    max_steps: int = -1
    base_path: str = ""  # the base model's folder, recorded by adapters that save it themselves


@dataclass
class TrainerHooks:
    """What a method needs from the trainer."""

    callbacks: List = field(default_factory=list)
    # (learning_rate, weight_decay) -> the optimizer's parameter groups (LoRA+); None: the Trainer's own.
    param_groups: Optional[Callable] = None
    # () -> parameters trained at a time, where that is not what requires grad at the start (LISA)
    trainable: Optional[Callable] = None


@dataclass
class LaunchFacts:
    """The launch as the plan check sees it, for a method's own launch rules."""

    label: str  # the dist option, for messages
    shards_weights: bool  # ZeRO-3 or FSDP: parameters are partitioned across ranks
    world_size: int
    on_gpu: bool
    precision: str


def apply_peft_library(config_of):
    """``Method.apply`` for a method the peft library implements: ``config_of(model,
    peft_cfg, ctx)`` builds peft's config; the model gets wrapped by get_peft_model."""

    def apply(model, peft_cfg, ctx):
        from peft import get_peft_model

        return get_peft_model(model, config_of(model, peft_cfg, ctx))

    return apply


def importable(module: str) -> bool:
    """Whether an optional package is installed, without importing it."""
    import importlib.util

    return importlib.util.find_spec(module) is not None


# The fttrain extra (pyproject.toml's optional-dependencies) that installs each optional package.
EXTRA_OF = {"bitsandbytes": "qlora", "torchao": "quantize", "galore_torch": "galore",
            "liger_kernel": "liger", "cut_cross_entropy": "cce"}


def install_hint(module: str) -> str:
    return f"pip install 'fttrain[{EXTRA_OF[module]}]'"


def no_problems(*_) -> List[str]:
    return []


def no_hooks(model, peft_cfg, trainer_cfg) -> TrainerHooks:
    return TrainerHooks()


@dataclass(frozen=True)
class Method:
    name: str  # the peft.method value and the schema option (schema/peft/<name>)
    config: type  # its PeftConfig subclass
    # (model, peft_cfg, ApplyContext) -> the model to train, with exactly the intended parameters trainable
    apply: Callable
    whole_model: bool = False  # the model's own weights train: saved (and exported) as a whole model
    saves: str = "peft"  # "peft": a peft adapter folder | "model": the whole model | "bottleneck": fttrain's adapter
    merge_note: Optional[str] = None  # None: merges into the base weights; else why it cannot
    packs: bool = True  # False: adds inputs per sequence (virtual tokens), so rows cannot be packed
    trl_tasks: bool = True  # runs with the TRL tasks (dpo, kto, orpo, rm, grpo)
    decoder_only: bool = False  # built for decoder-only models
    redraws_layers: bool = False  # changes the trainable set during training (DDP must look for unused parameters)
    quantized_base: bool = False  # trains on a 4/8-bit base (bitsandbytes)
    quantizes: Callable = lambda peft_cfg: False  # (peft_cfg) -> quantises weights through bitsandbytes itself
    plans: Tuple[str, ...] = ALL_PLANS  # the dist plans it runs under
    plan_note: str = ""  # why not under the others (shown with the refusal)
    sharded_ok: bool = True  # verified under plans that shard weights (ZeRO-3, FSDP)
    peft_type: Optional[str] = None  # peft's PeftType for it, where that is not its name (adapter_config.json)
    check: Callable = no_problems  # (cfg) -> problems with its knobs and their combinations
    launch_problems: Callable = no_problems  # (peft_cfg, LaunchFacts) -> problems with this launch
    hooks: Callable = no_hooks  # (model, peft_cfg, trainer_cfg) -> TrainerHooks
    optimizer: Optional[Callable] = None  # (peft_cfg) -> TrainingArguments keywords that pick its optimizer
    quantization: Optional[Callable] = None  # (peft_cfg, precision) -> the base's BitsAndBytesConfig
    zero3_problem: Callable = lambda peft_cfg: None  # (peft_cfg) -> why its layers fail under ZeRO-3, or None
    # (trainer, out_dir, named trainable weights gathered whole) -> None: writes the final folder itself
    # (every rank calls it; rank 0 writes). None: the Trainer's save_model.
    save: Optional[Callable] = None
