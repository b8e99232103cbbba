"""Bottleneck adapters (Houlsby et al. 2019; parallel form from He et al. 2022).

PEFT has no such method, so fttrain carries this small module. Each adapted
sublayer (attention, FFN) of every transformer layer gets

    serial:    out = h + s * up(act(down(h)))       h = sublayer(x)   (Houlsby)
    parallel:  out = h + s * up(act(down(x)))       x = sublayer input (He et al.)

``up`` starts at zero, so a freshly adapted model computes exactly what the
base model computes. The adapter is attached as a child module of the
sublayer (its weights are named ``...self_attn.bottleneck_adapter.down.weight``)
and called from a forward hook, so the base model's own module names and
forward code stay untouched.

Saved as ``adapter_model.safetensors`` (adapter weights only) plus
``bottleneck_config.json``; ``load_bottleneck`` puts them back on a base.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List

import torch
from torch import nn

from fttrain.errors import PeftSetupError
from fttrain.methods.base import Method, PeftConfig
from fttrain.models.layers import transformer_layers

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CHILD = "bottleneck_adapter"
ACTIVATIONS = {"gelu": nn.GELU, "relu": nn.ReLU, "silu": nn.SiLU, "tanh": nn.Tanh}
# Sublayer names inside one transformer layer, first match wins. The pre-norm
# names (Llama family) take the sublayer's input and output before the
# residual; the BERT names are the output projections before the residual
# and LayerNorm, where Houlsby et al. put the adapter.
SUBLAYERS = {
    "attention": [("self_attn", "pre_norm"), ("attention.output.dense", "post_norm"), ("attn", "pre_norm")],
    "ffn": [("mlp", "pre_norm"), ("output.dense", "post_norm"), ("feed_forward", "pre_norm")],
}


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters after attention and FFN."""

    method: str = "adapter"
    r: int = 64  # bottleneck width: d -> r -> d
    activation: str = "gelu"  # gelu | relu | silu | tanh
    # serial: h + up(act(down(h))) on the sublayer's output (Houlsby et al.).
    # parallel: sublayer(x) + scale * up(act(down(x))) on its input (He et al.).
    placement: str = "serial"
    scale: float = 1.0  # multiplies the adapter's output (He et al. use 4 for parallel)
    dropout: float = 0.0
    sublayers: List[str] = field(default_factory=lambda: ["attention", "ffn"])


@dataclass
class BottleneckSpec:
    r: int = 64
    activation: str = "gelu"
    placement: str = "serial"
    scale: float = 1.0
    dropout: float = 0.0
    sublayers: List[str] = field(default_factory=lambda: ["attention", "ffn"])
    base_model_name_or_path: str = ""

    @classmethod
    def from_cfg(cls, peft_cfg, base: str = "") -> "BottleneckSpec":
        return cls(r=peft_cfg.r, activation=peft_cfg.activation, placement=peft_cfg.placement,
                   scale=float(peft_cfg.scale), dropout=float(peft_cfg.dropout),
                   sublayers=list(peft_cfg.sublayers), base_model_name_or_path=base)


class BottleneckAdapter(nn.Module):
    def __init__(self, dim: int, r: int, activation: str, dropout: float, scale: float):
        super().__init__()
        self.down = nn.Linear(dim, r)
        self.act = ACTIVATIONS[activation]()
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


def is_bottleneck_folder(folder) -> bool:
    return (Path(folder) / CONFIG_NAME).exists()


def read_spec(folder) -> BottleneckSpec:
    raw = json.loads((Path(folder) / CONFIG_NAME).read_text())
    raw.pop("fttrain_adapter", None)
    return BottleneckSpec(**raw)


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


def apply_bottleneck(model, peft_cfg, ctx):
    for p in model.parameters():
        p.requires_grad_(False)
    add_bottleneck_adapters(model, BottleneckSpec.from_cfg(peft_cfg, ctx.base_path))
    return model


def save_trained(trainer, out_dir, trainable_weights) -> None:
    """The final folder: the adapter's weights only, its spec, and the base's config."""
    from fttrain.env import is_main_process

    weights = adapter_state_dict(trainable_weights)
    if is_main_process():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_bottleneck(weights, model._fttrain_bottleneck, out_dir)
        model.config.save_pretrained(out_dir)


def bottleneck_problems(cfg) -> List[str]:
    peft, out = cfg.peft, []
    if peft.r <= 0:
        out.append(f"peft.r={peft.r} must be positive")
    if peft.activation not in ACTIVATIONS:
        out.append(f"peft.activation={peft.activation!r} must be one of {sorted(ACTIVATIONS)}")
    if peft.placement not in ("serial", "parallel"):
        out.append(f"peft.placement={peft.placement!r} must be serial or parallel")
    bad = [x for x in peft.sublayers if x not in SUBLAYERS]
    if bad or not peft.sublayers:
        out.append(f"peft.sublayers={list(peft.sublayers)} must be a non-empty subset of {sorted(SUBLAYERS)}")
    return out


METHODS = (
    Method("adapter", BottleneckConfig, apply_bottleneck, saves="bottleneck", save=save_trained, trl_tasks=False,
           sharded_ok=False,
           merge_note="bottleneck adapters are nonlinear (d -> r -> d with an activation)", check=bottleneck_problems),
)
