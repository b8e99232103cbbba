"""Best-fit-decreasing packing and the two batch collators.

Packing puts several samples into one row of at most ``max_length`` tokens.
Samples are taken longest first and each goes into the open row with the
*least* room that still fits it (best fit), which leaves ~1-2% of a row empty
on typical SFT length distributions.

Inside a packed row ``position_ids`` restart at 0 at every sample. Three
samples A (3 tokens), B (2) and C (3) in one row:

    input_ids     a0 a1 a2 b0 b1 c0 c1 c2
    position_ids   0  1  2  0  1  0  1  2
    labels         .  a1 a2 .  b1 .  c1 c2      (. = -100: first token of a sample)

The attention implementation turns the position-id restarts into a
block-diagonal causal mask (sdpa/eager via transformers' packed-sequence
detection, flash-attention via varlen kernels): ``1`` = may attend.

            a0 a1 a2 b0 b1 c0 c1 c2
        a0   1
        a1   1  1
        a2   1  1  1
        b0            1
        b1            1  1
        c0                  1
        c1                  1  1
        c2                  1  1  1

That detection is skipped when a KV cache is passed, which is why packed
forward passes run with ``use_cache=False`` (with a cache the samples leak
into each other; see tests/test_packing.py).
"""

from __future__ import annotations

import bisect
from typing import Dict, List, Sequence

import torch

from fttrain.data.tokenize import IGNORE


def best_fit_decreasing(lengths: Sequence[int], capacity: int) -> List[List[int]]:
    """Group sample indices into bins of total length <= capacity."""
    order = sorted(range(len(lengths)), key=lambda i: (-lengths[i], i))
    bins: List[List[int]] = []
    # Open bins sorted by remaining room: (room, bin index).
    rooms: List[tuple] = []
    for i in order:
        n = lengths[i]
        if n > capacity:
            raise ValueError(f"sample {i} has {n} tokens, more than the packing capacity {capacity}")
        k = bisect.bisect_left(rooms, (n, -1))
        if k < len(rooms):
            room, b = rooms.pop(k)
            bins[b].append(i)
            if room - n > 0:
                bisect.insort(rooms, (room - n, b))
        else:
            bins.append([i])
            if capacity - n > 0:
                bisect.insort(rooms, (capacity - n, len(bins) - 1))
    return bins


def pack(samples: List[Dict], capacity: int) -> List[Dict]:
    """Samples with input_ids/labels/sample_id -> packed rows with position_ids."""
    bins = best_fit_decreasing([len(s["input_ids"]) for s in samples], capacity)
    rows = []
    for members in bins:
        members = sorted(members)  # keep file order inside a row; order does not change the loss
        row = {"input_ids": [], "labels": [], "position_ids": [], "sample_ids": []}
        for i in members:
            s = samples[i]
            row["input_ids"] += s["input_ids"]
            row["labels"] += s["labels"]
            row["position_ids"] += list(range(len(s["input_ids"])))
            row["sample_ids"].append(s["sample_id"])
        rows.append(row)
    return rows


def concat_blocks(samples: List[Dict], block: int) -> List[Dict]:
    """Pretraining layout: documents end to end (each already ends in EOS), cut
    into rows of exactly ``block`` tokens; the last row keeps the remainder,
    so no token is dropped. Attention crosses document boundaries inside a
    row, as in GPT-style pretraining: the EOS between documents tells the
    model a new one starts. Positions run 0..block-1 in every row. A document
    longer than a block continues in the next row instead of being truncated.
    """
    rows, ids, labels, owners = [], [], [], []
    for s in samples:
        ids += s["input_ids"]
        labels += s["input_ids"]
        owners += [s["sample_id"]] * len(s["input_ids"])
    for start in range(0, len(ids), block):
        row_labels = labels[start:start + block]
        row_labels[0] = IGNORE  # nothing in this row precedes it
        rows.append({"input_ids": ids[start:start + block], "labels": row_labels,
                     "sample_ids": sorted(set(owners[start:start + block]))})
    return rows


def as_rows(samples: List[Dict]) -> List[Dict]:
    """Unpacked: one sample per row."""
    return [
        {"input_ids": s["input_ids"], "labels": s["labels"], "sample_ids": [s["sample_id"]]} for s in samples
    ]


def stream_position(rows: List[Dict]) -> Dict[str, int]:
    """A streamed micro-batch's furthest row in the stream (``fttrain.data.streaming``),
    as a plain int: the trainer records it without a device round trip."""
    if rows and "stream_pos" in rows[0]:
        return {"stream_pos": max(r["stream_pos"] for r in rows)}
    return {}


def host_counts(labels: torch.Tensor, n_real: int, sample_ids: List[int]) -> Dict:
    """What the trainer counts per micro-batch, as Python numbers made here on
    the host: read after the batch moves to the GPU, each would be a
    device-to-host sync that drains the queue. ``num_trained_tokens`` counts
    as the loss does (labels shifted by one)."""
    return {"num_real_tokens": n_real, "num_trained_tokens": int((labels[:, 1:] != IGNORE).sum()),
            "sample_ids": sample_ids}


class PackedCollator:
    """Packed rows of a micro-batch.

    ``flatten=True`` (flash-attention): all rows end to end in one row, no
    padding at all; varlen kernels cost O(sum of sample lengths^2).
    ``flatten=False`` (sdpa, eager): rows stacked to [B, longest row]. A
    flattened row would make sdpa build one (B*L)^2 mask; stacking keeps it
    B*L^2. The short tail of a row is padding laid out as one more "sample"
    (positions restart at 0, labels -100), so it is masked off like any
    other sample boundary and never attends into real tokens.
    """

    def __init__(self, pad_token_id: int, flatten: bool):
        self.pad = pad_token_id
        self.flatten = flatten

    def __call__(self, rows: List[Dict]) -> Dict[str, torch.Tensor]:
        n_real = sum(len(r["input_ids"]) for r in rows)
        sample_ids = [x for r in rows for x in r["sample_ids"]]
        position = stream_position(rows)
        if self.flatten:
            rows = [{k: [x for r in rows for x in r[k]] for k in ("input_ids", "labels", "position_ids")}]
        width = max(len(r["input_ids"]) for r in rows)
        ids, labels, pos = [], [], []
        for r in rows:
            gap = width - len(r["input_ids"])
            ids.append(r["input_ids"] + [self.pad] * gap)
            labels.append(r["labels"] + [IGNORE] * gap)
            pos.append(r["position_ids"] + list(range(gap)))
        labels = torch.tensor(labels, dtype=torch.long)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": labels,
            "position_ids": torch.tensor(pos, dtype=torch.long),
            **host_counts(labels, n_real, sample_ids),
            **position,
        }


class PaddingCollator:
    """Unpacked rows, right-padded to the longest row in the micro-batch."""

    def __init__(self, pad_token_id: int):
        self.pad = pad_token_id

    def __call__(self, rows: List[Dict]) -> Dict[str, torch.Tensor]:
        width = max(len(r["input_ids"]) for r in rows)
        ids = torch.full((len(rows), width), self.pad, dtype=torch.long)
        labels = torch.full((len(rows), width), IGNORE, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            n = len(r["input_ids"])
            ids[i, :n] = torch.tensor(r["input_ids"])
            labels[i, :n] = torch.tensor(r["labels"])
            mask[i, :n] = 1
        return {
            "input_ids": ids,
            "labels": labels,
            "attention_mask": mask,
            **host_counts(labels, int(mask.sum()), [x for r in rows for x in r["sample_ids"]]),
            **stream_position(rows),
        }
