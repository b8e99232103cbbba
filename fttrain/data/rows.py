"""Rows for the tasks whose trainer tokenizes for itself (TRL's) or that need
task-specific features (encoder tasks): load, split, convert each row.

    load_splits   data.train (+ data.eval, or a seeded held-out fraction) -> row lists
    convert_rows  row -> task example via a converter that raises RowError naming the
                  field; strict: stop at the first bad row with file and row index;
                  lenient (data.strict=false): drop it and count it under its reason.
                  Policies the user chose act whatever data.strict says: DropRow
                  (counted under its reason), StopAtRow (stops naming the row).

The causal-LM path (``pipeline.py``) uses the same split so held-out rows are
chosen the same way for every task.
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Tuple

from fttrain.data.formats import RowError, placeholders
from fttrain.data.sources import DataError, RowSource, open_rows

log = logging.getLogger(__name__)


def split_train_eval(rows, fraction: float, seed: int):
    """Deterministic held-out split of a row sequence (or a row count); returns
    (train ids, eval ids) in file order."""
    n = rows if isinstance(rows, int) else len(rows)
    ids = range(n)
    n_eval = int(round(n * fraction))
    if fraction > 0 and n_eval == 0 and n > 1:
        n_eval = 1
    held = set(random.Random(seed).sample(ids, n_eval))
    return [i for i in ids if i not in held], sorted(held)


@dataclass
class Split:
    source: str  # for messages: the file, or the file and the held-out fraction
    rows: RowSource  # the whole file, read lazily
    ids: List[int]  # which rows of `rows` belong to this split


def load_splits(data_cfg) -> Tuple[Split, Optional[Split]]:
    from fttrain.config.schema import value_of
    from fttrain.data.formats import TEXT_FORMATS

    as_text = value_of(data_cfg.format) in TEXT_FORMATS  # a CSV answer "2" stays the string "2"
    rows = open_rows(data_cfg.train, data_cfg.train_split, csv_as_text=as_text)
    if data_cfg.eval:
        eval_rows = open_rows(data_cfg.eval, data_cfg.eval_split, csv_as_text=as_text)
        train = Split(data_cfg.train, rows, list(range(len(rows))))
        evaluation = Split(data_cfg.eval, eval_rows, list(range(len(eval_rows))))
    elif data_cfg.eval_fraction > 0:
        train_ids, eval_ids = split_train_eval(rows, data_cfg.eval_fraction, data_cfg.split_seed)
        train = Split(data_cfg.train, rows, train_ids)
        evaluation = Split(f"{data_cfg.train} (held-out {data_cfg.eval_fraction:.0%})", rows, eval_ids)
    else:
        train, evaluation = Split(data_cfg.train, rows, list(range(len(rows)))), None
    if data_cfg.max_samples is not None:
        train.ids = train.ids[: data_cfg.max_samples]
    return train, evaluation


class DropRow(Exception):
    """Raised by a converter: drop this row, counted under ``reason``, in strict
    mode too (a policy the user set, such as data.overlength=drop)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class StopAtRow(Exception):
    """Raised by a converter: stop naming the row, whatever data.strict says
    (a policy the user set, such as data.overlength=raise)."""


def convert_rows(split: Split, convert: Callable[[Dict], object], strict: bool) -> Tuple[List, List[int], Dict]:
    """(converted examples, their row ids, report). A converter returning None
    drops the row under reason "skipped" (counted, never silent)."""
    out, kept_ids, dropped, marked = [], [], Counter(), Counter()
    for i in split.ids:
        try:
            ex = convert(split.rows[i])
        except RowError as e:
            if strict:
                where = "" if isinstance(e, DataError) else f"{split.source} row {i}: "  # a bad line names itself
                raise DataError(f"{where}{e}. Fix the row, or set data.strict=false to drop such rows with a "
                                "count.") from None
            dropped[e.reason] += 1
            continue
        except DropRow as e:
            dropped[e.reason] += 1
            continue
        except StopAtRow as e:
            raise DataError(f"{split.source} row {i}: {e}") from None
        if ex is None:
            dropped["skipped"] += 1
            continue
        out.append(ex)
        kept_ids.append(i)
        found = placeholders(split.rows[i])
        if found:
            marked["rows"] += 1
            marked.update(found)
    if not out:
        raise DataError(f"{split.source}: no usable rows out of {len(split.ids)} (dropped: {dict(dropped)})")
    report = {"source": split.source, "rows": len(split.ids), "kept": len(out), "dropped": dict(dropped)}
    if marked:
        rows_marked = marked.pop("rows")
        report.update(rows_with_placeholders=rows_marked, placeholders=dict(marked.most_common(10)))
        log.warning("%s: %d rows hold unfilled template placeholders, e.g. %s", split.source, rows_marked,
                    ", ".join(list(marked)[:3]))
    return out, kept_ids, report
