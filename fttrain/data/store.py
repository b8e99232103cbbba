"""Prepared rows on disk, memory-mapped: written once per node, read by every rank.

One split of a preparation is a folder:

    chunk-00000.tokens.npy   int32    token ids of the samples of chunk 0, end to end
    chunk-00000.trained.npy  uint8    1 where the token is trained (its label is itself)
    ...                               one pair per chunk of rows, written by the worker that encoded it
    sample_starts.npy        int64    [samples + 1] where each sample starts in the chunks' tokens, end to end
    sample_ids.npy           int64    [samples] the source row of each sample
    row_offsets.npy          int64    [rows + 1] packed layout: row r is row_members[row_offsets[r]:row_offsets[r+1]]
    row_members.npy          int64    sample indices, in file order inside a row
    meta.json                         layout, report, role-pattern samples
    examples.pkl                      eval split: the kept examples, for generation eval

Labels are not stored: every label is either -100 or the token itself (the
first token of a sample is never a target), so a one-byte mask carries them.
On disk that is 5 bytes a token (+16 a sample, +8 a packed row); opened, the
files are mapped, so a rank's memory grows only by the pages it touches and
every rank on a node shares one copy through the page cache.

Rows come out as the collators expect them (lists of ints), identical to
``packing.pack`` / ``as_rows`` / ``concat_blocks`` over the same samples.
"""

from __future__ import annotations

import json
import pickle
from array import array
from pathlib import Path
from typing import Dict, List, Optional

import numpy as np

from fttrain.data.tokenize import IGNORE

LAYOUTS = ("packed", "samples", "blocks")


class ChunkWriter:
    """The samples of one chunk of rows, written as the chunk's two token files."""

    def __init__(self, folder: Path, index: int):
        self.folder, self.index = Path(folder), index
        self.tokens, self.trained = array("i"), array("B")
        self.lengths, self.sample_ids, self.trained_counts = array("i"), array("q"), array("q")

    def add(self, input_ids: List[int], labels: List[int], sample_id: int) -> None:
        packed = array("i", input_ids)
        ids = np.frombuffer(packed, dtype=np.int32)
        lab = np.frombuffer(array("q", labels), dtype=np.int64)
        mask = lab != IGNORE
        if not np.array_equal(lab[mask], ids[mask]):
            raise AssertionError(f"row {sample_id}: a label differs from its token; the mask cannot carry it")
        self.tokens.extend(packed)  # array to array: a copy of bytes, not a walk over Python ints
        self.trained.frombytes(mask.tobytes())  # bool -> one byte, 0 or 1
        self.lengths.append(len(ids))
        self.sample_ids.append(sample_id)
        self.trained_counts.append(int(mask.sum()))

    def close(self) -> Dict[str, np.ndarray]:
        stem = self.folder / f"chunk-{self.index:05d}"
        np.save(f"{stem}.tokens.npy", np.frombuffer(self.tokens, dtype=np.int32))
        np.save(f"{stem}.trained.npy", np.frombuffer(self.trained, dtype=np.uint8))
        return {"lengths": np.frombuffer(self.lengths, dtype=np.int32).copy(),
                "sample_ids": np.frombuffer(self.sample_ids, dtype=np.int64).copy(),
                "trained": np.frombuffer(self.trained_counts, dtype=np.int64).copy()}


def write_split(folder: Path, n_chunks: int, lengths: np.ndarray, sample_ids: np.ndarray, layout: str,
                block: int, bins: Optional[List[List[int]]], meta: Dict, examples: Optional[Dict]) -> None:
    """The index files of a split whose chunks the workers have written."""
    assert layout in LAYOUTS, layout
    folder = Path(folder)
    starts = np.zeros(len(lengths) + 1, dtype=np.int64)
    np.cumsum(lengths, out=starts[1:])
    np.save(folder / "sample_starts.npy", starts)
    np.save(folder / "sample_ids.npy", np.asarray(sample_ids, dtype=np.int64))
    if layout == "packed":
        offsets = np.zeros(len(bins) + 1, dtype=np.int64)
        np.cumsum([len(b) for b in bins], out=offsets[1:])
        np.save(folder / "row_offsets.npy", offsets)
        members = np.fromiter((i for b in bins for i in sorted(b)), dtype=np.int64, count=int(offsets[-1]))
        np.save(folder / "row_members.npy", members)
    if examples is not None:
        with open(folder / "examples.pkl", "wb") as f:
            pickle.dump(examples, f, protocol=pickle.HIGHEST_PROTOCOL)
    with open(folder / "meta.json", "w") as f:
        json.dump({"layout": layout, "block": block, "chunks": n_chunks, **meta}, f)


class PreparedRows:
    """The rows of one prepared split, read from the mapped files on demand."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        with open(self.folder / "meta.json") as f:
            self.meta = json.load(f)
        self.layout, self.block = self.meta["layout"], self.meta["block"]
        chunks = [self.folder / f"chunk-{k:05d}" for k in range(self.meta["chunks"])]
        self._tokens = [np.load(f"{c}.tokens.npy", mmap_mode="r") for c in chunks]
        self._trained = [np.load(f"{c}.trained.npy", mmap_mode="r") for c in chunks]
        self._chunk_starts = np.cumsum([0] + [len(t) for t in self._tokens])
        self.sample_starts = np.load(self.folder / "sample_starts.npy", mmap_mode="r")
        self.sample_ids = np.load(self.folder / "sample_ids.npy", mmap_mode="r")
        if self.layout == "packed":
            self.row_offsets = np.load(self.folder / "row_offsets.npy", mmap_mode="r")
            self.row_members = np.load(self.folder / "row_members.npy", mmap_mode="r")

    def __reduce__(self):  # a copy (a DataLoader worker started by spawn) maps the same files
        return PreparedRows, (str(self.folder),)

    @property
    def num_samples(self) -> int:
        return len(self.sample_ids)

    @property
    def num_tokens(self) -> int:
        return int(self.sample_starts[-1])

    def __len__(self) -> int:
        if self.layout == "packed":
            return len(self.row_offsets) - 1
        if self.layout == "blocks":
            return -(-self.num_tokens // self.block)
        return self.num_samples

    def _span(self, a: int, b: int):
        """Tokens [a, b) of all samples end to end: (ids, trained mask), across chunk files."""
        if a >= b:
            return np.empty(0, np.int32), np.empty(0, np.uint8)
        k = int(np.searchsorted(self._chunk_starts, a, side="right")) - 1
        ids, mask = [], []
        while a < b:
            base, end = int(self._chunk_starts[k]), int(self._chunk_starts[k + 1])
            hi = min(b, end)
            ids.append(self._tokens[k][a - base:hi - base])
            mask.append(self._trained[k][a - base:hi - base])
            a, k = hi, k + 1
        if len(ids) == 1:
            return ids[0], mask[0]
        return np.concatenate(ids), np.concatenate(mask)

    def sample(self, i: int) -> Dict[str, List[int]]:
        """Sample i (file order) with its labels."""
        ids, mask = self._span(int(self.sample_starts[i]), int(self.sample_starts[i + 1]))
        return {"input_ids": ids.tolist(), "labels": np.where(mask, ids, IGNORE).tolist()}

    def __getitem__(self, r):
        if isinstance(r, slice):
            return [self[i] for i in range(*r.indices(len(self)))]
        r = int(r)
        if r < 0:
            r += len(self)
        if not 0 <= r < len(self):
            raise IndexError(r)
        if self.layout == "samples":
            out = self.sample(r)
            out["sample_ids"] = [int(self.sample_ids[r])]
            return out
        if self.layout == "blocks":
            a = r * self.block
            b = min(a + self.block, self.num_tokens)
            ids, _ = self._span(a, b)
            labels = ids.tolist()
            labels[0] = IGNORE  # nothing in this row precedes it
            first = int(np.searchsorted(self.sample_starts, a, side="right")) - 1
            last = int(np.searchsorted(self.sample_starts, b, side="left"))
            owners = sorted({int(x) for x in self.sample_ids[first:last]})
            return {"input_ids": ids.tolist(), "labels": labels, "sample_ids": owners}
        members = self.row_members[int(self.row_offsets[r]):int(self.row_offsets[r + 1])]
        parts = [self._span(int(self.sample_starts[i]), int(self.sample_starts[i + 1])) for i in members]
        ids = np.concatenate([p[0] for p in parts])
        mask = np.concatenate([p[1] for p in parts])
        positions = np.concatenate([np.arange(len(p[0])) for p in parts])
        return {"input_ids": ids.tolist(), "labels": np.where(mask, ids, IGNORE).tolist(),
                "position_ids": positions.tolist(), "sample_ids": [int(self.sample_ids[i]) for i in members]}

    def __iter__(self):
        for r in range(len(self)):
            yield self[r]

    def __eq__(self, other):
        if isinstance(other, (PreparedRows, list, tuple)):
            return len(self) == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    __hash__ = None

    def lengths(self) -> np.ndarray:
        """Tokens per row (for length-grouped sampling and statistics)."""
        if self.layout == "samples":
            return np.diff(self.sample_starts)
        if self.layout == "blocks":
            n = len(self)
            out = np.full(n, self.block, dtype=np.int64)
            if n:
                out[-1] = self.num_tokens - (n - 1) * self.block
            return out
        per_sample = np.diff(self.sample_starts)
        return np.add.reduceat(per_sample[self.row_members], self.row_offsets[:-1]) if len(self) else per_sample[:0]

    def examples(self) -> Dict[int, object]:
        path = self.folder / "examples.pkl"
        if not path.exists():
            return {}
        with open(path, "rb") as f:
            return pickle.load(f)
