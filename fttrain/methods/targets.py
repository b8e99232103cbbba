"""Target-module presets ("attention", "query_value", "all_linear") resolved per
architecture, so one config works for Llama, Qwen, Mistral, GPT-2 and BERT."""

from __future__ import annotations

from typing import List

from fttrain.errors import PeftSetupError

# Attention projections by architecture family; the first family whose names
# all exist in the model wins.
ATTENTION_PRESETS = [
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # Llama, Qwen, Mistral, Gemma
    ["query", "key", "value"],  # BERT, RoBERTa, MiniLM
    ["c_attn", "c_proj"],  # GPT-2
    ["query_key_value", "dense"],  # Falcon, GPT-NeoX
]
# Query and value projections only (Hu et al.'s original LoRA targets).
QUERY_VALUE_PRESETS = [
    ["q_proj", "v_proj"],  # Llama, Qwen, Mistral, Gemma
    ["query", "value"],  # BERT, RoBERTa, MiniLM
    ["query_key_value"],  # Falcon, GPT-NeoX: one fused projection
    ["c_attn"],  # GPT-2: one fused projection
]
PRESETS = {"attention": ATTENTION_PRESETS, "query_value": QUERY_VALUE_PRESETS}


def linear_leaf_names(model) -> set:
    import torch.nn as nn

    names = set()
    for n, m in model.named_modules():
        if isinstance(m, nn.Linear) or type(m).__name__ in ("Linear4bit", "Linear8bitLt", "Conv1D"):
            names.add(n.rsplit(".", 1)[-1])
    return names


def resolve_target_modules(model, names: List[str]) -> List[str]:
    from fttrain.models.layers import head_module_names

    if list(names) == ["all_linear"]:
        head = {n.rsplit(".", 1)[-1] for n in head_module_names(model)}
        leaves = sorted(linear_leaf_names(model) - head)
        if not leaves:
            raise PeftSetupError(f"peft.target_modules=[all_linear]: {type(model).__name__} has no Linear layers")
        return leaves
    leaf_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    out: List[str] = []
    for name in names:
        if name in PRESETS:
            for preset in PRESETS[name]:
                if all(p in leaf_names for p in preset):
                    out += preset
                    break
            else:
                raise PeftSetupError(f"peft.target_modules: no known {name} projections in {type(model).__name__}")
        elif name == "all_linear":
            raise PeftSetupError("peft.target_modules: 'all_linear' cannot be combined with other names")
        else:
            if name not in leaf_names:
                raise PeftSetupError(f"peft.target_modules: {type(model).__name__} has no module named {name!r}")
            out.append(name)
    return out


def targets(model, peft_cfg) -> List[str]:
    return resolve_target_modules(model, peft_cfg.target_modules)
