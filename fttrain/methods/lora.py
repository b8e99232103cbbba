"""LoRA and its variants through peft's LoraConfig: rsLoRA, DoRA, PiSSA and
LoftQ initialisation, LoRA+ learning rates; QLoRA on a 4/8-bit base."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from fttrain.config.choice import choices
from fttrain.errors import PeftSetupError
from fttrain.methods.base import LaunchFacts, Method, PeftConfig, TrainerHooks, apply_peft_library, importable, \
    install_hint
from fttrain.methods.targets import linear_leaf_names, resolve_target_modules
from fttrain.config.bounds import bounded

INIT = {"default": True, "gaussian": "gaussian", "pissa": "pissa", "loftq": "loftq"}  # peft's init_lora_weights
LoraInit = choices("LoraInit", INIT, __name__)
LoraBias = choices("LoraBias", ("none", "all", "lora_only"), __name__)
QuantType = choices("QuantType", ("nf4", "fp4"), __name__)
ComputeDtype = choices("ComputeDtype", ("auto", "bfloat16", "float16", "float32"), __name__)
QuantStorage = choices("QuantStorage", ("bfloat16", "float16", "float32", "uint8"), __name__)


@dataclass
class LoraConfig(PeftConfig):
    method: str = "lora"
    r: int = bounded(16, lo=1)  # rank: higher learns more, costs memory and adapter size
    alpha: int = bounded(32, lo=0, lo_open=True)  # scale = alpha / r
    # 0: deterministic and fastest; 0.05-0.1 can help on small data sets
    dropout: float = bounded(0.0, lo=0, hi=1, hi_open=True)
    bias: LoraBias = LoraBias.none  # none | all | lora_only
    # or [attention], [query_value], or module names like [q_proj, v_proj]
    target_modules: List[str] = field(default_factory=lambda: ["all_linear"])
    # whole modules trained and saved next to the adapter (e.g. [lm_head])
    modules_to_save: List[str] = field(default_factory=list)
    use_rslora: bool = False  # scale alpha/sqrt(r): keeps high ranks stable
    use_dora: bool = False  # magnitude/direction split: often better, ~2x slower steps
    init: LoraInit = LoraInit.default  # default | gaussian | pissa | loftq
    loftq_bits: int = bounded(4, lo=1, hi=8)  # init=loftq: the bit width the base will be quantised to
    # LoRA+: B matrices learn at learning_rate x this ratio (paper: 16). null: off.
    loraplus_lr_ratio: Optional[float] = bounded(None, lo=0, lo_open=True)


@dataclass
class QLoraConfig(LoraConfig):
    method: str = "qlora"
    bits: int = bounded(4, lo=4, hi=8)  # 4 (nf4/fp4) or 8
    quant_type: QuantType = QuantType.nf4  # nf4 | fp4
    double_quant: bool = True  # quantise the quantisation constants: ~0.4 bit/param saved
    compute_dtype: ComputeDtype = ComputeDtype.auto  # auto: follows precision (bf16 -> bfloat16, fp16 -> float16, else float32)
    # Needed for ZeRO-3 / FSDP: must equal the compute dtype there.
    quant_storage: Optional[QuantStorage] = None


def lora_config(model, peft_cfg, ctx):
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
        task_type=ctx.task_type,
        **extra,
    )


apply_lora = apply_peft_library(lora_config)


def apply_qlora(model, peft_cfg, ctx):
    from peft import prepare_model_for_kbit_training

    if not linear_leaf_names(model):
        raise PeftSetupError(f"peft=qlora: {type(model).__name__} has no Linear layers to quantise")
    # Norms to fp32 and input grads on, so checkpointed k-bit layers backprop.
    model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=ctx.gradient_checkpointing)
    return apply_lora(model, peft_cfg, ctx)


def resolved_compute_dtype(peft_cfg, precision: str) -> str:
    """peft.compute_dtype, with "auto" following the run's precision."""
    if peft_cfg.compute_dtype != "auto":
        return peft_cfg.compute_dtype
    return {"bf16": "bfloat16", "fp16": "float16"}.get(precision, "float32")


def quantization_config(peft_cfg, precision: str = "fp32"):
    """BitsAndBytes settings for the QLoRA base."""
    import torch
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


# ---------------------------------------------------------------- LoRA+
def loraplus_hooks(model, peft_cfg, trainer_cfg) -> TrainerHooks:
    hooks = TrainerHooks()
    if peft_cfg.loraplus_lr_ratio:
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


# ---------------------------------------------------------------- checks
def lora_problems(cfg) -> List[str]:
    peft, out = cfg.peft, []
    if peft.r <= 0:
        out.append(f"peft.r={peft.r} must be positive")
    if peft.loraplus_lr_ratio is not None and peft.loraplus_lr_ratio <= 0:
        out.append(f"peft.loraplus_lr_ratio={peft.loraplus_lr_ratio} must be positive (or null for plain LoRA)")
    return out


def qlora_problems(cfg) -> List[str]:
    peft = cfg.peft
    out = lora_problems(cfg)
    if peft.init == "loftq":
        out.append("peft.init=loftq initialises against a quantisation itself: use it with peft=lora, not qlora")
    if peft.bits not in (4, 8):
        out.append(f"peft.bits={peft.bits} must be 4 or 8")
    if not importable("bitsandbytes"):
        out.append(f"peft=qlora needs bitsandbytes: {install_hint('bitsandbytes')}")
    return out


def loftq_init(peft_cfg) -> bool:
    """LoftQ initialises the adapter against the base quantised by bitsandbytes."""
    return peft_cfg.init == "loftq"


def lora_launch_problems(peft_cfg, launch: LaunchFacts) -> List[str]:
    if peft_cfg.init == "loftq" and not launch.on_gpu:
        return ["peft.init=loftq: peft's LoftQ initialisation runs on CUDA only; on CPU use init=default or pissa"]
    return []


def qlora_launch_problems(peft_cfg, launch: LaunchFacts) -> List[str]:
    out = lora_launch_problems(peft_cfg, launch)
    if launch.shards_weights:
        storage, compute = peft_cfg.quant_storage, resolved_compute_dtype(peft_cfg, launch.precision)
        if storage is None or storage != compute:
            out.append(
                f"peft=qlora with dist={launch.label} shards the 4-bit weights, which needs peft.quant_storage equal "
                f"to the compute dtype ({compute}, from peft.compute_dtype={peft_cfg.compute_dtype}); it is "
                f"{storage}. Set peft.quant_storage={compute}"
            )
        if peft_cfg.bits != 4:
            out.append(f"peft=qlora with dist={launch.label} needs peft.bits=4 (8-bit weights cannot be sharded)")
    if launch.precision == "fp16":
        bf16_only = [f"peft.{k}=bfloat16" for k in ("compute_dtype", "quant_storage")
                     if getattr(peft_cfg, k) == "bfloat16"]
        if bf16_only:
            out.append(f"precision=fp16 with a bf16-only setting ({', '.join(bf16_only)}): set them to float16, "
                       "or use precision=bf16")
    return out


def dora_under_zero3(peft_cfg) -> Optional[str]:
    # Tried on 2 CPU ranks: peft's DoRA layers read base weight shapes that ZeRO-3 partitions.
    return "peft.use_dora=true" if peft_cfg.use_dora else None


METHODS = (
    Method("lora", LoraConfig, apply_lora, check=lora_problems, launch_problems=lora_launch_problems,
           hooks=loraplus_hooks, zero3_problem=dora_under_zero3, quantizes=loftq_init),
    Method("qlora", QLoraConfig, apply_qlora, quantized_base=True, check=qlora_problems,
           launch_problems=qlora_launch_problems, hooks=loraplus_hooks, quantization=quantization_config,
           zero3_problem=dora_under_zero3),
)
