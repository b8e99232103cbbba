"""Waiting on other ranks without the process group's timeout.

Local rank 0 prepares what its node shares (the tiny model's files, the
tokenized data set) while the other ranks wait. A collective barrier there
fails once the wait passes ``dist.timeout_minutes`` (and NCCL's watchdog
kills the job), yet tokenizing a few hundred thousand long chats can take
longer than any timeout one would set for a collective. So the ranks wait by
polling keys in the rendezvous store (a non-blocking ``check``, once a
second), which no timeout limits:

    rank:        0 (local main)      1 .. 7
    before       -                   poll until key <step>/0 is set
    the work     prepare             (after 0: reuse what it wrote)
    after        set <step>/0 = ok   set <step>/r = ok; poll until every rank's key is set

A failure sets the rank's key to the error, so the waiting ranks stop at once
with its message instead of waiting for the launcher to kill them.
"""

from __future__ import annotations

import logging
import os
import time
import uuid
from contextlib import contextmanager
from typing import Iterable

from fttrain.env import is_main_process
from fttrain.errors import FttrainError

log = logging.getLogger("fttrain")

POLL_SECONDS = 1.0
_steps = {"n": 0}
_token: dict = {}


class RankFailed(RuntimeError):
    """Another rank failed in a section this rank was waiting on."""


def _group():
    import torch.distributed as dist

    if not dist.is_available() or not dist.is_initialized() or dist.get_world_size() == 1:
        return None
    return dist


def _store():
    from torch.distributed import distributed_c10d

    return distributed_c10d._get_default_store()


def _wait_for(store, keys: Iterable[str], what: str, mine: str) -> None:
    """Until every key is set; a key holding a failure raises it here, after
    acknowledging it under this rank's own key (``mine``)."""
    pending = list(keys)
    waited, next_log = 0.0, 60.0
    while pending:
        still = []
        for key in pending:
            if not store.check([key]):
                still.append(key)
                continue
            value = store.get(key).decode()
            if value not in ("ok", "seen"):
                store.set(mine, "seen")
                rank = key.rsplit("/", 1)[-1]
                kind, _, message = value.partition(":")
                failure = f"rank {rank} failed during {what}: {message}"
                raise _user_error(failure) if kind == "user" else RankFailed(failure)
        pending = still
        if pending:
            time.sleep(POLL_SECONDS)
            waited += POLL_SECONDS
            if waited >= next_log:
                log.info("waiting for %s on %d rank(s) for %.0f s", what, len(pending), waited)
                next_log *= 2


def _user_error(message: str) -> Exception:
    return FttrainError(message)


def _failure(e: BaseException) -> str:
    kind = "user" if isinstance(e, FttrainError) else "error"
    return f"{kind}:{type(e).__name__}: {e}" if kind == "error" else f"user:{e}"


@contextmanager
def local_main_first(what: str):
    """Run the block on each node's local rank 0 first, then on the other ranks;
    return once every rank has run it. No timeout (see the module doc)."""
    yield from _leader_first(what, per_node=True)


@contextmanager
def main_first(what: str):
    """The same with rank 0 of the whole job first (one writer of a shared folder)."""
    yield from _leader_first(what, per_node=False)


def _leader_first(what: str, per_node: bool):
    dist = _group()
    if dist is None:
        yield
        return
    store = _store()
    rank, world = dist.get_rank(), dist.get_world_size()
    leader = rank - int(os.environ.get("LOCAL_RANK", rank)) if per_node else 0
    _steps["n"] += 1
    prefix = f"fttrain/local_main_first/{_steps['n']}"
    mine = f"{prefix}/{rank}"
    if rank != leader:
        _wait_for(store, [f"{prefix}/{leader}"], what, mine)
    try:
        yield
    except BaseException as e:
        store.set(mine, _failure(e))
        # A few seconds for the waiting ranks to read the message before the launcher
        # sees this rank exit and stops them.
        others = [f"{prefix}/{r}" for r in range(world) if r != rank]
        deadline = time.monotonic() + 5 * POLL_SECONDS
        while time.monotonic() < deadline and not all(store.check([k]) for k in others):
            time.sleep(POLL_SECONDS / 10)
        raise
    store.set(mine, "ok")
    _wait_for(store, [f"{prefix}/{r}" for r in range(world)], what, mine)


def launch_token() -> str:
    """A string every rank of this launch shares and no other launch has."""
    if "value" not in _token:
        dist = _group()
        if dist is None:
            _token["value"] = uuid.uuid4().hex[:12]
        else:
            store = _store()
            if is_main_process():
                store.set("fttrain/launch_token", uuid.uuid4().hex[:12])
            _token["value"] = store.get("fttrain/launch_token").decode()  # blocks until rank 0 has set it
    return _token["value"]
