"""Apply the ``peft`` group to a loaded model.

Each method is one small function. ``full`` trains every weight; the LoRA
family goes through the ``peft`` library. Target-module presets are resolved
per architecture so that one config works for Llama, Qwen, Mistral and BERT.
"""

from __future__ import annotations

from typing import List, Union

# Attention projections by architecture family; the first family whose names
# all exist in the model wins.
ATTENTION_PRESETS = [
    ["q_proj", "k_proj", "v_proj", "o_proj"],  # Llama, Qwen, Mistral, Gemma
    ["query", "key", "value"],  # BERT, RoBERTa, MiniLM
    ["c_attn", "c_proj"],  # GPT-2
    ["query_key_value", "dense"],  # Falcon, GPT-NeoX
]


def resolve_target_modules(model, names: List[str]) -> Union[str, List[str]]:
    if list(names) == ["all_linear"]:
        return "all-linear"  # peft: every Linear except the output head
    leaf_names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    out: List[str] = []
    for name in names:
        if name == "attention":
            for preset in ATTENTION_PRESETS:
                if all(p in leaf_names for p in preset):
                    out += preset
                    break
            else:
                raise ValueError(f"peft.target_modules: no known attention projections in {type(model).__name__}")
        elif name == "all_linear":
            raise ValueError("peft.target_modules: 'all_linear' cannot be combined with other names")
        else:
            if name not in leaf_names:
                raise ValueError(f"peft.target_modules: {type(model).__name__} has no module named {name!r}")
            out.append(name)
    return out


def lora_config(model, peft_cfg, task_type: str = "CAUSAL_LM"):
    from peft import LoraConfig

    init = {"default": True, "gaussian": "gaussian", "pissa": "pissa"}[peft_cfg.init]
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        bias=peft_cfg.bias,
        target_modules=resolve_target_modules(model, peft_cfg.target_modules),
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        use_rslora=peft_cfg.use_rslora,
        use_dora=peft_cfg.use_dora,
        init_lora_weights=init,
        task_type=task_type,
    )


def quantization_config(peft_cfg):
    """BitsAndBytes settings for ``peft=qlora``; None for other methods."""
    if peft_cfg.method != "qlora":
        return None
    import torch
    from transformers import BitsAndBytesConfig

    compute = getattr(torch, peft_cfg.compute_dtype)
    if peft_cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant_type,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=compute,
        bnb_4bit_quant_storage=getattr(torch, peft_cfg.quant_storage) if peft_cfg.quant_storage else torch.uint8,
    )


def apply_peft(model, peft_cfg, gradient_checkpointing: bool):
    method = peft_cfg.method
    if method == "full":
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method in ("lora", "qlora"):
        from peft import get_peft_model, prepare_model_for_kbit_training

        if method == "qlora":
            # Norms to fp32 and input grads on, so checkpointed k-bit layers backprop.
            model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
        return get_peft_model(model, lora_config(model, peft_cfg))
    raise ValueError(f"peft.method: {method!r} is not implemented")
