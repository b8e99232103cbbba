"""The optional packages a run keeps out of its process.

transformers, peft and accelerate import DeepSpeed, bitsandbytes and torchao
whenever they are installed, whether the run uses them or not. On a 2-core
machine (``python -X importtime -m fttrain +exp=tiny_sft``) that is about
1.2 s for deepspeed (accelerate's ``unwrap_model``, in the Trainer's
constructor), 0.9 s for bitsandbytes (``import peft``) and 0.45 s for torchao
(transformers' quantizers): 2.6 s of a 7 s start to the first step.

A single run (``python -m fttrain``; not a sweep, whose trials share one process
and may differ) marks the packages its config has no use for as absent (None in
``sys.modules``). Each library's own check, ``importlib.util.find_spec``, then
reads them as not installed. Kept whenever in doubt: a model whose config.json
is not on this machine yet may be a quantised checkpoint.

``FTTRAIN_IMPORT_ALL=1`` turns it off.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path
from typing import List, Optional

log = logging.getLogger(__name__)

# trainer.optim values that need nothing beyond torch. Any other keeps both packages: most
# are bitsandbytes' or torchao's (fttrain.methods.optimizer_package), and the packages of
# the rest (GaLore, APOLLO, LOMO, ...) may import bitsandbytes themselves.
TORCH_OPTIMIZERS = frozenset({"adamw_torch", "adamw_torch_fused", "adafactor", "sgd", "adagrad", "rmsprop"})
QUANTIZATION_PACKAGES = ("bitsandbytes", "torchao")


def keep_out_unused(cfg) -> List[str]:
    """Mark the packages this run does not use as absent; returns their names."""
    try:
        unused = [p for p in unused_packages(cfg) if p not in sys.modules]
    except Exception:  # a config the checks will refuse (an unknown method, ...): keep everything
        return []
    for package in unused:
        sys.modules[package] = None  # find_spec -> None; `import package` -> ModuleNotFoundError
    if unused:
        log.debug("kept out of this process (unused by the config; FTTRAIN_IMPORT_ALL=1 imports them): %s",
                  ", ".join(unused))
    return unused


def unused_packages(cfg) -> List[str]:
    if os.environ.get("FTTRAIN_IMPORT_ALL", "0") not in ("", "0"):
        return []
    from fttrain.plan import plan_of

    unused = []
    if plan_of(cfg.dist) != "deepspeed" and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false").lower() != "true":
        unused.append("deepspeed")
    if needs_no_quantization(cfg):
        unused += QUANTIZATION_PACKAGES
    return unused


def needs_no_quantization(cfg) -> bool:
    """True when nothing in the run can need bitsandbytes or torchao: a method
    that neither trains on nor makes quantised weights, a torch optimizer, no
    second model (a teacher) and a model whose config.json says it is not quantised."""
    from fttrain.methods import method_of, uses_bitsandbytes

    if uses_bitsandbytes(cfg.peft) or method_of(cfg.peft).optimizer is not None:  # ... or GaLore's (8-bit) own
        return False
    if cfg.trainer.optim not in TORCH_OPTIMIZERS:
        return False
    if getattr(cfg.task, "teacher", ""):  # a run, an export or a hub model: may be quantised
        return False
    model_config = local_model_config(cfg.model)
    return model_config is not None and "quantization_config" not in model_config


def local_model_config(model_cfg) -> Optional[dict]:
    """The model's config.json as this machine has it, without building or
    downloading anything; None when it is not here (or not readable)."""
    from fttrain.models.load import PACKAGE_PREFIX
    from fttrain.models.tiny import BUILTIN_NAME

    name = model_cfg.name_or_path
    if name == BUILTIN_NAME:
        return {}  # fttrain's own tiny Llama, built full-precision
    if name.startswith(PACKAGE_PREFIX):
        return None
    try:
        if os.path.isdir(name):
            path = Path(name) / "config.json"
        else:
            from huggingface_hub import try_to_load_from_cache

            cached = try_to_load_from_cache(name, "config.json", revision=model_cfg.revision)
            if not isinstance(cached, str):
                return None
            path = Path(cached)
        return json.loads(path.read_text())
    except Exception:  # an unreadable or odd source: the loader reports it; here it only means "keep"
        return None
