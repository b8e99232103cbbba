"""The typed schema of an fttrain run.

Every YAML file under ``fttrain/conf/`` is merged onto these dataclasses while Hydra
composes the run, so an unknown key, a misspelled key or a wrong type fails at
compose time with the full key path (``peft.rr``, ``data.max_length``), before
any model or dataset is touched.

Config groups whose options carry different knobs (``peft``, ``task``) use one
dataclass per option, all subclasses of the group's base class (a PEFT method's
class is declared with the method, in ``fttrain.methods``). Each YAML of
such a group starts its defaults list with ``/schema/<group>/<option>@_here_``,
which types the node as that subclass.

Cross-field rules (this knob only makes sense with that one) live in
``fttrain.config.checks``, not here.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from fttrain.config.choice import Choice, choices
from fttrain.methods import METHODS
from fttrain.methods.base import PeftConfig
from fttrain.tasks import TASKS, TaskConfig
from fttrain.config.bounds import bounded


# --------------------------------------------------------------------- enums
def value_of(x):
    """An Enum member's value, or the thing itself (configs built without the schema)."""
    return x.value if isinstance(x, Enum) else x


class AttnImpl(Choice):
    sdpa = "sdpa"  # packed rows: a [L, L] block mask per row, and sdpa's slower masked kernels
    flash_attention_2 = "flash_attention_2"  # flash-attn's varlen kernel: no mask (GPU, needs the package)
    flex_attention = "flex_attention"  # torch's flex attention: a sparse block mask of the documents
    eager = "eager"


def flattens_packed_rows(attn) -> bool:
    """Whether packed rows go end to end in one row: the implementations that
    take document boundaries without a dense [L, L] mask (sdpa would build
    one for the whole flattened batch)."""
    return value_of(attn) in ("flash_attention_2", "flex_attention")


class DataFormat(Choice):
    alpaca = "alpaca"  # instruction / input / output
    sharegpt = "sharegpt"  # conversations: [{from, value}]
    messages = "messages"  # OpenAI style: messages: [{role, content}]
    prompt_completion = "prompt_completion"  # prompt / completion
    text = "text"  # raw text, every token trained
    preference = "preference"  # prompt / chosen / rejected (strings or messages): dpo, orpo, kto, rm
    unpaired = "unpaired"  # prompt / completion / label (true = desirable), or messages + label: kto
    prompt = "prompt"  # prompt (string or messages) + columns the reward functions read: grpo
    classification = "classification"  # text [/ text_pair] / label or labels: cls
    tokens_tags = "tokens_tags"  # CoNLL-style tokens / tags: ner
    squad = "squad"  # context / question / answers{text, answer_start}: qa


Overlength = choices("Overlength", ("truncate", "drop", "raise"), __name__)
# full: rank 0 gathers whole weights into one folder; sharded: one shard per rank
SaveFormat = choices("SaveFormat", ("full", "sharded"), __name__)
# who checkpoints activations under FSDP: transformers ("model") or FSDP's wrapper
# trainer.loss (fttrain/loss.py): default = the model's own [tokens, vocab] logits;
# chunked = lm_head + cross-entropy a chunk of positions at a time, recomputed in backward;
# liger = Liger-Kernel's fused linear cross-entropy, cce = cut-cross-entropy's (Triton kernels: a CUDA GPU
# and pip install liger-kernel / cut-cross-entropy); neither writes the logits out
TokenLoss = choices("TokenLoss", ("default", "chunked", "liger", "cce"), __name__)
ActivationCheckpointing = choices("ActivationCheckpointing", ("model", "fsdp"), __name__)
# Resuming checks a checkpoint against its manifest: every file's size and SHA-256
# (reads it all once: seconds per GB) or sizes only (instant; misses flipped bytes).
VerifyCheckpoints = choices("VerifyCheckpoints", ("hash", "size"), __name__)


class Precision(Choice):
    auto = "auto"  # bf16 on a GPU that supports it, fp32 otherwise
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class DistPlan(Choice):
    single = "single"  # one process, no wrapper
    ddp = "ddp"  # torch DistributedDataParallel
    deepspeed = "deepspeed"  # DeepSpeed ZeRO stage 1, 2 or 3
    fsdp = "fsdp"  # torch FSDP2 (fully_shard)


# ------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the offline tiny Llama built by ``fttrain.models.tiny``."""

    vocab_size: int = bounded(384, lo=8)
    hidden_size: int = bounded(128, lo=1)
    intermediate_size: int = bounded(352, lo=1)
    num_hidden_layers: int = bounded(4, lo=1)
    num_attention_heads: int = bounded(4, lo=1)
    num_key_value_heads: int = bounded(2, lo=1)
    max_position_embeddings: int = bounded(512, lo=8)
    seed: int = bounded(0, lo=0)


@dataclass
class ModelConfig:
    # A hub id, a local directory, or "builtin:tiny-llama" for the offline tiny model.
    name_or_path: str = MISSING
    revision: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to name_or_path
    trust_remote_code: bool = False
    # flash_attention_2 if installed: faster, and varlen packing without masks
    attn_implementation: AttnImpl = AttnImpl.sdpa
    # Dropout of the base model's own modules (BERT: 0.1). null keeps the
    # checkpoint's; 0.0 makes training deterministic across rank layouts
    # (TRL tasks turn it off themselves). Adapter dropout is peft.dropout.
    dropout: Optional[float] = bounded(None, lo=0, hi=1, hi_open=True)
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


# -------------------------------------------------------------------- peft
# One class per method, declared with the method in fttrain/methods/ (fttrain/conf/peft/<option>.yaml
# sets its knobs). Where a method takes target modules, the presets "attention",
# "query_value" and "all_linear" are resolved per architecture (fttrain.methods.targets).


# -------------------------------------------------------------------- data
@dataclass
class DataConfig:
    # A local .jsonl/.json/.csv/.parquet file, a `datasets` name or path, or
    # "builtin:<name>" for a generated data set (see fttrain.data.synthetic).
    train: str = MISSING
    eval: Optional[str] = None  # a file; otherwise eval_fraction of train
    eval_fraction: float = bounded(0.05, lo=0, hi=1, hi_open=True)
    split_seed: int = bounded(1234, lo=0)
    train_split: str = "train"  # for `datasets` sources
    eval_split: str = "validation"  # for `datasets` sources given as data.eval
    # alpaca | sharegpt | messages | prompt_completion | text | preference | unpaired | prompt
    format: DataFormat = DataFormat.messages
    # Column names that differ from the format's defaults, e.g. {messages: conversation}.
    columns: Dict[str, str] = field(default_factory=dict)
    # Role names in the data mapped to system/user/assistant (sharegpt: human->user, gpt->assistant).
    role_map: Dict[str, str] = field(default_factory=dict)
    system_prompt: Optional[str] = None  # prepended to every chat without one
    # "tokenizer": the model's own template (default); a shipped name (llama3,
    # chatml: fttrain/data/templates/); or a path to a .jinja file. The run
    # trains with it and saves it with the model, so inference uses the same format.
    chat_template: str = "tokenizer"
    # A template whose turn markers this tokenizer splits into plain-text pieces
    # is refused (it is another model's format). true accepts it: a base model
    # learning a new format.
    allow_split_markers: bool = False
    max_length: int = bounded(1024, lo=8)  # longer sequences cost memory quadratically in eager attention
    overlength: Overlength = Overlength.truncate  # truncate | drop | raise
    # strict: a bad row raises with its index and field. lenient: it is dropped and counted.
    strict: bool = True
    # Best-fit-decreasing, padding-free rows: faster, same loss. null: on where
    # the task packs (sft, pt), off where it cannot (TRL's and encoder tasks).
    packing: Optional[bool] = None
    max_samples: Optional[int] = bounded(None, lo=1)  # cap on training rows, for smoke tests
    # Processes that tokenize and mask (sft, pt): null = the CPUs this process
    # may use, at most 8. Each holds the tokenizer and ~2000 rows at a time.
    num_proc: Optional[int] = bounded(None, lo=1)
    # Encode the training rows while training reads them, a window at a time,
    # instead of preparing them once into the cache: for sets larger than the
    # disk. Every rank encodes every row; needs trainer.max_steps.
    streaming: bool = False
    # rows packed together when streaming: more packs tighter, holds more in memory
    stream_window: int = bounded(2000, lo=1)
    # Reuse tokenized data from an identical earlier preparation (keyed by this
    # section, the files' size and mtime, the tokenizer and the template).
    cache: bool = True


# -------------------------------------------------------------- dist, prec
@dataclass
class DistConfig:
    """How the run is spread over processes. One class per kind of plan, so a
    ZeRO knob given to an FSDP plan fails at compose time. The translation to
    accelerate / DeepSpeed / FSDP settings lives in ``fttrain.plan``."""

    plan: DistPlan = DistPlan.single
    # Set it to make fttrain refuse a launch that did not start this many
    # processes (e.g. `accelerate launch --num_processes 2` without --multi_gpu
    # starts one).
    expected_world_size: Optional[int] = bounded(None, lo=1)
    backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU
    # How long a collective may wait for a rank. Data preparation on local
    # rank 0 is waited for without it (fttrain.rendezvous), however long it takes.
    timeout_minutes: float = bounded(30, lo=0, lo_open=True)


@dataclass
class DdpDistConfig(DistConfig):
    plan: DistPlan = DistPlan.ddp
    find_unused_parameters: bool = False  # true only for models with unused branches: slower


@dataclass
class ZeroDistConfig(DistConfig):
    plan: DistPlan = DistPlan.deepspeed
    stage: int = bounded(2, lo=1, hi=3)  # 1: optimizer states, 2: + gradients, 3: + parameters sharded
    offload_optimizer: bool = False  # optimizer states and step on CPU (DeepSpeed's CPU Adam)
    offload_params: bool = False  # stage 3 only: parameters live in CPU memory between uses
    overlap_comm: bool = True  # overlap gradient reduction with backward: faster, more memory
    # full: rank 0 gathers the weights into one standard HF folder (needs the
    # whole model in rank 0's CPU memory). sharded: each rank writes its own
    # shard; `python -m fttrain.consolidate RUN_DIR` merges them later.
    save_format: SaveFormat = SaveFormat.full


@dataclass
class FsdpDistConfig(DistConfig):
    plan: DistPlan = DistPlan.fsdp
    # true: full shard (parameters freed after forward, gathered again for
    # backward: least memory). false: shard gradients and optimizer state only
    # (SHARD_GRAD_OP: one all-gather fewer per step, parameters stay whole).
    reshard_after_forward: bool = True
    hybrid: bool = False  # shard within a node, replicate across nodes (needs >1 node)
    offload: bool = False  # parameters, gradients and optimizer step on CPU: slow, fits big models
    # Wrap unit; null: the model's own decoder-layer class (_no_split_modules).
    wrap_class: Optional[str] = None
    # With trainer.gradient_checkpointing: "model" checkpoints through
    # transformers, "fsdp" through FSDP's activation checkpointing wrapper.
    activation_checkpointing: ActivationCheckpointing = ActivationCheckpointing.model
    save_format: SaveFormat = SaveFormat.full  # full | sharded, as for ZeRO


@dataclass
class PrecisionConfig:
    dtype: Precision = Precision.auto


# ----------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    micro_batch_size: int = bounded(4, lo=1)  # per device; packed rows hold several samples each
    gradient_accumulation_steps: int = bounded(1, lo=1)  # more: larger global batch at the same memory, fewer steps/s
    # If set, accumulation is derived: global = micro x accumulation x world size.
    global_batch_size: Optional[int] = bounded(None, lo=1)
    max_steps: int = bounded(-1, lo=-1)  # >0 overrides num_epochs
    num_epochs: float = bounded(1.0, lo=0)
    learning_rate: float = bounded(2e-4, lo=0, lo_open=True)  # LoRA likes ~1e-4..3e-4; full fine-tuning ~1e-5
    lr_scheduler: str = "cosine"
    warmup_ratio: float = bounded(0.03, lo=0, hi=1, hi_open=True)
    weight_decay: float = bounded(0.0, lo=0)
    max_grad_norm: float = bounded(1.0, lo=0)
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False  # less activation memory, ~30% slower steps
    # chunked: the full logits never exist (a 128k vocabulary at 8k tokens is 4 GiB
    # of fp32 logits + their gradient), for one more lm_head matmul per chunk.
    loss: TokenLoss = TokenLoss.default
    # positions per chunk: smaller holds less, more chunks cost more launches
    loss_chunk_tokens: int = bounded(1024, lo=1)
    # Liger-Kernel's fused RMSNorm, RoPE and SwiGLU (CUDA GPU, pip install liger-kernel; the
    # families Liger patches: Llama, Mistral, Qwen, Gemma, Phi-3, ...): less activation memory.
    liger_kernels: bool = False
    # torch.compile the model: faster steps after a first step that compiles
    # (tens of seconds, reported as first_step_seconds; again if shapes change).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; aot_eager traces without generating kernels
    # Steps between log lines: each one reads the loss and grad norm back from
    # the GPU (a sync that drains its queue) and, with several ranks, gathers them.
    logging_steps: int = bounded(10, lo=1)
    eval_steps: Optional[int] = bounded(None, lo=1)  # None: evaluate once at the end
    save_steps: Optional[int] = bounded(None, lo=1)  # None: save only the final model (and on a stop signal)
    save_total_limit: int = bounded(2, lo=0)  # complete checkpoints kept (newest first); 0 keeps all
    verify_checkpoints: VerifyCheckpoints = VerifyCheckpoints.hash  # before resuming: hash | size
    # On these signals every rank finishes its step, one checkpoint is written,
    # and the run stops (Slurm: USR1 before the time limit, TERM on preemption).
    # USR2: the time-limit warning of Hydra's submitit launcher (hydra/launcher=slurm*).
    stop_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    # After stopping on one of these under Slurm, rank 0 runs scontrol requeue.
    requeue_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2"])
    # With several ranks, steps between their agreeing on a stop signal (an
    # all-reduce read back on the host: a sync). A stop then waits up to this
    # many steps, so slurm.signal_seconds must cover them and a checkpoint.
    stop_check_steps: int = bounded(5, lo=1)
    # A step (forward, backward, update; not evals, saves or a process's first
    # step, which compiles) running longer than this is a hang: that rank writes
    # every thread's stack to stacks/rank<r>.txt and exits, and the launcher ends
    # the job. null: no limit. Keep it above the slowest real step and below
    # dist.timeout_minutes, so the stacks are written before a collective gives up.
    step_timeout_seconds: Optional[int] = bounded(1200, lo=1)
    dataloader_num_workers: int = bounded(0, lo=0)
    seed: int = bounded(42, lo=0, hi=2**32 - 1)
    # Each rank writes ranks/rank<r>.json: the sample ids it trained on and a
    # hash of its whole trainable weights. Costs a pass over every weight at the
    # end (gathered from the shards under ZeRO-3/FSDP: ~minutes for an 8B full
    # fine-tune); the tiny experiments turn it on for the tests.
    rank_records: bool = False


@dataclass
class LoggerConfig:
    """Where metrics go besides the run dir (fttrain/trackers.py says what each tracker gets)."""

    # mlflow | wandb | tensorboard (fed by fttrain.trackers; several at once:
    # logger.report_to=[mlflow,tensorboard]); any other integration transformers
    # knows (comet_ml, clearml, ...) is passed to it as is.
    report_to: List[str] = field(default_factory=list)
    # MLflow experiment / W&B project. null: MLflow uses the experiment's name,
    # W&B $WANDB_PROJECT or "fttrain". A Hydra sweep adds "-sweep" (MLflow) / groups its trials (W&B).
    project: Optional[str] = None
    # MLflow server or store; null: sqlite:///<output_root>/mlflow.db, shared by every run there
    # (for Slurm sweeps whose trials run at once on a shared file system, use a server: http://host:5000).
    tracking_uri: Optional[str] = None
    progress_bar: bool = True


# ------------------------------------------------------------------ harness
@dataclass
class HarnessConfig:
    """lm-evaluation-harness on the trained model once it is saved (fttrain/harness.py);
    ``fttrain eval RUN_DIR`` runs the same later, or on an export."""

    # lm_eval task, group or tag names (hellaswag, arc_easy, mmlu) or globs; empty: no evaluation.
    # e.g. python -m fttrain +exp=demo 'harness.tasks=[arc_easy]' harness.limit=100
    tasks: List[str] = field(default_factory=list)
    include_path: Optional[str] = None  # a folder of your own task YAMLs (local data: dataset_path: json)
    # The first N docs of each task: minutes instead of hours, but not a score to set beside published ones.
    limit: Optional[int] = bounded(None, lo=1)
    num_fewshot: Optional[int] = bounded(None, lo=0)  # null: each task's own
    batch_size: int = bounded(8, lo=1)  # requests per forward pass: more is faster until memory runs out
    # Instruct models: prompts go through the tokenizer's chat template, as the model was tuned to read them.
    apply_chat_template: bool = False
    system_instruction: Optional[str] = None  # a system prompt before each prompt (the one the model was tuned with)


# ------------------------------------------------------------------ slurm
@dataclass
class SlurmConfig:
    """How ``python -m fttrain.slurm`` renders and submits this run (slurm/*.sbatch).
    Training ignores it; it is part of the run's config so a job's config is
    exactly the one that was rendered."""

    partition: Optional[str] = None  # required to render: the queue (sinfo lists them)
    account: Optional[str] = None  # charged account, where the cluster asks for one
    qos: Optional[str] = None
    nodes: int = bounded(1, lo=1)  # > 1 renders the multi-node template: one accelerate launch per node
    gpus_per_node: int = bounded(8, lo=0)  # one training process per GPU; 0 = CPU processes (gloo)
    processes_per_node: Optional[int] = bounded(None, lo=1)  # null: gpus_per_node (CPU clusters: set it)
    cpus_per_task: int = bounded(8, lo=1)  # CPU cores for each node's launcher and its processes (data loading)
    mem: Optional[str] = None  # per node, e.g. 200G; "0" = all of it; null: the partition default
    time: str = "04:00:00"  # wall time; USR1 arrives signal_seconds before it ends
    job_name: Optional[str] = None  # null: the run's name
    constraint: Optional[str] = None  # node features, e.g. a100|h100
    # warning before the limit: trainer.stop_check_steps steps + a checkpoint must fit in it
    signal_seconds: int = bounded(90, lo=1)
    # Requeues after a stop signal, counted by Slurm (SLURM_RESTART_COUNT, which
    # also counts other restarts): a long run needs one per time slice.
    max_requeues: int = bounded(20, lo=0)
    # rendezvous port on the first node; null: derived from the job id (no clashes)
    port: Optional[int] = bounded(None, lo=1, hi=65535)
    # Environment setup, run before launching: module load ..., source venv/bin/activate
    setup: List[str] = field(default_factory=list)
    env: Dict[str, str] = field(default_factory=dict)  # extra exported variables: +slurm.env.HF_HOME=/scratch/hf
    sbatch: List[str] = field(default_factory=list)  # extra #SBATCH options, e.g. ["--exclusive"]
    nccl_debug: str = "WARN"  # NCCL_DEBUG: INFO prints topology and transports (hangs, slow links)
    distributed_debug: str = "OFF"  # TORCH_DISTRIBUTED_DEBUG: DETAIL checks collectives match (slow)
    python: str = "python"  # interpreter on the compute nodes (after setup)


# ------------------------------------------------------------------ run
@dataclass
class FTConfig:
    name: str = MISSING  # the experiment's name; the run dir is output_root/name
    output_root: str = "outputs"
    # null | "auto" (newest checkpoint in the run dir) | a checkpoint path
    resume_from: Optional[str] = None
    # Allow reusing a run dir that holds a finished run (its files are replaced).
    overwrite: bool = False
    # Check everything that can be checked without the model (config, launch,
    # tokenizer, template, every data row), print the batch arithmetic and a
    # sample with its trained tokens marked, then stop.
    preflight: bool = False
    # The metrics.json key python -m fttrain returns: what Hydra sweepers (Optuna) optimise.
    objective: str = "eval_loss"
    model: ModelConfig = MISSING
    peft: PeftConfig = MISSING
    task: TaskConfig = MISSING
    data: DataConfig = MISSING
    dist: DistConfig = MISSING
    precision: PrecisionConfig = MISSING
    trainer: TrainerConfig = MISSING
    logger: LoggerConfig = MISSING
    slurm: SlurmConfig = MISSING
    # Not a config group: harness.tasks=[...] on the command line (HarnessConfig).
    harness: HarnessConfig = field(default_factory=HarnessConfig)


GROUP_SCHEMAS: Dict[str, Dict[str, Any]] = {
    "model": {"model": ModelConfig},
    "peft": {name: method.config for name, method in METHODS.items()},
    "task": {name: task.config for name, task in TASKS.items()},
    "data": {"data": DataConfig},
    "dist": {"single": DistConfig, "ddp": DdpDistConfig, "zero": ZeroDistConfig, "fsdp": FsdpDistConfig},
    "precision": {"precision": PrecisionConfig},
    "trainer": {"trainer": TrainerConfig},
    "logger": {"logger": LoggerConfig},
    "slurm": {"slurm": SlurmConfig},
}


def register_configs() -> None:
    import sys

    from omegaconf import OmegaConf

    # ${fttrain_python:} -> this interpreter (fttrain/conf/slurm/local.yaml: jobs use the Python that rendered them).
    OmegaConf.register_new_resolver("fttrain_python", lambda: sys.executable, replace=True)
    cs = ConfigStore.instance()
    cs.store(name="fttrain_schema", node=FTConfig)
    for group, options in GROUP_SCHEMAS.items():
        for option, node in options.items():
            cs.store(group=f"schema/{group}", name=option, node=node)
