"""Files and folders whole or absent: written under a temporary name, then renamed.

A reader (another rank, a resumed run, a user) sees the old version or the new
one, never half of one. Used for the run directory's files, checkpoints, the
saved model, exports and the prepared-data cache.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Dict, List


def write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())  # on disk before the rename publishes it
    os.replace(tmp, path)


def write_json(path: Path, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str))


def write_jsonl(path: Path, rows: List[Dict]) -> None:
    write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows))


def publish_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place; a reader sees the old one or the new one."""
    if final.exists():
        old = final.with_name(final.name + ".old")
        shutil.rmtree(old, ignore_errors=True)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)


def sync_folder(folder: Path) -> None:
    """fsync every file of a folder, before it is renamed into place (a crash before the
    rename leaves a temporary folder, which is never used)."""
    for p in Path(folder).rglob("*"):
        if p.is_file():
            fd = os.open(p, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)


def sync_dir(folder: Path) -> None:
    """fsync a directory, so a rename into it survives a power loss."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:  # some file systems cannot fsync a directory
        pass
    finally:
        os.close(fd)


def remove_tree(path) -> None:
    shutil.rmtree(path, ignore_errors=True)
