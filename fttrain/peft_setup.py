"""Apply the ``peft`` group to a loaded model: one small function per method.

    full, freeze, lisa, galore     the model's own weights (some or all) train
    lora family, qlora             peft's LoraConfig (rsLoRA, DoRA, PiSSA, LoftQ, LoRA+)
    ia3 vera loha lokr oft adalora peft's other adapters
    prompt/prefix/p_tuning,        peft's virtual-token methods
      llama_adapter
    adapter                        fttrain's bottleneck adapters (fttrain.bottleneck)

Target-module presets ("attention", "query_value", "all_linear") are resolved per
architecture so one config works for Llama, Qwen, Mistral and BERT. What a
method needs from the trainer (an optimizer with LoRA+ groups, GaLore's
optimizer, LISA's or AdaLoRA's callback) is returned by ``trainer_hooks``.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, field
from typing import Callable, List, Optional

import torch
from transformers import TrainerCallback

from fttrain.errors import PeftSetupError

log = logging.getLogger("fttrain")


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
LORA_FAMILY = ("lora", "qlora")
VIRTUAL_TOKEN = ("prompt_tuning", "prefix_tuning", "p_tuning")
# Methods whose result is the model's own weights (saved as a whole model).
WHOLE_MODEL = ("full", "freeze", "lisa", "galore")
INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}


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


# ------------------------------------------------------------ peft configs
def resolved_compute_dtype(peft_cfg, precision: str) -> str:
    """peft.compute_dtype, with "auto" following the run's precision."""
    if peft_cfg.compute_dtype != "auto":
        return peft_cfg.compute_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def lora_config(model, peft_cfg, task_type: str = "CAUSAL_LM"):
    from peft import LoftQConfig, LoraConfig

    extra = {}
    if peft_cfg.init == "loftq":
        extra["loftq_config"] = LoftQConfig(loftq_bits=peft_cfg.loftq_bits)
    return LoraConfig(
        r=peft_cfg.r,
        lora_alpha=peft_cfg.alpha,
        lora_dropout=peft_cfg.dropout,
        bias=peft_cfg.bias,
        target_modules=resolve_target_modules(model, peft_cfg.target_modules),
        modules_to_save=list(peft_cfg.modules_to_save) or None,
        use_rslora=peft_cfg.use_rslora,
        use_dora=peft_cfg.use_dora,
        init_lora_weights=INIT[peft_cfg.init],
        task_type=task_type,
        **extra,
    )


def peft_library_config(model, peft_cfg, task_type: str = "CAUSAL_LM", max_steps: int = -1):
    """The peft library's config object for every method it implements."""
    import peft

    m = peft_cfg.method
    targets = lambda: resolve_target_modules(model, peft_cfg.target_modules)  # noqa: E731
    if m in LORA_FAMILY:
        return lora_config(model, peft_cfg, task_type)
    if m == "ia3":
        t = list(peft_cfg.target_modules) if peft_cfg.target_modules else None
        ff = list(peft_cfg.feedforward_modules) if peft_cfg.feedforward_modules else None
        return peft.IA3Config(target_modules=t and resolve_target_modules(model, t), feedforward_modules=ff,
                              task_type=task_type)
    if m == "vera":
        return peft.VeraConfig(r=peft_cfg.r, target_modules=targets(), vera_dropout=peft_cfg.dropout, task_type=task_type)
    if m in ("loha", "lokr"):
        cls = peft.LoHaConfig if m == "loha" else peft.LoKrConfig
        return cls(r=peft_cfg.r, alpha=peft_cfg.alpha, module_dropout=peft_cfg.dropout, target_modules=targets(),
                   task_type=task_type)
    if m == "oft":
        return peft.OFTConfig(r=0, oft_block_size=peft_cfg.block_size, module_dropout=peft_cfg.dropout,
                              target_modules=targets(), task_type=task_type)
    if m == "adalora":
        return peft.AdaLoraConfig(init_r=peft_cfg.init_r, target_r=peft_cfg.target_r, tinit=peft_cfg.tinit,
                                  tfinal=peft_cfg.tfinal, deltaT=peft_cfg.delta_t, lora_alpha=peft_cfg.alpha,
                                  lora_dropout=peft_cfg.dropout, total_step=max_steps, target_modules=targets(),
                                  task_type=task_type)
    if m == "prompt_tuning":
        init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": peft_cfg.init_text,
                "tokenizer_name_or_path": model.name_or_path} if peft_cfg.init_text else {}
        return peft.PromptTuningConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens, task_type=task_type, **init)
    if m == "prefix_tuning":
        return peft.PrefixTuningConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens,
                                       prefix_projection=peft_cfg.projection,
                                       encoder_hidden_size=peft_cfg.encoder_hidden_size, task_type=task_type)
    if m == "p_tuning":
        return peft.PromptEncoderConfig(num_virtual_tokens=peft_cfg.num_virtual_tokens,
                                        encoder_hidden_size=peft_cfg.encoder_hidden_size,
                                        encoder_reparameterization_type=peft_cfg.encoder_type, task_type=task_type)
    if m == "llama_adapter":
        n_layers = model.config.num_hidden_layers
        if peft_cfg.adapter_layers > n_layers:
            raise PeftSetupError(f"peft.adapter_layers={peft_cfg.adapter_layers} exceeds the model's {n_layers} layers")
        return peft.AdaptionPromptConfig(adapter_len=peft_cfg.adapter_len, adapter_layers=peft_cfg.adapter_layers,
                                         task_type=task_type)
    raise PeftSetupError(f"peft.method: {m!r} is not a peft library method")


def quantization_config(peft_cfg, precision: str = "fp32"):
    """BitsAndBytes settings for ``peft=qlora``; None for other methods."""
    if peft_cfg.method != "qlora":
        return None
    from transformers import BitsAndBytesConfig

    if peft_cfg.bits == 8:
        return BitsAndBytesConfig(load_in_8bit=True)
    compute = resolved_compute_dtype(peft_cfg, precision)
    return BitsAndBytesConfig(
        load_in_4bit=True,
        bnb_4bit_quant_type=peft_cfg.quant_type,
        bnb_4bit_use_double_quant=peft_cfg.double_quant,
        bnb_4bit_compute_dtype=getattr(torch, compute),
        bnb_4bit_quant_storage=getattr(torch, peft_cfg.quant_storage) if peft_cfg.quant_storage else torch.uint8,
    )


# ------------------------------------------------------------- apply
def apply_peft(model, peft_cfg, gradient_checkpointing: bool, task_type: str = "CAUSAL_LM", max_steps: int = -1,
               base_path: str = ""):
    """Return the model to train, with exactly the intended parameters trainable."""
    method = peft_cfg.method
    if method == "full" or method == "galore":  # GaLore changes the optimizer, not the model
        for p in model.parameters():
            p.requires_grad_(True)
        return model
    if method == "freeze":
        return apply_freeze(model, peft_cfg)
    if method == "lisa":
        return apply_lisa(model, peft_cfg)
    if method == "adapter":
        return apply_bottleneck(model, peft_cfg, base_path)
    from peft import get_peft_model, prepare_model_for_kbit_training

    if method == "qlora":
        if not linear_leaf_names(model):
            raise PeftSetupError(f"peft=qlora: {type(model).__name__} has no Linear layers to quantise")
        # Norms to fp32 and input grads on, so checkpointed k-bit layers backprop.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=gradient_checkpointing)
    return get_peft_model(model, peft_library_config(model, peft_cfg, task_type, max_steps))


def apply_freeze(model, peft_cfg):
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


def apply_lisa(model, peft_cfg):
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


def apply_bottleneck(model, peft_cfg, base_path: str):
    from fttrain.bottleneck import BottleneckSpec, add_bottleneck_adapters

    for p in model.parameters():
        p.requires_grad_(False)
    add_bottleneck_adapters(model, BottleneckSpec.from_cfg(peft_cfg, base_path))
    return model


# -------------------------------------------------- what the trainer needs
@dataclass
class TrainerHooks:
    callbacks: List = field(default_factory=list)
    # (learning_rate, weight_decay) -> the optimizer's parameter groups (LoRA+); None: the Trainer's own.
    param_groups: Optional[Callable] = None


def trainer_hooks(model, peft_cfg, trainer_cfg) -> TrainerHooks:
    hooks = TrainerHooks()
    m = peft_cfg.method
    if m == "lisa":
        from fttrain.lisa import LisaCallback

        hooks.callbacks.append(LisaCallback(model, peft_cfg, trainer_cfg.seed))
    if m == "adalora":
        hooks.callbacks.append(AdaLoraBudget(model))
    if m in LORA_FAMILY and peft_cfg.loraplus_lr_ratio:
        hooks.param_groups = lambda lr, wd: loraplus_param_groups(model, lr, wd, peft_cfg.loraplus_lr_ratio)
    return hooks


def loraplus_param_groups(model, lr: float, weight_decay: float, ratio: float):
    """LoRA+ (Hayou et al. 2024): B matrices at lr x ratio. Embedding adapters
    (lora_embedding_B) count as B. Biases and norms get no weight decay."""
    groups = {"A": [], "B": [], "no_decay": []}
    for n, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if "lora_B" in n or "lora_embedding_B" in n:
            groups["B"].append(p)
        elif p.ndim < 2:
            groups["no_decay"].append(p)
        else:
            groups["A"].append(p)
    out = [
        {"params": groups["A"], "lr": lr, "weight_decay": weight_decay},
        {"params": groups["B"], "lr": lr * ratio, "weight_decay": weight_decay},
        {"params": groups["no_decay"], "lr": lr, "weight_decay": 0.0},
    ]
    return [g for g in out if g["params"]]


def optimizer_args(peft_cfg, optim: str, use_cpu: bool) -> dict:
    """TrainingArguments keywords that pick the optimizer: GaLore's when
    peft=galore, otherwise trainer.optim (paged variants unpaged on CPU)."""
    if peft_cfg.method == "galore":
        return galore_args(peft_cfg)
    return {"optim": optimizer_for_device(optim, use_cpu)}


def galore_args(peft_cfg) -> dict:
    name = {"adamw": "galore_adamw", "adamw_8bit": "galore_adamw_8bit", "adafactor": "galore_adafactor"}[peft_cfg.optimizer]
    if peft_cfg.layerwise:
        name += "_layerwise"
    targets = list(peft_cfg.target_modules)
    return {
        "optim": name,
        # transformers matches these against module names; "all-linear" is its own preset.
        "optim_target_modules": "all-linear" if targets == ["all_linear"] else targets,
        "optim_args": f"rank={peft_cfg.rank},update_proj_gap={peft_cfg.update_proj_gap},"
                      f"scale={peft_cfg.scale},proj_type={peft_cfg.proj_type}",
    }


class AdaLoraBudget(TrainerCallback):
    """AdaLoRA reallocates ranks from gradient-based importance after each
    optimizer step; the Trainer does not call it, so this callback does."""

    def __init__(self, model):
        self.model = model

    def on_optimizer_step(self, args, state, control, **kwargs):
        # Gradients are still there (zeroed after this event); this is step global_step + 1.
        self.model.base_model.update_and_allocate(state.global_step + 1)


# ------------------------------------------------------ optimizer choice
def optimizer_for_device(optim: str, use_cpu: bool) -> str:
    """bitsandbytes' paged optimizers page state between GPU and CPU memory;
    on CPU there is nothing to page, so the unpaged variant runs instead."""
    if not (use_cpu and optim.startswith("paged_")):
        return optim
    plain = {"paged_adamw_32bit": "adamw_torch", "paged_adamw_8bit": "adamw_bnb_8bit"}.get(optim, optim[len("paged_"):])
    log.warning("trainer.optim=%s pages optimizer state to CPU, which needs a GPU; using %s on CPU", optim, plain)
    return plain
