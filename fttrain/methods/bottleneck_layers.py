"""The bottleneck adapter's layers (torch): attached to a model, saved, loaded.
The method's declaration and config are in ``fttrain.methods.bottleneck``."""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from fttrain.errors import PeftSetupError
from fttrain.methods.bottleneck import (ACTIVATIONS, CHILD, CONFIG_NAME, SUBLAYERS, WEIGHTS_NAME, BottleneckSpec,
                                        read_spec)
from fttrain.models.layers import transformer_layers


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, r: int, activation: str, dropout: float, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.act = getattr(nn, ACTIVATIONS[activation])()
        self.dropout = nn.Dropout(dropout)
        self.up = nn.Linear(r, dim)
        self.scale = scale
        nn.init.zeros_(self.up.weight)  # identity at start: the residual carries h unchanged
        nn.init.zeros_(self.up.bias)

    def forward(self, x):
        return self.scale * self.up(self.dropout(self.act(self.down(x))))


def _hook(placement: str):
    def hook(module, args, kwargs, output):
        adapter = getattr(module, CHILD)
        h = output[0] if isinstance(output, tuple) else output
        src = h if placement == "serial" else (args[0] if args else kwargs["hidden_states"])
        w = adapter.down.weight
        delta = adapter(src.to(w.dtype)).to(h.dtype)
        new = h + delta
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    return hook


def _find_sublayer(layer: nn.Module, kind: str):
    modules = dict(layer.named_modules())
    for name, norm in SUBLAYERS[kind]:
        if name in modules:
            return name, modules[name], norm
    return None, None, None


def add_bottleneck_adapters(model, spec: BottleneckSpec) -> List[str]:
    """Attach adapters to every layer's chosen sublayers; returns their names.
    Freezes nothing: the caller decides what trains."""
    if spec.activation not in ACTIVATIONS:
        raise PeftSetupError(f"peft.activation={spec.activation!r} must be one of {sorted(ACTIVATIONS)}")
    if spec.placement not in ("serial", "parallel"):
        raise PeftSetupError(f"peft.placement={spec.placement!r} must be serial or parallel")
    dim = model.config.hidden_size
    added = []
    for layer_name, layer in transformer_layers(model):
        for kind in spec.sublayers:
            if kind not in SUBLAYERS:
                raise PeftSetupError(f"peft.sublayers: {kind!r} is not one of {sorted(SUBLAYERS)}")
            name, sub, norm = _find_sublayer(layer, kind)
            if sub is None:
                raise PeftSetupError(
                    f"peft=adapter: {type(layer).__name__} ({layer_name}) has none of the {kind} sublayers "
                    f"{[n for n, _ in SUBLAYERS[kind]]}"
                )
            if spec.placement == "parallel" and norm != "pre_norm":
                raise PeftSetupError(
                    f"peft.placement=parallel needs the sublayer's input and output before the residual; "
                    f"{type(model).__name__} is post-norm ({name} feeds a LayerNorm): use placement=serial"
                )
            ref = next(sub.parameters())
            adapter = BottleneckAdapter(dim, spec.r, spec.activation, spec.dropout, spec.scale)
            # fp32 whatever the base's dtype: trainable weights are the optimizer's masters
            # (the hook casts activations in and out).
            adapter.to(device=ref.device, dtype=torch.float32)
            sub.add_module(CHILD, adapter)
            sub.register_forward_hook(_hook(spec.placement), with_kwargs=True)
            added.append(f"{layer_name}.{name}.{CHILD}")
    model._fttrain_bottleneck = spec  # read by save_bottleneck
    return added


def adapter_state_dict(named_params) -> Dict[str, torch.Tensor]:
    return {n: p.detach().cpu().contiguous() for n, p in named_params if f".{CHILD}." in n}


def save_bottleneck(weights: Dict[str, torch.Tensor], spec: BottleneckSpec, folder) -> None:
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if not weights:
        raise RuntimeError("no bottleneck adapter weights to save")
    save_file(weights, str(folder / WEIGHTS_NAME))
    (folder / CONFIG_NAME).write_text(json.dumps({"fttrain_adapter": "bottleneck", **asdict(spec)}, indent=2) + "\n")


def load_bottleneck(model, folder):
    """Attach the adapters described in ``folder`` to ``model`` and load their weights."""
    from safetensors.torch import load_file

    spec = read_spec(folder)
    add_bottleneck_adapters(model, spec)
    weights = load_file(str(Path(folder) / WEIGHTS_NAME))
    expected = set(adapter_state_dict(model.named_parameters()))
    missing, unexpected = expected - set(weights), set(weights) - expected
    if missing or unexpected:
        raise PeftSetupError(
            f"{folder}: adapter weights do not fit this base model "
            f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})"
        )
    model.load_state_dict(weights, strict=False)
    for p in model.parameters():
        p.requires_grad_(False)
    return model
