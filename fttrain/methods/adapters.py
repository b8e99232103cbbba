"""peft's other adapters: IA3, VeRA, LoHa and LoKr (LyCORIS), OFT, AdaLoRA."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from fttrain.methods.base import Method, PeftConfig, TrainerHooks, apply_peft_library
from fttrain.methods.targets import resolve_target_modules, targets
from fttrain.config.bounds import bounded


@dataclass
class IA3Config(PeftConfig):
    method: str = "ia3"
    # null: peft's per-architecture defaults (Llama: k_proj, v_proj, down_proj).
    target_modules: Optional[List[str]] = None
    feedforward_modules: Optional[List[str]] = None  # scaled on their input, not output


@dataclass
class VeraConfig(PeftConfig):
    method: str = "vera"
    r: int = bounded(256, lo=1)  # shared random matrices are cheap: VeRA uses far higher ranks than LoRA
    # targets must share one shape per kind (q/v on GQA models differ: name them)
    target_modules: List[str] = field(default_factory=lambda: ["attention"])
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)


@dataclass
class LycorisConfig(PeftConfig):
    """LoHa and LoKr (the LyCORIS family) take the same knobs."""

    r: int = bounded(8, lo=1)
    alpha: int = bounded(8, lo=0, lo_open=True)
    # module dropout: a whole adapted module is skipped with this probability
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)
    target_modules: List[str] = field(default_factory=lambda: ["attention"])


@dataclass
class LohaConfig(LycorisConfig):
    method: str = "loha"


@dataclass
class LokrConfig(LycorisConfig):
    method: str = "lokr"


@dataclass
class OftConfig(PeftConfig):
    method: str = "oft"
    block_size: int = bounded(32, lo=1)  # orthogonal blocks of this size; must divide each target's input width
    target_modules: List[str] = field(default_factory=lambda: ["attention"])
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)


@dataclass
class AdaLoraConfig(PeftConfig):
    """LoRA whose rank budget is reallocated by importance during training."""

    method: str = "adalora"
    init_r: int = bounded(12, lo=1)  # rank each module starts with
    target_r: int = bounded(8, lo=1)  # average rank left at the end
    tinit: int = bounded(0, lo=0)  # steps before pruning starts
    tfinal: int = bounded(0, lo=0)  # steps at the end with the final budget fixed
    delta_t: int = bounded(1, lo=1)  # steps between budget reallocations
    alpha: int = bounded(32, lo=0, lo_open=True)
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)
    target_modules: List[str] = field(default_factory=lambda: ["attention"])


def ia3_config(model, c, ctx):
    import peft

    t = list(c.target_modules) if c.target_modules else None
    ff = list(c.feedforward_modules) if c.feedforward_modules else None
    return peft.IA3Config(target_modules=t and resolve_target_modules(model, t), feedforward_modules=ff,
                          task_type=ctx.task_type)


def vera_config(model, c, ctx):
    import peft

    return peft.VeraConfig(r=c.r, target_modules=targets(model, c), vera_dropout=c.dropout, task_type=ctx.task_type)


def lycoris_config(cls_name):
    def config_of(model, c, ctx):
        import peft

        return getattr(peft, cls_name)(r=c.r, alpha=c.alpha, module_dropout=c.dropout,
                                       target_modules=targets(model, c), task_type=ctx.task_type)

    return config_of


def oft_config(model, c, ctx):
    import peft

    return peft.OFTConfig(r=0, oft_block_size=c.block_size, module_dropout=c.dropout, target_modules=targets(model, c),
                          task_type=ctx.task_type)


def adalora_config(model, c, ctx):
    import peft

    return peft.AdaLoraConfig(init_r=c.init_r, target_r=c.target_r, tinit=c.tinit, tfinal=c.tfinal,
                              deltaT=c.delta_t, lora_alpha=c.alpha, lora_dropout=c.dropout, total_step=ctx.max_steps,
                              target_modules=targets(model, c), task_type=ctx.task_type)


def adalora_hooks(model, peft_cfg, trainer_cfg) -> TrainerHooks:
    from fttrain.methods.callbacks import AdaLoraBudget

    return TrainerHooks(callbacks=[AdaLoraBudget(model)])


def adalora_problems(cfg) -> List[str]:
    peft, out = cfg.peft, []
    if cfg.trainer.max_steps <= 0:
        out.append("peft=adalora lays its rank budget out over the whole run: set trainer.max_steps > 0")
    if not 0 < peft.target_r <= peft.init_r:
        out.append(f"peft.target_r={peft.target_r} must be in 1..peft.init_r ({peft.init_r})")
    return out


def fails_under_zero3(name):
    # Tried on 2 CPU ranks: these peft layers read the shapes of base weights that ZeRO-3 has
    # partitioned (size 0 outside a forward pass) and fail. They run under FSDP, which gathers whole layers.
    return lambda peft_cfg: f"peft={name}"


METHODS = (
    Method("ia3", IA3Config, apply_peft_library(ia3_config), zero3_problem=fails_under_zero3("ia3")),
    Method("vera", VeraConfig, apply_peft_library(vera_config), zero3_problem=fails_under_zero3("vera")),
    Method("loha", LohaConfig, apply_peft_library(lycoris_config("LoHaConfig")), zero3_problem=fails_under_zero3("loha")),
    Method("lokr", LokrConfig, apply_peft_library(lycoris_config("LoKrConfig")), zero3_problem=fails_under_zero3("lokr")),
    Method("oft", OftConfig, apply_peft_library(oft_config)),
    Method("adalora", AdaLoraConfig, apply_peft_library(adalora_config), hooks=adalora_hooks, check=adalora_problems,
           plans=("single", "ddp"),
           plan_note="AdaLoRA ranks modules by their gradients after each step, which DeepSpeed does not keep and "
                     "FSDP shards (it fails there)"),
)
