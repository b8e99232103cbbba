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
from fttrain.errors import FttrainError
from fttrain.methods import method_of
from fttrain.methods.base import importable
from fttrain.tasks import TASKS, task_of


CHAT_FORMATS = {"alpaca", "sharegpt", "messages"}  # formats rendered through a chat template


class ConfigCheckError(FttrainError, ValueError):
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


def packing_on(cfg: DictConfig) -> bool:
    """data.packing, with null meaning: on where the task packs."""
    return cfg.data.packing if cfg.data.packing is not None else task_of(cfg.task).packs



def task_problems(cfg: DictConfig) -> List[str]:
    task, peft, data = cfg.task, cfg.peft, cfg.data
    method = method_of(peft)
    problems = []
    problems += task_of(task).check(cfg)
    if task_of(task).encoder:
        if method.decoder_only:
            problems.append(f"peft={peft.method} is built for decoder-only models; task={task.name} needs another method")
        if data.packing:
            problems.append(f"data.packing=true: task={task.name} classifies whole sequences or their tokens, "
                            "packing would mix them; set data.packing=false (or null)")
    if task_of(task).trl and data.packing:
        problems.append(f"data.packing=true: task={task.name} pads each batch (TRL's trainer); set data.packing=false "
                        "(or null)")
    if task_of(task).trl and not method.trl_tasks:
        problems.append(f"peft={peft.method} is not supported by task={task.name} (TRL's trainers take LoRA-family "
                        "adapters or full/freeze fine-tuning)")
    return problems


def check_config(cfg: DictConfig) -> None:
    problems: List[str] = [p for p in unknown_keys(cfg) if not p.startswith("hydra")]
    if problems:  # the remaining checks read keys and could trip over the unknown ones
        raise ConfigCheckError(problems)
    data, task, trainer, model = cfg.data, cfg.task, cfg.trainer, cfg.model

    # --- data
    if data.max_length < 8:
        problems.append(f"data.max_length={data.max_length} is too small to hold a prompt and a response")
    if not 0.0 <= data.eval_fraction < 1.0:
        problems.append(f"data.eval_fraction={data.eval_fraction} must be in [0, 1)")
    if data.num_proc is not None and data.num_proc < 1:
        problems.append(f"data.num_proc={data.num_proc} must be >= 1 (or null: the CPUs this process may use)")
    if data.streaming:
        if not task_of(task).packs:
            problems.append(f"data.streaming=true: task={task.name} reads its rows in memory; streaming serves "
                            f"{' and '.join(t.name for t in TASKS.values() if t.packs)}")
        if trainer.max_steps <= 0:
            problems.append("data.streaming=true: a stream has no length, so set trainer.max_steps > 0")
        if trainer.dataloader_num_workers:
            problems.append("data.streaming=true: set trainer.dataloader_num_workers=0 (the stream is read, and its "
                            "resume position kept, in the training process)")
        if data.stream_window < 1:
            problems.append(f"data.stream_window={data.stream_window} must be >= 1")
    from fttrain.data.templates import template_choice_problem

    problem = template_choice_problem(data.chat_template)
    if problem:
        problems.append(problem)
    problems += inherited_data_problems(cfg)
    from fttrain.data.formats import ROLES, TOOL_CALL

    for source, role in data.role_map.items():
        if role not in ROLES + (TOOL_CALL,):
            problems.append(f"data.role_map.{source}={role!r} must be one of {list(ROLES + (TOOL_CALL,))} "
                            f"({TOOL_CALL}: the turn's content is a function call, as LLaMA-Factory's function_call)")
    allowed = task_of(task).formats
    if value_of(data.format) not in allowed:
        problems.append(f"task={task.name} reads data.format {' or '.join(allowed)}, not {value_of(data.format)!r}")
    problems += task_problems(cfg)

    # --- model
    if model.name_or_path.startswith("pkg:") and not importable(model.name_or_path[4:]):
        problems.append(f"model.name_or_path={model.name_or_path}: package {model.name_or_path[4:]!r} is not installed "
                        f"(pip install {model.name_or_path[4:].replace('_', '-')})")
    if model.dropout is not None and not 0.0 <= model.dropout < 1.0:
        problems.append(f"model.dropout={model.dropout} is not a probability in [0, 1)")
    if value_of(model.attn_implementation) == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            problems.append(
                "model.attn_implementation=flash_attention_2 but flash-attn is not installed; "
                "pip install flash-attn, or use sdpa"
            )

    # --- peft
    problems += peft_problems(cfg)

    # --- trainer: stop signals, then batch arithmetic that can be checked without a world size
    from fttrain.preemption import signal_number

    numbers = {}  # signal name -> number, for the names that are signals
    for key in ("stop_signals", "requeue_signals"):
        for name in trainer[key]:
            try:
                numbers[name] = signal_number(name)
            except AttributeError:
                problems.append(f"trainer.{key}: {name!r} is not a signal name (e.g. SIGUSR1, SIGTERM)")
    if trainer.learning_rate <= 0:
        problems.append(f"trainer.learning_rate={trainer.learning_rate} must be > 0")
    if value_of(trainer.loss) != "default" and not task_of(task).token_loss:
        problems.append(f"trainer.loss={value_of(trainer.loss)}: task={task.name} computes its own loss (not the causal "
                        "LM's token cross-entropy from fttrain's trainer); set trainer.loss=default")
    for key in ("stop_check_steps", "logging_steps", "loss_chunk_tokens"):
        if trainer[key] < 1:
            problems.append(f"trainer.{key}={trainer[key]} must be >= 1")
    if trainer.save_total_limit < 0:
        problems.append("trainer.save_total_limit must be >= 0 (0 keeps every checkpoint)")
    stopping = {numbers[n] for n in trainer.stop_signals if n in numbers}
    unhandled = [n for n in trainer.requeue_signals if n in numbers and numbers[n] not in stopping]
    if unhandled:
        problems.append(f"trainer.requeue_signals {sorted(unhandled)} are not in trainer.stop_signals, so they "
                        "would never stop the run")
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


def check_tokenizer_template(cfg: DictConfig, tokenizer, template) -> None:
    """Runs after the tokenizer loads and before the model does: the chat
    template exists where chat data needs one, and is this model's format."""
    from fttrain.data.templates import TemplateInfo, check_template_fits, shipped_templates

    fmt = value_of(cfg.data.format)
    chat_data = fmt in CHAT_FORMATS or fmt in ("preference", "unpaired", "prompt", "prompt_completion")
    if not chat_data or cfg.task.name not in TASKS or TASKS[cfg.task.name].encoder:
        return None
    if not template:
        if fmt in CHAT_FORMATS:
            raise ConfigCheckError([
                f"data.format={fmt} needs a chat template and the tokenizer has none: set data.chat_template to "
                f"one of {shipped_templates()} or a .jinja file in the model's format"])
        return None
    info = TemplateInfo.probe(tokenizer, template)
    problems = check_template_fits(tokenizer, info, cfg.data.allow_split_markers)
    if problems:
        raise ConfigCheckError([f"data.chat_template={cfg.data.chat_template}: {p}" for p in problems])
    return info


def length_problems(cfg: DictConfig, model_config) -> List[str]:
    """data.max_length against the positions the model has (read from its config.json, before any weights)."""
    limit = next((getattr(model_config, k) for k in ("max_position_embeddings", "n_positions", "max_seq_len",
                                                      "seq_length") if isinstance(getattr(model_config, k, None), int)),
                 None)
    if limit is not None and cfg.data.max_length > limit:
        return [f"data.max_length={cfg.data.max_length} is longer than the model's {limit} positions "
                f"(max_position_embeddings of {cfg.model.name_or_path}); set data.max_length<={limit}"]
    return []


# What the built-in demo sets choose for themselves; on another data.train they are a trap.
DEMO_DATA_KEYS = ("eval", "max_samples", "max_length", "system_prompt")


def inherited_data_problems(cfg: DictConfig) -> List[str]:
    """Your data.train on an experiment built for a generated set: a generated
    eval set makes no sense for it (refused)."""
    data = cfg.data
    if data.train and not str(data.train).startswith("builtin:") and data.eval and str(data.eval).startswith("builtin:"):
        return [f"data.eval={data.eval} is the experiment's generated eval set, but data.train={data.train} is "
                "your data: set data.eval=YOUR_EVAL_FILE, or data.eval=null to hold out data.eval_fraction of it"]
    return []


def inherited_data_settings(cfg: DictConfig, overrides) -> List[str]:
    """data.* values that came from the experiment while data.train came from
    the command line: shown next to a warning at start-up and in preflight."""
    from fttrain.config.schema import DataConfig

    given = {o.split("=", 1)[0].lstrip("+~") for o in overrides}
    if "data.train" not in given or str(cfg.data.train).startswith("builtin:"):
        return []
    defaults = DataConfig()
    out = []
    for key in DEMO_DATA_KEYS:
        value = cfg.data[key]
        if f"data.{key}" not in given and value != getattr(defaults, key):
            out.append(f"data.{key}={value}")
    return out


def peft_problems(cfg: DictConfig) -> List[str]:
    """Values and combinations of the ``peft`` group (method x plan rules are
    in fttrain.plan.check.check_plan, which knows the launch)."""
    from omegaconf import OmegaConf

    from fttrain.methods import METHODS

    peft, trainer = cfg.peft, cfg.trainer
    m, out = peft.method, []
    # `peft.method` is a plain field: `peft=qlora peft.method=full` must not slip through.
    schema = OmegaConf.get_type(peft)
    own = getattr(schema, "method", None) if schema is not None else None
    if m not in METHODS:
        return [f"peft.method={m!r} is not a method fttrain knows; one of {sorted(METHODS)}"]
    if isinstance(own, str) and own != m:
        if METHODS.get(own) and METHODS[own].quantized_base and METHODS[m].whole_model:
            out.append(f"peft={own} with peft.method={m}: 4-bit weights cannot be trained directly (QLoRA trains an "
                       f"adapter on a frozen quantised base); use peft={m} without quantisation, or peft={own}")
        else:
            out.append(f"peft.method={m!r} contradicts the chosen peft option (a {schema.__name__}, method {own!r}); "
                       f"pick the method with peft=<option>, one of {sorted(METHODS)}")
        return out
    method = METHODS[m]
    out += method.check(cfg)
    if not method.packs and packing_on(cfg):
        out.append(f"peft={m} prepends virtual tokens to each sequence, which packed rows (several samples per row) "
                   "cannot take: set data.packing=false")
    if any(k in trainer.optim for k in ("8bit", "bnb", "paged")) and not importable("bitsandbytes"):
        out.append(f"trainer.optim={trainer.optim} needs bitsandbytes: pip install 'fttrain[qlora]'")
    from transformers.training_args import OptimizerNames

    if trainer.optim not in {o.value for o in OptimizerNames}:
        out.append(f"trainer.optim={trainer.optim!r} is not an optimizer transformers knows "
                   "(adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, adafactor, ...)")
    return out
