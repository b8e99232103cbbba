"""Read rows from local files, generated builtin sets, or `datasets` names.

Every source ends up as a list of plain dicts, in file order, so that an error
can name the row index a user sees when they open the file.
"""

from __future__ import annotations

import json
import os
from typing import Dict, List

from fttrain.data.synthetic import resolve_builtin

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")


class DataError(ValueError):
    """A problem with the user's data; the message names the file, row and field."""


def load_rows(source: str, split: str = "train") -> List[Dict]:
    if source.startswith("builtin:"):
        source = resolve_builtin(source)
    if source.endswith(FILE_SUFFIXES) or os.path.isfile(source):
        if not os.path.exists(source):
            raise DataError(f"data file not found: {source}")
        return _load_file(source)
    return _load_datasets(source, split)


def _load_file(path: str) -> List[Dict]:
    if path.endswith(".jsonl"):
        rows = []
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f):
                if not line.strip():
                    continue
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise DataError(f"{path} line {i + 1}: not valid JSON ({e.msg})") from None
        return rows
    if path.endswith(".json"):
        with open(path, encoding="utf-8") as f:
            try:
                data = json.load(f)
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
            lists = [v for v in data.values() if isinstance(v, list)]
            if len(lists) != 1:
                raise DataError(f"{path}: expected a list of rows, or an object holding exactly one list")
            data = lists[0]
        if not isinstance(data, list):
            raise DataError(f"{path}: expected a list of rows")
        return data
    # csv and parquet through pyarrow: typed columns, no pandas index surprises
    if path.endswith(".csv"):
        import pyarrow.csv as pacsv

        table = pacsv.read_csv(path)
    else:
        import pyarrow.parquet as pq

        table = pq.read_table(path)
    return table.to_pylist()


def _load_datasets(name: str, split: str) -> List[Dict]:
    """A `datasets` hub name or a folder saved with `save_to_disk`."""
    import datasets

    if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
        ds = datasets.load_from_disk(name)
    else:
        ds = datasets.load_dataset(name, split=split)
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; has {list(ds)}")
        ds = ds[split]
    return ds.to_list()
