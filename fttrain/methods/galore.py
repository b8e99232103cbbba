"""GaLore: every weight trains, with the optimizer state in a low-rank projection
(transformers' GaLore optimizers)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List

from fttrain.config.choice import choices
from fttrain.methods.base import LaunchFacts, Method, PeftConfig, importable, install_hint
from fttrain.methods.whole import train_everything
from fttrain.config.bounds import bounded

OPTIMIZERS = {"adamw": "galore_adamw", "adamw_8bit": "galore_adamw_8bit", "adafactor": "galore_adafactor"}
GaloreOptimizer = choices("GaloreOptimizer", OPTIMIZERS, __name__)
Projection = choices("Projection", ("std", "reverse_std", "right", "left", "full"), __name__)


@dataclass
class GaloreConfig(PeftConfig):
    """Full-parameter training with GaLore's low-rank optimizer state."""

    method: str = "galore"
    rank: int = bounded(128, lo=1)  # projection rank: the optimizer state of a d x d weight becomes r x d
    # steps between SVD refreshes of the projection: fewer is slower, tracks better
    update_proj_gap: int = bounded(200, lo=1)
    scale: float = bounded(0.25, lo=0, lo_open=True)
    proj_type: Projection = Projection.std  # std | reverse_std | right | left | full
    # projected matrices; the rest use plain AdamW
    target_modules: List[str] = field(default_factory=lambda: ["all_linear"])
    optimizer: GaloreOptimizer = GaloreOptimizer.adamw  # adamw | adamw_8bit | adafactor
    layerwise: bool = False  # per-layer optimizer steps: less memory; one process only, no grad clipping


def galore_args(peft_cfg) -> dict:
    name = OPTIMIZERS[peft_cfg.optimizer]
    if peft_cfg.layerwise:
        name += "_layerwise"
    targets = list(peft_cfg.target_modules)
    return {
        "optim": name,
        # transformers matches these against module names; "all-linear" is its own preset.
        "optim_target_modules": "all-linear" if targets == ["all_linear"] else targets,
        "optim_args": f"rank={peft_cfg.rank},update_proj_gap={peft_cfg.update_proj_gap},"
                      f"scale={peft_cfg.scale},proj_type={peft_cfg.proj_type}",
    }


def galore_problems(cfg) -> List[str]:
    peft, trainer, out = cfg.peft, cfg.trainer, []
    if peft.rank <= 0 or peft.update_proj_gap <= 0:
        out.append("peft.rank and peft.update_proj_gap must be positive")
    if peft.layerwise and trainer.gradient_accumulation_steps != 1:
        out.append("peft.layerwise=true steps each layer during backward: gradient accumulation is impossible")
    if not importable("galore_torch"):
        out.append(f"peft=galore needs GaLore's optimizers: {install_hint('galore_torch')}")
    if peft.optimizer == "adamw_8bit" and not importable("bitsandbytes"):
        out.append(f"peft.optimizer=adamw_8bit needs bitsandbytes: {install_hint('bitsandbytes')}")
    if trainer.optim != "adamw_torch":
        out.append("peft=galore chooses the optimizer itself (peft.optimizer); leave trainer.optim at adamw_torch")
    return out


def galore_launch_problems(peft_cfg, launch: LaunchFacts) -> List[str]:
    if peft_cfg.layerwise and launch.world_size > 1:
        return ["peft.layerwise=true steps the optimizer inside backward, which DDP's gradient averaging cannot "
                f"follow; it runs on one process only (this launch has {launch.world_size})"]
    return []


METHODS = (
    # GaLore changes the optimizer, not the model.
    Method("galore", GaloreConfig, train_everything, whole_model=True, saves="model", optimizer=galore_args,
           check=galore_problems, launch_problems=galore_launch_problems, plans=("single", "ddp"),
           plan_note="GaLore's optimizer projects whole gradient matrices, which ZeRO and FSDP shard"),
)
