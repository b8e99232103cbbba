"""The PEFT methods: one module per family, each declaring its ``Method``s
(``fttrain.methods.base``) in a ``METHODS`` tuple, collected here by importing
every module of this package. ``fttrain ls peft`` lists the options; each
family module's docstring says what its methods are.

A new method is a module here (its config class and ``METHODS = (Method(...),)``)
and its YAML in ``fttrain/conf/peft/``; nothing else lists it (CONTRIBUTING.md).
"""

from __future__ import annotations

import importlib
import logging
import pkgutil
from typing import Dict, Optional

from fttrain.errors import PeftSetupError
from fttrain.methods.base import ApplyContext, Method, TrainerHooks

log = logging.getLogger("fttrain")

# Modules of this package that declare no method.
_NOT_FAMILIES = {"base", "targets", "callbacks", "bottleneck_layers"}


def _collect() -> Dict[str, Method]:
    found: Dict[str, Method] = {}
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        if info.name in _NOT_FAMILIES:
            continue
        module = importlib.import_module(f"{__name__}.{info.name}")
        for method in getattr(module, "METHODS", ()):
            if method.name in found:
                raise RuntimeError(f"peft method {method.name!r} is declared twice ({module.__name__})")
            found[method.name] = method
    return found


METHODS: Dict[str, Method] = _collect()


def method_of(peft_cfg_or_name) -> Method:
    """The declaration of a method, from its name or a peft config."""
    name = peft_cfg_or_name if isinstance(peft_cfg_or_name, str) else peft_cfg_or_name.method
    try:
        return METHODS[name]
    except KeyError:
        raise PeftSetupError(f"peft.method={name!r} is not a method fttrain knows; one of {sorted(METHODS)}") from None


def method_by_peft_type(peft_type: str) -> str:
    """The method that wrote an adapter_config.json with this peft_type."""
    peft_type = peft_type.lower()
    for m in METHODS.values():
        if (m.peft_type or m.name) == peft_type:
            return m.name
    return peft_type


def apply_peft(model, peft_cfg, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM", max_steps: int = -1,
               base_path: str = ""):
    """The model to train, with exactly the intended parameters trainable."""
    ctx = ApplyContext(gradient_checkpointing, task_type, max_steps, base_path)
    return method_of(peft_cfg).apply(model, peft_cfg, ctx)


def trainer_hooks(model, peft_cfg, trainer_cfg) -> TrainerHooks:
    return method_of(peft_cfg).hooks(model, peft_cfg, trainer_cfg)


def quantization_config(peft_cfg, precision: str = "fp32"):
    """The BitsAndBytesConfig a method loads its base with (QLoRA); None for the others."""
    quantization = method_of(peft_cfg).quantization
    return quantization(peft_cfg, precision) if quantization else None


def uses_bitsandbytes(peft_cfg) -> bool:
    """Whether the method goes through bitsandbytes: a 4/8-bit base (QLoRA) or
    weights it quantises itself (LoRA's LoftQ initialisation)."""
    method = method_of(peft_cfg)
    return method.quantized_base or method.quantizes(peft_cfg)


def optimizer_args(peft_cfg, optim: str, use_cpu: bool) -> dict:
    """TrainingArguments keywords that pick the optimizer: the method's own
    (GaLore's), otherwise trainer.optim (paged variants unpaged on CPU)."""
    own = method_of(peft_cfg).optimizer
    if own is not None:
        return own(peft_cfg)
    return {"optim": optimizer_for_device(optim, use_cpu)}


def optimizer_package(optim: str) -> Optional[str]:
    """The package a transformers optimizer (trainer.optim) keeps its state with
    beyond torch: "torchao" for its 4/8-bit AdamW, "bitsandbytes" for the 8/32-bit,
    paged, Lion, AdEMAMix and RMSprop ones and GaLore's (galore_torch imports it);
    None for the rest."""
    if optim in ("adamw_torch_4bit", "adamw_torch_8bit"):
        return "torchao"
    if "bnb" in optim or "8bit" in optim or optim.startswith(("paged_", "lion_", "ademamix", "galore_")):
        return "bitsandbytes"
    return None


def optimizer_for_device(optim: str, use_cpu: bool) -> str:
    """bitsandbytes' paged optimizers page state between GPU and CPU memory;
    on CPU there is nothing to page, so the unpaged variant runs instead."""
    if not (use_cpu and optim.startswith("paged_")):
        return optim
    plain = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}.get(optim, optim[len("paged_"):])
    log.warning("trainer.optim=%s pages optimizer state to CPU, which needs a GPU; using %s on CPU", optim, plain)
    return plain
