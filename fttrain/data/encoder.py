"""Encoder tasks: validate rows and turn them into model features.

    classification  {text, text_pair?, label}            -> input_ids, attention_mask, token_type_ids?, labels: int
                    {text, text_pair?, labels: [...]}    -> ... labels: float multi-hot  (multi_label=True)
    ner             {tokens: [words], tags: [tags]}      -> ... labels: one per token, -100 where not trained
    qa (SQuAD)      {context, question, answers: {text: [...], answer_start: [...]}}
                      train -> one feature per context window: ... start_positions, end_positions
                      eval  -> one feature per context window: ... offset_mapping (None off the context)

Each encoder checks its row and raises ``RowError(field, reason, message)``
naming the field; ``encode_rows`` adds the source and row index (strict) or
drops the row and counts it under its reason (lenient), as the causal-LM
pipeline does. Features are unpadded lists; a collator pads them.

Labels are ids: positions in a list of label names, given by the config or by
``collect_label_names`` (sorted, so every run and rank agrees). A row may name
a label or give its id. ``model_label_config`` turns the names into what
``AutoModelFor*Classification.from_pretrained`` needs.

Sub-word alignment for NER, shown for one row (``.`` = -100, not trained):

    words        Mina   moved  to  Busan
    tokens  [CLS] mina  moved  to  bus  ##an  [SEP]
    word_ids None 0     1      2   3    3     None
    labels   .    B-PER O      O   B-LOC .     .       first sub-token only (default)
    labels   .    B-PER O      O   B-LOC I-LOC .       label_all_tokens: a B- tag continues as I-

QA windows: the question comes first and is never cut; the context is cut
into windows that overlap by ``doc_stride`` tokens, so an answer of up to
``doc_stride`` tokens cut at one window's end lies whole in the next:

    [CLS] question [SEP] context tokens 0 .. k        [SEP]
    [CLS] question [SEP] context tokens k-stride .. m [SEP]

A training window that does not hold the whole answer (or any window of an
unanswerable row) points start and end at [CLS] (index 0), the "no answer
here" position.

Evaluation maps predictions back to the rows: ``NEREncoder.word_predictions``
reads each word's tag at its first sub-token and predicts 'O' for a word cut
off by truncation (so its entity counts as missed, not as absent), and
``fttrain.metrics.squad.postprocess_qa`` turns window logits into context text.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

from fttrain.data.formats import RowError
from fttrain.data.rows import DropRow, Split, StopAtRow, convert_rows
from fttrain.data.sources import DataError
from fttrain.data.tokenize import IGNORE

MODEL_INPUTS = ("input_ids", "attention_mask", "token_type_ids")


@dataclass
class Encoded:
    """One row's features: one for classification and NER, one per context window for QA."""

    features: List[Dict]
    truncated: bool  # what was cut, per task: tokens (classification), words (NER), the answer (QA)


@dataclass
class EncodedSplit:
    features: List[Dict]
    report: Dict


# ------------------------------------------------------------------ labels
def collect_label_names(rows: Iterable[Dict], field: str) -> List[str]:
    """Every label name used in ``rows[field]`` (one name, or a list of them), sorted.

    Rows that give integer ids instead get the names "0" .. "<largest id>".
    Values of the wrong type are skipped here; the encoder rejects those rows
    with their row index.
    """
    names, largest_id = set(), -1
    for row in rows:
        value = row.get(field) if isinstance(row, dict) else None
        for item in value if isinstance(value, list) else [value]:
            if isinstance(item, str):
                names.add(item)
            elif isinstance(item, int) and not isinstance(item, bool):
                largest_id = max(largest_id, item)
    if names and largest_id >= 0:
        raise ValueError(
            f"field '{field}' holds both label names and integer ids; an id is a position in the label "
            "list, so list the label names in the config"
        )
    if largest_id >= 0:
        return [str(i) for i in range(largest_id + 1)]
    if not names:
        raise ValueError(f"no labels found in field '{field}'")
    return sorted(names)


def model_label_config(label_names: Sequence[str], multi_label: bool = False) -> Dict:
    """Keyword arguments for ``AutoModelFor{Sequence,Token}Classification.from_pretrained``.

    ``problem_type`` is always set: left to itself, transformers picks
    regression for one label and single-label for integer labels, and only
    a float multi-hot batch would select the multi-label (BCE) loss.
    """
    names = list(label_names)
    return {
        "num_labels": len(names),
        "id2label": dict(enumerate(names)),
        "label2id": {name: i for i, name in enumerate(names)},
        "problem_type": "multi_label_classification" if multi_label else "single_label_classification",
    }


class _Labels:
    def __init__(self, names: Sequence[str]):
        self.names = list(names)
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"label names must be unique: {self.names}")
        self.ids = {name: i for i, name in enumerate(self.names)}

    def id_of(self, value, field: str) -> int:
        if isinstance(value, str):
            if value not in self.ids:
                raise RowError(
                    field, "unknown_label", f"field '{field}': label {value!r} is not in labels {self.names}"
                )
            return self.ids[value]
        if isinstance(value, int) and not isinstance(value, bool):
            if not 0 <= value < len(self.names):
                raise RowError(
                    field, "unknown_label", f"field '{field}': id {value} is out of range for labels {self.names}"
                )
            return value
        raise RowError(field, "bad_type", f"field '{field}' must be a label name or id, not {type(value).__name__}")


# ------------------------------------------------------------------ row fields
class _Columns:
    """Reads a row's fields under the user's column names (``data.columns``)."""

    def __init__(self, columns: Optional[Dict[str, str]]):
        self.columns = dict(columns or {})

    def key(self, name: str) -> str:
        return self.columns.get(name, name)

    def value(self, row, name: str, required: bool = True):
        if not isinstance(row, dict):
            raise RowError("<row>", "bad_type", f"row is a {type(row).__name__}, not an object")
        key = self.key(name)
        value = row.get(key)
        if value is None and required:
            raise RowError(key, "missing_field", f"field '{key}' is missing")
        return value

    def text(self, row, name: str, required: bool = True) -> Optional[str]:
        value = self.value(row, name, required)
        if value is None:
            return None
        key = self.key(name)
        if not isinstance(value, str):
            raise RowError(key, "bad_type", f"field '{key}' must be a string, not {type(value).__name__}")
        if not value.strip():
            raise RowError(key, "empty_field", f"field '{key}' is empty")
        return value

    def list(self, row, name: str) -> list:
        value = self.value(row, name)
        key = self.key(name)
        if not isinstance(value, list):
            raise RowError(key, "bad_type", f"field '{key}' must be a list, not {type(value).__name__}")
        return value


def _fast(tokenizer, task: str):
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{task} needs a fast tokenizer: it maps tokens back to words and characters")


def _model_inputs(encoding, index: Optional[int] = None) -> Dict[str, list]:
    return {k: list(encoding[k] if index is None else encoding[k][index]) for k in MODEL_INPUTS if k in encoding}


# ------------------------------------------------------------------ classification
class ClassificationEncoder:
    """``{text, text_pair?, label}``, or with ``multi_label`` ``{text, text_pair?, labels: [...]}``.

    ``truncated``: the text (pair) was longer than ``max_length`` tokens and cut to it.
    """

    def __init__(
        self,
        tokenizer,
        label_names: Sequence[str],
        max_length: int,
        multi_label: bool = False,
        columns: Optional[Dict[str, str]] = None,
    ):
        self.tokenizer, self.max_length, self.multi_label = tokenizer, max_length, multi_label
        self.labels = _Labels(label_names)
        if not multi_label and len(self.labels.names) < 2:
            raise ValueError(f"single-label classification needs at least 2 labels, got {self.labels.names}")
        self.columns = _Columns(columns)

    def __call__(self, row: Dict) -> Encoded:
        text = self.columns.text(row, "text")
        pair = self.columns.text(row, "text_pair", required=False)
        labels = self._labels(row)
        args = (text,) if pair is None else (text, pair)
        encoding = self.tokenizer(*args)
        truncated = len(encoding["input_ids"]) > self.max_length
        if truncated:  # tokenized twice only when it is too long: truncation alone would not say so
            encoding = self.tokenizer(*args, truncation=True, max_length=self.max_length)
        return Encoded([{**_model_inputs(encoding), "labels": labels}], truncated)

    def _labels(self, row: Dict):
        if not self.multi_label:
            return self.labels.id_of(self.columns.value(row, "label"), self.columns.key("label"))
        key = self.columns.key("labels")
        hot = [0.0] * len(self.labels.names)
        for j, value in enumerate(self.columns.list(row, "labels")):
            hot[self.labels.id_of(value, f"{key}[{j}]")] = 1.0
        return hot


# ------------------------------------------------------------------ NER
class NEREncoder:
    """``{tokens: [words], tags: [tag names or ids]}``, CoNLL/IOB2 style.

    ``truncated``: words fell past ``max_length`` and got no token. They are
    still scored: ``word_predictions`` predicts 'O' for them, so an entity
    among them counts as missed instead of vanishing from the evaluation.
    """

    def __init__(
        self,
        tokenizer,
        tag_names: Sequence[str],
        max_length: int,
        label_all_tokens: bool = False,
        columns: Optional[Dict[str, str]] = None,
    ):
        _fast(tokenizer, "NER")
        self.tokenizer, self.max_length, self.label_all_tokens = tokenizer, max_length, label_all_tokens
        self.tags = _Labels(tag_names)
        # A continuation sub-token repeats its word's tag, except that B-X
        # becomes I-X: only one token may begin an entity.
        self.continuation = [
            self.tags.ids.get("I-" + name[2:], i) if name.startswith("B-") else i
            for i, name in enumerate(self.tags.names)
        ]
        self.columns = _Columns(columns)

    def tag_ids(self, row: Dict) -> Tuple[List[str], List[int]]:
        """The row's words and tag ids, checked."""
        words = self.columns.list(row, "tokens")
        tags = self.columns.list(row, "tags")
        wkey, tkey = self.columns.key("tokens"), self.columns.key("tags")
        if not words:
            raise RowError(wkey, "empty_field", f"field '{wkey}' is empty")
        if len(tags) != len(words):
            raise RowError(
                tkey, "length_mismatch", f"field '{tkey}' has {len(tags)} items but '{wkey}' has {len(words)}"
            )
        for j, word in enumerate(words):
            if not isinstance(word, str):
                raise RowError(f"{wkey}[{j}]", "bad_type", f"{wkey}[{j}] must be a string, not {type(word).__name__}")
            if not word.strip():
                raise RowError(f"{wkey}[{j}]", "empty_field", f"{wkey}[{j}] is an empty word")
        return words, [self.tags.id_of(tag, f"{tkey}[{j}]") for j, tag in enumerate(tags)]

    def gold_tags(self, row: Dict) -> List[str]:
        return [self.tags.names[i] for i in self.tag_ids(row)[1]]

    def _encode_words(self, words: List[str]):
        """(encoding, number of words that lost every token to truncation)."""
        encoding = self.tokenizer(words, is_split_into_words=True)
        if len(encoding["input_ids"]) <= self.max_length:
            return encoding, 0
        words_before = set(encoding.word_ids()) - {None}
        encoding = self.tokenizer(words, is_split_into_words=True, truncation=True, max_length=self.max_length)
        return encoding, len(words_before - set(encoding.word_ids()))

    def __call__(self, row: Dict) -> Encoded:
        words, tags = self.tag_ids(row)
        encoding, lost = self._encode_words(words)
        labels, previous = [], None
        for word in encoding.word_ids():
            if word is None:
                labels.append(IGNORE)
            elif word != previous:
                labels.append(tags[word])
            else:
                labels.append(self.continuation[tags[word]] if self.label_all_tokens else IGNORE)
            previous = word
        return Encoded([{**_model_inputs(encoding), "labels": labels}], lost > 0)

    def word_predictions(self, row: Dict, token_predictions: Sequence[int]) -> List[str]:
        """Predicted tag per word of ``row`` from its feature's per-token predicted ids.

        A word's prediction is the one at its first sub-token, whatever
        ``label_all_tokens`` was in training. A word with no token (cut by
        truncation) is predicted 'O'. ``token_predictions`` may be longer than
        the feature (padding); the tail is ignored.
        """
        words, _ = self.tag_ids(row)
        encoding, _ = self._encode_words(words)
        predicted = ["O"] * len(words)
        seen = set()
        for position, word in enumerate(encoding.word_ids()):
            if word is not None and word not in seen:
                seen.add(word)
                predicted[word] = self.tags.names[int(token_predictions[position])]
        return predicted


# ------------------------------------------------------------------ QA
class QAEncoder:
    """SQuAD rows; ``answers`` with empty lists is an unanswerable question,
    accepted only with ``version_2_with_negative``.

    ``truncated`` (training): the answer lies whole in no window, so every
    window of the row trains "no answer"; raise ``doc_stride`` to prevent it.
    """

    def __init__(
        self,
        tokenizer,
        max_length: int = 384,
        doc_stride: int = 128,
        version_2_with_negative: bool = False,
        columns: Optional[Dict[str, str]] = None,
    ):
        _fast(tokenizer, "QA")
        if not 0 <= doc_stride < max_length:
            raise ValueError(f"doc_stride={doc_stride} must be below max_length={max_length}")
        self.tokenizer, self.max_length, self.doc_stride = tokenizer, max_length, doc_stride
        self.version_2_with_negative = version_2_with_negative
        self.columns = _Columns(columns)

    def answers(self, row: Dict) -> List[Tuple[str, int]]:
        """The row's (text, answer_start) pairs, each checked against the context."""
        context = self.columns.text(row, "context")
        key = self.columns.key("answers")
        answers = self.columns.value(row, "answers")
        if not isinstance(answers, dict) or not isinstance(answers.get("text"), list) or not isinstance(
            answers.get("answer_start"), list
        ):
            raise RowError(key, "bad_type", f"field '{key}' must be {{text: [...], answer_start: [...]}}")
        texts, starts = answers["text"], answers["answer_start"]
        if len(texts) != len(starts):
            raise RowError(
                f"{key}.answer_start",
                "length_mismatch",
                f"field '{key}.answer_start' has {len(starts)} items but '{key}.text' has {len(texts)}",
            )
        if not texts and not self.version_2_with_negative:
            raise RowError(
                key, "unanswerable", f"field '{key}' is empty (unanswerable); set version_2_with_negative to allow it"
            )
        out = []
        for j, (text, start) in enumerate(zip(texts, starts)):
            if not isinstance(text, str) or not text:
                raise RowError(f"{key}.text[{j}]", "bad_type", f"field '{key}.text[{j}]' must be a non-empty string")
            if not isinstance(start, int) or isinstance(start, bool) or start < 0:
                raise RowError(
                    f"{key}.answer_start[{j}]", "bad_type", f"field '{key}.answer_start[{j}]' must be an integer >= 0"
                )
            found = context[start : start + len(text)]
            if found != text:
                raise RowError(
                    f"{key}.answer_start[{j}]",
                    "answer_mismatch",
                    f"field '{key}.answer_start[{j}]' is {start}, but the context there reads {found!r}, "
                    f"not the answer {text!r}",
                )
            out.append((text, start))
        return out

    def _windows(self, row: Dict):
        # Leading spaces in a question only waste tokens of every window.
        question = self.columns.text(row, "question").lstrip()
        context = self.columns.text(row, "context")
        qkey = self.columns.key("question")
        question_tokens = len(self.tokenizer(question, add_special_tokens=False)["input_ids"])
        room = self.max_length - question_tokens - self.tokenizer.num_special_tokens_to_add(pair=True)
        if room <= self.doc_stride:  # the tokenizer would abort the process, not raise
            raise RowError(
                qkey,
                "too_long",
                f"field '{qkey}' takes {question_tokens} tokens, leaving {room} of max_length={self.max_length} "
                f"for the context; that must be more than doc_stride={self.doc_stride}",
            )
        return self.tokenizer(
            question,
            context,
            truncation="only_second",
            max_length=self.max_length,
            stride=self.doc_stride,
            return_overflowing_tokens=True,
            return_offsets_mapping=True,
        )

    def train_features(self, row: Dict) -> Encoded:
        answers = self.answers(row)
        windows = self._windows(row)
        features, answer_seen = [], False
        for k in range(len(windows["input_ids"])):
            feature = _model_inputs(windows, k)
            start = end = 0  # [CLS]: no answer in this window
            if answers:
                start, end = self._answer_tokens(windows, k, *answers[0])
                answer_seen |= start != 0
            features.append({**feature, "start_positions": start, "end_positions": end})
        return Encoded(features, bool(answers) and not answer_seen)

    @staticmethod
    def _answer_tokens(windows, k: int, text: str, answer_start: int) -> Tuple[int, int]:
        """Token positions of the answer in window k, or (0, 0) when it is not all inside."""
        offsets, sequence = windows["offset_mapping"][k], windows.sequence_ids(k)
        first = sequence.index(1)
        last = len(sequence) - 1 - sequence[::-1].index(1)
        answer_end = answer_start + len(text)
        if offsets[first][0] > answer_start or offsets[last][1] < answer_end:
            return 0, 0
        start = first
        while start <= last and offsets[start][0] <= answer_start:
            start += 1
        end = last
        while end >= first and offsets[end][1] >= answer_end:
            end -= 1
        return start - 1, end + 1

    def eval_features(self, row: Dict) -> Encoded:
        """Windows with ``offset_mapping`` (None off the context), for ``metrics.squad.postprocess_qa``;
        pass ``keep_example_ids=True`` to ``encode_rows`` so each names its row."""
        self.answers(row)  # the references must be valid too
        windows = self._windows(row)
        features = []
        for k in range(len(windows["input_ids"])):
            sequence = windows.sequence_ids(k)
            offsets = [tuple(o) if s == 1 else None for o, s in zip(windows["offset_mapping"][k], sequence)]
            features.append({**_model_inputs(windows, k), "offset_mapping": offsets})
        return Encoded(features, False)


# ------------------------------------------------------------------ rows -> split
def encode_rows(
    encode: Callable[[Dict], Encoded],
    rows: Sequence[Dict],
    ids: Sequence[int],
    source: str,
    strict: bool = True,
    keep_example_ids: bool = False,
    overlength: str = "truncate",
) -> EncodedSplit:
    """Encode ``rows[i]`` for i in ``ids``; a bad row stops (strict) or is counted and dropped.

    ``keep_example_ids`` adds ``example_id`` (the row index) to every feature,
    which QA post-processing and NER evaluation use to find a feature's row.
    ``overlength`` (``data.overlength``) decides what a truncated row does:
    truncate (kept, counted), drop (dropped, counted under "overlength"),
    raise (stops with the row index, whatever ``strict`` says).
    """
    def convert(row):
        encoded = encode(row)
        if encoded.truncated and overlength == "raise":
            raise StopAtRow("cut at max_length (QA: its answer lies whole in no window) and data.overlength=raise. "
                            "Set data.overlength=truncate or drop, or raise data.max_length.")
        if encoded.truncated and overlength == "drop":
            raise DropRow("overlength")
        return encoded

    encoded, kept_ids, report = convert_rows(Split(source, rows, list(ids)), convert, strict)
    features = [{**f, "example_id": i} if keep_example_ids else f
                for e, i in zip(encoded, kept_ids) for f in e.features]
    if not features:
        raise DataError(f"{source}: {len(encoded)} usable rows gave no features")
    report.update(truncated=sum(e.truncated for e in encoded), features=len(features))
    return EncodedSplit(features, report)
