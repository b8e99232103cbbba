"""LISA: layerwise importance sampling (Pan et al. 2024).

Every ``switch_every`` optimizer steps, ``active_layers`` transformer layers
are drawn at random; only they (plus embeddings and head, if chosen) have
``requires_grad``. The optimizer is built over every layer once (see
``apply_lisa``), so no rebuild is needed; at each switch
the optimizer state of the layers that stop training is dropped, which is
where LISA's memory saving comes from, and the newly active layers start with
fresh Adam moments (as they would in a freshly built optimizer). Frozen
parameters get no gradient, and AdamW skips parameters without one, so an
inactive layer is not touched (not even by weight decay).

The draw for period k depends only on (seed, k), so a resumed run activates
the same layers as an uninterrupted one.
"""

from __future__ import annotations

import logging
import random
from dataclasses import dataclass
from typing import List

from fttrain.errors import PeftSetupError
from fttrain.methods.base import Method, PeftConfig, TrainerHooks
from fttrain.config.bounds import bounded

log = logging.getLogger("fttrain")


@dataclass
class LisaConfig(PeftConfig):
    """Layerwise importance sampling: a few random layers learn at a time."""

    method: str = "lisa"
    active_layers: int = bounded(2, lo=1)  # decoder layers unfrozen at a time
    switch_every: int = bounded(20, lo=1)  # steps between re-draws
    train_embeddings: bool = True
    train_head: bool = True


def apply_lisa(model, peft_cfg, ctx=None):
    """Every layer starts trainable, so the optimizer is built over all of
    them; LisaCallback freezes all but the drawn ones before the first step."""
    from fttrain.models.layers import embedding_param_names, head_param_names, layer_param_names

    n_layers = len(layer_param_names(model))
    if not 0 < peft_cfg.active_layers <= n_layers:
        raise PeftSetupError(f"peft.active_layers={peft_cfg.active_layers} must be in 1..{n_layers} (the model's layers)")
    fixed_off = set()
    if not peft_cfg.train_embeddings:
        fixed_off |= set(embedding_param_names(model))
    if not peft_cfg.train_head:
        fixed_off |= set(head_param_names(model))
    for n, p in model.named_parameters():
        p.requires_grad_(n not in fixed_off)
    return model


def lisa_hooks(model, peft_cfg, trainer_cfg) -> TrainerHooks:
    from fttrain.methods.callbacks import LisaCallback

    callback = LisaCallback(model, peft_cfg, trainer_cfg.seed)
    # Every layer is trainable until the first draw; a draw trains active_layers of them.
    return TrainerHooks(callbacks=[callback], trainable=callback.active_count)


def lisa_problems(cfg) -> List[str]:
    if cfg.peft.active_layers <= 0 or cfg.peft.switch_every <= 0:
        return ["peft.active_layers and peft.switch_every must be positive"]
    return []


def draw_layers(seed: int, period: int, num_layers: int, k: int) -> List[int]:
    rng = random.Random(seed * 1_000_003 + period)
    return sorted(rng.sample(range(num_layers), k))


METHODS = (
    Method("lisa", LisaConfig, apply_lisa, whole_model=True, saves="model", redraws_layers=True, trl_tasks=False,
           hooks=lisa_hooks, check=lisa_problems, plans=("single", "ddp"),
           plan_note="LISA freezes and unfreezes layers during training, while ZeRO and FSDP fix the trainable set "
                     "when they wrap the model"),
)
