"""``fttrain estimate OVERRIDES [--world-size N] [--gpu-memory GIB]`` (also printed by
``preflight=true``): the expected peak GPU memory per device of a causal-LM run,
from the model's config alone (the model is built on the meta device: no
weights are read or allocated).

    weights      frozen weights in their load dtype (bf16 for an adapter run under bf16,
                 4-bit QLoRA: half a byte + one fp32 constant per 64 (double quant: 1 byte
                 + 2 fp32 constants per 256x64)); trained weights as fp32 masters
    gradients    one per trained weight, in its dtype (fp32)
    optimizer    AdamW's two moments: 8 bytes per trained weight (bitsandbytes' 8-bit
                 optimizers: 2); under DeepSpeed with bf16 also its fp32 master copy (4)
    activations  what backward keeps, per token and decoder layer, in elements of the
                 compute dtype (b bytes): about (9 h + 3 kv + 4 i) b for a Llama-style layer
                 with sdpa/flash attention (two norms' inputs in fp32 and outputs: 6 h; q, k,
                 v and their RoPE copies: 2 h + 3 kv; the attention output: h; the SwiGLU's
                 gate, up, activation and product: 4 i); with gradient checkpointing only
                 each layer's input (h b, the residual stream) plus one layer's full set
                 while it is recomputed. Adapter dropout's masked copies are not counted.
    logits       default loss: tokens x vocab x 10 bytes (the compute-dtype logits with
                 their fp32 upcast and log-softmax in forward; log-softmax and its fp32
                 gradient in backward); chunked: loss_chunk_tokens x vocab x 10;
                 liger: the same over Liger's chunk, tokens / ceil(vocab / hidden) to a power of 2;
                 cce: none (cut-cross-entropy keeps its blocks of logits on chip)
    tokens       micro_batch_size x data.max_length (packed rows are full)

The plan divides what it shards by the world size: ZeRO-1 the optimizer,
ZeRO-2 also the gradients, ZeRO-3 and FSDP also the weights (plus two layers
gathered whole at a time); offloading moves the optimizer (and with
offload_params / FSDP offload the weights) to CPU memory. DDP keeps a
bucketed copy of the gradients.

Exact, and tested on CPU: parameter counts, and the bytes of weights,
gradients and optimizer states per plan and world size. Approximate:
activations and logits (a model of what autograd keeps; kernels' workspaces
and the allocator's fragmentation are not counted). On a GPU the one-shot check
(``bench/gpu_check.sh``) compares the total with ``torch.cuda.max_memory_allocated``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from typing import Dict, Optional

from fttrain.errors import FttrainError

GIB = 2 ** 30


@dataclass
class Estimate:
    parts: Dict[str, float] = field(default_factory=dict)  # bytes per device, by part
    params: int = 0
    trained: int = 0
    world_size: int = 1
    notes: list = field(default_factory=list)

    @property
    def total(self) -> float:
        return sum(self.parts.values())

    def table(self, gpu_memory: Optional[float] = None) -> str:
        lines = [f"expected peak GPU memory per device ({self.params:,} parameters, {self.trained:,} trained, "
                 f"world size {self.world_size}):"]
        for name, value in self.parts.items():
            lines.append(f"  {name:<12} {size(value):>12}")
        lines.append(f"  {'total':<12} {size(self.total):>12}" + (f" of {size(gpu_memory)}" if gpu_memory else ""))
        lines += [f"  note: {n}" for n in self.notes]
        return "\n".join(lines)


def size(n: float) -> str:
    return f"{n / GIB:.2f} GiB" if n >= GIB / 10 else f"{n / 2 ** 20:.1f} MiB"


class EstimateError(FttrainError):
    pass


def meta_model(cfg):
    """The run's model with its PEFT method applied, on the meta device."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from fttrain.methods import apply_peft
    from fttrain.models.load import resolve_model_path

    path = resolve_model_path(cfg.model)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.model.revision,
                                            trust_remote_code=cfg.model.trust_remote_code)
    except OSError as e:
        raise EstimateError(f"model.name_or_path={path}: no config.json to read ({str(e).splitlines()[0]})") from None
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.model.trust_remote_code)
        model = apply_peft(model, cfg.peft, False, max_steps=max(cfg.trainer.max_steps, 1), base_path=path)
    return model, config


def param_bytes(model, cfg, precision: str) -> Dict[str, float]:
    """Bytes of weights, gradients and optimizer states on one device before
    the plan shards them."""
    from fttrain.methods import method_of

    method = method_of(cfg.peft)
    quantized = method.quantized_base
    bits = getattr(cfg.peft, "bits", 16)
    compute = 2 if precision in ("bf16", "fp16") else 4
    frozen_dtype = compute if not method.whole_model else 4  # fttrain loads whole-model runs in fp32
    weights = grads = 0.0
    for name, p in model.named_parameters():
        n = p.numel()
        if p.requires_grad:
            weights += 4 * n
            grads += 4 * n
        elif quantized and p.dim() == 2 and "lm_head" not in name and "embed" not in name:
            if bits == 4:
                blocks = n / 64
                weights += n / 2 + (blocks + 4 * blocks / 256 if cfg.peft.double_quant else 4 * blocks)
            else:
                weights += n + 4 * p.shape[0]  # int8 + a row scale
        else:
            weights += frozen_dtype * n
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    optim = str(cfg.trainer.optim)
    per_weight = 2 if ("8bit" in optim or "bnb" in optim) else 8
    return {"weights": weights, "gradients": grads, "optimizer": per_weight * trained}


def shard(parts: Dict[str, float], cfg, world: int, precision: str, trained: int, layer_bytes: float,
          notes: list) -> Dict[str, float]:
    """What the plan keeps on one device."""
    from fttrain.plan import plan_of

    plan, dist, out = plan_of(cfg.dist), cfg.dist, dict(parts)
    if plan == "deepspeed":
        if precision in ("bf16", "fp16"):
            out["optimizer"] += 4 * trained  # DeepSpeed's fp32 master copy of the trained weights
            out["weights"] -= 2 * trained  # ... and the weights themselves in bf16/fp16
            out["gradients"] -= 2 * trained
        out["optimizer"] /= world
        if dist.stage >= 2:
            out["gradients"] /= world
        if dist.stage == 3:
            out["weights"] = out["weights"] / world + 2 * layer_bytes
        if dist.offload_optimizer:
            out["optimizer"] = 0.0
            notes.append("the optimizer states live in CPU memory (dist.offload_optimizer)")
        if dist.stage == 3 and dist.offload_params:
            out["weights"] = 2 * layer_bytes
    elif plan == "fsdp":
        for key in ("weights", "gradients", "optimizer"):
            out[key] /= world
        out["weights"] += 2 * layer_bytes
        if dist.offload:
            out["weights"], out["optimizer"] = 2 * layer_bytes, 0.0
            notes.append("weights and optimizer states live in CPU memory (dist.offload)")
    elif plan == "ddp" and world > 1:
        out["gradients"] *= 2  # the reducer's buckets hold a copy of every gradient
    return out


def activation_bytes(config, cfg, precision: str) -> Dict[str, float]:
    b = 2 if precision in ("bf16", "fp16") else 4
    config = config.get_text_config() if hasattr(config, "get_text_config") else config  # multimodal: the LM's
    h = config.hidden_size
    i = getattr(config, "intermediate_size", 4 * h)
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", heads) * getattr(config, "head_dim", h // heads)
    layers = config.num_hidden_layers
    tokens = cfg.trainer.micro_batch_size * cfg.data.max_length
    per_layer = (9 * h + 3 * kv + 4 * i) * b
    if cfg.trainer.gradient_checkpointing:
        activations = tokens * (layers * h * b + per_layer)
    else:
        activations = tokens * layers * per_layer
    vocab = config.vocab_size
    loss = str(cfg.trainer.loss)
    if loss == "chunked":
        tokens_at_once = min(tokens, cfg.trainer.loss_chunk_tokens)
    elif loss == "liger":  # Liger's fused loss: chunks of next_pow2(tokens / ceil(vocab / hidden)) positions
        positions = -(-tokens // -(-vocab // h))
        tokens_at_once = min(tokens, 1 << (positions - 1).bit_length())
    elif loss == "cce":  # cut-cross-entropy: blocks of logits in on-chip memory, none written out
        tokens_at_once = 0
    else:
        tokens_at_once = tokens
    logits = 10 * vocab * tokens_at_once
    return {"activations": float(activations), "logits": float(logits)}


def estimate(cfg, world_size: int = 1, precision: Optional[str] = None) -> Estimate:
    """The expected peak per device; precision "auto" counts as bf16 (a GPU that has it)."""
    from fttrain.config.schema import value_of

    precision = precision or str(value_of(cfg.precision.dtype))
    if precision == "auto":
        precision = "bf16"
    model, config = meta_model(cfg)
    params = sum(p.numel() for p in model.parameters())
    trained = sum(p.numel() for p in model.parameters() if p.requires_grad)
    compute = 2 if precision in ("bf16", "fp16") else 4
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layer_bytes = compute * params / max(text.num_hidden_layers, 1)
    result = Estimate(params=params, trained=trained, world_size=world_size)
    parts = param_bytes(model, cfg, precision)
    result.parts = {**shard(parts, cfg, world_size, precision, trained, layer_bytes, result.notes),
                    **activation_bytes(config, cfg, precision)}
    return result


def gpu_memory() -> Optional[float]:
    import torch

    return float(torch.cuda.get_device_properties(0).total_memory) if torch.cuda.is_available() else None


def report(cfg, world_size: int, log, memory: Optional[float] = None) -> Estimate:
    """Log the estimate; a WARNING when it exceeds the GPU's memory."""
    result = estimate(cfg, world_size)
    memory = memory or gpu_memory()
    log.info("%s", result.table(memory))
    if memory and result.total > memory:
        log.warning("the estimate (%.1f GiB) exceeds this GPU's %.1f GiB: lower trainer.micro_batch_size or "
                    "data.max_length, or turn on trainer.gradient_checkpointing, trainer.loss=chunked, a sharded "
                    "plan (dist=zero3, fsdp) or a quantised base (peft=qlora)", result.total / GIB, memory / GIB)
    return result


def main(argv=None) -> int:
    import logging

    from fttrain.config.compose import compose_config

    parser = argparse.ArgumentParser(prog="fttrain estimate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--world-size", type=int, default=1, help="processes the run will have")
    parser.add_argument("--gpu-memory", type=float, default=None, help="GiB per GPU (default: this machine's GPU)")
    parser.add_argument("--config-dir", "-cd", action="append", default=[], help="your config folder")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fttrain train")
    args = parser.parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        cfg = compose_config(args.overrides, config_dirs=args.config_dir)
        report(cfg, args.world_size, logging.getLogger("fttrain"),
               args.gpu_memory * GIB if args.gpu_memory else None)
    except FttrainError as e:
        print(f"fttrain estimate: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
