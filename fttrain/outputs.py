"""The run directory: the output contract later stages and users rely on.

    <run_dir>/
      config.yaml          resolved config of this run
      overrides.yaml       the command-line overrides
      run_info.json        batch arithmetic, world size, versions, pad strategy
      data_report.json     rows kept, dropped (per reason) and truncated, per split
      model/               adapter (PEFT) or full model, plus tokenizer, HF format
      metrics.json         final metrics (see METRIC_KEYS)
      train_log.jsonl      one line per logged step: loss, grad_norm, lr, eval_loss
      loss_curve.png
      samples.jsonl        generations on eval prompts after training
      checkpoints/         trainer checkpoints (trainer.save_steps, or on a stop signal); see fttrain.checkpoints
      rank0.pid            while running: rank 0's pid, for the Slurm script's signal forwarding
      run.lock             held (flock) by the run writing here: a second run into it is refused
      heartbeat/rank<r>.json  each rank's last step and time (trainer.step_timeout_seconds)
      stacks/rank<r>.txt   every thread's stack of a rank whose step hung past the timeout
      ranks/rank<r>.json   per-rank record: sample ids trained on, weight hash
      train_rank<r>.log    each rank's log
      COMPLETE             written last; its presence means every file above is whole

A directory with COMPLETE is never overwritten unless ``overwrite=true``;
``resume_from=auto`` on it does nothing unless trainer.max_steps or
trainer.num_epochs grew (then it continues from the newest checkpoint).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Dict, List

from fttrain.errors import FttrainError

METRIC_KEYS = [
    "train_loss",
    "eval_loss",
    "train_tokens_per_second",
    "padding_fraction",
    "peak_memory_bytes",
    "trainable_params",
    "total_params",
    "world_size",
    "global_batch_size",
    "steps",
]
COMPLETE = "COMPLETE"


class RunDirError(FttrainError, RuntimeError):
    pass


class RunLock:
    """``run.lock`` in a run directory, held with flock by the main process of
    the run writing there. The kernel drops the lock when that process ends,
    however it ends, so a lock left by a dead run is never stale; the file's
    text (pid, host, start) only names the holder in the refusal."""

    NAME = "run.lock"

    def __init__(self, run_dir: Path):
        import fcntl
        import socket

        import errno
        import logging

        run_dir.mkdir(parents=True, exist_ok=True)
        path = run_dir / self.NAME
        self.fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        for attempt in range(10):  # `fttrain status` holds it for an instant
            try:
                fcntl.flock(self.fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    # A file system without flock (some Lustre and NFS mounts): run unguarded, and say so.
                    logging.getLogger("fttrain").warning("%s cannot be locked here (%s): a second run into this "
                                                         "directory would not be refused", path, e)
                    return
                if attempt == 9:
                    holder = os.pread(self.fd, 200, 0).decode(errors="replace").strip() or "unknown"
                    os.close(self.fd)
                    raise RunDirError(
                        f"{run_dir} is in use by another run ({holder}). Wait for it to end, or choose another "
                        "directory (name=OTHER or hydra.run.dir=PATH)"
                    ) from None
                time.sleep(0.1)
        os.ftruncate(self.fd, 0)
        os.pwrite(self.fd, f"pid {os.getpid()} on {socket.gethostname()} since "
                           f"{time.strftime('%Y-%m-%dT%H:%M:%S%z')}\n".encode(), 0)

    def release(self) -> None:
        if self.fd is not None:
            os.close(self.fd)  # closing drops the flock
            self.fd = None


def finished_run_metrics(run_dir: Path, trainer_cfg, resume_from, overwrite: bool):
    """resume_from=auto on a finished run: its metrics when no more training is
    planned than it did (the run is left as it is), else None (it continues).
    Read from metrics.json alone, which only a continuing rank 0 removes, so
    every rank decides the same whatever order they read in."""
    import json

    if resume_from != "auto" or overwrite or not (run_dir / COMPLETE).exists():
        return None
    try:
        metrics = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return None  # not a whole finished run (or rank 0 is continuing it): the guard decides
    if trainer_cfg.max_steps > 0:
        grew = trainer_cfg.max_steps > int(metrics.get("steps") or 0)
    else:
        planned = metrics.get("planned") or {}
        grew = planned.get("max_steps", 0) > 0 or trainer_cfg.num_epochs > planned.get("num_epochs", float("inf"))
    return None if grew else metrics


def guard_run_dir(run_dir: Path, overwrite: bool, resume_from, hashes: bool = True) -> None:
    """Refuse to clobber a finished run, restart over an unfinished one, or
    resume from a checkpoint that is incomplete or fails verification."""
    from fttrain.checkpoints import complete_checkpoints, is_complete, verify

    if resume_from not in (None, "auto"):
        problem = ("no trainer_state.json: missing, or a save that did not finish"
                   if not is_complete(Path(resume_from)) else verify(Path(resume_from), hashes))
        if problem:
            raise RunDirError(
                f"resume_from={resume_from} is not a whole checkpoint ({problem}); resume_from=auto picks the "
                "newest whole one in the run directory"
            )
    if overwrite:
        return
    if resume_from == "auto":
        # The newest complete checkpoint, or a fresh start in a directory that
        # holds no finished run (a Slurm job's first start uses the same command).
        if not complete_checkpoints(run_dir) and (run_dir / COMPLETE).exists():
            raise RunDirError(
                f"resume_from=auto: {run_dir} holds a finished run and no complete checkpoint to resume from "
                "(set trainer.save_steps to write them). Choose another directory or drop resume_from."
            )
        return
    if resume_from is not None:
        inside = Path(resume_from).resolve().is_relative_to(run_dir.resolve())
        if inside or not (run_dir / COMPLETE).exists():
            return
    if (run_dir / COMPLETE).exists():
        raise RunDirError(
            f"{run_dir} holds a finished run. Choose another directory (name=OTHER or hydra.run.dir=PATH), "
            "continue it from its last checkpoint with resume_from=auto and a larger trainer.max_steps, "
            "or replace it with overwrite=true."
        )
    ckpts = run_dir / "checkpoints"
    if ckpts.is_dir() and any(ckpts.glob("checkpoint-*")):
        raise RunDirError(
            f"{run_dir} holds an unfinished run with checkpoints. Continue it with resume_from=auto, "
            "or start over with overwrite=true, or choose another directory (name=OTHER or hydra.run.dir=PATH)."
        )


# What was measured on a finished run's model: a continued or replaced run has another model.
MEASURED_ON_MODEL = ("eval_harness.json", "eval_harness_samples.jsonl", "eval_harness_error.txt")


def unmark_complete(run_dir: Path) -> None:
    """A directory being rewritten (resume, overwrite) is not complete until the end."""
    for name in (COMPLETE, "metrics.json", *MEASURED_ON_MODEL):
        p = run_dir / name
        if p.exists():
            p.unlink()


def clear_previous_run(run_dir: Path) -> None:
    """overwrite=true: remove what the old run derived, so nothing of it (a
    stale checkpoint picked by a later resume, an old COMPLETE) passes for
    the new run's. model/ is swapped for the new one when that is saved."""
    unmark_complete(run_dir)
    # trackers.json: the new run starts tracker runs of its own rather than continuing the old one's.
    for name in ("samples.jsonl", "train_log.jsonl", "data_report.json", "trackers.json"):
        p = run_dir / name
        if p.exists():
            p.unlink()
    for name in ("checkpoints", "ranks", "model.old", "model.tmp", "tensorboard", "compare"):
        shutil.rmtree(run_dir / name, ignore_errors=True)


def plot_loss_curve(log_rows: List[Dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(r["step"], r["loss"]) for r in log_rows if "loss" in r]
    evals = [(r["step"], r["eval_loss"]) for r in log_rows if "eval_loss" in r]
    fig, ax = plt.subplots(figsize=(6, 4), dpi=100)
    if train:
        ax.plot(*zip(*train), label="train loss")
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss")
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss (per trained token)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)


def mark_complete(run_dir: Path) -> None:
    from fttrain import atomic

    atomic.write_text(run_dir / COMPLETE, time.strftime("%Y-%m-%dT%H:%M:%S%z") + "\n")


WEIGHT_FILES = {
    "hf": ("adapter_model.safetensors", "model.safetensors", "model.safetensors.index.json", "pytorch_model.bin"),
    "bottleneck": ("adapter_model.safetensors",),  # fttrain's bottleneck adapters (fttrain.methods.bottleneck)
    "zero_sharded": ("latest",),
    "fsdp_sharded": ("pytorch_model_fsdp_0",),
}


def check_weights_written(folder: Path, model_format: str) -> None:
    """A model folder without weights must never be published as a finished run."""
    folder = Path(folder)
    if not any((folder / name).exists() for name in WEIGHT_FILES[model_format]):
        raise RuntimeError(
            f"saving wrote no weights to {folder} (expected one of {list(WEIGHT_FILES[model_format])}); "
            "the run is not marked complete"
        )


def run_status(run_dir: Path, now: float = None) -> str:
    """What a run directory says about its run: finished, running (the lock is held)
    or stopped; its newest checkpoint; each rank's last step and how long ago; a hang."""
    import fcntl
    import json

    from fttrain.checkpoints import latest_checkpoint

    run_dir, now = Path(run_dir), time.time() if now is None else now
    if not run_dir.is_dir():
        raise RunDirError(f"{run_dir}: no such run directory")
    lock, holder = run_dir / RunLock.NAME, ""
    if lock.exists():
        fd = os.open(lock, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except OSError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip()
        finally:
            os.close(fd)
    state = "finished" if (run_dir / COMPLETE).exists() else f"running ({holder})" if holder else "not running"
    lines = [f"{run_dir}: {state}"]
    newest = latest_checkpoint(run_dir, hashes=False)
    lines.append(f"  newest whole checkpoint: {newest.name if newest else 'none'}")
    for beat in sorted((run_dir / "heartbeat").glob("rank*.json"), key=lambda p: int(p.stem[4:])):
        try:
            b = json.loads(beat.read_text())
        except (OSError, ValueError):
            continue
        lines.append(f"  rank {b['rank']}: step {b['step']} done {now - b['time']:.0f} s ago (pid {b['pid']})")
    for stack in sorted((run_dir / "stacks").glob("rank*.txt")):
        text = stack.read_text(errors="replace")
        if text.strip():
            lines.append(f"  {stack.stem}: {text.splitlines()[0]} (stacks in {stack})")
    return "\n".join(lines)


def main(argv=None) -> int:
    """``fttrain status RUN_DIR ...``: each run's state, checkpoint, ranks' heartbeats and hangs."""
    import argparse
    import sys

    from fttrain.errors import report

    parser = argparse.ArgumentParser(prog="fttrain status", description=main.__doc__)
    parser.add_argument("run_dirs", nargs="+", type=Path)
    args = parser.parse_args(argv)
    try:
        for run_dir in args.run_dirs:
            print(run_status(run_dir))
    except FttrainError as e:
        return report("fttrain status", e)
    sys.stdout.flush()
    return 0
