"""The HF ``Trainer`` with the accounting fttrain's output contract needs.

Why the plain Trainer and not TRL's SFTTrainer: fttrain's data layer already
formats, masks and packs (``fttrain.data``), so SFTTrainer's own dataset
preparation would only repeat it. The Trainer brings what we keep: the
step loop, gradient accumulation with loss normalised by the number of
trained tokens across micro-batches *and* ranks (``num_items_in_batch``),
DDP/DeepSpeed/FSDP through accelerate, checkpointing and resume.

Added here:
* real-token and padding accounting for ``train_tokens_per_second`` and
  ``padding_fraction``;
* a guard: a step whose batches hold no trained token never reaches the
  optimizer (it would divide by zero and poison the weights with NaN);
* a token-weighted eval loss (the Trainer averages per-batch means);
* optionally, the ids of the samples each rank trained on.
"""

from __future__ import annotations

import json
import math
import os
import time
from pathlib import Path
from typing import Dict

import torch
from transformers import Trainer, TrainerCallback

from fttrain.checkpoints import AtomicCheckpoints
from fttrain.data.tokenize import IGNORE
from fttrain.env import is_main_process


class ZeroTrainedTokensError(RuntimeError):
    """A bug: the data layer should have dropped rows without trained tokens."""


class TokenCounting:
    """For trainers that build their own batches (TRL's): count the real and
    padded token slots the model is trained on, from the batch's attention
    masks, for ``train_tokens_per_second`` and ``padding_fraction``.
    ``count_keys`` names the masks that together cover each sequence once."""

    count_keys = ("attention_mask",)

    def setup_accounting(self, rank_records: bool):
        self.rank_records = rank_records
        self.real_tokens = 0
        self.slot_tokens = 0
        self.seen_sample_ids = []  # TRL's batches do not carry fttrain's sample ids

    def compute_loss(self, model, inputs, *args, **kwargs):
        # Here, not in training_step: GRPO generates inside _prepare_inputs, so
        # its masks exist only once the loss is computed.
        if model.training:
            for key in self.count_keys:
                mask = inputs.get(key) if isinstance(inputs, dict) else None
                if mask is not None:
                    # A device tensor, summed where it lives: read once, at the end, not per micro-batch.
                    self.real_tokens = self.real_tokens + mask.sum()
                    self.slot_tokens += mask.numel()
        return super().compute_loss(model, inputs, *args, **kwargs)

    def global_token_counts(self):
        t = torch.stack([torch.as_tensor(n, device=self.args.device).double()
                         for n in (self.real_tokens, self.slot_tokens)])
        t = self.accelerator.reduce(t, reduction="sum")
        return int(t[0]), int(t[1])


class NonfiniteWatch:
    """Notes, on the device, the first optimizer step whose loss (any
    micro-batch) or gradient norm is not finite: no sync here. The stop-signal
    poll (``fttrain.preemption.StopOnSignal``) reads it with its own all-reduce,
    and the run stops before that step's weights are checkpointed or saved.

    Under fp16 the loss scaler skips a step whose gradients overflow and
    lowers its scale: a non-finite gradient norm, or a few non-finite losses in
    a row, is that working. Only ``FP16_NONFINITE_STREAK`` non-finite losses in
    a row (the scale has then fallen by 2^64) count as a divergence there."""

    FP16_NONFINITE_STREAK = 64  # micro-batches
    _first_nonfinite = None  # int64 tensor: the first such step, -1 while every value was finite
    _streak = None  # fp16: non-finite losses in a row

    def _note_nonfinite(self, value) -> None:
        step = self.state.global_step + 1  # the step being taken
        first = self.first_nonfinite_step()
        if value is None:
            return
        if not isinstance(value, torch.Tensor):  # DeepSpeed hands the norm over as a float: already on the host
            if not math.isfinite(float(value)):
                self._first_nonfinite = torch.where(first < 0, torch.full_like(first, step), first)
            return
        if hasattr(value, "full_tensor"):  # FSDP2's gradient norm is a (replicated) DTensor
            value = value.full_tensor()
        bad = ~torch.isfinite(value.detach()).all().to(first.device)
        if self.args.fp16:
            self._streak = torch.where(bad, (self._streak if self._streak is not None else 0) + 1,
                                       torch.zeros_like(first))
            bad = self._streak >= self.FP16_NONFINITE_STREAK
        self._first_nonfinite = torch.where(bad & (first < 0), torch.full_like(first, step), first)

    def first_nonfinite_step(self):
        """The device tensor (-1: none so far); read by the stop-signal poll."""
        if self._first_nonfinite is None:
            self._first_nonfinite = torch.tensor(-1, dtype=torch.long, device=self.args.device)
        return self._first_nonfinite

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self._note_nonfinite(loss)
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        if not self.args.fp16:
            self._note_nonfinite(grad_norm)
        return grad_norm


class MethodParamGroups:
    """For trainers given a PEFT method's own parameter groups (LoRA+):
    ``param_groups`` (lr, weight_decay) -> groups, set before the Trainer's
    __init__; None keeps the Trainer's own grouping."""

    param_groups = None

    def create_optimizer(self, model=None):
        """The Trainer's optimizer class and settings (so 8-bit, paged and
        fused optimizers still apply) over the method's own parameter groups."""
        if self.param_groups is None or self.optimizer is not None:
            return super().create_optimizer(model)
        cls, kwargs = self.get_optimizer_cls_and_kwargs(self.args, self.model)
        kwargs.pop("lr", None)
        self.optimizer = cls(self.param_groups(self.args.learning_rate, self.args.weight_decay), **kwargs)
        return self.optimizer


def with_fttrain_accounting(trainer_cls, count_keys=("attention_mask",)):
    """trainer_cls (TRL's DPOTrainer, GRPOTrainer, ...) with token counting,
    the PEFT method's optimizer groups (LoRA+) and whole-or-absent checkpoints."""
    return type(f"FT{trainer_cls.__name__}",
                (AtomicCheckpoints, NonfiniteWatch, MethodParamGroups, TokenCounting, trainer_cls),
                {"count_keys": tuple(count_keys)})


class FTTrainer(AtomicCheckpoints, NonfiniteWatch, MethodParamGroups, TokenCounting, Trainer):
    count_keys = ()  # counted in compute_loss from the collator's num_real_tokens

    def __init__(self, *args, rank_records: bool, param_groups=None, **kwargs):
        self.param_groups = param_groups  # (lr, weight_decay) -> groups; None: the Trainer's own grouping
        super().__init__(*args, **kwargs)
        if not self.model_accepts_loss_kwargs:
            raise RuntimeError(
                f"{type(self.accelerator.unwrap_model(self.model)).__name__}.forward takes no loss kwargs, so the loss "
                "could not be normalised by the trained tokens of the whole batch (it would average micro-batch means)"
            )
        self.setup_accounting(rank_records)
        self._flops_per_token = None  # 6 x parameters (without embeddings), counted once
        # data.streaming=true: the furthest stream position this rank trained on, and (at a
        # checkpoint) the furthest any rank did, which is where a resumed stream goes on.
        self.tracks_stream = False
        self.stream_pos = -1
        self.stream_consumed = -1

    def _save_checkpoint(self, model, trial):
        if self.tracks_stream:  # every rank saves: the one collective that finds the stream's position
            pos = torch.tensor([self.stream_pos], dtype=torch.long, device=self.args.device)
            self.stream_consumed = int(self.accelerator.gather(pos).max())
        super()._save_checkpoint(model, trial)

    def get_batch_samples(self, epoch_iterator, num_batches, device):
        batch_samples, num_items = super().get_batch_samples(epoch_iterator, num_batches, device)
        # The collator's host-side count: no device sync. Every row the data layer
        # keeps has a trained token, so a rank's step without one is a bug.
        if batch_samples and sum(b.get("num_trained_tokens", 1) for b in batch_samples) == 0:
            raise ZeroTrainedTokensError(
                "an optimizer step would see zero trained tokens; the data layer should have dropped such rows"
            )
        return batch_samples, num_items

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        # Host-side numbers from the collator (fttrain.data.packing.host_counts): reading them syncs nothing.
        sample_ids = inputs.pop("sample_ids", None)
        n_real = inputs.pop("num_real_tokens", None)
        inputs.pop("num_trained_tokens", None)
        stream_pos = inputs.pop("stream_pos", None)
        if model.training:
            if stream_pos is not None:
                self.stream_pos = max(self.stream_pos, stream_pos)
            self.slot_tokens += inputs["input_ids"].numel()
            self.real_tokens += n_real if n_real is not None else inputs["input_ids"].numel()
            if self.rank_records and sample_ids is not None:
                self.seen_sample_ids.append(list(sample_ids))
        return super().compute_loss(model, inputs, return_outputs=return_outputs, num_items_in_batch=num_items_in_batch)

    def floating_point_ops(self, inputs) -> int:
        """The Trainer's 6 x tokens x parameters, without counting the parameters
        again at every micro-step (a walk over every weight)."""
        if self._flops_per_token is None:
            self._flops_per_token = super().floating_point_ops({"input_ids": torch.empty(1, 1)})
        return self._flops_per_token * inputs["input_ids"].numel() if "input_ids" in inputs else 0

    # ------------------------------------------------------------- eval
    # trainer.loss=liger: skip_logits=True, or Liger's forward makes the whole logits tensor in eval mode.
    eval_forward_kwargs: Dict = {}

    def eval_sums(self, model, inputs) -> Dict[str, torch.Tensor]:
        """One eval batch's terms summed over its trained tokens ("loss" first);
        evaluate reports each divided by the trained tokens of every rank."""
        # num_items_in_batch=1 turns the model's mean into a sum over tokens.
        one = torch.tensor(1, device=inputs["input_ids"].device)
        return {"loss": model(**inputs, use_cache=False, num_items_in_batch=one, **self.eval_forward_kwargs).loss}

    @torch.no_grad()
    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix="eval"):
        """Loss = sum of token losses / number of trained tokens, over all ranks."""
        # Each rank takes every world-size-th row, each row exactly once: the
        # Trainer's eval loader pads ranks to even batches by repeating rows.
        # Every rank runs the same number of forward passes (under FSDP and
        # ZeRO-3 each pass gathers weights from all ranks): a rank short of
        # rows repeats one batch and does not count it.
        rows = eval_dataset if eval_dataset is not None else self.eval_dataset
        rank, world = self.args.process_index, self.args.world_size
        mine, bs = rows[rank::world], self.args.per_device_eval_batch_size
        num_batches = math.ceil(math.ceil(len(rows) / world) / bs)  # the busiest rank's count
        model = self.accelerator.unwrap_model(self.model)
        was_training = model.training
        model.eval()
        total, names = None, []
        for i in range(num_batches):
            chunk = mine[i * bs:(i + 1) * bs]
            inputs = self._prepare_inputs(self.data_collator(chunk or rows[:1]))
            inputs.pop("sample_ids", None)
            for key in ("num_real_tokens", "num_trained_tokens", "stream_pos"):
                inputs.pop(key, None)
            n = (inputs["labels"][..., 1:] != IGNORE).sum()
            with self.compute_loss_context_manager():
                sums = self.eval_sums(model, inputs)
            if total is None:
                names, total = list(sums), torch.zeros(len(sums) + 1, dtype=torch.float64, device=self.args.device)
            if chunk and n > 0:
                total += torch.stack([*(sums[k].double() for k in names), n.double()])
        total = self.accelerator.reduce(total, reduction="sum")
        if was_training:
            model.train()
        tokens = total[-1].clamp(min=1)
        metrics = {f"{metric_key_prefix}_{k}": float(total[j] / tokens) for j, k in enumerate(names)}
        # Per trained token; for task=pt the usual language-modelling number.
        metrics[f"{metric_key_prefix}_perplexity"] = math.exp(min(metrics[f"{metric_key_prefix}_loss"], 50.0))
        metrics[f"{metric_key_prefix}_tokens"] = int(total[-1])
        self.log(metrics)
        self.control = self.callback_handler.on_evaluate(self.args, self.state, self.control, metrics)
        return metrics

def _step_of(line: str) -> float:
    """Step of a log line; a line torn by a crash counts as past any checkpoint."""
    try:
        return json.loads(line)["step"]
    except (ValueError, KeyError, TypeError):
        return float("inf")


class StepTimer(TrainerCallback):
    """Seconds spent inside optimizer steps (forward, backward, update, data
    loading), without the evals and checkpoint saves between them."""

    def __init__(self):
        self.seconds = 0.0
        self.first_step_seconds = None  # this process's first step (compilation, warm-up)
        self._start = None

    def on_step_begin(self, args, state, control, **kwargs):
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if self._start is not None:
            took = time.perf_counter() - self._start
            self.seconds += took
            if self.first_step_seconds is None:
                self.first_step_seconds = took
            self._start = None


class StepWatchdog(TrainerCallback):
    """A hung step ends the job with every rank's stacks on disk.

    Each rank arms ``faulthandler``'s watchdog (a C thread: it fires even while
    the main thread is stuck in a collective or in C code holding the GIL) at
    the start of every optimizer step but its first in this process (which
    compiles and warms up) and disarms it at the end. A step that runs past
    ``trainer.step_timeout_seconds`` appends ``Timeout (h:mm:ss)!`` and every
    thread's Python stack to ``stacks/rank<r>.txt`` and exits that process with
    status 1; the launcher then ends the other ranks, whose own watchdogs have
    written theirs if they were waiting on it. Evals and checkpoint saves
    between steps, and the data loading before a step, are not timed (a
    collective's own timeout, dist.timeout_minutes, bounds those).

    ``heartbeat/rank<r>.json`` holds each rank's last finished step and its
    time (``fttrain status``): one small write in place per step."""

    def __init__(self, run_dir: Path, rank: int, timeout_seconds):
        self.run_dir, self.rank, self.timeout = Path(run_dir), rank, timeout_seconds
        self.stacks = None
        self.beat_fd = None
        self.steps_seen = 0

    def on_train_begin(self, args, state, control, **kwargs):
        (self.run_dir / "heartbeat").mkdir(parents=True, exist_ok=True)
        self.beat_fd = os.open(self.run_dir / "heartbeat" / f"rank{self.rank}.json", os.O_WRONLY | os.O_CREAT, 0o644)
        if self.timeout:
            (self.run_dir / "stacks").mkdir(exist_ok=True)
            # Appended: the stacks of an earlier hang of this run stay for the resumed job to show.
            self.stacks = open(self.run_dir / "stacks" / f"rank{self.rank}.txt", "a")
        self._beat(state.global_step)

    def on_step_begin(self, args, state, control, **kwargs):
        self.steps_seen += 1
        if self.stacks is not None and self.steps_seen > 1:
            import faulthandler

            faulthandler.dump_traceback_later(self.timeout, repeat=False, file=self.stacks, exit=True)

    def on_step_end(self, args, state, control, **kwargs):
        if self.stacks is not None:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
        self._beat(state.global_step)

    def on_train_end(self, args, state, control, **kwargs):
        self.close()

    def close(self) -> None:
        if self.stacks is not None:
            import faulthandler

            faulthandler.cancel_dump_traceback_later()
            self.stacks.close()
            path = Path(self.stacks.name)
            if path.exists() and path.stat().st_size == 0:
                path.unlink()
                try:
                    path.parent.rmdir()  # empty: no rank hung
                except OSError:
                    pass
            self.stacks = None
        if self.beat_fd is not None:
            os.close(self.beat_fd)
            self.beat_fd = None

    def _beat(self, step: int) -> None:
        if self.beat_fd is None:
            return
        line = json.dumps({"rank": self.rank, "step": step, "time": round(time.time(), 3), "pid": os.getpid()})
        os.pwrite(self.beat_fd, line.ljust(160).encode(), 0)  # the same length each time: never a torn tail


class NothingLeftToTrain(Exception):
    """Raised out of the Trainer's loop: the checkpoint resumed from is the run's last step."""


class ResumePlan(TrainerCallback):
    """What a resumed run does with the plan as it is now.

    * The learning rate of its next step comes from the schedule as planned
      now, not the one the checkpoint saved: with trainer.max_steps raised on
      a finished run, the schedule continues as if the run had been planned
      that long from the start (the Trainer's schedules are closed-form
      functions of the step and the total). Same plan: the same value.
    * A changed trainer.learning_rate applies from the next step (the
      scheduler's saved base rates are scaled by new / saved, so LoRA+'s
      per-group ratios stay): resuming a diverged run's last good checkpoint
      with a lower rate does what it says.
    * A checkpoint of the last planned step (a run killed during its final
      eval or save) trains nothing more: the Trainer would take one step past
      max_steps, as it tests for the end only after a step."""

    SCHEDULE = "fttrain_schedule.json"  # in each checkpoint: the learning rate it was trained with

    def __init__(self):
        self.checkpoint = None  # set by the recipe when it resumes

    def on_train_begin(self, args, state, control, lr_scheduler=None, **kwargs):
        if not state.global_step or not isinstance(lr_scheduler, torch.optim.lr_scheduler.LambdaLR):
            return
        saved = self._saved_rate()
        if saved and saved != args.learning_rate:
            scale = args.learning_rate / saved
            lr_scheduler.base_lrs = [base * scale for base in lr_scheduler.base_lrs]
            for group, base in zip(lr_scheduler.optimizer.param_groups, lr_scheduler.base_lrs):
                group["initial_lr"] = base
            import logging

            logging.getLogger("fttrain").info("trainer.learning_rate is %g, the checkpoint was trained at %g: the "
                                              "schedule goes on at the new rate", args.learning_rate, saved)
        lrs = [base * f(lr_scheduler.last_epoch) for f, base in zip(lr_scheduler.lr_lambdas, lr_scheduler.base_lrs)]
        for group, lr in zip(lr_scheduler.optimizer.param_groups, lrs):
            group["lr"] = lr
        lr_scheduler._last_lr = lrs

    def _saved_rate(self):
        path = Path(self.checkpoint) / self.SCHEDULE if self.checkpoint else None
        try:
            return float(json.loads(path.read_text())["learning_rate"]) if path else None
        except (OSError, ValueError, KeyError):
            return None

    def on_step_begin(self, args, state, control, **kwargs):
        if state.max_steps and state.global_step >= state.max_steps:
            raise NothingLeftToTrain(state.global_step)


class AtTrainBegin(TrainerCallback):
    """Calls fn once the Trainer has wrapped the model (DDP, DeepSpeed engine,
    FSDP) and loaded any checkpoint, just before the first step. Under ZeRO-3
    the model cannot run a forward pass before the engine exists."""

    def __init__(self, fn):
        self.fn = fn

    def on_train_begin(self, args, state, control, **kwargs):
        self.fn()


class JsonlLogCallback(TrainerCallback):
    """Streams every log line (per-step loss, grad norm, lr, eval loss) to
    ``train_log.jsonl`` as it happens, so a crashed run still has its curve."""

    def __init__(self, path: Path):
        self.path = Path(path)
        self.resume_step = None  # set by the recipe when resuming from a checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if not is_main_process():
            return
        kept = []
        if self.resume_step is not None and self.path.exists():
            # Keep the history up to the checkpoint; lines logged after it
            # (by a run that went on before stopping) are replayed anew.
            kept = [l for l in self.path.read_text().splitlines() if _step_of(l) <= self.resume_step]
        self.path.write_text("".join(l + "\n" for l in kept))

    def on_step_end(self, args, state, control, **kwargs):
        # Log the last step even when max_steps is not a multiple of
        # logging_steps, so the logged losses cover every step.
        if state.global_step >= state.max_steps:
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if is_main_process() and logs:
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": state.global_step, **logs}) + "\n")


def write_rank_record(trainer: FTTrainer, run_dir: Path) -> None:
    """Each rank writes what it trained on and a fingerprint of its weights.
    Tests use these to prove that ranks trained on disjoint shards and ended
    with identical weights."""
    if not trainer.rank_records:
        return
    import hashlib

    from fttrain.plan.save import full_trainable_weights

    rank = trainer.args.process_index
    h = hashlib.sha256()
    # Whole weights, gathered from the shards under FSDP / ZeRO-3 (a collective: every rank is here).
    for name, p in full_trainable_weights(trainer):
        h.update(name.encode())
        h.update(p.float().cpu().numpy().tobytes())
    folder = Path(run_dir) / "ranks"
    folder.mkdir(exist_ok=True)
    record = {
        "rank": rank,
        "world_size": trainer.args.world_size,
        "pid": os.getpid(),
        "trainable_sha256": h.hexdigest(),
        "sample_ids_per_micro_batch": trainer.seen_sample_ids,
    }
    (folder / f"rank{rank}.json").write_text(json.dumps(record))
