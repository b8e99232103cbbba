"""Knowledge distillation (``task=distill``): the losses, the teacher, and the trainer.

Each trained token t (a position whose next token is trained, exactly the
tokens the cross-entropy counts) gives the student's and the teacher's
next-token distributions at temperature T, s = softmax(z_s / T) and
p = softmax(z_t / T). The step's loss over the trained tokens N is

    loss = [ (1 - alpha) * sum_t CE(z_s, label_t) + alpha * T^2 * sum_t D(p_t, s_t) ] / N

with D one of (task.loss)

    forward_kl   KL(p || s) = sum_v p_v (log p_v - log s_v)      covers every teacher mode
    reverse_kl   KL(s || p) = sum_v s_v (log s_v - log p_v)      seeks the main mode
    jsd          b KL(p || m) + (1 - b) KL(s || m),  m = b p + (1 - b) s,  b = task.jsd_beta

N is the trained tokens of the whole optimizer step on all ranks (the Trainer's
num_items_in_batch), so the loss is normalised as fttrain's cross-entropy is:
the same for 1 rank as for 2 at one global batch. T^2 keeps the gradient of the
teacher term on the scale of the cross-entropy's as T changes (Hinton et al.).

task.top_k keeps the teacher's k most likely tokens per position, renormalised
(forward KL only: outside them the teacher has no probability), and is what
``precompute_teacher`` stores: k int32 ids + k fp16 logits = 6k bytes per trained
token (k=32 and 10M trained tokens: 1.8 GiB), after which the teacher is freed.

On-policy (task.on_policy, GKD): on that share of optimizer steps (drawn from the
seed and the step, so every rank and a resumed run draw alike) each row keeps
its prompt (everything before its last trained span), the student samples an
answer of at most task.max_new_tokens (TRL's GKDTrainer.generate_on_policy_outputs),
and the loss is alpha-free: T^2 * sum_t D(p_t, s_t) / N over the sampled tokens,
N counted again over the rewritten micro-batches of the step on all ranks.

Memory: the teacher's logits for a micro-batch exist once, [tokens, vocab], and
only the trained positions are kept (fp32: 4 x vocab bytes a trained token;
at a 128k vocabulary and 8k trained tokens, 4 GiB beside the student's own).
"""

from __future__ import annotations

import json
import logging
import random
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch
import torch.nn.functional as F

from fttrain.data.tokenize import IGNORE
from fttrain.errors import FttrainError
from fttrain.trainer import FTTrainer

log = logging.getLogger("fttrain")


class DistillError(FttrainError, ValueError):
    pass


# ------------------------------------------------------------------ losses
@dataclass(frozen=True)
class DistillLossSpec:
    kind: str = "forward_kl"  # forward_kl | reverse_kl | jsd
    temperature: float = 1.0
    alpha: float = 0.5  # weight of the teacher term
    jsd_beta: float = 0.5
    top_k: Optional[int] = None

    @classmethod
    def of(cls, task) -> "DistillLossSpec":
        return cls(str(getattr(task.loss, "value", task.loss)), float(task.temperature), float(task.alpha),
                   float(task.jsd_beta), None if task.top_k is None else int(task.top_k))


def token_divergence(student_logits: torch.Tensor, teacher_logits: torch.Tensor, kind: str,
                     temperature: float = 1.0, jsd_beta: float = 0.5) -> torch.Tensor:
    """[N, V] student and teacher logits -> [N] divergence per token, in fp32, times T^2."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1)
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    if kind == "forward_kl":
        d = (p.exp() * (p - s)).sum(-1)
    elif kind == "reverse_kl":
        d = (s.exp() * (s - p)).sum(-1)
    elif kind == "jsd":
        b = torch.tensor(jsd_beta, dtype=s.dtype, device=s.device)
        m = torch.logsumexp(torch.stack([p + torch.log(b), s + torch.log1p(-b)]), dim=0)
        d = b * (p.exp() * (p - m)).sum(-1) + (1 - b) * (s.exp() * (s - m)).sum(-1)
    else:
        raise ValueError(f"unknown distillation loss {kind!r}")
    return d * temperature ** 2


def top_k_forward_kl(student_logits: torch.Tensor, teacher_ids: torch.Tensor, teacher_logits: torch.Tensor,
                     temperature: float = 1.0) -> torch.Tensor:
    """KL(p_k || s) per token with p_k the teacher renormalised over its top-k ids:
    sum_j p_j (log p_j - log s_{id_j}), the student normalised over its whole vocabulary."""
    s = F.log_softmax(student_logits.float() / temperature, dim=-1).gather(-1, teacher_ids.long())
    p = F.log_softmax(teacher_logits.float() / temperature, dim=-1)
    return (p.exp() * (p - s)).sum(-1) * temperature ** 2


def trained_positions(labels: torch.Tensor) -> torch.Tensor:
    """[B, L] labels -> [B, L-1] mask of the positions whose next token is trained
    (logits[t] predicts labels[t+1], as the causal LM's loss shifts them)."""
    return labels[..., 1:] != IGNORE


def at_trained(logits: torch.Tensor, mask: torch.Tensor, width: int) -> torch.Tensor:
    """[B, L, V] -> [N, width]: the trained positions' logits, row-major, vocabulary cut to width."""
    return logits[:, :-1][mask][..., :width]


# ------------------------------------------------------------------ the teacher
def teacher_location(task) -> str:
    """task.teacher as a loadable path: a run directory's model/ or export, a folder, or a hub id."""
    from fttrain.models.adapted import model_folder

    path = Path(task.teacher)
    return str(model_folder(path)) if path.exists() else task.teacher


def load_teacher_tokenizer(task):
    from transformers import AutoTokenizer

    from fttrain.models.adapted import adapter_base, folder_kind

    where = teacher_location(task)
    folder = Path(where)
    if folder.exists() and not (folder / "tokenizer_config.json").exists() and folder_kind(folder) != "full":
        where = adapter_base(folder, None)
    try:
        return AutoTokenizer.from_pretrained(where)
    except OSError as e:  # neither a folder here nor a hub id reachable from here
        raise DistillError(f"task.teacher={task.teacher}: no such folder ({folder.resolve()}), and not a model the hub "
                           f"serves from here: {str(e).splitlines()[0]}") from None


def vocabulary_problem(student_tok, teacher_tok, teacher_name: str) -> Optional[str]:
    """Why the two tokenizers cannot be distilled between, or None: the token ids must mean
    the same strings, or the teacher's probability of id i says nothing about the student's id i."""
    from fttrain.models.load import vocabulary_difference

    diff = vocabulary_difference(student_tok, teacher_tok)
    if diff is None:
        return None
    return (f"task=distill needs a teacher with the student's tokenizer; the student's and the teacher "
            f"{teacher_name}'s differ: {diff}. Distil between models of one family (same tokenizer), or pick "
            "another teacher")


def load_teacher(task, dtype: torch.dtype, device) -> torch.nn.Module:
    """The teacher in eval mode, without gradients, on ``device``: a whole model,
    or a run's base with its adapter (unmerged, as it was trained), plus
    task.teacher_adapter if given."""
    from fttrain.models.adapted import load_for_inference
    from fttrain.models.load import load_causal_lm

    where = teacher_location(task)
    if Path(where).exists():
        name = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]
        model = load_for_inference(where, dtype=name).model
    else:
        model = load_causal_lm(where, dtype)
    if task.teacher_adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, task.teacher_adapter)
    model.requires_grad_(False)
    model.eval()
    if getattr(model, "hf_device_map", None) is None and not getattr(model, "is_loaded_in_4bit", False):
        model.to(device)
    return model


def vocab_width(student, teacher, tokenizer) -> int:
    """The logit columns both models score: all of them when the heads agree, else the
    tokenizer's tokens (families pad their embeddings to different multiples)."""
    ws = student.get_output_embeddings().weight.shape[0]
    wt = teacher.get_output_embeddings().weight.shape[0]
    if ws == wt:
        return ws
    n = len(tokenizer)
    if n > min(ws, wt):
        raise DistillError(f"the tokenizer has {n} tokens but the student scores {ws} and the teacher {wt}")
    log.info("distill: the student's head has %d rows and the teacher's %d; the %d tokenizer tokens are compared",
             ws, wt, n)
    return n


# ------------------------------------------------------------------ precomputed top-k
TOPK_FILE = "teacher_topk.json"


@torch.no_grad()
def precompute_top_k(teacher, rows, k: int, folder: Path, batch_size: int, pad_id: int, device,
                     source: Dict, vocab: int) -> Dict:
    """The teacher's top-k logits at every trained position of every sample of a
    prepared split, in sample order: ids.npy [P, k] int32, logits.npy [P, k] fp16,
    offsets.npy [samples + 1] into them. Rows built from these samples (packed or
    not) read their positions in order, so a batch's trained positions match. Ids
    are chosen among the first ``vocab`` columns, those the student's head shares."""
    folder.mkdir(parents=True, exist_ok=True)
    counts = np.zeros(rows.num_samples + 1, dtype=np.int64)
    samples = [rows.sample(i) for i in range(rows.num_samples)]
    for i, smp in enumerate(samples):
        counts[i + 1] = sum(1 for x in smp["labels"][1:] if x != IGNORE)
    offsets = np.cumsum(counts)
    total = int(offsets[-1])
    ids = np.lib.format.open_memmap(folder / "ids.npy", mode="w+", dtype=np.int32, shape=(total, k))
    logits = np.lib.format.open_memmap(folder / "logits.npy", mode="w+", dtype=np.float16, shape=(total, k))
    for start in range(0, len(samples), batch_size):
        batch = samples[start:start + batch_size]
        width = max(len(s["input_ids"]) for s in batch)
        input_ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
        labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
        attention = torch.zeros((len(batch), width), dtype=torch.long)
        for j, s in enumerate(batch):
            n = len(s["input_ids"])
            input_ids[j, :n], labels[j, :n], attention[j, :n] = torch.tensor(s["input_ids"]), \
                torch.tensor(s["labels"]), 1
        out = teacher(input_ids=input_ids.to(device), attention_mask=attention.to(device), use_cache=False).logits
        top = at_trained(out, trained_positions(labels).to(device), vocab).float().topk(k, dim=-1)
        a, b = int(offsets[start]), int(offsets[start + len(batch)])
        ids[a:b] = top.indices.cpu().numpy().astype(np.int32)
        logits[a:b] = top.values.cpu().numpy().astype(np.float16)
    ids.flush()
    logits.flush()
    np.save(folder / "offsets.npy", offsets)
    meta = {"k": k, "samples": rows.num_samples, "positions": total, "bytes": total * k * 6, "split": str(rows.folder),
            "source": source}
    (folder / TOPK_FILE).write_text(json.dumps(meta, indent=2))
    return meta


def read_top_k(folder: Path, rows, k: int, source: Dict) -> Optional["TopKStore"]:
    """The store in folder if it was computed for these rows, k and teacher (source), else None."""
    meta_file = folder / TOPK_FILE
    if not meta_file.exists():
        return None
    meta = json.loads(meta_file.read_text())
    if (meta.get("k"), meta.get("samples"), meta.get("split"), meta.get("source")) != \
            (k, rows.num_samples, str(rows.folder), source):
        return None
    return TopKStore(folder)


class TopKStore:
    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.ids = np.load(folder / "ids.npy", mmap_mode="r")
        self.logits = np.load(folder / "logits.npy", mmap_mode="r")
        self.offsets = np.load(folder / "offsets.npy")

    def __reduce__(self):
        return TopKStore, (str(self.folder),)

    def of_samples(self, members) -> Tuple[np.ndarray, np.ndarray]:
        spans = [(int(self.offsets[i]), int(self.offsets[i + 1])) for i in members]
        return (np.concatenate([self.ids[a:b] for a, b in spans]),
                np.concatenate([self.logits[a:b] for a, b in spans]))


class WithTeacherTopK:
    """A prepared split whose rows also carry the teacher's top-k at their trained positions."""

    def __init__(self, rows, store: TopKStore):
        self.rows, self.store = rows, store

    def __len__(self):
        return len(self.rows)

    def members(self, r: int):
        if self.rows.layout == "packed":
            return self.rows.row_members[int(self.rows.row_offsets[r]):int(self.rows.row_offsets[r + 1])]
        return [r]

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        r = int(r) % len(self)
        row = self.rows[r]
        row["teacher_ids"], row["teacher_logits"] = self.store.of_samples(self.members(r))
        return row

    def __getattr__(self, name):  # lengths(), num_tokens, folder ... of the rows
        return getattr(self.rows, name)


class TopKCollator:
    """The task's collator, plus the rows' teacher top-k concatenated in row order."""

    def __init__(self, collator):
        self.collator = collator

    def __call__(self, rows):
        extra = [(r.pop("teacher_ids", None), r.pop("teacher_logits", None)) for r in rows]
        batch = self.collator(rows)
        if extra and extra[0][0] is not None:
            batch["teacher_ids"] = torch.from_numpy(np.concatenate([e[0] for e in extra]))
            batch["teacher_logits"] = torch.from_numpy(np.concatenate([e[1] for e in extra]).astype(np.float32))
        return batch


# ------------------------------------------------------------------ on-policy (GKD)
def last_span_starts(labels: torch.Tensor) -> List[int]:
    """Per row, where its last trained span begins (the last answer of a chat)."""
    trained = (labels != IGNORE).tolist()
    starts = []
    for i, row in enumerate(trained):
        begins = [j for j, t in enumerate(row) if t and (j == 0 or not row[j - 1])]  # each trained span's first
        if not begins:
            raise DistillError(f"row {i} of an on-policy micro-batch has no trained token to answer")
        starts.append(begins[-1])
    return starts


def prompts_of(batch: Dict, pad_id: int) -> Dict[str, torch.Tensor]:
    """The rows' prompts (each row up to its last trained span), left-padded for generate."""
    starts = last_span_starts(batch["labels"])
    width = max(starts)
    ids = torch.full((len(starts), width), pad_id, dtype=torch.long, device=batch["input_ids"].device)
    mask = torch.zeros_like(ids)
    for i, n in enumerate(starts):
        ids[i, width - n:] = batch["input_ids"][i, :n]
        mask[i, width - n:] = batch["attention_mask"][i, :n]
    return {"prompts": ids, "prompt_attention_mask": mask}


class OnPolicy:
    """task.on_policy: which steps the student answers itself, and the rewrite of a
    micro-batch into prompt + the student's sampled answer (labels on the answer)."""

    def __init__(self, share: float, max_new_tokens: int, seed: int, pad_id: int, eos_ids):
        from transformers import GenerationConfig

        self.share, self.seed = share, seed
        # The student's own distribution: temperature 1, nothing cut or penalised (as GKD
        # samples). Every such knob is set: generate fills the ones left unset from the
        # model's generation_config (an instruct model's repetition_penalty, min_p, ...).
        self.generation = GenerationConfig(
            max_new_tokens=max_new_tokens, do_sample=True, num_beams=1, num_return_sequences=1, temperature=1.0,
            top_k=0, top_p=1.0, min_p=0.0, typical_p=1.0, epsilon_cutoff=0.0, eta_cutoff=0.0,
            repetition_penalty=1.0, encoder_repetition_penalty=1.0, no_repeat_ngram_size=0, min_length=0,
            return_dict_in_generate=True, pad_token_id=pad_id, eos_token_id=eos_ids)
        self.pad_id = pad_id

    def step_is_on_policy(self, step: int) -> bool:
        return self.share > 0 and random.Random(self.seed * 1_000_003 + step).random() < self.share

    @staticmethod
    def _generate():
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # trl.experimental announces itself as experimental
            from trl.experimental.gkd import GKDTrainer
        return GKDTrainer.generate_on_policy_outputs

    def rewrite(self, model, batch: Dict) -> Dict:
        ids, mask, labels = self._generate()(model, prompts_of(batch, self.pad_id), self.generation)
        batch = {k: v for k, v in batch.items() if k not in ("input_ids", "attention_mask", "labels", "position_ids")}
        # Prompts are left-padded: positions count real tokens, as the rows had them.
        position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
        batch.update(input_ids=ids, attention_mask=mask, labels=labels, position_ids=position_ids, on_policy=True,
                     num_real_tokens=int(mask.sum()), num_trained_tokens=int((labels[:, 1:] != IGNORE).sum()))
        return batch


# ------------------------------------------------------------------ the trainer
MODEL_INPUTS = ("input_ids", "attention_mask", "position_ids")


class DistillTrainer(FTTrainer):
    """FTTrainer whose loss mixes the labels' cross-entropy with a divergence from the teacher."""

    def __init__(self, *args, teacher, spec: DistillLossSpec, width: int, on_policy: Optional[OnPolicy] = None,
                 **kwargs):
        super().__init__(*args, compute_loss_func=self.distill_loss, **kwargs)
        self.teacher, self.spec, self.width, self.on_policy = teacher, spec, width, on_policy
        self._teacher_view = None
        self._sampled = False  # an on-policy micro-batch: its labels are the student's own samples
        self.on_policy_steps = 0

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batches, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        if batches and self.on_policy is not None and self.on_policy.step_is_on_policy(self.state.global_step):
            from trl.models.utils import unwrap_model_for_generation

            gc_kwargs = self.args.gradient_checkpointing_kwargs if self.args.gradient_checkpointing else None
            with unwrap_model_for_generation(self.model_wrapped, self.accelerator,
                                             gradient_checkpointing_kwargs=gc_kwargs) as student:
                training = student.training
                student.eval()  # no dropout while it answers
                try:
                    batches = [self.on_policy.rewrite(student, b) for b in batches]
                finally:
                    student.train(training)
            # Normalise by the sampled tokens of the step's micro-batches on all ranks.
            num_items = self._get_num_items_in_batch(batches, device)
            self.on_policy_steps += 1
        return batches, num_items

    def teacher_view(self, inputs):
        """What the loss needs of the teacher for this batch: (ids, logits) of its top-k
        at the trained positions, or its logits there ([N, width]) with ids None."""
        ids, logits = inputs.pop("teacher_ids", None), inputs.pop("teacher_logits", None)
        if ids is not None:
            return ids, logits
        if self.teacher is None:
            raise DistillError("the batch has no precomputed teacher logits and no teacher is loaded")
        with torch.no_grad():
            out = self.teacher(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}, use_cache=False).logits
            chosen = at_trained(out, trained_positions(inputs["labels"]), self.width)
            del out
            if self.spec.top_k is not None:
                top = chosen.float().topk(self.spec.top_k, dim=-1)
                return top.indices, top.values
        return None, chosen

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        self._sampled = bool(inputs.pop("on_policy", False))
        self._teacher_view = self.teacher_view(inputs)
        try:
            return super().compute_loss(model, inputs, return_outputs=return_outputs,
                                        num_items_in_batch=num_items_in_batch)
        finally:
            self._teacher_view = None

    def loss_sums(self, logits, labels, view, spec: DistillLossSpec):
        """(summed cross-entropy, summed teacher divergence) over the trained tokens."""
        mask = trained_positions(labels)
        whole = at_trained(logits, mask, logits.shape[-1])
        # The labels' cross-entropy over the student's whole head (as sft's); the teacher is
        # compared over the columns both heads have (the tokenizer's tokens, fttrain.distill.vocab_width).
        ce = F.cross_entropy(whole.float(), labels[..., 1:][mask], reduction="sum")
        student = whole[:, :self.width]
        ids, teacher = view
        if ids is not None:
            kd = top_k_forward_kl(student, ids, teacher, spec.temperature).sum()
        else:
            kd = token_divergence(student, teacher, spec.kind, spec.temperature, spec.jsd_beta).sum()
        return ce, kd

    def distill_loss(self, outputs, labels, num_items_in_batch=None):
        ce, kd = self.loss_sums(outputs.logits, labels, self._teacher_view, self.spec)
        n = num_items_in_batch if num_items_in_batch is not None else trained_positions(labels).sum()
        if torch.is_tensor(n):
            n = n.to(ce.device)
        if self._sampled:  # the labels' cross-entropy would teach the student its own samples
            return kd / n
        return ((1 - self.spec.alpha) * ce + self.spec.alpha * kd) / n

    def eval_sums(self, model, inputs) -> Dict[str, torch.Tensor]:
        """eval_loss: the labels' cross-entropy, as every causal-LM run reports it;
        eval_teacher_kl: KL(teacher || student) at temperature 1 (top-k renormalised
        when the teacher is cut to top_k), the distance distillation closes."""
        view = self.teacher_view(inputs)
        labels = inputs["labels"]
        out = model(**{k: inputs[k] for k in MODEL_INPUTS if k in inputs}, use_cache=False)
        at_t1 = DistillLossSpec("forward_kl", 1.0, self.spec.alpha, self.spec.jsd_beta, self.spec.top_k)
        ce, kl = self.loss_sums(out.logits, labels, view, at_t1)
        return {"loss": ce, "teacher_kl": kl}

