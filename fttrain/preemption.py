"""Stop on a signal at a step boundary, checkpoint, and requeue under Slurm.

Slurm warns a job before its time limit (``#SBATCH --signal=B:USR1@90``
sends SIGUSR1 to the batch script) and preempts with SIGTERM. The batch
script (slurm/*.sbatch) forwards USR1 to rank 0, whose pid is in
``<run_dir>/rank0.pid``: accelerate and torchrun do not pass USR1 on to
their workers, and one rank is enough, because:

* each rank's handler only sets a flag (nothing unsafe runs inside a signal
  handler), and the current optimizer step finishes;
* every ``trainer.stop_check_steps`` steps the ranks take the maximum of
  their flags (one small all-reduce, and reading it back is a device sync,
  hence not every step), so all ranks stop after the same step, and none
  exits alone leaving the others waiting in a collective; one process reads
  its own flag after every step;
* they write one checkpoint together (fttrain.checkpoints: complete or absent),
  the recipe skips the final evaluation and save;
* when the signal was a time-limit warning (USR1 from the batch script, USR2
  from submitit), every rank waits for the others, rank 0 requeues the job
  once (``scontrol requeue $SLURM_JOB_ID``) as its last action, and every
  process exits with status 0 (Slurm's own SIGTERM after the requeue is
  ignored). The restarted job (SLURM_RESTART_COUNT > 0) resumes from the
  newest complete checkpoint (fttrain.__main__).
* the same poll carries each rank's first step with a loss or gradient norm
  that was not finite (``fttrain.trainer.NonfiniteWatch``, noted on the
  device): the ranks stop together at once, before that step's weights are
  checkpointed (a checkpoint or eval step is always polled, and one process
  reads the flag whenever it got a signal) and without saving a model; the
  recipe then fails naming the step and the last good checkpoint
  (``diverged_at``). One process reads it every ``check_steps`` steps too:
  one device sync per poll, as the ranks' all-reduce is;
* SIGTERM (preemption, scancel, the time limit itself) stops and
  checkpoints without requeueing: Slurm requeues preempted jobs itself
  (PreemptMode=REQUEUE), and a cancelled job should stay cancelled. The
  checkpoint must fit in the cluster's grace time (KillWait / GraceTime);
  torchrun's agent kills its workers after its own shutdown timeout too.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
from pathlib import Path
from typing import List, Optional

import torch
from transformers import TrainerCallback

log = logging.getLogger("fttrain")

PID_FILE = "rank0.pid"


def signal_number(name: str) -> int:
    """"SIGUSR1" or "USR1" -> signal.SIGUSR1"""
    name = name.upper()
    return int(getattr(signal, name if name.startswith("SIG") else f"SIG{name}"))


def signal_name(number: int) -> str:
    return signal.Signals(number).name


class StopOnSignal(TrainerCallback):
    """Installs handlers for ``signals``; every ``check_steps`` optimizer steps
    the ranks agree whether any of them got one, and if so save and stop together."""

    def __init__(self, signals: List[str], requeue_signals: List[str], check_steps: int = 1):
        self.check_steps = check_steps
        self.trainer = None  # set by the recipe: its first_nonfinite_step() is polled with the signals
        self.diverged_at: Optional[int] = None  # the first step any rank saw a non-finite loss or grad norm
        self.received: Optional[int] = None  # the signal number this rank got
        self.stopped_at: Optional[int] = None  # the step all ranks stopped after
        self.stop_signal: Optional[int] = None  # agreed over ranks: the largest number received
        self.requeue_signals = {signal_number(s) for s in requeue_signals}
        self.previous = {}
        for name in signals:
            number = signal_number(name)
            self.previous[number] = signal.signal(number, self._handle)
        from fttrain.early_signals import take

        early = take()  # one that came while the process started (fttrain.early_signals)
        if early is not None and early in self.previous:
            self._handle(early, None)

    def _handle(self, signum, frame):
        # Repeats are ignored: on preemption slurmd and torchrun's agent both send
        # SIGTERM to each worker, and requeueing sends one more after the checkpoint.
        if self.received is None:
            self.received = signum

    def restore(self) -> None:
        """The handlers that were there before (after the run)."""
        for number, handler in self.previous.items():
            signal.signal(number, handler if handler is not None else signal.SIG_DFL)
        self.previous = {}

    def _agreed(self, device, step: int, last_step: int, must_check: bool):
        """(the largest signal any rank got, the first non-finite step on any rank or None)."""
        nonfinite = getattr(self.trainer, "first_nonfinite_step", None)
        alone = not (torch.distributed.is_available() and torch.distributed.is_initialized()) \
            or torch.distributed.get_world_size() == 1
        polled = not (step % self.check_steps) or step == last_step or must_check
        if not polled and not (alone and self.received):
            # Every rank skips the same steps; the last one, and any that saves or evaluates, is checked,
            # so no signal goes unseen and no non-finite weights are written. Alone, a signal is acted on
            # at once, so the non-finite flag is read with it: a stop must not checkpoint a diverged model.
            return 0, None
        first = nonfinite() if nonfinite is not None else None
        if alone:
            bad = int(first) if first is not None else -1
            return self.received or 0, (bad if bad >= 0 else None)
        never = 2 ** 62  # MAX over -step finds the smallest step any rank saw
        flag = torch.tensor([self.received or 0, -never], dtype=torch.int64, device=device)
        if first is not None:
            flag[1] = torch.where(first >= 0, -first, torch.full_like(first, -never))
        torch.distributed.all_reduce(flag, op=torch.distributed.ReduceOp.MAX)
        signal_got, bad = flag.tolist()
        return signal_got, (-bad if bad > -never else None)

    def on_step_end(self, args, state, control, **kwargs):
        agreed, bad = self._agreed(args.device, state.global_step, state.max_steps,
                                   must_check=bool(control.should_save or control.should_evaluate))
        if bad is not None and self.diverged_at is None:
            self.diverged_at = bad
            control.should_save = control.should_evaluate = False  # weights after that step are not to be kept
            control.should_training_stop = True
            log.error("the loss or gradient norm was not finite at step %d (seen after step %d): stopping every "
                      "rank without saving", bad, state.global_step)
            return control
        if agreed and self.stopped_at is None:
            self.stop_signal, self.stopped_at = agreed, state.global_step
            control.should_save = True
            control.should_training_stop = True
            log.warning("%s received%s: stopping after step %d on this rank, as on every rank, and writing a "
                        "checkpoint", signal_name(agreed), "" if self.received else " by another rank",
                        state.global_step)
        return control

    def stop_before_training(self, device, step: int) -> bool:
        """A signal that came during start-up (launch, model loading, data
        preparation), agreed over ranks now: the run stops before its first
        step, with nothing new to checkpoint, and requeues as after any step."""
        agreed, _ = self._agreed(device, step, step, must_check=True)
        if not agreed:
            return False
        self.stop_signal, self.stopped_at = agreed, step
        log.warning("%s received during start-up%s: stopping before training (at step %d) on every rank",
                    signal_name(agreed), "" if self.received else " by another rank", step)
        return True

    @property
    def stopped(self) -> bool:
        return self.stopped_at is not None

    def should_requeue(self) -> bool:
        """Under Slurm, for a requeue signal, and fewer restarts so far than
        FTTRAIN_MAX_REQUEUES (slurm.max_requeues, set by the job script)."""
        if not (self.stopped and self.stop_signal in self.requeue_signals and os.environ.get("SLURM_JOB_ID")):
            return False
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        limit = os.environ.get("FTTRAIN_MAX_REQUEUES")
        if limit is not None and restarts >= int(limit):
            log.warning("not requeueing: the job has restarted %d times (slurm.max_requeues=%s)", restarts, limit)
            return False
        return True


def write_pid_file(run_dir: Path) -> Path:
    """Rank 0 records its pid for the batch script's signal forwarding."""
    path = Path(run_dir) / PID_FILE
    path.write_text(f"{os.getpid()}\n")
    return path


def remove_pid_file(run_dir: Path) -> None:
    path = Path(run_dir) / PID_FILE
    try:
        if path.read_text().strip() == str(os.getpid()):
            path.unlink()
    except FileNotFoundError:
        pass


def requeue_job() -> str:
    """``scontrol requeue $SLURM_JOB_ID``; Slurm then ends this run of the job
    and starts it again (same job id, SLURM_RESTART_COUNT + 1)."""
    job = os.environ["SLURM_JOB_ID"]
    done = subprocess.run(["scontrol", "requeue", job], capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"scontrol requeue {job} failed: {(done.stderr or done.stdout).strip()}")
    return job
