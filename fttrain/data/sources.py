"""Read rows from local files, generated builtin sets, or `datasets` names.

Every source is a sequence of plain dicts in file order, so that an error can
name the row index a user sees when they open the file. Sources are lazy: a
JSON Lines file is indexed by the byte offset of each row and a row is parsed
when it is read; Parquet is read a row group at a time; `datasets` sets stay
memory-mapped Arrow. A million-row file therefore costs ~8 bytes a row in
memory until it is read, and worker processes forked for preparation read
their own rows (``os.pread``: no shared file position).

In memory as a whole: ``.json`` (one JSON document) and ``.csv``.

Rows are numbered from 0 in file order, blank lines not counted (what
``data.max_samples``, the split and the data report count); an error in a
JSON Lines file also gives its line number in the file, counted from 1. A file
that cannot be read (its encoding, its suffix, a corrupt container) is refused
naming the file and what to do. CSV files in the text formats (chats,
prompt/completion, preference, text) are read as text: an answer "2" stays "2".
"""

from __future__ import annotations

import bisect
import json
import os
from typing import Dict, Iterator, List, Sequence

import numpy as np

from fttrain.data.formats import RowError
from fttrain.data.synthetic import resolve_builtin
from fttrain.errors import FttrainError

FILE_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet")
UTF8_HINT = "fttrain reads UTF-8: convert it, e.g. iconv -f LATIN1 -t UTF-8 IN > OUT (or -f UTF-16)"


class DataError(FttrainError, ValueError):
    """A problem with the user's data; the message names the file, row and field."""


class UnreadableRow(DataError, RowError):
    """One line of a JSON Lines file that is not a JSON row: stops a strict run,
    dropped and counted (``invalid_json``) by a lenient one."""

    def __init__(self, message: str):
        DataError.__init__(self, message)
        self.field, self.reason = "<line>", "invalid_json"


class RowSource(Sequence):
    """Rows by index, read on demand."""

    name: str

    def read(self, ids: Sequence[int]) -> List[Dict]:
        """Several rows at once (sources that read in blocks override it)."""
        return [self[i] for i in ids]

    def __iter__(self) -> Iterator[Dict]:
        for start in range(0, len(self), 1024):
            yield from self.read(range(start, min(start + 1024, len(self))))


class ListSource(RowSource):
    def __init__(self, name: str, rows: List[Dict]):
        self.name, self.rows = name, rows

    def __len__(self):
        return len(self.rows)

    def __getitem__(self, i):
        return self.rows[i]


class JsonlSource(RowSource):
    """Rows of a JSON Lines file, indexed by byte offset (blank lines skipped)."""

    def __init__(self, path: str):
        self.name = path
        self.starts, self.ends = _line_offsets(path)
        self._fd = None
        self._pid = None

    def __len__(self):
        return len(self.starts)

    def _file(self) -> int:
        if self._fd is None or self._pid != os.getpid():
            self._fd, self._pid = os.open(self.name, os.O_RDONLY), os.getpid()
        return self._fd

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        start, end = int(self.starts[i]), int(self.ends[i])
        line = os.pread(self._file(), end - start, start)
        try:
            row = json.loads(line)
        except UnicodeDecodeError as e:
            raise UnreadableRow(f"{self.name} row {i} (line {self._line_number(start)}): not UTF-8 ({e.reason} at "
                                f"byte {e.start}); {UTF8_HINT}") from None
        except json.JSONDecodeError as e:
            raise UnreadableRow(f"{self.name} row {i} (line {self._line_number(start)}): not valid JSON "
                                f"({e.msg})") from None
        except RecursionError:
            raise UnreadableRow(f"{self.name} row {i} (line {self._line_number(start)}): nested too deeply to "
                                "read") from None
        if not isinstance(row, dict):
            raise UnreadableRow(f"{self.name} row {i} (line {self._line_number(start)}): a row must be a JSON "
                                f"object, not {type(row).__name__}")
        return row

    def read(self, ids: Sequence[int]) -> List[Dict]:
        ids = list(ids)
        if ids and ids[-1] - ids[0] == len(ids) - 1 and ids == sorted(ids):  # one read for a contiguous run
            lo, hi = int(self.starts[ids[0]]), int(self.ends[ids[-1]])
            block = os.pread(self._file(), hi - lo, lo)
            rows = []
            for i in ids:
                s, e = int(self.starts[i]) - lo, int(self.ends[i]) - lo
                try:
                    row = json.loads(block[s:e])
                except (ValueError, RecursionError):  # JSONDecodeError and UnicodeDecodeError are ValueErrors
                    row = None
                rows.append(row if isinstance(row, dict) else self[i])  # self[i] raises, naming the line
            return rows
        return [self[i] for i in ids]

    def _line_number(self, offset: int) -> int:
        with open(self.name, "rb") as f:
            return f.read(offset).count(b"\n") + 1

    def __getstate__(self):  # a copy opens its own file
        state = dict(self.__dict__)
        state["_fd"] = state["_pid"] = None
        return state


def _check_encoding(path: str) -> None:
    """A UTF-16/32 file (byte-order mark or NUL bytes) is refused before any row is read."""
    with open(path, "rb") as f:
        head = f.read(4096)
    if head.startswith((b"\xff\xfe", b"\xfe\xff")) or b"\x00" in head:
        raise DataError(f"{path}: the file is UTF-16 or UTF-32 encoded; {UTF8_HINT}")


def _line_offsets(path: str):
    """(starts, ends) of the non-blank lines, as int64 arrays: one pass over the bytes."""
    starts, ends = [], []
    pos = 0
    _check_encoding(path)
    with open(path, "rb") as f:
        tail = b""
        while True:
            block = f.read(1 << 24)
            if not block:
                break
            data = tail + block
            base = pos - len(tail)
            cut = data.rfind(b"\n") + 1
            lines, tail = data[:cut], data[cut:]
            _scan(lines, base, starts, ends)
            pos += len(block)
        if tail:
            _scan(tail + b"\n", pos - len(tail), starts, ends)
    return np.asarray(starts, dtype=np.int64), np.asarray(ends, dtype=np.int64)


def _scan(lines: bytes, base: int, starts: list, ends: list) -> None:
    start = 0
    n = len(lines)
    while start < n:
        end = lines.index(b"\n", start)
        # 0x7B: '{', the usual start; otherwise blank means Unicode whitespace only, as str.strip() sees it.
        if (end > start and lines[start] == 0x7B) or lines[start:end].decode("utf-8", "replace").strip():
            starts.append(base + start)
            ends.append(base + end)
        start = end + 1


class ParquetSource(RowSource):
    """Rows of a Parquet file, decoded one row group at a time."""

    def __init__(self, path: str):
        import pyarrow
        import pyarrow.parquet as pq

        self.name = path
        try:
            meta = pq.ParquetFile(path).metadata
        except (pyarrow.ArrowException, OSError) as e:
            raise DataError(f"{path}: not a readable Parquet file ({e}); write it again, or convert it to "
                            "JSON Lines") from None
        self.group_starts = np.cumsum([0] + [meta.row_group(g).num_rows for g in range(meta.num_row_groups)])
        self._cached = (None, None)

    def __len__(self):
        return int(self.group_starts[-1])

    def _group(self, g: int) -> List[Dict]:
        if self._cached[0] != g:
            import pyarrow.parquet as pq

            self._cached = (g, pq.ParquetFile(self.name).read_row_group(g).to_pylist())
        return self._cached[1]

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        g = bisect.bisect_right(self.group_starts, i) - 1
        return self._group(g)[i - int(self.group_starts[g])]

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cached"] = (None, None)
        return state


class ArrowTableSource(RowSource):
    """A CSV file read once into an Arrow table (columnar: about the file's size in
    memory, not a Python object per field); rows become dicts only when read."""

    def __init__(self, name: str, table):
        self.name, self.table = name, table

    def __len__(self):
        return self.table.num_rows

    def __getitem__(self, i):
        if i < 0:
            i += len(self)
        return self.table.slice(int(i), 1).to_pylist()[0]

    def read(self, ids: Sequence[int]) -> List[Dict]:
        ids = [int(i) for i in ids]
        if ids and ids[-1] - ids[0] == len(ids) - 1 and ids == sorted(ids):  # one slice for a contiguous run
            return self.table.slice(ids[0], len(ids)).to_pylist()
        return [self[i] for i in ids]


class DatasetsSource(RowSource):
    """A `datasets` set: memory-mapped Arrow, rows converted on read."""

    def __init__(self, name: str, ds):
        self.name, self.ds = name, ds

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        return self.ds[int(i)]

    def read(self, ids: Sequence[int]) -> List[Dict]:
        ids = [int(i) for i in ids]
        if not ids:
            return []
        if ids[-1] - ids[0] == len(ids) - 1 and ids == sorted(ids):
            return self.ds.select(range(ids[0], ids[-1] + 1)).to_list()
        return self.ds.select(ids).to_list()


def open_rows(source: str, split: str = "train", csv_as_text: bool = False) -> RowSource:
    """The rows of a data source, read lazily where the format allows.
    ``csv_as_text``: every CSV column as strings (the text formats), not typed by its values."""
    name = source
    if source.startswith("builtin:"):
        source = resolve_builtin(source)
    kind = source.lower()
    if kind.endswith(FILE_SUFFIXES) or os.path.isfile(source):
        if not os.path.exists(source):
            raise DataError(f"data file not found: {source}")
        if not kind.endswith(FILE_SUFFIXES):
            suffix = "".join(os.path.basename(source).partition(".")[1:]) or "none"
            raise DataError(f"{source}: fttrain reads {', '.join(FILE_SUFFIXES)} files, not this suffix ({suffix}); "
                            "rename the file if it is one of them, or decompress it first (gunzip, unzstd)")
        if kind.endswith(".jsonl"):
            return JsonlSource(source)
        if kind.endswith(".parquet"):
            return ParquetSource(source)
        if kind.endswith(".json"):
            return ListSource(source, _load_json(source))
        return ArrowTableSource(source, _read_csv(source, csv_as_text))
    if os.path.isdir(source) and not any(os.scandir(source)):
        raise DataError(f"{source}: the folder is empty (expected data files, or a set saved with save_to_disk)")
    if not os.path.exists(source) and (os.sep in source.strip("/") and source.startswith((".", "/", "~"))):
        raise DataError(f"data file or folder not found: {source}")
    return _load_datasets(name, split)


def _read_csv(path: str, as_text: bool):
    """A CSV file as an Arrow table (typed columns, no pandas index surprises), or all columns as strings."""
    import pyarrow
    import pyarrow.csv as pacsv

    _check_encoding(path)
    try:
        options = None
        if as_text:  # the header's names, from the first block
            names = pacsv.open_csv(path).schema.names
            options = pacsv.ConvertOptions(column_types={n: pyarrow.string() for n in names})
        return pacsv.read_csv(path, convert_options=options)
    except pyarrow.ArrowInvalid as e:
        text = str(e)
        if "UTF8" in text or "utf8" in text.lower():
            raise DataError(f"{path}: not UTF-8 ({text}); {UTF8_HINT}") from None
        if "Empty CSV" in text:
            raise DataError(f"{path}: the CSV file is empty (expected a header line and rows)") from None
        raise DataError(f"{path}: not a CSV file fttrain can read ({text}); every line needs the header's "
                        "number of fields (quote fields that hold commas)") from None


def load_rows(source: str, split: str = "train") -> List[Dict]:
    """Every row of a source as a list (small sets, tests and tools)."""
    return list(open_rows(source, split))


def _load_json(path: str) -> List[Dict]:
    """A JSON array of rows (or an object holding one), parsed whole: JSON has no
    row boundaries to read between; JSON Lines (.jsonl) is read lazily."""
    _check_encoding(path)
    with open(path, encoding="utf-8") as f:
        try:
            data = json.load(f)
        except UnicodeDecodeError as e:
            raise DataError(f"{path}: not UTF-8 ({e.reason} at byte {e.start}); {UTF8_HINT}") from None
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: not valid JSON ({e.msg} at line {e.lineno})") from None
        except RecursionError:
            raise DataError(f"{path}: nested too deeply to read") from None
    if isinstance(data, dict):  # {"data": [...]} or {"train": [...]}
        lists = [v for v in data.values() if isinstance(v, list)]
        if len(lists) != 1:
            raise DataError(f"{path}: expected a list of rows, or an object holding exactly one list")
        data = lists[0]
    if not isinstance(data, list):
        raise DataError(f"{path}: expected a list of rows")
    return data


def _load_datasets(name: str, split: str) -> RowSource:
    """A `datasets` hub name or a folder saved with `save_to_disk`."""
    import datasets

    try:
        if os.path.isdir(name) and os.path.exists(os.path.join(name, "dataset_info.json")):
            ds = datasets.load_from_disk(name)
        else:
            ds = datasets.load_dataset(name, split=split)
    except (FileNotFoundError, ConnectionError, ValueError, datasets.exceptions.DatasetNotFoundError) as e:
        # datasets' own errors for a name, folder or split it cannot find (EmptyDatasetError is a FileNotFoundError)
        raise DataError(f"{name}: not a data file ({', '.join(FILE_SUFFIXES)}), folder or `datasets` set that could "
                        f"be loaded: {e}") from None
    if isinstance(ds, datasets.DatasetDict):
        if split not in ds:
            raise DataError(f"{name}: no split {split!r}; has {list(ds)}")
        ds = ds[split]
    return DatasetsSource(name, ds)
