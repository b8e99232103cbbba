"""peft's virtual-token methods (prompt, prefix and p-tuning) and LLaMA-Adapter's
adaption prompts: learned inputs rather than weight changes, so nothing merges."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

from fttrain.config.choice import choices
from fttrain.errors import PeftSetupError
from fttrain.methods.base import Method, PeftConfig, apply_peft_library
from fttrain.config.bounds import bounded

PromptEncoder = choices("PromptEncoder", ("MLP", "LSTM"), __name__)  # p-tuning's reparameterisation


@dataclass
class PromptTuningConfig(PeftConfig):
    method: str = "prompt_tuning"
    num_virtual_tokens: int = bounded(20, lo=1)  # more: more capacity, longer sequences
    init_text: Optional[str] = None  # initialise the soft prompt from this text's embeddings


@dataclass
class PrefixTuningConfig(PeftConfig):
    method: str = "prefix_tuning"
    num_virtual_tokens: int = bounded(20, lo=1)
    projection: bool = True  # learn prefixes through an MLP: more stable, more parameters while training
    encoder_hidden_size: int = bounded(512, lo=1)  # width of that MLP


@dataclass
class PTuningConfig(PeftConfig):
    method: str = "p_tuning"
    num_virtual_tokens: int = bounded(20, lo=1)
    encoder_hidden_size: int = bounded(512, lo=1)
    encoder_type: PromptEncoder = PromptEncoder.MLP  # MLP | LSTM


@dataclass
class LlamaAdapterConfig(PeftConfig):
    """Adaption prompts with zero-init gating (LLaMA-Adapter), Llama-family models only."""

    method: str = "llama_adapter"
    adapter_len: int = bounded(10, lo=1)  # learned prompt tokens per adapted layer
    adapter_layers: int = bounded(2, lo=1)  # the top layers that get them


def prompt_tuning_config(model, c, ctx):
    import peft

    init = {"prompt_tuning_init": "TEXT", "prompt_tuning_init_text": c.init_text,
            "tokenizer_name_or_path": model.name_or_path} if c.init_text else {}
    return peft.PromptTuningConfig(num_virtual_tokens=c.num_virtual_tokens, task_type=ctx.task_type, **init)


def prefix_tuning_config(model, c, ctx):
    import peft

    return peft.PrefixTuningConfig(num_virtual_tokens=c.num_virtual_tokens, prefix_projection=c.projection,
                                   encoder_hidden_size=c.encoder_hidden_size, task_type=ctx.task_type)


def p_tuning_config(model, c, ctx):
    import peft

    return peft.PromptEncoderConfig(num_virtual_tokens=c.num_virtual_tokens, encoder_hidden_size=c.encoder_hidden_size,
                                    encoder_reparameterization_type=c.encoder_type, task_type=ctx.task_type)


def llama_adapter_config(model, c, ctx):
    import peft

    n_layers = model.config.num_hidden_layers
    if c.adapter_layers > n_layers:
        raise PeftSetupError(f"peft.adapter_layers={c.adapter_layers} exceeds the model's {n_layers} layers")
    return peft.AdaptionPromptConfig(adapter_len=c.adapter_len, adapter_layers=c.adapter_layers,
                                     task_type=ctx.task_type)


# What all of them share: inputs, not weights; verified on unsharded plans; not with TRL's trainers.
INPUTS = dict(trl_tasks=False, sharded_ok=False)
METHODS = (
    Method("prompt_tuning", PromptTuningConfig, apply_peft_library(prompt_tuning_config), packs=False,
           merge_note="a soft prompt is an input, not a weight change", **INPUTS),
    Method("prefix_tuning", PrefixTuningConfig, apply_peft_library(prefix_tuning_config), packs=False,
           merge_note="prefixes are extra keys and values, not a weight change", **INPUTS),
    Method("p_tuning", PTuningConfig, apply_peft_library(p_tuning_config), packs=False,
           merge_note="virtual tokens are inputs, not a weight change", **INPUTS),
    Method("llama_adapter", LlamaAdapterConfig, apply_peft_library(llama_adapter_config), decoder_only=True,
           peft_type="adaption_prompt",
           merge_note="adaption prompts add attention over learned tokens, not a weight change", **INPUTS),
)
