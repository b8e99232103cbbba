"""From ``cfg.data`` to training rows: load, split, validate, tokenize, pack, store.

    load_splits       data.train (+ data.eval or a held-out fraction), read lazily (``sources``)
    encode_rows       row -> Example (``formats``) -> samples with the loss mask (``tokenize``, ``chat``)
    _encode_chunks    chunks of rows over data.num_proc forked workers, each writing its token files
    _prepare_split    counts merged in file order, the layout (packed / samples / blocks), the report
    prepare_data_cached   the cache entry, built under a temporary name, renamed when whole

Nothing is dropped silently: every row that does not reach training is
counted under its reason in the report (``data_report.json`` in the run dir),
and in strict mode (the default) a bad row stops the run with its file, row
index and field, whichever worker read it. ``streaming.py`` encodes with the
same ``encode_rows`` while training reads (data.streaming=true).
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import socket
import tempfile
import uuid
import weakref
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import numpy as np

from fttrain.data.chat import MaskPolicy
from fttrain.data.formats import Chat, Example, Formatter, RowError, placeholders
from fttrain.data.packing import best_fit_decreasing
from fttrain.data.rows import load_splits
from fttrain.data.sources import DataError, RowSource, UnreadableRow
from fttrain.atomic import remove_tree, sync_folder
from fttrain.data.store import ChunkWriter, PreparedRows, write_split
from fttrain.data.templates import TemplateError
from fttrain.data.tokenize import Tokenizer, apply_overlength, count_trained

log = logging.getLogger(__name__)
CACHE_VERSION = 4  # bump when tokenization, masking, packing or the store's files change


@dataclass
class SplitData:
    rows: PreparedRows  # what the trainer iterates: packed or one sample per row, memory-mapped
    examples: Dict[int, Example]  # eval split only: kept examples by row id, for generation eval
    report: Dict = field(default_factory=dict)
    # The first sample of each distinct role pattern ("system,user,assistant", ...), for preflight.
    pattern_samples: Dict[str, Dict] = field(default_factory=dict)

    @classmethod
    def open(cls, folder: Path) -> "SplitData":
        rows = PreparedRows(folder)
        return cls(rows, rows.examples(), rows.meta["report"], rows.meta["patterns"])


@dataclass
class PreparedData:
    train: Optional[SplitData]  # None with data.streaming=true: the training rows are made as they are read
    eval: Optional[SplitData]
    folder: Optional[Path] = None  # where the prepared files are

    @property
    def report(self) -> Dict:
        out = {"train": self.train.report} if self.train is not None else {}
        if self.eval is not None:
            out["eval"] = self.eval.report
        return out

    @classmethod
    def open(cls, folder: Path) -> "PreparedData":
        folder = Path(folder)
        def split(name):
            return SplitData.open(folder / name) if (folder / name / "meta.json").exists() else None

        return cls(split("train"), split("eval"), folder)


MAX_PATTERN_SAMPLES = 8


class RowCounts:
    """What happened to the rows of one split, for data_report.json."""

    def __init__(self):
        self.dropped: Counter = Counter()
        self.truncated = 0
        self.trained_turns = 0
        self.turns_without_end_of_turn = 0
        self.empty_think_masked = 0
        self.rows_split = 0
        self.placeholder_rows = 0
        self.placeholders: Counter = Counter()

    def merge(self, other: "RowCounts") -> None:
        for name, value in vars(other).items():
            if isinstance(value, Counter):
                getattr(self, name).update(value)
            else:
                setattr(self, name, getattr(self, name) + value)

    def add_chat(self, encoded) -> None:
        self.trained_turns += encoded.trained_turns
        self.turns_without_end_of_turn += encoded.turns_without_end_of_turn
        self.empty_think_masked += encoded.empty_think_masked
        self.rows_split += encoded.split

    def report(self) -> Dict:
        out = {"dropped": dict(self.dropped), "truncated": self.truncated}
        if self.trained_turns:
            out.update(trained_turns=self.trained_turns, turns_without_end_of_turn=self.turns_without_end_of_turn)
        if self.empty_think_masked:
            out["empty_think_blocks_not_trained"] = self.empty_think_masked
        if self.rows_split:
            out["rows_split_per_turn"] = self.rows_split  # the template rewrote history (task.history_rewrite=split)
        if self.placeholder_rows:
            out["rows_with_placeholders"] = self.placeholder_rows
            out["placeholders"] = dict(self.placeholders.most_common(10))
        return out


# ---------------------------------------------------------------- encoding
MIN_CHUNK_ROWS = 256  # fewer rows than two chunks: encoded in this process, no workers started
CHUNK_ROWS = 2000  # most rows a worker encodes and writes at a time: ~10 MB of text, one pair of token files
# Rows rendered, then tokenized in one call, then labelled: ~12 % less CPU a row than one row start to end
# (measured on 930-token chats), as the template engine and the tokenizer each stay in the CPU caches.
ENCODE_BATCH = 32


@dataclass
class EncodeJob:
    """What encoding one split needs; forked workers inherit it instead of unpickling it per chunk."""

    source: str
    rows: RowSource
    formatter: Formatter
    tokenizer: Tokenizer
    max_length: int
    overlength: str
    strict: bool
    blocks: bool
    keep_examples: bool
    folder: Path


    @classmethod
    def for_split(cls, source: str, rows: RowSource, formatter: Formatter, tokenizer: Tokenizer, data_cfg,
                  blocks: bool, keep_examples: bool = False, folder: Path = Path(".")) -> "EncodeJob":
        return cls(source, rows, formatter, tokenizer, data_cfg.max_length, str(data_cfg.overlength),
                   bool(data_cfg.strict), blocks, keep_examples, folder)


_JOB: Optional[EncodeJob] = None


def encode_rows(job: EncodeJob, ids: List[int], counts: "RowCounts", keep: Callable[[List[int], List[int], int, Example], None]
                ) -> None:
    """Rows ``ids`` -> samples, each handed to ``keep(input_ids, labels, row, example)``;
    what was dropped, truncated or found is added to ``counts``. A bad row raises
    naming the file and row (strict; the first bad one in file order) or is counted
    under its reason."""
    tokenizer = job.tokenizer
    ids = list(ids)
    for start in range(0, len(ids), ENCODE_BATCH):
        batch = ids[start:start + ENCODE_BATCH]
        rows = read_rows(job.rows, batch)
        examples = []
        for row in rows:
            try:
                examples.append(row if isinstance(row, RowError) else job.formatter(row))
            except RowError as e:
                examples.append(e)
        encoded = iter(tokenizer.encode_many([ex for ex in examples if not isinstance(ex, RowError)]))
        for i, row, ex in zip(batch, rows, examples):
            _keep_row(job, i, row, ex, ex if isinstance(ex, RowError) else next(encoded), counts, keep)


def read_rows(rows: RowSource, ids: List[int]) -> List:
    """Rows ``ids``; a line that is not a JSON row comes back as its UnreadableRow
    (a RowError), for the strict or lenient policy to handle in file order."""
    try:
        return rows.read(ids)
    except UnreadableRow:
        out = []
        for i in ids:
            try:
                out.append(rows[i])
            except UnreadableRow as e:
                out.append(e)
        return out


def _keep_row(job: EncodeJob, i: int, row: Dict, ex, encoded, counts: "RowCounts", keep) -> None:
    """One row's samples (or the RowError that rejected it) handed on and counted; in file order."""
    tokenizer = job.tokenizer
    if isinstance(encoded, RowError):
        if job.strict and isinstance(encoded, UnreadableRow):
            raise DataError(f"{encoded}. Fix the line, or set data.strict=false to drop such lines with a "
                            "count.") from None
        if job.strict:
            raise DataError(
                f"{job.source} row {i}: {encoded}. Fix the row, or set data.strict=false to drop "
                "such rows with a count."
            ) from None
        counts.dropped[encoded.reason] += 1
        return
    kept = 0
    for ids_, labels in encoded.samples:
        if tokenizer.assistant_only_loss and count_trained(labels) == 0 and len(ids_) <= job.max_length:
            raise TemplateError(
                f"{job.source} row {i}: no token of it is trained, though it has a turn to train: the chat "
                "template's output could not be matched to its messages"
            )
        # Concatenated into blocks, a long document continues in the next block.
        sample, outcome = apply_overlength(ids_, labels, job.max_length if not job.blocks else len(ids_),
                                           job.overlength)
        if outcome == "raise":
            raise DataError(
                f"{job.source} row {i}: {len(ids_)} tokens is longer than data.max_length={job.max_length}. "
                "Set data.overlength=truncate or drop, or raise data.max_length."
            )
        if sample is None:
            counts.dropped[outcome] += 1
            continue
        counts.truncated += outcome == "truncated"
        keep(sample["input_ids"], sample["labels"], i, ex)
        kept += 1
    if kept and isinstance(ex, Chat):
        counts.add_chat(encoded)
    found = placeholders(row) if kept else []
    if found:
        counts.placeholder_rows += 1
        counts.placeholders.update(found)


def _encode_chunk(task) -> Dict:
    """Rows of one chunk -> its token files; returns the chunk's lengths, counts and samples to show."""
    index, ids = task
    job = _JOB
    counts = RowCounts()
    writer = ChunkWriter(job.folder, index)
    examples, patterns = {}, {}

    def keep(input_ids, labels, i, ex):
        writer.add(input_ids, labels, i)
        if isinstance(ex, Chat) and len(patterns) < 4 * MAX_PATTERN_SAMPLES:
            patterns.setdefault(ex.role_pattern(), {"input_ids": input_ids, "labels": labels})
        if job.keep_examples:
            examples[i] = ex

    encode_rows(job, ids, counts, keep)
    return {"index": index, **writer.close(), "counts": counts, "patterns": patterns, "examples": examples}


def _encode_chunks(job: EncodeJob, ids: List[int], num_proc: int):
    """Every chunk's result, in file order: in this process, or over num_proc forked workers."""
    global _JOB
    # At least ~8 chunks a worker, so that the last ones finish together.
    size = max(MIN_CHUNK_ROWS, min(CHUNK_ROWS, -(-len(ids) // (8 * max(1, num_proc)))))
    chunks = [(k, ids[a:a + size]) for k, a in enumerate(range(0, len(ids), size))]
    _JOB = job
    try:
        if num_proc <= 1 or len(chunks) <= 1:
            for chunk in chunks:
                yield _encode_chunk(chunk)
            return
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor
        from concurrent.futures.process import BrokenProcessPool

        # Fork: the workers share the tokenizer, template and row index without pickling them.
        # A tokenizer that already ran batched would warn after the fork; the workers are the parallelism.
        # An executor, not a Pool: a worker killed by the kernel (out of memory) breaks it with an
        # error instead of leaving its chunk unanswered and every rank waiting forever.
        os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
        executor = ProcessPoolExecutor(min(num_proc, len(chunks)), mp_context=multiprocessing.get_context("fork"))
        try:
            yield from executor.map(_encode_chunk, chunks)
        except BrokenProcessPool:
            raise RuntimeError(f"{job.source}: a data worker died while encoding (killed, e.g. out of memory); "
                               f"lower data.num_proc (it was {num_proc})") from None
        finally:
            executor.shutdown(wait=False, cancel_futures=True)
    finally:
        _JOB = None


def workers(data_cfg) -> int:
    """data.num_proc, or (null) the CPUs this process may use, at most 8."""
    if getattr(data_cfg, "num_proc", None):
        return int(data_cfg.num_proc)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, 8))


def check_end_of_turn(source: str, counts: RowCounts, tokenizer: Tokenizer) -> None:
    """Stop when no trained turn ends with an end-of-turn token: the model would never learn to stop."""
    if counts.trained_turns and counts.turns_without_end_of_turn == counts.trained_turns:
        markers = list(tokenizer.info.end_of_turn) if tokenizer.info else []
        raise TemplateError(
            f"{source}: no trained turn ends with an end-of-turn token (looked for {markers}), so the model would "
            "never learn to stop. Use a chat template that closes each assistant turn (the model's own does)."
        )


def layout_of(data_cfg, blocks: bool) -> str:
    """How samples become rows: pretraining blocks, best-fit packed rows, or one sample a row."""
    if blocks:
        return "blocks"
    return "packed" if packs(data_cfg) else "samples"


def _prepare_split(source: str, rows: RowSource, ids: List[int], formatter: Formatter, tokenizer: Tokenizer,
                   data_cfg, keep_examples: bool, blocks: bool, folder: Path, num_proc: int) -> Dict:
    """Encode one split into ``folder``; returns its report."""
    folder.mkdir(parents=True, exist_ok=True)
    job = EncodeJob.for_split(source, rows, formatter, tokenizer, data_cfg, blocks, keep_examples, folder)
    counts = RowCounts()
    lengths, sample_ids, trained, patterns, examples = [], [], [], {}, {}
    n_chunks = 0
    for result in _encode_chunks(job, ids, num_proc):
        n_chunks += 1
        counts.merge(result["counts"])
        lengths.append(result["lengths"])
        sample_ids.append(result["sample_ids"])
        trained.append(result["trained"])
        for pattern, sample in result["patterns"].items():
            if len(patterns) < MAX_PATTERN_SAMPLES:
                patterns.setdefault(pattern, sample)
        examples.update(result["examples"])
    lengths = np.concatenate(lengths) if lengths else np.empty(0, np.int32)
    sample_ids = np.concatenate(sample_ids) if sample_ids else np.empty(0, np.int64)
    if not len(lengths):
        raise DataError(f"{source}: no usable rows out of {len(ids)} (dropped: {dict(counts.dropped)})")
    check_end_of_turn(source, counts, tokenizer)
    layout, bins = layout_of(data_cfg, blocks), None
    if layout == "blocks":
        n_rows = -(-int(lengths.sum()) // data_cfg.max_length)
    elif layout == "packed":
        bins = best_fit_decreasing(lengths.tolist(), data_cfg.max_length)
        n_rows = len(bins)
    else:
        n_rows = len(lengths)
    n_tokens = int(lengths.sum())
    kept_rows = len(np.unique(sample_ids))
    report = {
        "source": source,
        "rows": len(ids),
        "kept": kept_rows,
        **counts.report(),
        "tokens": n_tokens,
        "trained_tokens": int(sum(int(t.sum()) for t in trained)),
        "rows_after_packing": n_rows,
    }
    if len(lengths) != kept_rows:
        report["samples"] = len(lengths)  # more than rows: chats split per turn
    if blocks:
        report["layout"] = f"documents concatenated into {data_cfg.max_length}-token blocks"
    if layout == "packed":
        report["packing_efficiency"] = round(n_tokens / (n_rows * data_cfg.max_length), 4)
    if counts.turns_without_end_of_turn:
        log.warning("%s: %d of %d trained turns do not end with an end-of-turn token", source,
                    counts.turns_without_end_of_turn, counts.trained_turns)
    if counts.placeholder_rows:
        log.warning("%s: %d rows hold unfilled template placeholders, e.g. %s", source, counts.placeholder_rows,
                    ", ".join(list(counts.placeholders)[:3]))
    write_split(folder, n_chunks, lengths, sample_ids, layout, data_cfg.max_length, bins,
                {"report": report, "patterns": patterns}, examples if keep_examples else None)
    return report


def streams(data_cfg) -> bool:
    return bool(getattr(data_cfg, "streaming", False))


def packs(data_cfg) -> bool:
    """This pipeline serves the packing tasks (sft, pt): data.packing=null means on."""
    return data_cfg.packing is not False


def mask_policy(task_cfg) -> MaskPolicy:
    """The sft task's masking knobs (other tasks: the defaults)."""
    return MaskPolicy(
        roles=tuple(getattr(task_cfg, "train_roles", None) or ("assistant",)),
        last_turn_only=bool(getattr(task_cfg, "last_turn_only", False)),
        train_empty_think=bool(getattr(task_cfg, "train_empty_think", False)),
        history_rewrite=str(getattr(task_cfg, "history_rewrite", "split")),
    )


def prepare_data(data_cfg, tokenizer, chat_template: Optional[str], assistant_only_loss: bool,
                 blocks: bool = False, policy: MaskPolicy = MaskPolicy(), folder: Optional[Path] = None) -> PreparedData:
    """Load, encode and lay out both splits into ``folder`` (default: a temporary
    folder removed with the returned object) and open them memory-mapped."""
    formatter, tok = encoders(data_cfg, tokenizer, chat_template, assistant_only_loss, policy)
    temporary = folder is None
    folder = Path(tempfile.mkdtemp(prefix="fttrain-prepared-")) if temporary else Path(folder)
    try:
        write_prepared(folder, data_cfg, formatter, tok, blocks)
    except BaseException:
        remove_tree(folder)
        raise
    data = PreparedData.open(folder)
    if temporary:
        weakref.finalize(data, remove_tree, str(folder))
    return data


def encoders(data_cfg, tokenizer, chat_template, assistant_only_loss, policy):
    """(row -> example, example -> samples) for this data config."""
    fmt = data_cfg.format.value if hasattr(data_cfg.format, "value") else str(data_cfg.format)
    formatter = Formatter(fmt, dict(data_cfg.columns), dict(data_cfg.role_map), data_cfg.system_prompt)
    return formatter, Tokenizer(tokenizer, chat_template, assistant_only_loss, policy)


def write_prepared(folder: Path, data_cfg, formatter: Formatter, tok: Tokenizer, blocks: bool) -> None:
    """Both splits into folder/train and folder/eval (with data.streaming=true: the eval split only)."""
    num_proc = workers(data_cfg)
    train_split, eval_split = load_splits(data_cfg)
    if not streams(data_cfg):
        _prepare_split(data_cfg.train, train_split.rows, train_split.ids, formatter, tok, data_cfg,
                       keep_examples=False, blocks=blocks, folder=folder / "train", num_proc=num_proc)
    if eval_split is not None:
        _prepare_split(eval_split.source, eval_split.rows, eval_split.ids, formatter, tok, data_cfg,
                       keep_examples=True, blocks=blocks, folder=folder / "eval", num_proc=num_proc)


# ------------------------------------------------------------------ cache
def _source_fingerprint(source) -> dict:
    """Path, size and mtime of a local file; the name alone for `datasets` sources."""
    if source is None:
        return {}
    if source.startswith("builtin:"):
        from fttrain.data.synthetic import resolve_builtin

        source = resolve_builtin(source)
    state = os.path.join(source, "state.json")
    if os.path.isdir(source) and os.path.exists(state):  # save_to_disk folder: its content fingerprint
        with open(state) as f:
            return {"path": os.path.abspath(source), "state": json.load(f).get("_fingerprint")}
    if os.path.exists(source):
        st = os.stat(source)
        return {"path": os.path.abspath(source), "size": st.st_size, "mtime_ns": st.st_mtime_ns}
    return {"name": source}


NOT_IN_KEY = ("num_proc", "cache")  # how the rows are prepared, not what they are


def cache_key(data_cfg, tokenizer, chat_template: Optional[str], assistant_only_loss: bool, blocks: bool = False,
              policy: MaskPolicy = MaskPolicy()) -> str:
    from omegaconf import OmegaConf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_id = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    data = OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True) if OmegaConf.is_config(data_cfg) \
        else dict(data_cfg)
    for knob in NOT_IN_KEY:
        data.pop(knob, None)
    material = {
        "v": CACHE_VERSION,
        "data": data,
        "train": _source_fingerprint(data_cfg.train),
        "eval": _source_fingerprint(data_cfg.eval),
        "tokenizer": hashlib.sha256(tok_id.encode()).hexdigest(),
        "special": [tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id],
        "template": chat_template,
        "assistant_only_loss": assistant_only_loss,
        "blocks": blocks,
        "mask_policy": repr(policy),
    }
    return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()[:16]


COMPLETE = "COMPLETE"  # written last: a folder without it is a preparation that did not finish


def prepare_data_cached(data_cfg, tokenizer, chat_template, assistant_only_loss, cache_root,
                        blocks: bool = False, policy: MaskPolicy = MaskPolicy(), fresh_tag: Optional[str] = None
                        ) -> PreparedData:
    """prepare_data into ``cache_root/prepared/<key>``, reusing an identical
    earlier preparation (data.cache=true).

    Called by local rank 0 first (the others wait, then map what it wrote),
    so a large data set is tokenized once per node instead of once per rank,
    every rank shares one copy through the page cache, and a rerun or a
    resumed run skips tokenizing altogether. With data.cache=false the folder
    is ``<key>-<fresh_tag>`` (one per launch, shared by its ranks), made anew
    and removed when this process ends.

    The folder is built under a temporary name and renamed into place once
    every file is on disk, so an interrupted preparation never passes for a
    finished one; two nodes preparing into one shared cache keep the first.
    """
    key = cache_key(data_cfg, tokenizer, chat_template, assistant_only_loss, blocks, policy)
    if not data_cfg.cache:
        key = f"{key}-{fresh_tag or os.getpid()}"
    path = Path(cache_root) / "prepared" / key
    if (path / COMPLETE).exists():
        if data_cfg.cache:
            log.info("data: reusing prepared data %s", path)
        return PreparedData.open(path)
    formatter, tok = encoders(data_cfg, tokenizer, chat_template, assistant_only_loss, policy)
    # Unique across the nodes that may share this cache (their local rank 0s can have the same pid).
    tmp = path.with_name(f"{path.name}.tmp-{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    remove_tree(tmp)
    try:
        tmp.mkdir(parents=True)
        write_prepared(tmp, data_cfg, formatter, tok, blocks)
        sync_folder(tmp)
        (tmp / COMPLETE).write_text("")
        try:
            os.rename(tmp, path)
        except OSError:  # another node (shared cache) or an earlier unfinished folder holds the name
            if (path / COMPLETE).exists():
                remove_tree(tmp)
            else:
                remove_tree(path)
                os.rename(tmp, path)
    except BaseException:
        remove_tree(tmp)
        raise
    if not data_cfg.cache:
        import atexit

        atexit.register(remove_tree, str(path))
    return PreparedData.open(path)
