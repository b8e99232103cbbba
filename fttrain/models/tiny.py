"""An offline tiny Llama-family model and byte-level BPE tokenizer, built from a seed.

Tests and the demo must never need the hub, so fttrain builds its own model:
a ``LlamaForCausalLM`` with a few layers, and a tokenizer trained locally on
``fttrain.data.synthetic.tokenizer_corpus``. The same seed and shape give the
same weights and vocabulary byte for byte. Both are saved in standard HF
format under ``<cache>/models/`` and loaded from there like any local model.

Special tokens follow Llama 3: ``<|begin_of_text|>`` (BOS), ``<|eot_id|>``
(end of a turn, and EOS), and a distinct ``<|pad|>``. The chat template is
``templates/llama3.jinja``, which has ``{% generation %}`` markers.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import asdict, is_dataclass
from pathlib import Path

from fttrain.paths import cache_dir

BUILTIN_NAME = "builtin:tiny-llama"
SPECIAL_TOKENS = ["<|begin_of_text|>", "<|eot_id|>", "<|pad|>", "<|start_header_id|>", "<|end_header_id|>"]
TEMPLATE = Path(__file__).resolve().parent.parent / "data" / "templates" / "llama3.jinja"
BUILD_VERSION = 3  # bump when the build recipe changes (3: tool-aware llama3 template), so caches are rebuilt


def _spec_dict(spec) -> dict:
    if is_dataclass(spec):
        return asdict(spec)
    from omegaconf import OmegaConf

    return dict(OmegaConf.to_container(spec, resolve=True)) if not isinstance(spec, dict) else dict(spec)


def tiny_model_dir(spec) -> Path:
    """Folder of the tiny model with this shape and seed, built on first use."""
    d = _spec_dict(spec)
    key = hashlib.sha256(json.dumps({**d, "v": BUILD_VERSION}, sort_keys=True).encode()).hexdigest()[:12]
    folder = cache_dir() / "models" / f"tiny-llama-{key}"
    if not _is_complete(folder):
        _build(d, folder)
    return folder


def _is_complete(folder: Path) -> bool:
    return all((folder / f).exists() for f in ("config.json", "model.safetensors", "tokenizer.json"))


def build_tokenizer(vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    from fttrain.data.synthetic import tokenizer_corpus

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(tokenizer_corpus(), trainer=trainer)
    bos = tok.token_to_id("<|begin_of_text|>")
    # Like Llama: plain text gets BOS prepended; chat templates add it themselves.
    tok.post_processor = processors.TemplateProcessing(
        single="<|begin_of_text|> $A", pair="<|begin_of_text|> $A $B", special_tokens=[("<|begin_of_text|>", bos)]
    )
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|begin_of_text|>",
        eos_token="<|eot_id|>",
        pad_token="<|pad|>",
        model_max_length=4096,
    )
    fast.chat_template = TEMPLATE.read_text()
    return fast


def _build(d: dict, folder: Path) -> None:
    import torch
    from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(d["vocab_size"])
    config = LlamaConfig(
        vocab_size=len(tokenizer),
        hidden_size=d["hidden_size"],
        intermediate_size=d["intermediate_size"],
        num_hidden_layers=d["num_hidden_layers"],
        num_attention_heads=d["num_attention_heads"],
        num_key_value_heads=d["num_key_value_heads"],
        max_position_embeddings=d["max_position_embeddings"],
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
        rope_theta=10000.0,
        # As a hub model's config has it: tools that load by path (TRL's
        # reference model) pick the class from it.
        architectures=["LlamaForCausalLM"],
    )
    # Seed the init through a local generator state so the build does not
    # depend on (or disturb) the caller's RNG.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(d["seed"])
        model = LlamaForCausalLM(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    # Build in a private folder and rename: ranks racing to build the same
    # model never see a half-written one.
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    # Written piece by piece rather than with model.save_pretrained, which
    # under torch.distributed writes only on global rank 0; this build belongs
    # to whichever process calls it (local rank 0 of each node).
    from safetensors.torch import save_file

    tmp.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, tmp / "model.safetensors",
              metadata={"format": "pt"})
    model.config.save_pretrained(tmp)
    model.generation_config.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if not _is_complete(tmp):
        raise RuntimeError(f"building the tiny model left an incomplete folder {tmp}")
    (tmp / "fttrain_tiny_spec.json").write_text(json.dumps(d, indent=2, sort_keys=True))
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        os.rename(tmp, folder)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
