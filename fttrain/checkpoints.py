"""Trainer checkpoints that are whole or absent.

    <run_dir>/checkpoints/
      checkpoint-<step>/     complete: every rank's part written, then moved here
      .staging/checkpoint-<step>/
                             being written (or left by a run that died while saving)

The Trainer writes a checkpoint (weights or shards, optimizer, scheduler,
RNG states of every rank, trainer state with the data position) into
``.staging``; once every rank has written its part, rank 0 renames it to
``checkpoint-<step>``. A rename within one directory is atomic on POSIX
file systems, so a reader never sees half a checkpoint under the final name.

Before the rename, every file is flushed to disk (fsync) and rank 0 writes
``fttrain_manifest.json`` last: the size and SHA-256 of every file. Resuming
verifies it (sizes always; hashes unless ``trainer.verify_checkpoints=size``),
so a checkpoint whose files were deleted, truncated, zeroed or flipped after
it was written is named and skipped for the next newest good one, instead of
crashing the resume or resuming from damaged weights. A checkpoint without a
manifest (written before fttrain wrote them) is trusted as before.

Only then are older checkpoints removed (the newest ``trainer.save_total_limit``
complete ones stay), and an incomplete one is removed only once a newer
complete one exists. Resuming never picks an incomplete checkpoint; it is
reported instead.

A save that fails with a write error (a full disk, a read-only folder) removes
its staging folder and stops the run with the path, the space left and the
previous checkpoint, which stays whole.
"""

from __future__ import annotations

import hashlib
import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from fttrain.env import is_main_process
from fttrain.errors import FttrainError

log = logging.getLogger("fttrain")

STAGING = ".staging"
MANIFEST = "fttrain_manifest.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path) -> int:
    """checkpoints/checkpoint-120 -> 120"""
    return int(Path(path).name.rsplit("-", 1)[-1])


def _numbered(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step)


def is_complete(path: Path) -> bool:
    """Published whole: fttrain's manifest (written last, before the rename), or for a
    checkpoint written without one, trainer_state.json (the Trainer's last file).
    Whether its files are still intact is ``verify``'s question."""
    return (Path(path) / MANIFEST).is_file() or (Path(path) / "trainer_state.json").is_file()


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _numbered(Path(run_dir) / "checkpoints") if is_complete(p)]


def incomplete_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoints that were never finished: staged ones, and numbered folders
    without the Trainer's state (written by a version that saved in place)."""
    folder = Path(run_dir) / "checkpoints"
    return _numbered(folder / STAGING) + [p for p in _numbered(folder) if not is_complete(p)]


class CheckpointError(FttrainError, RuntimeError):
    """A checkpoint that cannot be written, or one named to resume from that fails verification."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def _files(folder: Path) -> List[Path]:
    return sorted(p for p in Path(folder).rglob("*") if p.is_file() and p.name != MANIFEST)


def write_manifest(folder: Path, hashes: bool = True) -> None:
    """Size and SHA-256 of every file of a written checkpoint, the last file written.
    Without hashes (trainer.verify_checkpoints=size) only sizes: no second read of a huge checkpoint."""
    from fttrain import atomic

    folder = Path(folder)
    files = {str(p.relative_to(folder)): {"bytes": p.stat().st_size, **({"sha256": _sha256(p)} if hashes else {})}
             for p in _files(folder)}
    atomic.write_json(folder / MANIFEST, {"version": 1, "files": files})


def verify(folder: Path, hashes: bool = True) -> Optional[str]:
    """None for a checkpoint that is whole, or what is wrong with it. Without a
    manifest (an older fttrain's checkpoint) only the Trainer's state is read."""
    try:
        return _verify(Path(folder), hashes)
    except OSError as e:  # a file that exists but cannot be read
        return f"unreadable ({e})"


def _verify(folder: Path, hashes: bool) -> Optional[str]:
    import json

    if (folder / MANIFEST).is_file():
        try:
            files = json.loads((folder / MANIFEST).read_text())["files"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            return f"{MANIFEST} is unreadable ({type(e).__name__})"
        for name, want in files.items():
            path = folder / name
            if not path.is_file():
                return f"{name} is missing"
            size = path.stat().st_size
            if size != want["bytes"]:
                return f"{name} has {size} bytes, {want['bytes']} were written"
        if hashes:
            for name, want in files.items():
                if want.get("sha256") and _sha256(folder / name) != want["sha256"]:
                    return f"{name} differs from what was written (SHA-256 mismatch)"
    try:
        json.loads((folder / "trainer_state.json").read_text())
    except (OSError, ValueError) as e:
        return f"trainer_state.json is unreadable ({type(e).__name__})"
    return None


def latest_checkpoint(run_dir: Path, hashes: bool = True) -> Optional[Path]:
    """Newest complete checkpoint that passes verification; incomplete and damaged
    ones are reported, never picked."""
    for p in incomplete_checkpoints(run_dir):
        log.warning("incomplete checkpoint %s (a save that did not finish) is ignored", p)
    for p in reversed(complete_checkpoints(run_dir)):
        problem = verify(p, hashes)
        if problem is None:
            return p
        log.warning("checkpoint %s is damaged and skipped: %s", p, problem)
    return None


def rotate(run_dir: Path, keep: Optional[int], just_written: Optional[Path] = None) -> List[Path]:
    """Remove all but the newest ``keep`` complete checkpoints (None or 0 keeps
    all), and incomplete ones older than the newest complete one; never the
    one just written (after resuming from an older checkpoint it is not the
    newest by step). Returns what was removed."""
    done = complete_checkpoints(run_dir)
    if not done:
        return []
    newest = checkpoint_step(done[-1])
    doomed = [p for p in (done[:-keep] if keep else []) if p != just_written]
    doomed += [p for p in incomplete_checkpoints(run_dir) if checkpoint_step(p) < newest]
    for p in doomed:
        shutil.rmtree(p, ignore_errors=True)
    return doomed


class AtomicCheckpoints:
    """Trainer mixin: checkpoints are written under ``.staging`` and renamed
    once every rank has written its part (see the module docstring). The
    Trainer's own rotation is off (save_total_limit=None in its arguments);
    ``keep_checkpoints`` is applied here, after the rename."""

    keep_checkpoints: Optional[int] = None
    manifest_hashes: bool = True  # trainer.verify_checkpoints=hash
    # Rank 0 calls each with the staged folder before it is renamed: state that is not the Trainer's.
    checkpoint_extras: tuple = ()

    def _get_output_dir(self, trial):
        return os.path.join(self.args.output_dir, STAGING)

    # Loading a checkpoint that verified can still fail: one written by another model, method or
    # plan than this run's. Said as such, naming the checkpoint, instead of a traceback.
    def _load_from_checkpoint(self, resume_from_checkpoint, model=None):
        with _loading(resume_from_checkpoint, "the weights"):
            return super()._load_from_checkpoint(resume_from_checkpoint, model)

    def _load_optimizer_and_scheduler(self, checkpoint):
        with _loading(checkpoint, "the optimizer and scheduler state"):
            return super()._load_optimizer_and_scheduler(checkpoint)

    def _save_checkpoint(self, model, trial):
        name = f"checkpoint-{self.state.global_step}"
        staging = Path(self.args.output_dir) / STAGING
        if is_main_process() and (staging / name).exists():
            shutil.rmtree(staging / name)  # left by a save of this step that died
        if is_main_process():
            warn_if_short_of_space(Path(self.args.output_dir))
        self.accelerator.wait_for_everyone()
        try:
            super()._save_checkpoint(model, trial)
            failed = None
        except Exception as e:  # noqa: BLE001  told to every rank below, then raised
            failed = e
        # Every rank has written its shards, optimizer state and RNG state, or one failed.
        failed = _agreed_failure(self.accelerator, failed)
        if failed is None and is_main_process():
            from fttrain.atomic import sync_folder

            try:
                from fttrain import atomic
                from fttrain.trainer import ResumePlan

                atomic.write_json(staging / name / ResumePlan.SCHEDULE, {"learning_rate": self.args.learning_rate})
                for write in self.checkpoint_extras:
                    write(staging / name)
                sync_folder(staging / name)  # on disk before it is published: a power loss cannot empty its files
                write_manifest(staging / name, self.manifest_hashes)
            except OSError as e:
                failed = e
        failed = _agreed_failure(self.accelerator, failed)
        if failed is not None:
            if is_main_process():
                shutil.rmtree(staging / name, ignore_errors=True)
            if not is_write_error(failed):
                raise failed
            raise save_failed(staging / name, failed, Path(self.args.output_dir).parent) from None
        if is_main_process():
            from fttrain.atomic import publish_dir, sync_dir

            final = Path(self.args.output_dir) / name
            # A rename; the same step saved again after a resume is swapped in, the old one removed after.
            publish_dir(staging / name, final)
            sync_dir(final.parent)
            removed = rotate(Path(self.args.output_dir).parent, self.keep_checkpoints, just_written=final)
            log.info("checkpoint %s complete%s", final,
                     f"; removed {', '.join(p.name for p in removed)}" if removed else "")
        self.accelerator.wait_for_everyone()


def warn_if_short_of_space(folder: Path) -> None:
    """A checkpoint takes about what the last one took: say so before writing when the disk has less."""
    done = complete_checkpoints(folder.parent)
    if not done:
        return
    need = sum(p.stat().st_size for p in done[-1].rglob("*") if p.is_file())
    try:
        free = shutil.disk_usage(folder).free
    except OSError:
        return
    if free < need * 1.05:
        log.warning("%s has %.0f MiB free and the last checkpoint took %.0f MiB: the next save will likely fail "
                    "(free space, or lower trainer.save_total_limit)", folder, free / 2**20, need / 2**20)


class _loading:
    """Turns an error while loading part of a checkpoint into a CheckpointError naming it."""

    def __init__(self, checkpoint, what: str):
        self.checkpoint, self.what = checkpoint, what

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        if error is None or self.checkpoint is None or not isinstance(error, Exception) \
                or isinstance(error, FttrainError):
            return False
        raise CheckpointError(
            f"resuming from {self.checkpoint} failed while loading {self.what}: {type(error).__name__}: "
            f"{str(error)[:600]}. The checkpoint's files are intact, so it was most likely written by a run with "
            "another model, PEFT method or settings (peft.r, target modules, dist plan) than this one: resume with "
            "the settings it was written with, or start over with overwrite=true"
        ) from error


def _agreed_failure(accelerator, error: Optional[BaseException]) -> Optional[BaseException]:
    """This rank's error, or (another rank failed) a stand-in of the same kind (a write
    error or another failure): every rank learns of a failed save in the same barrier,
    so none waits for the others."""
    import torch

    if accelerator.num_processes == 1:
        return error
    kind = 0.0 if error is None else 1.0 if is_write_error(error) else 2.0
    worst = float(accelerator.reduce(torch.tensor([kind], device=accelerator.device), reduction="max"))
    if error is not None or worst == 0:
        return error
    if worst == 1:
        return OSError("another rank could not write its part of the checkpoint (see its log)")
    return RuntimeError("another rank failed while writing its part of the checkpoint; its log has the error")


# How the writers report a full disk or a refused write when it is not an OSError:
# torch.save (C++ streams), safetensors (Rust).
_WRITE_ERROR_TEXT = ("no space left", "os error", "basic_ios", "disk quota", "read-only file system",
                     "permission denied", "file write failed", "unexpected pos")


def is_write_error(error: BaseException) -> bool:
    return isinstance(error, OSError) or any(t in str(error).lower() for t in _WRITE_ERROR_TEXT)


def save_failed(staging: Path, error: BaseException, run_dir: Path) -> CheckpointError:
    """The message for a checkpoint that could not be written: where, why, the space left, what is kept."""
    try:
        free = shutil.disk_usage(staging.parent if staging.parent.exists() else run_dir).free
        space = f"; {free / 2**20:.0f} MiB free on that file system"
    except OSError:
        space = ""
    kept = complete_checkpoints(run_dir)
    previous = f"the previous checkpoint {kept[-1]} is whole" if kept else "no earlier checkpoint exists"
    return CheckpointError(
        f"writing checkpoint {staging.name} under {staging.parent} failed: {error}{space}. The partial checkpoint "
        f"was removed and {previous}; free space (or lower trainer.save_total_limit) and continue with "
        "resume_from=auto"
    )
