"""``trainer.loss``: how a causal LM's token cross-entropy is computed.

    default   the model's own forward: lm_head over every position, then the loss
              on [tokens, vocab] logits upcast to fp32. At a 128k vocabulary and
              8k tokens per micro-batch that is 4 GiB of fp32 logits, plus their
              gradient, beside a 1B model's few GiB of activations.
    chunked   the decoder's hidden states go through lm_head and the loss
              trainer.loss_chunk_tokens positions at a time, each chunk's logits
              recomputed in backward (activation checkpointing): the whole
              logits tensor never exists. Costs one more lm_head matmul per chunk.
              The sum of the chunks' summed losses over the trained tokens is the
              default loss up to fp32 summation order.

It replaces the forward of the causal LM (under any PEFT wrapper, so LoRA on
lm_head, modules_to_save and frozen heads all go through the head module as
usual) for calls with labels; generation, calls without labels and calls with
precomputed shift_labels keep the model's own forward. What the family's
forward does to logits is kept where the config says it (Gemma's
final_logit_softcapping, Cohere's logit_scale). Families whose forward does
more (Granite's logits_scaling, a head with its own transform before the
output embeddings, ...) are caught by a probe: before training, the model's
own loss and the chunked loss of one short random sequence must agree, or
the run stops with trainer.loss=default as the fix. A mixture-of-experts model
that adds its router loss in forward is refused (the chunked forward would
drop it).
"""

from __future__ import annotations

import types
from typing import Dict, Optional

import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from fttrain.data.tokenize import IGNORE
from fttrain.errors import FttrainError


class LossSetupError(FttrainError):
    pass


def _chunk_loss(hidden: torch.Tensor, targets: torch.Tensor, head, softcap: Optional[float],
                scale: Optional[float]) -> torch.Tensor:
    logits = head(hidden)
    if scale is not None:
        logits = logits * scale
    if softcap is not None:
        logits = torch.tanh(logits / softcap) * softcap
    return F.cross_entropy(logits.float(), targets, ignore_index=IGNORE, reduction="sum")


def chunked_token_loss(hidden: torch.Tensor, head, labels: torch.Tensor, chunk_tokens: int,
                       num_items_in_batch=None, softcap: Optional[float] = None,
                       scale: Optional[float] = None) -> torch.Tensor:
    """The causal LM loss of transformers' ForCausalLMLoss (labels shifted by
    one; a sum over num_items_in_batch when given, else the mean over trained
    tokens) from hidden states [B, L, H], without the [B*L, vocab] logits.
    Every chunk is processed, trained tokens or not: skipping the empty ones
    would need to read the labels back from the device."""
    targets = shifted_targets(labels, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    total = flat.new_zeros((), dtype=torch.float32)
    for start in range(0, flat.shape[0], chunk_tokens):
        part = slice(start, start + chunk_tokens)
        if torch.is_grad_enabled():
            total = total + checkpoint(_chunk_loss, flat[part], targets[part], head, softcap, scale,
                                       use_reentrant=False)
        else:
            total = total + _chunk_loss(flat[part], targets[part], head, softcap, scale)
    return normalised(total, targets, num_items_in_batch)


def shifted_targets(labels: torch.Tensor, device) -> torch.Tensor:
    """[B*L] next-token targets, as ForCausalLMLoss shifts them: each row's last position has none."""
    return F.pad(labels, (0, 1), value=IGNORE)[..., 1:].reshape(-1).to(device)


def normalised(total: torch.Tensor, targets: torch.Tensor, num_items_in_batch=None) -> torch.Tensor:
    """A summed token loss over num_items_in_batch (the step's trained tokens) when given, else
    the mean over this batch's trained tokens."""
    if num_items_in_batch is None:
        return total / (targets != IGNORE).sum()
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(total.device)
    return total / num_items_in_batch


def causal_lm_of(model):
    """The *ForCausalLM module inside PEFT's wrappers (the one with lm_head)."""
    from peft import PeftModel

    if isinstance(model, PeftModel):
        model = model.get_base_model()
    return model


PROBE_TOKENS = 24
PROBE_RTOL = 1e-4  # the two paths run the same ops on one chunk; a dropped transform moves the loss far more


def use_chunked_loss(model, chunk_tokens: int, probe: bool = True) -> None:
    """Give the causal LM inside ``model`` the chunked loss (see the module docstring).
    probe: check it against the model's own loss on a short sequence first
    (skipped where the weights are not materialised: ZeRO-3 partitions)."""
    _use_token_loss(model, "chunked", lambda hidden, head, labels, num_items, softcap, scale:
                    chunked_token_loss(hidden, head, labels, chunk_tokens, num_items, softcap, scale),
                    probe, PROBE_RTOL)


def _use_token_loss(model, name: str, token_loss, probe: bool, rtol: float, probe_loss=None) -> None:
    """The causal LM's forward, for calls with labels, replaced by its decoder and
    ``token_loss(hidden, head, labels, num_items_in_batch, softcap, scale)``; the probe
    runs ``probe_loss`` (default: token_loss) in its place."""
    from transformers.modeling_outputs import CausalLMOutputWithPast

    lm = causal_lm_of(model)
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if getattr(config, "output_router_logits", False):
        raise LossSetupError(f"trainer.loss={name}: {type(lm).__name__} adds its router's auxiliary loss in its own "
                             "forward, which this loss would drop; use trainer.loss=default")
    head, backbone = lm.get_output_embeddings(), getattr(lm, lm.base_model_prefix, None)
    if head is None or backbone is None:
        raise LossSetupError(f"trainer.loss={name}: {type(lm).__name__} has no lm_head and decoder to split the "
                             "loss between; use trainer.loss=default")
    softcap = getattr(config, "final_logit_softcapping", None)
    scale = getattr(config, "logit_scale", None)
    own_forward = lm.forward

    def forward_with(loss_of):
        def forward(self, *args, labels=None, **kwargs):
            if labels is None or args or kwargs.get("logits_to_keep", 0) not in (0, None) \
                    or kwargs.get("shift_labels") is not None:
                return own_forward(*args, labels=labels, **kwargs)
            num_items = kwargs.get("num_items_in_batch")
            kwargs.pop("logits_to_keep", None)
            kwargs.pop("shift_labels", None)
            hidden = backbone(**kwargs).last_hidden_state
            loss = loss_of(hidden, head, labels, num_items, softcap, scale)
            return CausalLMOutputWithPast(loss=loss, logits=None)

        return types.MethodType(forward, lm)

    new_forward = forward_with(token_loss)
    if probe and not any(hasattr(p, "ds_id") for p in lm.parameters()):
        probed = new_forward if probe_loss is None else forward_with(probe_loss)
        own, new = probe_losses(model, lm, own_forward, probed, config.vocab_size)
        if not torch.isclose(own, new, rtol=rtol, atol=0):
            raise LossSetupError(
                f"trainer.loss={name}: {type(lm).__name__}'s own loss ({own.item():.6f}) and the {name} loss "
                f"({new.item():.6f}) differ on a test sequence: its forward does more to the logits than "
                "lm_head(hidden states); use trainer.loss=default")
    lm.forward = new_forward


@torch.no_grad()
def probe_losses(model, lm, own_forward, chunked_forward, vocab_size: int):
    """(own loss, chunked loss) of one random sequence, in eval mode (no dropout),
    through the whole model (PEFT wrappers included)."""
    device = next(p.device for p in lm.parameters())
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab_size, (1, PROBE_TOKENS), generator=g).to(device)
    was_training = model.training
    model.eval()
    try:
        lm.forward = own_forward
        own = model(input_ids=ids, labels=ids).loss.float()
        lm.forward = chunked_forward
        chunked = model(input_ids=ids, labels=ids).loss.float()
    finally:
        lm.forward = own_forward
        model.train(was_training)
    return own, chunked


# ------------------------------------------------------------ Triton kernels (GPU)
# trainer.loss=liger (fused linear cross-entropy) and trainer.liger_kernels (RMSNorm, RoPE,
# SwiGLU, ...): Liger-Kernel patches the causal LM inside any PEFT wrapper (use_liger, as
# transformers' Trainer would with use_liger_kernel, but before the Trainer exists, so a
# combination Liger refuses stops the run before training). trainer.loss=cce puts
# cut-cross-entropy's linear_cross_entropy where the chunked loss goes (use_cce_loss). Both
# read the normalisation (num_items_in_batch) from the trainer as the default loss does, and
# both multiply by lm_head.weight themselves (fttrain.config.checks.gpu_kernel_problems).
FUSED_LOSSES = {"liger": "liger_kernel", "cce": "cut_cross_entropy"}  # trainer.loss -> its package
CCE_PROBE_RTOL = 2e-2  # bf16 logits against the kernel's fp32 ones; a dropped transform moves it far more


def gpu_kernels(trainer_cfg) -> Dict[str, str]:
    """{knob as written on the command line: the package whose Triton kernels it runs}."""
    out = {}
    if trainer_cfg.loss in FUSED_LOSSES:
        out[f"trainer.loss={trainer_cfg.loss}"] = FUSED_LOSSES[trainer_cfg.loss]
    if trainer_cfg.liger_kernels:
        out["trainer.liger_kernels=true"] = "liger_kernel"
    return out


def liger_knobs(trainer_cfg) -> str:
    """The knobs that ask for Liger, as written on the command line (for messages)."""
    return " and ".join(k for k, package in gpu_kernels(trainer_cfg).items() if package == "liger_kernel")


def liger_kernel_config(trainer_cfg) -> Optional[dict]:
    """The keyword arguments of Liger's _apply_liger_kernel_to_instance; None: Liger is not used.
    Every kernel a family may take is named: an apply function's own defaults are on, so a
    family's GeGLU, LayerNorm or ReLU² would otherwise be swapped in unasked (each family's
    function reads the names it has)."""
    loss, kernels = trainer_cfg.loss == "liger", bool(trainer_cfg.liger_kernels)
    if not (loss or kernels):
        return None
    return {"fused_linear_cross_entropy": loss, "cross_entropy": False,
            **{k: kernels for k in ("rms_norm", "rope", "swiglu", "geglu", "layer_norm", "relu_squared")}}


def gpu_kernel_runtime_problem(trainer_cfg, on_gpu: bool, precision: str = "bf16") -> Optional[str]:
    """Why the knobs' kernels cannot run here: Triton kernels need a CUDA GPU, and
    cut-cross-entropy's backward takes bf16/fp16 hidden states only."""
    kernels = gpu_kernels(trainer_cfg)
    if not kernels:
        return None
    if not on_gpu:
        return (f"{' and '.join(kernels)}: their Triton kernels run on a CUDA GPU and this run is on the CPU; "
                "use trainer.loss=chunked (plain torch) or leave them off")
    if trainer_cfg.loss == "cce" and precision not in ("bf16", "fp16"):
        return (f"trainer.loss=cce: cut-cross-entropy's backward takes bf16 or fp16 hidden states and this run is "
                f"{precision}; use precision=bf16 or trainer.loss=chunked")
    return None


def liger_family_problem(trainer_cfg, model_type: str) -> Optional[str]:
    """Liger patches only the model families it knows; any other would train unpatched without a word."""
    if liger_kernel_config(trainer_cfg) is None:
        return None
    from liger_kernel.transformers.monkey_patch import MODEL_TYPE_TO_APPLY_LIGER_FN

    if model_type in MODEL_TYPE_TO_APPLY_LIGER_FN:
        return None
    return (f"{liger_knobs(trainer_cfg)}: Liger-Kernel has no kernels for {model_type!r} models (it patches "
            f"{', '.join(sorted(MODEL_TYPE_TO_APPLY_LIGER_FN))}); use trainer.loss=chunked or leave them off")


def use_liger(model, trainer_cfg) -> None:
    """trainer.loss=liger / trainer.liger_kernels: Liger's kernels in the causal LM inside ``model``.
    Liger rebinds transformers' module-level classes and functions as well (the family's RMSNorm,
    MLP, rotary embedding), for the rest of the process."""
    from liger_kernel.transformers import _apply_liger_kernel_to_instance

    config = liger_kernel_config(trainer_cfg)
    try:
        _apply_liger_kernel_to_instance(model=causal_lm_of(model), **config)
    except (NotImplementedError, AssertionError) as e:  # a kernel this family's function refuses
        raise LossSetupError(f"{liger_knobs(trainer_cfg)}: Liger-Kernel refuses this model: {e}; "
                             "use trainer.loss=chunked or leave them off") from None


def cce_token_loss(hidden: torch.Tensor, head, labels: torch.Tensor, num_items_in_batch=None,
                   softcap: Optional[float] = None) -> torch.Tensor:
    """chunked_token_loss's result through cut-cross-entropy: the logits are never written
    out, each block of them made and reduced inside the kernel."""
    from cut_cross_entropy import linear_cross_entropy

    targets = shifted_targets(labels, hidden.device)
    flat = hidden.reshape(-1, hidden.shape[-1])
    # Autocast does not reach inside the kernel's own autograd function: the hidden states go in
    # as the autocast dtype lm_head(hidden) would have used (fp32 weights of a full fine-tune or
    # QLoRA's fp32 head stay as they are; the kernel casts the weight to the hidden states' dtype).
    device = flat.device.type
    if torch.is_autocast_enabled(device):
        flat = flat.to(torch.get_autocast_dtype(device))
    total = linear_cross_entropy(flat, head.weight, targets, ignore_index=IGNORE, softcap=softcap,
                                 reduction="sum").float()
    return normalised(total, targets, num_items_in_batch)


def use_cce_loss(model, probe: bool = True) -> None:
    """trainer.loss=cce: the causal LM inside ``model`` computes its training loss with
    cut-cross-entropy (as use_chunked_loss, with the same probe against its own loss)."""
    lm = causal_lm_of(model)
    head = lm.get_output_embeddings()
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    if type(head) is not torch.nn.Linear or head.bias is not None:
        raise LossSetupError(f"trainer.loss=cce: {type(lm).__name__}'s lm_head is a {type(head).__name__}"
                             f"{' with a bias' if getattr(head, 'bias', None) is not None else ''}; cut-cross-entropy "
                             "multiplies by a plain weight matrix; use trainer.loss=chunked (it calls the head)")
    scaled = [a for a in ("logit_scale", "logits_scaling") if getattr(config, a, None) not in (None, 1, 1.0)]
    if scaled:
        raise LossSetupError(f"trainer.loss=cce: {type(lm).__name__} scales its logits ({scaled[0]}), which "
                             "cut-cross-entropy cannot; use trainer.loss=chunked")
    # The kernel runs on CUDA tensors only. Where the weights are not on the GPU yet (the Trainer
    # moves them later), the probe checks the same assumption with the chunked loss in its place:
    # that this family's forward does nothing to the logits but lm_head and a softcap.
    on_gpu = next(lm.parameters()).is_cuda

    def cce(hidden, head, labels, num_items, softcap, scale):
        return cce_token_loss(hidden, head, labels, num_items, softcap)

    def chunked(hidden, head, labels, num_items, softcap, scale):
        return chunked_token_loss(hidden, head, labels, 1024, num_items, softcap)

    if on_gpu:
        _use_token_loss(model, "cce", cce, probe, CCE_PROBE_RTOL)
    else:  # the chunked loss runs the model's own ops: its tolerance
        _use_token_loss(model, "cce", cce, probe, PROBE_RTOL, probe_loss=chunked)
