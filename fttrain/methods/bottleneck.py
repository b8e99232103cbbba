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
from dataclasses import dataclass, field
from pathlib import Path
from typing import List

from fttrain.config.choice import choices
from fttrain.methods.base import Method, PeftConfig
from fttrain.config.bounds import bounded

CONFIG_NAME = "bottleneck_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
CHILD = "bottleneck_adapter"
ACTIVATIONS = {"gelu": "GELU", "relu": "ReLU", "silu": "SiLU", "tanh": "Tanh"}  # torch.nn classes
Activation = choices("Activation", ACTIVATIONS, __name__)
Placement = choices("Placement", ("serial", "parallel"), __name__)
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
    r: int = bounded(64, lo=1)  # bottleneck width: d -> r -> d
    activation: Activation = Activation.gelu  # gelu | relu | silu | tanh
    # serial: h + up(act(down(h))) on the sublayer's output (Houlsby et al.).
    # parallel: sublayer(x) + scale * up(act(down(x))) on its input (He et al.).
    placement: Placement = Placement.serial
    scale: float = bounded(1.0, lo=0, lo_open=True)  # multiplies the adapter's output (He et al. use 4 for parallel)
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)
    sublayers: List[str] = field(default_factory=lambda: ["attention", "ffn"])  # drop one to adapt only the other


@dataclass
class BottleneckSpec:
    r: int = bounded(64, lo=1)
    activation: str = "gelu"
    placement: str = "serial"
    scale: float = bounded(1.0, lo=0, lo_open=True)
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)
    sublayers: List[str] = field(default_factory=lambda: ["attention", "ffn"])
    base_model_name_or_path: str = ""

    @classmethod
    def from_cfg(cls, peft_cfg, base: str = "") -> "BottleneckSpec":
        return cls(r=peft_cfg.r, activation=peft_cfg.activation, placement=peft_cfg.placement,
                   scale=float(peft_cfg.scale), dropout=float(peft_cfg.dropout),
                   sublayers=list(peft_cfg.sublayers), base_model_name_or_path=base)


def is_bottleneck_folder(folder) -> bool:
    return (Path(folder) / CONFIG_NAME).exists()


def read_spec(folder) -> BottleneckSpec:
    raw = json.loads((Path(folder) / CONFIG_NAME).read_text())
    raw.pop("fttrain_adapter", None)
    return BottleneckSpec(**raw)


def apply_bottleneck(model, peft_cfg, ctx):
    from fttrain.methods.bottleneck_layers import add_bottleneck_adapters

    for p in model.parameters():
        p.requires_grad_(False)
    add_bottleneck_adapters(model, BottleneckSpec.from_cfg(peft_cfg, ctx.base_path))
    return model


def save_trained(trainer, out_dir, trainable_weights) -> None:
    """The final folder: the adapter's weights only, its spec, and the base's config."""
    from fttrain.env import is_main_process
    from fttrain.methods.bottleneck_layers import adapter_state_dict, save_bottleneck

    weights = adapter_state_dict(trainable_weights)
    if is_main_process():
        model = trainer.accelerator.unwrap_model(trainer.model)
        save_bottleneck(weights, model._fttrain_bottleneck, out_dir)
        model.config.save_pretrained(out_dir)


def bottleneck_problems(cfg) -> List[str]:
    peft, out = cfg.peft, []
    if peft.r <= 0:
        out.append(f"peft.r={peft.r} must be positive")
    bad = [x for x in peft.sublayers if x not in SUBLAYERS]
    if bad or not peft.sublayers:
        out.append(f"peft.sublayers={list(peft.sublayers)} must be a non-empty subset of {sorted(SUBLAYERS)}")
    return out


METHODS = (
    Method("adapter", BottleneckConfig, apply_bottleneck, saves="bottleneck", save=save_trained, trl_tasks=False,
           sharded_ok=False,
           merge_note="bottleneck adapters are nonlinear (d -> r -> d with an activation)", check=bottleneck_problems),
)
