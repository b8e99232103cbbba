"""From ``cfg.data`` to training rows: load, split, validate, tokenize, pack.

Nothing is dropped silently: every row that does not reach training is
counted under its reason in the report (``data_report.json`` in the run dir),
and in strict mode (the default) a bad row stops the run with its file, row
index and field.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import pickle
from collections import Counter
from dataclasses import dataclass, field
from typing import Dict, List, Optional

from fttrain.data.chat import MaskPolicy
from fttrain.data.formats import Chat, Example, Formatter, RowError, placeholders
from fttrain.data.packing import as_rows, concat_blocks, pack
from fttrain.data.rows import load_splits
from fttrain.data.sources import DataError
from fttrain.data.templates import TemplateError
from fttrain.data.tokenize import Tokenizer, apply_overlength, count_trained

log = logging.getLogger(__name__)
CACHE_VERSION = 3  # bump when tokenization, masking or packing changes


@dataclass
class SplitData:
    rows: List[Dict]  # what the trainer iterates: packed or one sample per row
    examples: Dict[int, Example]  # eval split only: kept examples by row id, for generation eval
    report: Dict = field(default_factory=dict)
    # The first sample of each distinct role pattern ("system,user,assistant", ...), for preflight.
    pattern_samples: Dict[str, Dict] = field(default_factory=dict)


@dataclass
class PreparedData:
    train: SplitData
    eval: Optional[SplitData]

    @property
    def report(self) -> Dict:
        out = {"train": self.train.report}
        if self.eval is not None:
            out["eval"] = self.eval.report
        return out


MAX_PATTERN_SAMPLES = 8


class _Counts:
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


def _process(
    source: str,
    rows: List[Dict],
    ids: List[int],
    formatter: Formatter,
    tokenizer: Tokenizer,
    data_cfg,
    keep_examples: bool,
    blocks: bool = False,
) -> SplitData:
    policy = data_cfg.overlength
    counts = _Counts()
    samples, examples, patterns = [], {}, {}
    for i in ids:
        try:
            ex = formatter(rows[i])
            encoded = tokenizer.encode(ex)
        except RowError as e:
            if data_cfg.strict:
                raise DataError(
                    f"{source} row {i}: {e}. Fix the row, or set data.strict=false to drop "
                    "such rows with a count."
                ) from None
            counts.dropped[e.reason] += 1
            continue
        kept = 0
        for ids_, labels in encoded.samples:
            if tokenizer.assistant_only_loss and count_trained(labels) == 0 and len(ids_) <= data_cfg.max_length:
                raise TemplateError(
                    f"{source} row {i}: no token of it is trained, though it has a turn to train: the chat "
                    "template's output could not be matched to its messages"
                )
            # Concatenated into blocks, a long document continues in the next block.
            sample, outcome = apply_overlength(ids_, labels, data_cfg.max_length if not blocks else len(ids_), policy)
            if outcome == "raise":
                raise DataError(
                    f"{source} row {i}: {len(ids_)} tokens is longer than data.max_length={data_cfg.max_length}. "
                    "Set data.overlength=truncate or drop, or raise data.max_length."
                )
            if sample is None:
                counts.dropped[outcome] += 1
                continue
            counts.truncated += outcome == "truncated"
            sample["sample_id"] = i
            samples.append(sample)
            kept += 1
            if isinstance(ex, Chat) and len(patterns) < MAX_PATTERN_SAMPLES:
                patterns.setdefault(ex.role_pattern(), sample)
        if kept and isinstance(ex, Chat):
            counts.add_chat(encoded)
        found = placeholders(rows[i]) if kept else []
        if found:
            counts.placeholder_rows += 1
            counts.placeholders.update(found)
        if kept and keep_examples:
            examples[i] = ex
    if not samples:
        raise DataError(f"{source}: no usable rows out of {len(ids)} (dropped: {dict(counts.dropped)})")
    if counts.trained_turns and counts.turns_without_end_of_turn == counts.trained_turns:
        markers = list(tokenizer.info.end_of_turn) if tokenizer.info else []
        raise TemplateError(
            f"{source}: no trained turn ends with an end-of-turn token (looked for {markers}), so the model would "
            "never learn to stop. Use a chat template that closes each assistant turn (the model's own does)."
        )
    if blocks:
        packed_rows = concat_blocks(samples, data_cfg.max_length)
    else:
        packed_rows = pack(samples, data_cfg.max_length) if packs(data_cfg) else as_rows(samples)
    n_tokens = sum(len(s["input_ids"]) for s in samples)
    kept_rows = len({s["sample_id"] for s in samples})
    report = {
        "source": source,
        "rows": len(ids),
        "kept": kept_rows,
        **counts.report(),
        "tokens": n_tokens,
        "trained_tokens": sum(count_trained(s["labels"]) for s in samples),
        "rows_after_packing": len(packed_rows),
    }
    if len(samples) != kept_rows:
        report["samples"] = len(samples)  # more than rows: chats split per turn
    if blocks:
        report["layout"] = f"documents concatenated into {data_cfg.max_length}-token blocks"
    if packs(data_cfg) and not blocks:
        report["packing_efficiency"] = round(n_tokens / (len(packed_rows) * data_cfg.max_length), 4)
    if counts.turns_without_end_of_turn:
        log.warning("%s: %d of %d trained turns do not end with an end-of-turn token", source,
                    counts.turns_without_end_of_turn, counts.trained_turns)
    if counts.placeholder_rows:
        log.warning("%s: %d rows hold unfilled template placeholders, e.g. %s", source, counts.placeholder_rows,
                    ", ".join(list(counts.placeholders)[:3]))
    return SplitData(packed_rows, examples, report, patterns)


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
                 blocks: bool = False, policy: MaskPolicy = MaskPolicy()) -> PreparedData:
    fmt = data_cfg.format.value if hasattr(data_cfg.format, "value") else str(data_cfg.format)
    formatter = Formatter(fmt, dict(data_cfg.columns), dict(data_cfg.role_map), data_cfg.system_prompt)
    tok = Tokenizer(tokenizer, chat_template, assistant_only_loss, policy)

    train_split, eval_split = load_splits(data_cfg)
    rows, train_ids = train_split.rows, train_split.ids
    train = _process(data_cfg.train, rows, train_ids, formatter, tok, data_cfg, keep_examples=False, blocks=blocks)
    evaluation = None
    if eval_split is not None:
        evaluation = _process(eval_split.source, eval_split.rows, eval_split.ids, formatter, tok, data_cfg,
                              keep_examples=True, blocks=blocks)
    return PreparedData(train, evaluation)


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


def cache_key(data_cfg, tokenizer, chat_template: Optional[str], assistant_only_loss: bool, blocks: bool = False,
              policy: MaskPolicy = MaskPolicy()) -> str:
    from omegaconf import OmegaConf

    backend = getattr(tokenizer, "backend_tokenizer", None)
    tok_id = backend.to_str() if backend is not None else repr(sorted(tokenizer.get_vocab().items()))
    material = {
        "v": CACHE_VERSION,
        "data": OmegaConf.to_container(data_cfg, resolve=True, enum_to_str=True)
        if OmegaConf.is_config(data_cfg) else data_cfg,
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


def prepare_data_cached(data_cfg, tokenizer, chat_template, assistant_only_loss, cache_root,
                        blocks: bool = False, policy: MaskPolicy = MaskPolicy()) -> PreparedData:
    """prepare_data, reusing the result of an identical earlier preparation.

    Called by local rank 0 first (the others wait, then load what it wrote),
    so a large data set is tokenized once per node instead of once per rank,
    and a rerun or a resumed run skips tokenizing altogether.
    """
    if not data_cfg.cache:
        return prepare_data(data_cfg, tokenizer, chat_template, assistant_only_loss, blocks, policy)
    key = cache_key(data_cfg, tokenizer, chat_template, assistant_only_loss, blocks, policy)
    path = cache_root / "prepared" / f"{key}.pkl"
    if path.exists():
        with open(path, "rb") as f:
            data = pickle.load(f)
        log.info("data: reusing prepared data %s", path)
        return data
    data = prepare_data(data_cfg, tokenizer, chat_template, assistant_only_loss, blocks, policy)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as f:
        pickle.dump(data, f, protocol=pickle.HIGHEST_PROTOCOL)
    os.replace(tmp, path)
    return data
