"""Load what a run produced, for inference: a whole model, or a base with one
or more adapters (peft's, or fttrain's bottleneck adapters).

Used by ``fttrain.export`` and ``fttrain.generate``. A path may be a run
directory (its ``model/`` is used and its ``config.yaml`` tells how the base
was loaded for training, e.g. 4-bit for QLoRA) or a model/adapter folder.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fttrain.errors import FttrainError
from fttrain.methods import METHODS, method_by_peft_type, quantization_config
from fttrain.methods.bottleneck import is_bottleneck_folder, read_spec
from fttrain.methods.bottleneck_layers import load_bottleneck
from fttrain.models.load import DTYPES, load_causal_lm


class LoadError(FttrainError, ValueError):
    pass


@dataclass
class Loaded:
    model: torch.nn.Module
    tokenizer: object
    kind: str  # "full" | "peft" | "bottleneck"
    base_path: Optional[str]
    folder: Path  # the model or adapter folder
    method: Optional[str]  # the run's peft.method, when known
    quantized: bool = False
    adapters: List[str] = field(default_factory=list)  # peft adapter names loaded


def model_folder(path) -> Path:
    """A run directory -> its model/ folder; a model or adapter folder as is."""
    path = Path(path)
    if not path.exists():
        raise LoadError(f"{path}: no such file or directory")
    if (path / "model").is_dir() and (path / "config.yaml").exists():
        return path / "model"
    return path


def run_dir_of(folder: Path) -> Optional[Path]:
    """The run directory a model folder is the ``model/`` of; None for anything else
    (an export such as RUN/merged is not the run's model, though it sits in the run)."""
    folder = Path(folder)
    return folder.parent if folder.name == "model" and (folder.parent / "config.yaml").exists() else None


def run_config(folder: Path):
    """The run's config.yaml next to model/, if this folder came from a run."""
    from omegaconf import OmegaConf

    cfg_file = folder.parent / "config.yaml"
    return OmegaConf.load(cfg_file) if cfg_file.exists() else None


def folder_kind(folder: Path) -> str:
    if (folder / "adapter_config.json").exists():
        return "peft"
    if is_bottleneck_folder(folder):
        return "bottleneck"
    if (folder / "config.json").exists():
        if (folder / "SHARDED.md").exists():
            raise LoadError(f"{folder} holds sharded weights: merge them first with python -m fttrain.consolidate {folder}")
        return "full"
    raise LoadError(f"{folder} holds neither a model (config.json), a peft adapter (adapter_config.json) "
                    "nor a bottleneck adapter (bottleneck_config.json)")


def adapter_base(folder: Path, base: Optional[str]) -> str:
    if base:
        return base
    if (folder / "adapter_config.json").exists():
        found = json.loads((folder / "adapter_config.json").read_text()).get("base_model_name_or_path")
    else:
        found = read_spec(folder).base_model_name_or_path
    if not found:
        raise LoadError(f"{folder}: the adapter does not name its base model; pass --base")
    if not os.path.isabs(found) and not os.path.exists(found):
        # A relative folder (adapters saved by older runs): relative to where that run started,
        # i.e. above the run directory; tried from the adapter's folder upwards.
        for parent in Path(folder).resolve().parents:
            if (parent / found).is_dir():
                return str(parent / found)
    return found


def adapter_method(folder: Path) -> Optional[str]:
    """The peft option that produced this folder: from the run's config.yaml,
    else from the adapter's own config; None for a whole model of unknown origin."""
    run_cfg = run_config(folder)
    if run_cfg is not None:
        return run_cfg.peft.method
    if (folder / "adapter_config.json").exists():
        return method_by_peft_type(json.loads((folder / "adapter_config.json").read_text()).get("peft_type", ""))
    if is_bottleneck_folder(folder):
        return next(m.name for m in METHODS.values() if m.saves == "bottleneck")
    return None


def training_quantization(run_cfg, folder: Path):
    """The BitsAndBytesConfig the run trained with (QLoRA), else None."""
    if run_cfg is None or run_cfg.peft.method not in METHODS or not METHODS[run_cfg.peft.method].quantized_base:
        return None
    info = folder.parent / "run_info.json"
    precision = json.loads(info.read_text()).get("precision", "fp32") if info.exists() else "fp32"
    return quantization_config(run_cfg.peft, precision)


def load_for_inference(path, base: Optional[str] = None, dtype: str = "fp32", quantized: Optional[bool] = None,
                       extra_adapters: Optional[Dict[str, str]] = None) -> Loaded:
    """Load a run's result ready for generate().

    quantized: load a QLoRA run's base 4-/8-bit as it trained (None: do so when
    the run was QLoRA). extra_adapters: more peft adapters {name: folder} put
    on the same base (the first one's name is "default").
    """
    from transformers import AutoTokenizer

    folder = model_folder(path)
    kind = folder_kind(folder)
    if extra_adapters and kind != "peft":
        raise LoadError("more adapters can only be added to a peft adapter on a base")
    run_cfg = run_config(folder)
    method = adapter_method(folder)
    torch_dtype = DTYPES[dtype]
    tokenizer = AutoTokenizer.from_pretrained(folder if (folder / "tokenizer_config.json").exists() else
                                              adapter_base(folder, base))
    if kind == "full":
        model = load_causal_lm(str(folder), torch_dtype)
        loaded = Loaded(model, tokenizer, kind, None, folder, method)
    else:
        base_path = adapter_base(folder, base)
        quant = None
        if quantized is None or quantized:
            quant = training_quantization(run_cfg, folder)
            if quantized and quant is None:
                raise LoadError(f"{folder}: quantized loading asked for, but the run was not QLoRA")
        model = load_causal_lm(base_path, torch_dtype, quant)
        if kind == "bottleneck":
            model = load_bottleneck(model, folder)
            loaded = Loaded(model, tokenizer, kind, base_path, folder, method)
        else:
            from peft import PeftModel

            model = PeftModel.from_pretrained(model, str(folder), adapter_name="default")
            names = ["default"]
            for name, other in (extra_adapters or {}).items():
                model.load_adapter(str(model_folder(other)), adapter_name=name)
                names.append(name)
            loaded = Loaded(model, tokenizer, kind, base_path, folder, method, quant is not None, names)
    loaded.model.eval()
    if tokenizer.pad_token_id is None:
        from fttrain.models.load import ensure_pad_token

        ensure_pad_token(tokenizer)
    return loaded
