"""Cross-field checks on a composed config, run before any model or data loads.

The schema (``schema.py``) catches unknown keys and wrong types while Hydra
composes. These checks catch combinations that are each valid alone but
wrong together, and say what to change. All problems are collected and
reported at once.
"""

from __future__ import annotations

from typing import List

from omegaconf import DictConfig

from fttrain.config.schema import value_of
from fttrain.models.load import TEMPLATE_DIR, shipped_templates


CHAT_FORMATS = {"alpaca", "sharegpt", "messages"}  # formats rendered through a chat template


class ConfigCheckError(ValueError):
    def __init__(self, problems: List[str]):
        self.problems = problems
        super().__init__("invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems))


def unknown_keys(node, path: str = "") -> List[str]:
    """Keys that a node's schema does not declare.

    Composing catches misspelled keys, but Hydra's ``+key=value`` opens the
    struct flag to add a key, so ``+trainer.lerning_rate=1e-4`` would slip
    through; this walk catches it.
    """
    import dataclasses

    from omegaconf import OmegaConf

    found: List[str] = []
    if not isinstance(node, DictConfig):
        return found
    schema = OmegaConf.get_type(node)
    declared = {f.name for f in dataclasses.fields(schema)} if dataclasses.is_dataclass(schema) else None
    for key in node.keys():
        full = f"{path}.{key}" if path else str(key)
        if declared is not None and key not in declared:
            found.append(f"{full}: unknown key (not in {schema.__name__}; check the spelling)")
            continue
        if declared is not None:
            found += unknown_keys(node._get_node(key), full)
    return found


def check_config(cfg: DictConfig) -> None:
    problems: List[str] = [p for p in unknown_keys(cfg) if not p.startswith("hydra")]
    if problems:  # the remaining checks read keys and could trip over the unknown ones
        raise ConfigCheckError(problems)
    data, task, peft, trainer, model = cfg.data, cfg.task, cfg.peft, cfg.trainer, cfg.model

    # --- data
    from fttrain.config.schema import OVERLENGTH_POLICIES

    if data.overlength not in OVERLENGTH_POLICIES:
        problems.append(f"data.overlength={data.overlength!r} must be one of {list(OVERLENGTH_POLICIES)}")
    if data.max_length < 8:
        problems.append(f"data.max_length={data.max_length} is too small to hold a prompt and a response")
    if not 0.0 <= data.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction={data.eval_fraction} must be in [0, 1)")
    template = data.chat_template
    if template != "tokenizer" and template not in shipped_templates():
        problems.append(f"data.chat_template={template!r}: not 'tokenizer' nor a shipped template {shipped_templates()}")
    if task.name == "sft" and task.assistant_only_loss and value_of(data.format) in CHAT_FORMATS:
        # Only checkable here for shipped templates; the tokenizer's own
        # template is checked right after the tokenizer loads (before the model).
        if template != "tokenizer":
            text = (TEMPLATE_DIR / f"{template}.jinja").read_text() if template in shipped_templates() else ""
            if text and "generation" not in text:
                problems.append(
                    f"task.assistant_only_loss=true needs {{% generation %}} markers, which data.chat_template={template} "
                    "lacks; pick another template or set task.assistant_only_loss=false"
                )
    if task.name == "pt" and value_of(data.format) != "text":
        problems.append(f"task=pt trains on raw text: data.format must be 'text', not {value_of(data.format)!r}")
    if task.name == "sft" and value_of(data.format) == "text" and task.assistant_only_loss:
        problems.append(
            "data.format=text has no responses to isolate: set task.assistant_only_loss=false (every token trained) "
            "or use task=pt"
        )

    # --- model
    if value_of(model.attn_implementation) == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            problems.append(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed; "
                "pip install flash-attn, or use sdpa"
            )

    # --- peft
    if peft.method in ("lora", "qlora"):
        if peft.r <= 0:
            problems.append(f"peft.r={peft.r} must be positive")
        if peft.bias not in ("none", "all", "lora_only"):
            problems.append(f"peft.bias={peft.bias!r} must be none, all or lora_only")
        if peft.init not in ("default", "gaussian", "pissa"):
            problems.append(f"peft.init={peft.init!r} must be default, gaussian or pissa")
    if peft.method == "qlora":
        if peft.bits not in (4, 8):
            problems.append(f"peft.bits={peft.bits} must be 4 or 8")
        if peft.quant_type not in ("nf4", "fp4"):
            problems.append(f"peft.quant_type={peft.quant_type!r} must be nf4 or fp4")

    # --- trainer: batch arithmetic that can be checked without a world size
    if trainer.micro_batch_size < 1 or trainer.gradient_accumulation_steps < 1:
        problems.append("trainer.micro_batch_size and trainer.gradient_accumulation_steps must be >= 1")
    if trainer.global_batch_size is not None and trainer.global_batch_size % trainer.micro_batch_size:
        problems.append(
            f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={trainer.micro_batch_size}"
        )
    if trainer.global_batch_size is not None and trainer.gradient_accumulation_steps != 1:
        problems.append(
            "set trainer.global_batch_size or trainer.gradient_accumulation_steps, not both: "
            "accumulation is derived from the global batch"
        )
    if not 0.0 <= trainer.warmup_ratio < 1.0:
        problems.append(f"trainer.warmup_ratio={trainer.warmup_ratio} must be a fraction in [0, 1)")
    if trainer.max_steps <= 0 and trainer.num_epochs <= 0:
        problems.append("set trainer.max_steps > 0 or trainer.num_epochs > 0")
    if trainer.eval_steps is not None and data.eval is None and data.eval_fraction == 0:
        problems.append("trainer.eval_steps is set but there is no eval data (data.eval or data.eval_fraction)")

    # --- run
    if cfg.resume_from is not None and cfg.overwrite:
        problems.append("resume_from and overwrite=true contradict each other: pick one")

    if problems:
        raise ConfigCheckError(problems)


def check_tokenizer_template(cfg: DictConfig, template) -> None:
    """Runs after the tokenizer loads and before the model does."""
    if cfg.task.name != "sft" or value_of(cfg.data.format) not in CHAT_FORMATS:
        return
    if not template:
        raise ConfigCheckError(
            [
                f"data.format={value_of(cfg.data.format)} needs a chat template and the tokenizer has none: "
                f"set data.chat_template to one of {shipped_templates()}"
            ]
        )
    from fttrain.data.tokenize import has_generation_markers

    if cfg.task.assistant_only_loss and not has_generation_markers(template):
        raise ConfigCheckError(
            [
                "task.assistant_only_loss=true but the tokenizer's chat template has no {% generation %} markers, "
                "so assistant tokens cannot be found. Set data.chat_template to a shipped template with markers "
                f"({shipped_templates()}) that matches the model's format, or task.assistant_only_loss=false."
            ]
        )
