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

Only then are older checkpoints removed (the newest ``trainer.save_total_limit``
complete ones stay), and an incomplete one is removed only once a newer
complete one exists. Resuming never picks an incomplete checkpoint; it is
reported instead.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path
from typing import List, Optional

from fttrain.env import is_main_process

log = logging.getLogger("fttrain")

STAGING = ".staging"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(path) -> int:
    """checkpoints/checkpoint-120 -> 120"""
    return int(Path(path).name.rsplit("-", 1)[-1])


def _numbered(folder: Path) -> List[Path]:
    if not folder.is_dir():
        return []
    return sorted((p for p in folder.iterdir() if p.is_dir() and _NAME.match(p.name)), key=checkpoint_step)


def is_complete(path: Path) -> bool:
    # trainer_state.json is the Trainer's last file; the rename makes the rest whole.
    return (Path(path) / "trainer_state.json").is_file()


def complete_checkpoints(run_dir: Path) -> List[Path]:
    """Complete checkpoints, oldest first."""
    return [p for p in _numbered(Path(run_dir) / "checkpoints") if is_complete(p)]


def incomplete_checkpoints(run_dir: Path) -> List[Path]:
    """Checkpoints that were never finished: staged ones, and numbered folders
    without the Trainer's state (written by a version that saved in place)."""
    folder = Path(run_dir) / "checkpoints"
    return _numbered(folder / STAGING) + [p for p in _numbered(folder) if not is_complete(p)]


def latest_checkpoint(run_dir: Path) -> Optional[Path]:
    """Newest complete checkpoint; incomplete ones are reported, never picked."""
    done = complete_checkpoints(run_dir)
    for p in incomplete_checkpoints(run_dir):
        log.warning("incomplete checkpoint %s (a save that did not finish) is ignored", p)
    return done[-1] if done else None


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
    # Rank 0 calls each with the staged folder before it is renamed: state that is not the Trainer's.
    checkpoint_extras: tuple = ()

    def _get_output_dir(self, trial):
        return os.path.join(self.args.output_dir, STAGING)

    def _save_checkpoint(self, model, trial):
        name = f"checkpoint-{self.state.global_step}"
        staging = Path(self.args.output_dir) / STAGING
        if is_main_process() and (staging / name).exists():
            shutil.rmtree(staging / name)  # left by a save of this step that died
        self.accelerator.wait_for_everyone()
        super()._save_checkpoint(model, trial)
        # Every rank has written its shards, optimizer state and RNG state.
        self.accelerator.wait_for_everyone()
        if is_main_process():
            from fttrain.atomic import publish_dir

            for write in self.checkpoint_extras:
                write(staging / name)

            final = Path(self.args.output_dir) / name
            # A rename; the same step saved again after a resume is swapped in, the old one removed after.
            publish_dir(staging / name, final)
            removed = rotate(Path(self.args.output_dir).parent, self.keep_checkpoints, just_written=final)
            log.info("checkpoint %s complete%s", final,
                     f"; removed {', '.join(p.name for p in removed)}" if removed else "")
        self.accelerator.wait_for_everyone()
