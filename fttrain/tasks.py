"""The tasks, each declared once: its config class, the data formats it reads,
its recipe, how its samples are batched (packed by fttrain, or padded by TRL's
trainers), its model head and peft's task type. Checks, the recipe registry and
the schema's ``task`` group read ``TASKS``; no module outside this one branches
on a task's name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Tuple

from omegaconf import MISSING

from fttrain.config.choice import choices
from fttrain.config.bounds import bounded


# ------------------------------------------------------------ config classes
# How an SFT chat whose template rewrites earlier turns is trained (see SFTTaskConfig.history_rewrite).
HistoryRewrite = choices("HistoryRewrite", ("split", "last", "raise"), __name__)


@dataclass
class GenerationEvalConfig:
    """Greedy generation on held-out prompts before and after training."""

    num_samples: int = bounded(8, lo=0)  # prompts written to samples.jsonl
    exact_match_samples: int = bounded(0, lo=0)  # >0: score exact match on this many eval rows
    max_new_tokens: int = bounded(48, lo=1)
    batch_size: int = bounded(8, lo=1)  # prompts per generate call: more is faster, needs memory for the KV cache


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
    history_rewrite: HistoryRewrite = HistoryRewrite.split
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


# How the student's distribution is pulled towards the teacher's (fttrain/distill.py).
DistillLoss = choices("DistillLoss", ("forward_kl", "reverse_kl", "jsd"), __name__)


@dataclass
class DistillTaskConfig(SFTTaskConfig):
    """Knowledge distillation: a student learns a teacher's next-token distributions on
    the trained tokens of SFT data, mixed with its own cross-entropy on the labels."""

    name: str = "distill"
    # A hub id, a model folder, or an fttrain run or export (a run's adapter is
    # loaded on its base, unmerged). The teacher must share the student's tokenizer.
    teacher: str = ""
    teacher_adapter: Optional[str] = None  # a peft adapter folder put on the teacher
    # forward_kl: KL(teacher || student), mass-covering, the classic recipe;
    # reverse_kl: KL(student || teacher), mode-seeking (a small student keeps the
    # teacher's main answer rather than spreading over all of them);
    # jsd: generalized Jensen-Shannon at jsd_beta, between the two.
    loss: DistillLoss = DistillLoss.forward_kl
    # > 1 softens both distributions so the teacher's ranking of unlikely tokens
    # teaches too; the term is multiplied by temperature^2 so its gradients keep their scale.
    temperature: float = bounded(1.0, lo=0, lo_open=True)
    alpha: float = bounded(0.5, lo=0, hi=1)  # weight of the teacher term; (1 - alpha) on the labels' cross-entropy
    jsd_beta: float = bounded(0.5, lo=0, hi=1, lo_open=True, hi_open=True)  # loss=jsd: the teacher's share of the mixture
    # The teacher's k most likely tokens per position, renormalised (forward_kl only):
    # what precompute_teacher stores. None: the whole vocabulary.
    top_k: Optional[int] = bounded(None, lo=1)
    # Run the teacher once over the training rows before training and keep its
    # top_k logits on disk (trained tokens x top_k x 6 bytes); the teacher is then
    # freed, and every epoch reads them. Needs top_k.
    precompute_teacher: bool = False
    # On-policy distillation (GKD, Agarwal et al. 2024; TRL's GKDTrainer): the share of
    # optimizer steps on which the student samples its own answer to each row's prompt
    # (the row up to its last trained span) and the teacher scores those tokens; the
    # loss on such a step is the divergence alone (the labels are not the sampled text).
    # It trains on the mistakes the student really makes, at the cost of a generate
    # call per micro-batch. 0: off (every step on the dataset's answers).
    on_policy: float = bounded(0.0, lo=0, hi=1)
    max_new_tokens: int = bounded(128, lo=1)  # on_policy: tokens the student samples per answer at most


# TRL 1.16's DPO losses (DPOConfig.loss_type): what task.loss_type may list.
DPOLoss = choices("DPOLoss", ("sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard",
                               "aot", "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"),
                   __name__)
KTOLoss = choices("KTOLoss", ("kto", "apo_zero_unpaired"), __name__)


@dataclass
class DPOTaskConfig(TaskConfig):
    """Direct preference optimisation on prompt / chosen / rejected (TRL's DPOTrainer)."""

    name: str = "dpo"
    beta: float = bounded(0.1, lo=0, lo_open=True)  # strength of the pull towards the reference: lower drifts further
    # sigmoid (DPO), ipo, hinge, robust, bco_pair, sppo_hard, nca_pair, aot, aot_unpaired,
    # apo_zero, apo_down, discopop, sft; several with loss_weights = a weighted sum.
    loss_type: List[DPOLoss] = field(default_factory=lambda: [DPOLoss.sigmoid])
    loss_weights: Optional[List[float]] = None  # with several loss types: their weights in the sum
    label_smoothing: float = bounded(0.0, lo=0, hi=0.5)  # > 0: conservative DPO for noisy preference labels
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
    beta: float = bounded(0.1, lo=0, lo_open=True)
    loss_type: KTOLoss = KTOLoss.kto  # kto | apo_zero_unpaired
    desirable_weight: float = bounded(1.0, lo=0, lo_open=True)  # raise when good examples are rarer than bad ones
    undesirable_weight: float = bounded(1.0, lo=0, lo_open=True)
    reference: str = "auto"  # as for dpo
    precompute_ref_log_probs: bool = False


@dataclass
class ORPOTaskConfig(TaskConfig):
    """Odds-ratio preference optimisation: SFT + preference in one loss, no reference model."""

    name: str = "orpo"
    beta: float = bounded(0.1, lo=0)  # weight of the odds-ratio term (lambda in the paper)


@dataclass
class RewardTaskConfig(TaskConfig):
    """A scalar-head reward model trained on chosen/rejected pairs (Bradley-Terry)."""

    name: str = "rm"
    # > 0 pulls rewards towards zero mean, so scores from different runs compare.
    center_rewards_coefficient: Optional[float] = bounded(None, lo=0)


@dataclass
class GRPOTaskConfig(TaskConfig):
    """Group relative policy optimisation with reward functions named by _target_."""

    name: str = "grpo"
    # Each entry: {_target_: module.function, weight: 1.0, <keyword arguments>}.
    # A function gets (prompts, completions, **columns of the data row) and returns one float per completion.
    rewards: List[Any] = field(default_factory=list)
    num_generations: int = bounded(4, lo=2)  # completions per prompt; the group whose rewards are compared
    max_completion_length: int = bounded(32, lo=1)
    beta: float = bounded(0.0, lo=0)  # KL penalty to the reference; 0 needs no reference model (less memory)
    # sampling temperature: diversity within a group is what gives signal
    temperature: float = bounded(1.0, lo=0, lo_open=True)
    # grpo | dr_grpo | dapo | bnpo: how token losses are averaged (TRL's loss_type)
    loss_type: str = "dapo"
    scale_rewards: str = "group"  # group | batch | none: divide advantages by the reward std of ...
    eval_samples: int = bounded(32, lo=0)  # held-out prompts scored greedily before and after training


@dataclass
class ClassificationTaskConfig(TaskConfig):
    """Sequence classification with an encoder (or decoder) and a linear head."""

    name: str = "cls"
    labels: Optional[List[str]] = None  # None: the sorted label names found in the training data
    multi_label: bool = False  # labels: [...] per row, sigmoid + BCE, a threshold per label
    threshold: float = bounded(0.5, lo=0, hi=1)  # multi-label decision threshold, for every label ...
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
    doc_stride: int = bounded(128, lo=1)  # overlap between windows of a long context: answers near a cut stay whole
    max_answer_length: int = bounded(30, lo=1)  # in tokens
    n_best: int = bounded(20, lo=1)  # start and end candidates tried per window
    # SQuAD 2.0: some questions have no answer; predict "" when the no-answer
    # score beats the best span by more than the threshold.
    version_2_with_negative: bool = False
    null_score_diff_threshold: float = 0.0  # higher: answers "no answer" less often


# ------------------------------------------------------------ checks
def reference_problems(cfg) -> List[str]:
    from fttrain.methods import method_of

    task, peft = cfg.task, cfg.peft
    if task.reference != "auto" and not method_of(peft).whole_model:
        return [f"task.reference={task.reference!r} with peft={peft.method}: an adapter run uses its own base "
                "(adapter switched off) as the reference; set task.reference=auto"]
    return []


def dpo_problems(cfg) -> List[str]:
    task, out = cfg.task, reference_problems(cfg)
    if task.loss_weights is not None and len(task.loss_weights) != len(task.loss_type):
        out.append(f"task.loss_weights has {len(task.loss_weights)} entries for {len(task.loss_type)} loss types")
    return out


def grpo_problems(cfg) -> List[str]:
    from fttrain.rewards import reward_problems

    out = reward_problems(cfg.task.rewards)
    if cfg.task.num_generations < 2:
        out.append("task.num_generations must be >= 2: GRPO compares completions within a group")
    return out


def cls_problems(cfg) -> List[str]:
    task, out = cfg.task, []
    if task.class_weights is not None and task.labels is None:
        out.append("task.class_weights needs task.labels, so each weight has a known label")
    if task.class_weights is not None and task.labels is not None and len(task.class_weights) != len(task.labels):
        out.append(f"task.class_weights has {len(task.class_weights)} entries for {len(task.labels)} labels")
    if task.thresholds and not task.multi_label:
        out.append("task.thresholds applies to multi-label classification: set task.multi_label=true")
    if task.thresholds and task.labels is not None and set(task.thresholds) - set(task.labels):
        out.append(f"task.thresholds names labels not in task.labels: {sorted(set(task.thresholds) - set(task.labels))}")
    return out


def qa_problems(cfg) -> List[str]:
    task, data = cfg.task, cfg.data
    if task.doc_stride >= data.max_length // 2:
        return [f"task.doc_stride={task.doc_stride} must be well below half of data.max_length={data.max_length} "
                "(the question and the overlap both take room in every window)"]
    return []


def sft_problems(cfg) -> List[str]:
    from fttrain.data.formats import ROLES

    task, out = cfg.task, []
    bad = [r for r in task.train_roles if r not in ROLES]
    if bad or not task.train_roles:
        out.append(f"task.train_roles={list(task.train_roles)} must be a non-empty list of {list(ROLES)}")
    fmt = getattr(cfg.data.format, "value", cfg.data.format)
    if fmt == "text" and task.assistant_only_loss:
        out.append("data.format=text has no responses to isolate: set task.assistant_only_loss=false (every token "
                   "trained) or use task=pt")
    return out


def distill_problems(cfg) -> List[str]:
    from fttrain.config.checks import packing_on
    from fttrain.plan import shards_weights

    task, out = cfg.task, sft_problems(cfg)
    loss = getattr(task.loss, "value", task.loss)
    if not task.teacher:
        out.append("task.teacher is required: a hub id, a model folder, or an fttrain run or export")
    if task.top_k is not None and loss != "forward_kl":
        out.append(f"task.top_k={task.top_k} with task.loss={loss}: a teacher cut to its top tokens defines only the "
                   "forward KL (the student's mass outside them has no teacher probability); use loss=forward_kl")
    if task.precompute_teacher and task.top_k is None:
        out.append("task.precompute_teacher=true needs task.top_k: the whole vocabulary per token is too much to store")
    if task.precompute_teacher and cfg.data.streaming:
        out.append("task.precompute_teacher=true with data.streaming=true: streamed rows are never all there to "
                   "score in advance; stream with the teacher online (precompute_teacher=false)")
    if task.on_policy > 0 and task.precompute_teacher:
        out.append(f"task.on_policy={task.on_policy} with task.precompute_teacher=true: the teacher must score the "
                   "answers the student samples during training, which do not exist in advance; set one of them off")
    if task.on_policy > 0 and not task.assistant_only_loss:
        out.append(f"task.on_policy={task.on_policy} with task.assistant_only_loss=false: the student answers the "
                   "prompt before each row's last trained span, and with every token trained that prompt is the "
                   "first token alone; set task.assistant_only_loss=true (chat or prompt/completion data)")
    if task.on_policy > 0 and packing_on(cfg):
        out.append(f"task.on_policy={task.on_policy} with packing: the student answers each row's prompt on its own, "
                   "and a packed row holds several samples; set data.packing=false")
    if shards_weights(cfg.dist):
        out.append("task=distill with a plan that shards the weights (ZeRO-3, FSDP): the teacher is not part of the "
                   "sharded engine, so every "
                   "rank would hold it whole outside the plan; use dist=ddp, zero1 or zero2 (the teacher is "
                   "replicated on each rank, in eval mode, without gradients)")
    return out


def no_problems(cfg) -> List[str]:
    return []


# ------------------------------------------------------------ TRL's preference trainers
def dpo_args(task) -> Dict:
    args = {"loss_type": list(task.loss_type), "label_smoothing": task.label_smoothing,
            "precompute_ref_log_probs": task.precompute_ref_log_probs}
    if task.loss_weights is not None:
        args["loss_weights"] = list(task.loss_weights)
    return args


def kto_args(task) -> Dict:
    return {"loss_type": task.loss_type, "desirable_weight": task.desirable_weight,
            "undesirable_weight": task.undesirable_weight, "precompute_ref_log_probs": task.precompute_ref_log_probs}


def no_args(task) -> Dict:
    return {}


@dataclass(frozen=True)
class TrlTrainer:
    """How a task runs on one of TRL's trainers."""

    trainer: str  # "module:Class"
    config: str  # "module:Class", a TrainingArguments subclass
    args: Callable = no_args  # (task config) -> the task's own keywords for the config class
    reference: bool = False  # takes a reference model (ref_model)
    unpaired: bool = False  # trains on examples that each judge one completion (KTO): pairs are split in two
    # the batch's masks that together cover each sequence once (prompt + completion), for token counting
    count_keys: Tuple[str, ...] = ("attention_mask",)

    def classes(self):
        """(trainer class, config class), imported now (TRL is imported only by runs that use it)."""
        return load_object(self.trainer), load_object(self.config)


def load_object(spec: str):
    import importlib
    import os

    module, name = spec.split(":")
    if module.startswith("trl.experimental"):
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # e.g. ORPO, in trl.experimental in TRL 1.x
    return getattr(importlib.import_module(module), name)


# ------------------------------------------------------------ declarations
@dataclass(frozen=True)
class Task:
    name: str  # task.name and the schema option (schema/task/<name>)
    config: type  # its TaskConfig subclass
    formats: Tuple[str, ...]  # the data.format values it reads (fttrain.config.schema.DataFormat)
    recipe: str  # "module:Class" in fttrain.recipes
    packs: bool = False  # fttrain packs its samples into rows (data.packing=null means on)
    trl: bool = False  # trained by one of TRL's trainers, which pad each batch themselves
    encoder: bool = False  # a head on an encoder (classification, tokens, spans) rather than a causal LM
    peft_task_type: str = "CAUSAL_LM"  # peft's task type: which head modules are saved with an adapter
    check: Callable = no_problems  # (cfg) -> problems with its knobs and their combinations
    trl_trainer: Optional[TrlTrainer] = None  # the preference tasks: which TRL trainer, and how
    # trained on the causal LM's token cross-entropy from the model's forward in
    # fttrain's trainer, so trainer.loss may change how it is computed
    token_loss: bool = False
    # causal-LM rows with a loss mask (sft, pt, distill): compare scores a model on them
    token_rows: bool = False


SFT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text")
TASKS: Dict[str, Task] = {t.name: t for t in (
    # causal LM on formatted, masked, packed tokens
    Task("sft", SFTTaskConfig, SFT_FORMATS, "sft:SFTRecipe", packs=True, token_loss=True, token_rows=True,
         check=sft_problems),
    Task("pt", PretrainTaskConfig, ("text",), "sft:SFTRecipe", packs=True, token_loss=True, token_rows=True),
    # a student on SFT rows, its loss from the teacher's logits and the labels (fttrain/distill.py)
    Task("distill", DistillTaskConfig, SFT_FORMATS, "distill:DistillRecipe", packs=True, token_rows=True,
         check=distill_problems),
    # TRL's preference trainers
    Task("dpo", DPOTaskConfig, ("preference",), "preference:PreferenceRecipe", trl=True, check=dpo_problems,
         trl_trainer=TrlTrainer("trl:DPOTrainer", "trl:DPOConfig", dpo_args, reference=True)),
    Task("kto", KTOTaskConfig, ("preference", "unpaired"), "preference:PreferenceRecipe", trl=True,
         check=reference_problems,
         trl_trainer=TrlTrainer("trl:KTOTrainer", "trl:KTOConfig", kto_args, reference=True, unpaired=True)),
    Task("orpo", ORPOTaskConfig, ("preference",), "preference:PreferenceRecipe", trl=True,
         trl_trainer=TrlTrainer("trl.experimental.orpo:ORPOTrainer", "trl.experimental.orpo:ORPOConfig",
                                count_keys=("chosen_attention_mask", "rejected_attention_mask"))),
    # a scalar-head reward model on pairs (peft then saves the score head with the adapter)
    Task("rm", RewardTaskConfig, ("preference",), "reward:RewardRecipe", trl=True, peft_task_type="SEQ_CLS"),
    # RL from reward functions
    Task("grpo", GRPOTaskConfig, ("prompt",), "grpo:GRPORecipe", trl=True, check=grpo_problems),
    # encoder heads
    Task("cls", ClassificationTaskConfig, ("classification",), "encoder:ClassificationRecipe", encoder=True,
         peft_task_type="SEQ_CLS", check=cls_problems),
    Task("ner", NERTaskConfig, ("tokens_tags",), "encoder:NERRecipe", encoder=True, peft_task_type="TOKEN_CLS"),
    Task("qa", QATaskConfig, ("squad",), "encoder:QARecipe", encoder=True, peft_task_type="QUESTION_ANS",
         check=qa_problems),
)}


def task_of(task_cfg_or_name) -> Task:
    name = task_cfg_or_name if isinstance(task_cfg_or_name, str) else task_cfg_or_name.name
    if name not in TASKS:
        raise ValueError(f"task.name={name!r} is not a task fttrain knows; one of {sorted(TASKS)}")
    return TASKS[name]
