"""The model's own weights train: all of them (full) or a chosen few (freeze)."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import List

from fttrain.errors import PeftSetupError
from fttrain.methods.base import Method, PeftConfig


@dataclass
class FullConfig(PeftConfig):
    method: str = "full"


@dataclass
class FreezeConfig(PeftConfig):
    """Full weights of a few layers; the rest frozen."""

    method: str = "freeze"
    trainable_layers: int = 2  # the last k decoder layers; negative: the first |k|; 0: none
    # Regexes on parameter names trained in addition (e.g. ["mlp"], ["norm"]).
    trainable_patterns: List[str] = field(default_factory=list)
    train_embeddings: bool = False
    train_head: bool = False


def train_everything(model, peft_cfg=None, ctx=None):
    for p in model.parameters():
        p.requires_grad_(True)
    return model


def apply_freeze(model, peft_cfg, ctx=None):
    from fttrain.models.layers import embedding_param_names, head_param_names, layer_param_names

    layers = layer_param_names(model)
    k = peft_cfg.trainable_layers
    if abs(k) > len(layers):
        raise PeftSetupError(f"peft.trainable_layers={k}: the model has only {len(layers)} layers")
    chosen = layers[len(layers) - k:] if k > 0 else layers[:-k] if k < 0 else []
    train = {n for names in chosen for n in names}
    if peft_cfg.train_embeddings:
        train |= set(embedding_param_names(model))
    if peft_cfg.train_head:
        train |= set(head_param_names(model))
    patterns = [re.compile(p) for p in peft_cfg.trainable_patterns]
    named = dict(model.named_parameters())
    for pat in patterns:
        hits = [n for n in named if pat.search(n)]
        if not hits:
            raise PeftSetupError(f"peft.trainable_patterns: {pat.pattern!r} matches no parameter of {type(model).__name__}")
        train |= set(hits)
    if not train:
        raise PeftSetupError("peft=freeze leaves nothing to train: set trainable_layers, trainable_patterns, "
                             "train_embeddings or train_head")
    for n, p in named.items():
        p.requires_grad_(n in train)
    return model


def freeze_problems(cfg) -> List[str]:
    peft = cfg.peft
    if peft.trainable_layers == 0 and not peft.trainable_patterns and not peft.train_embeddings \
            and not peft.train_head:
        return ["peft=freeze with trainable_layers=0 and nothing else chosen trains nothing"]
    return []


METHODS = (
    Method("full", FullConfig, train_everything, whole_model=True, saves="model"),
    Method("freeze", FreezeConfig, apply_freeze, whole_model=True, saves="model", check=freeze_problems),
)
