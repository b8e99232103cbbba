"""data.streaming=true: training rows made while training reads them, for sets
larger than the disk cache of prepared rows.

The training split is read a window of ``data.stream_window`` rows at a time
(file order, held-out rows skipped); each window is encoded with the same
rules as the prepared path (``pipeline.encode_rows``) and laid out on its
own: best-fit-decreasing packing within the window, one sample per row, or
pretraining blocks cut within the window. Larger windows pack tighter and hold
more samples in memory.

Every rank reads the whole stream and keeps its share of each global batch
(accelerate's IterableDatasetShard), so the rows and the loss equal a
one-process run at the same global batch; the cost is that each rank encodes
every row. The prepared path (the default) encodes once per node.

Resume: every row carries its position in the stream (``stream_pos`` = pass x
2^40 + its index in the pass); the trainer keeps the furthest position it
trained on, and a checkpoint saves the furthest over all ranks with how many
rows each window produced (``stream_state.json``). A resumed run turns that
position into a pass, a window and an offset in it, re-encodes only that
window, and goes on from the next row, in any pass: the short (one process)
or padded (several) last batch of a pass moves nothing.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Dict, List, Optional, Tuple

import torch

from fttrain.data.chat import MaskPolicy
from fttrain.data.formats import Chat
from fttrain.data.packing import as_rows, concat_blocks, pack
from fttrain.data.pipeline import (EncodeJob, RowCounts, check_end_of_turn, encode_rows, encoders, layout_of,
                                   load_splits)
from fttrain.data.sources import DataError

log = logging.getLogger("fttrain")

STATE_FILE = "stream_state.json"
PASS_STRIDE = 2 ** 40  # stream_pos = pass x PASS_STRIDE + the row's index in its pass


def lay_out(samples: List[Dict], layout: str, max_length: int) -> List[Dict]:
    """One window's samples -> rows, as the prepared path lays out a whole split."""
    if not samples:
        return []
    if layout == "blocks":
        return concat_blocks(samples, max_length)
    return pack(samples, max_length) if layout == "packed" else as_rows(samples)


class RowStream(torch.utils.data.IterableDataset):
    """The training rows of one split, encoded a window at a time as they are read."""

    def __init__(self, job, ids: List[int], window: int, layout: str):

        self.job, self.ids, self.window, self.layout = job, list(ids), max(1, int(window)), layout
        self.rows_per_window: List[int] = []  # rows each window produced so far, in order
        self.epoch_rows: Optional[int] = None  # rows of a whole pass, once one finished
        self.counts = RowCounts()
        self._start: Tuple[int, int] = (0, 0)
        self.pass_index = 0  # the pass __iter__ reads next

    @property
    def num_windows(self) -> int:
        return -(-len(self.ids) // self.window)

    def window_rows(self, w: int) -> List[Dict]:

        samples: List[Dict] = []
        counts = RowCounts() if w < len(self.rows_per_window) else self.counts  # a window counts once

        def keep(input_ids, labels, i, ex):
            samples.append({"input_ids": input_ids, "labels": labels, "sample_id": i})

        encode_rows(self.job, self.ids[w * self.window:(w + 1) * self.window], counts, keep)
        if w == 0:  # the prepared path checks the whole split; a stream, its first window
            check_end_of_turn(f"{self.job.source} (the first {self.window} rows)", counts, self.job.tokenizer)
        return lay_out(samples, self.layout, self.job.max_length)

    def __iter__(self):
        start_window, skip = self._start
        self._start = (0, 0)  # a later pass (the next epoch) starts from the beginning
        base = self.pass_index * PASS_STRIDE + sum(self.rows_per_window[:start_window])
        self.pass_index += 1
        produced = 0
        if torch.utils.data.get_worker_info() is not None:
            raise RuntimeError("a RowStream is read in the training process (trainer.dataloader_num_workers=0)")
        for w in range(start_window, self.num_windows):
            rows = self.window_rows(w)
            if w == len(self.rows_per_window):
                self.rows_per_window.append(len(rows))
            produced += len(rows)
            for k in range(skip, len(rows)):
                yield {**rows[k], "stream_pos": base + k}
            base += len(rows)
            skip = 0
        if start_window == 0 and produced == 0:
            raise DataError(f"{self.job.source}: no usable rows out of {len(self.ids)} "
                            f"(dropped: {dict(self.counts.dropped)})")
        if len(self.rows_per_window) == self.num_windows:
            self.epoch_rows = sum(self.rows_per_window)

    # ------------------------------------------------------------ resume
    def state(self, consumed: int = -1) -> Dict:
        """``consumed``: the furthest stream_pos trained on (-1: none yet)."""
        return {"window": self.window, "rows": len(self.ids), "rows_per_window": self.rows_per_window,
                "epoch_rows": self.epoch_rows, "consumed": consumed}

    def resume_after(self, state: Dict) -> Tuple[int, int, int]:
        """Start at the row after the checkpoint's furthest trained position;
        returns (pass, window, offset in it)."""
        pass_index, index = divmod(state["consumed"] + 1, PASS_STRIDE)
        if state.get("epoch_rows") and index >= state["epoch_rows"]:  # that row was the last of its pass
            pass_index, index = pass_index + 1, 0
        window, offset = self.resume(state, index)
        self.pass_index = pass_index
        return pass_index, window, offset

    def resume(self, state: Dict, consumed_rows: int) -> Tuple[int, int]:
        """Start after ``consumed_rows`` rows of the stream; returns (window, offset in it)."""
        if state.get("window") != self.window or state.get("rows") != len(self.ids):
            raise DataError(f"the checkpoint's stream was cut into windows of {state.get('window')} over "
                            f"{state.get('rows')} rows; this run has {self.window} over {len(self.ids)}: resuming "
                            "would repeat or skip rows. Resume with the same data and data.stream_window.")
        self.rows_per_window = list(state["rows_per_window"])
        self.epoch_rows = state.get("epoch_rows")
        if self.epoch_rows:
            consumed_rows %= self.epoch_rows
        done = 0
        for w, n in enumerate(self.rows_per_window):
            if consumed_rows < done + n:
                self._start = (w, consumed_rows - done)
                return self._start
            done += n
        if len(self.rows_per_window) < self.num_windows:  # exactly at the end of a recorded window
            self._start = (len(self.rows_per_window), consumed_rows - done)
            return self._start
        self._start = (0, 0)
        return self._start

    def save_state(self, folder: Path, consumed: int = -1) -> None:
        (Path(folder) / STATE_FILE).write_text(json.dumps(self.state(consumed)))

    def report(self) -> Dict:
        out = {"source": self.job.source, "rows": len(self.ids), "streaming": True,
               "windows_encoded": len(self.rows_per_window), **self.counts.report()}
        if self.epoch_rows is not None:
            out["rows_after_packing"] = self.epoch_rows
        return out

    def first_sample(self) -> Optional[Dict]:
        """The first trained sample of the stream (for the start-up log), encoded on its own."""

        found: List[Dict] = []

        def keep(input_ids, labels, i, ex):
            if not found:
                found.append({"input_ids": input_ids, "labels": labels, "chat": isinstance(ex, Chat)})

        for i in self.ids[:16]:
            encode_rows(self.job, [i], RowCounts(), keep)
            if found:
                return found[0]
        return None


def load_state(checkpoint: Path) -> Optional[Dict]:
    path = Path(checkpoint) / STATE_FILE
    return json.loads(path.read_text()) if path.exists() else None


def open_stream(data_cfg, tokenizer, chat_template: Optional[str], assistant_only_loss: bool, blocks: bool = False,
                policy: MaskPolicy = MaskPolicy()):
    """data.streaming=true: the training split as a RowStream."""
    formatter, tok = encoders(data_cfg, tokenizer, chat_template, assistant_only_loss, policy)
    train_split, _ = load_splits(data_cfg)
    job = EncodeJob.for_split(data_cfg.train, train_split.rows, formatter, tok, data_cfg, blocks)
    return RowStream(job, train_split.ids, data_cfg.stream_window, layout_of(data_cfg, blocks))
