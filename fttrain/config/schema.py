"""The typed schema of an fttrain run.

Every YAML file under ``fttrain/conf/`` is merged onto these dataclasses while Hydra
composes the run, so an unknown key, a misspelled key or a wrong type fails at
compose time with the full key path (``peft.rr``, ``data.max_length``), before
any model or dataset is touched.

Config groups whose options carry different knobs (``peft``, ``task``) use one
dataclass per option, all subclasses of the group's base class. Each YAML of
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


# --------------------------------------------------------------------- enums
def value_of(x):
    """An Enum member's value, or the thing itself (configs built without the schema)."""
    return x.value if isinstance(x, Enum) else x


class AttnImpl(str, Enum):
    sdpa = "sdpa"
    flash_attention_2 = "flash_attention_2"
    eager = "eager"


class DataFormat(str, Enum):
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


OVERLENGTH_POLICIES = ("truncate", "drop", "raise")  # a str, not an Enum: `raise` is a keyword


class Precision(str, Enum):
    auto = "auto"  # bf16 on a GPU that supports it, fp32 otherwise
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class DistPlan(str, Enum):
    single = "single"  # one process, no wrapper
    ddp = "ddp"  # torch DistributedDataParallel
    deepspeed = "deepspeed"  # DeepSpeed ZeRO stage 1, 2 or 3
    fsdp = "fsdp"  # torch FSDP2 (fully_shard)


# ------------------------------------------------------------------- model
@dataclass
class TinyModelConfig:
    """Shape of the offline tiny Llama built by ``fttrain.models.tiny``."""

    vocab_size: int = 384
    hidden_size: int = 128
    intermediate_size: int = 352
    num_hidden_layers: int = 4
    num_attention_heads: int = 4
    num_key_value_heads: int = 2
    max_position_embeddings: int = 512
    seed: int = 0


@dataclass
class ModelConfig:
    # A hub id, a local directory, or "builtin:tiny-llama" for the offline tiny model.
    name_or_path: str = MISSING
    revision: Optional[str] = None
    tokenizer: Optional[str] = None  # defaults to name_or_path
    trust_remote_code: bool = False
    attn_implementation: AttnImpl = AttnImpl.sdpa
    # Dropout of the base model's own modules (BERT: 0.1). null keeps the
    # checkpoint's; 0.0 makes training deterministic across rank layouts
    # (TRL tasks turn it off themselves). Adapter dropout is peft.dropout.
    dropout: Optional[float] = None
    tiny: TinyModelConfig = field(default_factory=TinyModelConfig)


# -------------------------------------------------------------------- peft
# One class per method (fttrain/conf/peft/<option>.yaml). Where a method takes target
# modules, the presets "attention" and "all_linear" are resolved per
# architecture (fttrain.peft_setup); anything else is a module name.
@dataclass
class PeftConfig:
    method: str = MISSING


@dataclass
class FullConfig(PeftConfig):
    method: str = "full"


@dataclass
class FreezeConfig(PeftConfig):
    """Full weights of a few layers; the rest frozen."""

    method: str = "freeze"
    trainable_layers: int = 2  # the last k decoder layers; negative: the first |k|; 0: none
    # Regexes on parameter names trained in addition (e.g. ["mlp"], ["norm"]).
    trainable_patterns: List[str] = field(default_factory=list)
    train_embeddings: bool = False
    train_head: bool = False


@dataclass
class LoraConfig(PeftConfig):
    method: str = "lora"
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    bias: str = "none"  # none | all | lora_only
    target_modules: List[str] = field(default_factory=lambda: ["all_linear"])
    modules_to_save: List[str] = field(default_factory=list)
    use_rslora: bool = False
    use_dora: bool = False
    init: str = "default"  # default | gaussian | pissa | loftq
    loftq_bits: int = 4  # init=loftq: the bit width the base will be quantised to
    # LoRA+: B matrices learn at learning_rate x this ratio (paper: 16). null: off.
    loraplus_lr_ratio: Optional[float] = None


@dataclass
class QLoraConfig(LoraConfig):
    method: str = "qlora"
    bits: int = 4  # 4 (nf4/fp4) or 8
    quant_type: str = "nf4"  # nf4 | fp4
    double_quant: bool = True
    compute_dtype: str = "auto"  # auto: follows precision (bf16 -> bfloat16, fp16 -> float16, else float32)
    # Needed for ZeRO-3 / FSDP: must equal the compute dtype there.
    quant_storage: Optional[str] = None


@dataclass
class IA3Config(PeftConfig):
    method: str = "ia3"
    # null: peft's per-architecture defaults (Llama: k_proj, v_proj, down_proj).
    target_modules: Optional[List[str]] = None
    feedforward_modules: Optional[List[str]] = None  # scaled on their input, not output


@dataclass
class VeraConfig(PeftConfig):
    method: str = "vera"
    r: int = 256  # shared random matrices are cheap: VeRA uses far higher ranks than LoRA
    target_modules: List[str] = field(default_factory=lambda: ["attention"])
    dropout: float = 0.0


@dataclass
class LycorisConfig(PeftConfig):
    """LoHa and LoKr (the LyCORIS family) take the same knobs."""

    r: int = 8
    alpha: int = 8
    dropout: float = 0.0  # module dropout: a whole adapted module is skipped with this probability
    target_modules: List[str] = field(default_factory=lambda: ["attention"])


@dataclass
class LohaConfig(LycorisConfig):
    method: str = "loha"


@dataclass
class LokrConfig(LycorisConfig):
    method: str = "lokr"


@dataclass
class OftConfig(PeftConfig):
    method: str = "oft"
    block_size: int = 32  # orthogonal blocks of this size; must divide each target's input width
    target_modules: List[str] = field(default_factory=lambda: ["attention"])
    dropout: float = 0.0


@dataclass
class AdaLoraConfig(PeftConfig):
    """LoRA whose rank budget is reallocated by importance during training."""

    method: str = "adalora"
    init_r: int = 12  # rank each module starts with
    target_r: int = 8  # average rank left at the end
    tinit: int = 0  # steps before pruning starts
    tfinal: int = 0  # steps at the end with the final budget fixed
    delta_t: int = 1  # steps between budget reallocations
    alpha: int = 32
    dropout: float = 0.0
    target_modules: List[str] = field(default_factory=lambda: ["attention"])


@dataclass
class PromptTuningConfig(PeftConfig):
    method: str = "prompt_tuning"
    num_virtual_tokens: int = 20
    init_text: Optional[str] = None  # initialise the soft prompt from this text's embeddings


@dataclass
class PrefixTuningConfig(PeftConfig):
    method: str = "prefix_tuning"
    num_virtual_tokens: int = 20
    projection: bool = True  # learn prefixes through an MLP: more stable, more parameters while training
    encoder_hidden_size: int = 512  # width of that MLP


@dataclass
class PTuningConfig(PeftConfig):
    method: str = "p_tuning"
    num_virtual_tokens: int = 20
    encoder_hidden_size: int = 512
    encoder_type: str = "MLP"  # MLP | LSTM


@dataclass
class LlamaAdapterConfig(PeftConfig):
    """Adaption prompts with zero-init gating (LLaMA-Adapter), Llama-family models only."""

    method: str = "llama_adapter"
    adapter_len: int = 10  # learned prompt tokens per adapted layer
    adapter_layers: int = 2  # the top layers that get them


@dataclass
class BottleneckConfig(PeftConfig):
    """Bottleneck adapters after attention and FFN (fttrain.bottleneck)."""

    method: str = "adapter"
    r: int = 64  # bottleneck width: d -> r -> d
    activation: str = "gelu"  # gelu | relu | silu | tanh
    # serial: h + up(act(down(h))) on the sublayer's output (Houlsby et al.).
    # parallel: sublayer(x) + scale * up(act(down(x))) on its input (He et al.).
    placement: str = "serial"
    scale: float = 1.0  # multiplies the adapter's output (He et al. use 4 for parallel)
    dropout: float = 0.0
    sublayers: List[str] = field(default_factory=lambda: ["attention", "ffn"])


@dataclass
class GaloreConfig(PeftConfig):
    """Full-parameter training with GaLore's low-rank optimizer state."""

    method: str = "galore"
    rank: int = 128  # projection rank: the optimizer state of a d x d weight becomes r x d
    update_proj_gap: int = 200  # steps between SVD refreshes of the projection: fewer is slower, tracks better
    scale: float = 0.25
    proj_type: str = "std"  # std | reverse_std | right | left | full
    target_modules: List[str] = field(default_factory=lambda: ["all_linear"])
    optimizer: str = "adamw"  # adamw | adamw_8bit | adafactor
    layerwise: bool = False  # per-layer optimizer steps: less memory; one process only, no grad clipping


@dataclass
class LisaConfig(PeftConfig):
    """Layerwise importance sampling: a few random layers learn at a time."""

    method: str = "lisa"
    active_layers: int = 2  # decoder layers unfrozen at a time
    switch_every: int = 20  # steps between re-draws
    train_embeddings: bool = True
    train_head: bool = True


# -------------------------------------------------------------------- task
@dataclass
class GenerationEvalConfig:
    """Greedy generation on held-out prompts before and after training."""

    num_samples: int = 8  # prompts written to samples.jsonl
    exact_match_samples: int = 0  # >0: score exact match on this many eval rows
    max_new_tokens: int = 48
    batch_size: int = 8  # prompts per generate call: more is faster, needs memory for the KV cache


@dataclass
class TaskConfig:
    name: str = MISSING


@dataclass
class SFTTaskConfig(TaskConfig):
    name: str = "sft"
    # Train only the chosen turns (train_roles) and their end-of-turn token;
    # found for any chat template (fttrain/data/chat.py). false: every token.
    assistant_only_loss: bool = True
    # Roles whose messages train: assistant (default); adding user or tool also trains those turns.
    train_roles: List[str] = field(default_factory=lambda: ["assistant"])
    last_turn_only: bool = False  # true: only the last trained turn of each chat (earlier ones are context)
    # false: an empty <think></think> block the template writes before an answer
    # (Qwen3 and other reasoning templates) is context, not trained, so the model
    # keeps its own reasoning mode; true: train it (teaches "no thinking").
    train_empty_think: bool = False
    # When the template writes earlier turns differently once later turns follow
    # (Qwen3 drops earlier <think> blocks; some fold the system prompt into the
    # last user turn): split = one sample per trained turn (more tokens, every
    # turn trained as served); last = train the last turn only; raise = stop.
    history_rewrite: str = "split"
    generation_eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)


@dataclass
class PretrainTaskConfig(TaskConfig):
    """Continued pretraining on raw text; every token trained."""

    name: str = "pt"
    # true: documents joined (EOS between them) and cut into data.max_length
    # blocks, no padding, attention crosses documents inside a block (GPT-style).
    # false: one document per sample, truncated to max_length, packed best-fit
    # with position restarts (no cross-document attention; data.packing).
    concatenate: bool = True
    generation_eval: GenerationEvalConfig = field(default_factory=GenerationEvalConfig)


# TRL 1.16's DPO losses (DPOConfig.loss_type): what task.loss_type may list.
DPO_LOSSES = ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
              "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm")


@dataclass
class DPOTaskConfig(TaskConfig):
    """Direct preference optimisation on prompt / chosen / rejected (TRL's DPOTrainer)."""

    name: str = "dpo"
    beta: float = 0.1  # strength of the pull towards the reference: lower drifts further
    # sigmoid (DPO), ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, aot, aot_unpaired,
    # apo_zero, apo_down, discopop, sft; several with loss_weights = a weighted sum.
    loss_type: List[str] = field(default_factory=lambda: ["sigmoid"])
    loss_weights: Optional[List[float]] = None
    label_smoothing: float = 0.0  # > 0: conservative DPO for noisy preference labels
    # auto: with an adapter, a frozen copy of the adapter as it started (TRL's
    # "ref" adapter: a few MB, and the true start model even for PiSSA-style
    # inits that change the base); with full fine-tuning, the start model
    # loaded again, frozen. A path or hub id: that model as the reference.
    reference: str = "auto"
    # Reference log-probs computed once before training: no reference forward
    # per step (faster, frees the reference), one extra pass over the data.
    precompute_ref_log_probs: bool = False


@dataclass
class KTOTaskConfig(TaskConfig):
    """Kahneman-Tversky optimisation: unpaired good/bad completions (pairs are split)."""

    name: str = "kto"
    beta: float = 0.1
    loss_type: str = "kto"  # kto | apo_zero_unpaired
    desirable_weight: float = 1.0  # raise when good examples are rarer than bad ones
    undesirable_weight: float = 1.0
    reference: str = "auto"  # as for dpo
    precompute_ref_log_probs: bool = False


@dataclass
class ORPOTaskConfig(TaskConfig):
    """Odds-ratio preference optimisation: SFT + preference in one loss, no reference model."""

    name: str = "orpo"
    beta: float = 0.1  # weight of the odds-ratio term (lambda in the paper)


@dataclass
class RewardTaskConfig(TaskConfig):
    """A scalar-head reward model trained on chosen/rejected pairs (Bradley-Terry)."""

    name: str = "rm"
    # > 0 pulls rewards towards zero mean, so scores from different runs compare.
    center_rewards_coefficient: Optional[float] = None


@dataclass
class GRPOTaskConfig(TaskConfig):
    """Group relative policy optimisation with reward functions named by _target_."""

    name: str = "grpo"
    # Each entry: {_target_: module.function, weight: 1.0, <keyword arguments>}.
    # A function gets (prompts, completions, **columns of the data row) and returns one float per completion.
    rewards: List[Any] = field(default_factory=list)
    num_generations: int = 4  # completions per prompt; the group whose rewards are compared
    max_completion_length: int = 32
    beta: float = 0.0  # KL penalty to the reference; 0 needs no reference model (less memory)
    temperature: float = 1.0  # sampling temperature: diversity within a group is what gives signal
    # grpo | dr_grpo | dapo | bnpo: how token losses are averaged (TRL's loss_type)
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # group | batch | none: divide advantages by the reward std of ...
    eval_samples: int = 32  # held-out prompts scored greedily before and after training


@dataclass
class ClassificationTaskConfig(TaskConfig):
    """Sequence classification with an encoder (or decoder) and a linear head."""

    name: str = "cls"
    labels: Optional[List[str]] = None  # None: the sorted label names found in the training data
    multi_label: bool = False  # labels: [...] per row, sigmoid + BCE, a threshold per label
    threshold: float = 0.5  # multi-label decision threshold, for every label ...
    thresholds: Dict[str, float] = field(default_factory=dict)  # ... unless set per label here
    class_weights: Optional[List[float]] = None  # per label, in `labels` order; for imbalanced data


@dataclass
class NERTaskConfig(TaskConfig):
    """Token classification on CoNLL-style tokens/tags; entity-level F1."""

    name: str = "ner"
    labels: Optional[List[str]] = None  # None: the tags found in the training data (O first)
    # false: only a word's first sub-token is labelled (the usual CoNLL recipe);
    # true: every sub-token is (B- continues as I-): more signal, same word-level scoring.
    label_all_tokens: bool = False


@dataclass
class QATaskConfig(TaskConfig):
    """Extractive question answering in SQuAD form; exact match and F1."""

    name: str = "qa"
    doc_stride: int = 128  # overlap between windows of a long context: answers near a cut stay whole
    max_answer_length: int = 30  # in tokens
    n_best: int = 20  # start and end candidates tried per window
    # SQuAD 2.0: some questions have no answer; predict "" when the no-answer
    # score beats the best span by more than the threshold.
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0


# -------------------------------------------------------------------- data
@dataclass
class DataConfig:
    # A local .jsonl/.json/.csv/.parquet file, a `datasets` name or path, or
    # "builtin:<name>" for a generated data set (see fttrain.data.synthetic).
    train: str = MISSING
    eval: Optional[str] = None  # a file; otherwise eval_fraction of train
    eval_fraction: float = 0.05
    split_seed: int = 1234
    train_split: str = "train"  # for `datasets` sources
    eval_split: str = "validation"  # for `datasets` sources given as data.eval
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
    max_length: int = 1024  # longer sequences cost memory quadratically in eager attention
    overlength: str = "truncate"  # truncate | drop | raise
    # strict: a bad row raises with its index and field. lenient: it is dropped and counted.
    strict: bool = True
    # Best-fit-decreasing, padding-free rows: faster, same loss. null: on where
    # the task packs (sft, pt), off where it cannot (TRL's and encoder tasks).
    packing: Optional[bool] = None
    max_samples: Optional[int] = None  # cap on training rows, for smoke tests
    # Processes that tokenize and mask (sft, pt): null = the CPUs this process
    # may use, at most 8. Each holds the tokenizer and ~2000 rows at a time.
    num_proc: Optional[int] = None
    # Encode the training rows while training reads them, a window at a time,
    # instead of preparing them once into the cache: for sets larger than the
    # disk. Every rank encodes every row; needs trainer.max_steps.
    streaming: bool = False
    stream_window: int = 2000  # rows packed together when streaming: more packs tighter, holds more in memory
    # Reuse tokenized data from an identical earlier preparation (keyed by this
    # section, the files' size and mtime, the tokenizer and the template).
    cache: bool = True


# -------------------------------------------------------------- dist, prec
@dataclass
class DistConfig:
    """How the run is spread over processes. One class per kind of plan, so a
    ZeRO knob given to an FSDP plan fails at compose time. The translation to
    accelerate / DeepSpeed / FSDP settings lives in ``fttrain.distributed``."""

    plan: DistPlan = DistPlan.single
    # Set it to make fttrain refuse a launch that did not start this many
    # processes (e.g. `accelerate launch --num_processes 2` without --multi_gpu
    # starts one).
    expected_world_size: Optional[int] = None
    backend: Optional[str] = None  # None: nccl on GPU, gloo on CPU
    # How long a collective may wait for a rank. Data preparation on local
    # rank 0 is waited for without it (fttrain.rendezvous), however long it takes.
    timeout_minutes: float = 30


@dataclass
class DdpDistConfig(DistConfig):
    plan: DistPlan = DistPlan.ddp
    find_unused_parameters: bool = False


@dataclass
class ZeroDistConfig(DistConfig):
    plan: DistPlan = DistPlan.deepspeed
    stage: int = 2  # 1: optimizer states, 2: + gradients, 3: + parameters sharded
    offload_optimizer: bool = False  # optimizer states and step on CPU (DeepSpeed's CPU Adam)
    offload_params: bool = False  # stage 3 only: parameters live in CPU memory between uses
    overlap_comm: bool = True  # overlap gradient reduction with backward: faster, more memory
    # full: rank 0 gathers the weights into one standard HF folder (needs the
    # whole model in rank 0's CPU memory). sharded: each rank writes its own
    # shard; `python -m fttrain.consolidate RUN_DIR` merges them later.
    save_format: str = "full"


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
    activation_checkpointing: str = "model"
    save_format: str = "full"  # full | sharded, as for ZeRO


@dataclass
class PrecisionConfig:
    dtype: Precision = Precision.auto


# ----------------------------------------------------------------- trainer
@dataclass
class TrainerConfig:
    micro_batch_size: int = 4  # per device; packed rows hold several samples each
    gradient_accumulation_steps: int = 1
    # If set, accumulation is derived: global = micro x accumulation x world size.
    global_batch_size: Optional[int] = None
    max_steps: int = -1  # >0 overrides num_epochs
    num_epochs: float = 1.0
    learning_rate: float = 2e-4
    lr_scheduler: str = "cosine"
    warmup_ratio: float = 0.03
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    optim: str = "adamw_torch"
    gradient_checkpointing: bool = False  # less activation memory, ~30% slower steps
    logging_steps: int = 1
    eval_steps: Optional[int] = None  # None: evaluate once at the end
    save_steps: Optional[int] = None  # None: save only the final model (and on a stop signal)
    save_total_limit: int = 2  # complete checkpoints kept (newest first); 0 keeps all
    # On these signals every rank finishes its step, one checkpoint is written,
    # and the run stops (Slurm: USR1 before the time limit, TERM on preemption).
    # USR2: the time-limit warning of Hydra's submitit launcher (hydra/launcher=slurm*).
    stop_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2", "SIGTERM"])
    # After stopping on one of these under Slurm, rank 0 runs scontrol requeue.
    requeue_signals: List[str] = field(default_factory=lambda: ["SIGUSR1", "SIGUSR2"])
    dataloader_num_workers: int = 0
    seed: int = 42
    # Each rank writes ranks/rank<r>.json: the sample ids it trained on and a
    # hash of its trainable weights (one pass over them at the end).
    rank_records: bool = True


@dataclass
class LoggerConfig:
    report_to: List[str] = field(default_factory=list)  # tensorboard | wandb | mlflow
    project: Optional[str] = None
    progress_bar: bool = True


# ------------------------------------------------------------------ slurm
@dataclass
class SlurmConfig:
    """How ``python -m fttrain.slurm`` renders and submits this run (slurm/*.sbatch).
    Training ignores it; it is part of the run's config so a job's config is
    exactly the one that was rendered."""

    partition: Optional[str] = None  # required to render: the queue (sinfo lists them)
    account: Optional[str] = None  # charged account, where the cluster asks for one
    qos: Optional[str] = None
    nodes: int = 1  # > 1 renders the multi-node template: one accelerate launch per node
    gpus_per_node: int = 8  # one training process per GPU; 0 = CPU processes (gloo)
    processes_per_node: Optional[int] = None  # null: gpus_per_node (CPU clusters: set it)
    cpus_per_task: int = 8  # CPU cores for each node's launcher and its processes (data loading)
    mem: Optional[str] = None  # per node, e.g. 200G; "0" = all of it; null: the partition default
    time: str = "04:00:00"  # wall time; USR1 arrives signal_seconds before it ends
    job_name: Optional[str] = None  # null: the run's name
    constraint: Optional[str] = None  # node features, e.g. a100|h100
    signal_seconds: int = 90  # warning before the limit: one step + a checkpoint must fit in it
    # Requeues after a stop signal, counted by Slurm (SLURM_RESTART_COUNT, which
    # also counts other restarts): a long run needs one per time slice.
    max_requeues: int = 20
    port: Optional[int] = None  # rendezvous port on the first node; null: derived from the job id (no clashes)
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


GROUP_SCHEMAS: Dict[str, Dict[str, Any]] = {
    "model": {"model": ModelConfig},
    "peft": {
        "full": FullConfig, "freeze": FreezeConfig, "lora": LoraConfig, "qlora": QLoraConfig, "ia3": IA3Config,
        "vera": VeraConfig, "loha": LohaConfig, "lokr": LokrConfig, "oft": OftConfig, "adalora": AdaLoraConfig,
        "prompt_tuning": PromptTuningConfig, "prefix_tuning": PrefixTuningConfig, "p_tuning": PTuningConfig,
        "llama_adapter": LlamaAdapterConfig, "adapter": BottleneckConfig, "galore": GaloreConfig,
        "lisa": LisaConfig,
    },
    "task": {
        "sft": SFTTaskConfig, "pt": PretrainTaskConfig, "dpo": DPOTaskConfig, "kto": KTOTaskConfig,
        "orpo": ORPOTaskConfig, "rm": RewardTaskConfig, "grpo": GRPOTaskConfig, "cls": ClassificationTaskConfig,
        "ner": NERTaskConfig, "qa": QATaskConfig,
    },
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
