"""Token character offsets read from the tokens' own bytes, for byte-level BPE tokenizers.

Labelling a chat needs each token's character offsets (``fttrain.data.chat``).
Asking the tokenizer for them costs about a third of the tokenizing time: its
offset tracking (~20 % of ``encode_batch``) and one Python tuple per token
(~0.2 us each, ~1 ms for a 4k-token chat). A byte-level BPE tokenizer (Llama-3,
Qwen, DeepSeek, GPT-style) has a cheaper source: every token stands for a fixed
string of bytes, so where those bytes, laid end to end, are exactly the text's
UTF-8 bytes, token j covers bytes [e_j - len_j, e_j) with e = cumsum(len), and
its character offsets follow from which character each byte belongs to.

    text   "héllo"         bytes  68 c3 a9 6c 6c 6f      characters of bytes  0 1 1 2 3 4
    tokens "h" "é" "llo"   lengths 1 2 3   byte ends 1 3 6   offsets (0,1) (1,2) (2,5)

That is the tokenizer's own offsets (a token that holds part of a character's
bytes covers that whole character, as the tokenizer's alignment gives it) when
two things hold:

* the text reaches the model unchanged, each token's bytes where they stand:
  checked for each text, as the tokens' bytes equal to the text's, byte for
  byte, with no empty token. A text that fails (NFC on decomposed characters)
  is tokenized again with the tokenizer's offsets;
* nothing moves the tokenizer's alignment while leaving the bytes as they
  were. That is a property of the tokenizer, so only these are read this way:
  a ByteLevel decoder; no normalizer, or only per-character Unicode ones
  (NFC/NFD/NFKC/NFKD, Lowercase); no prefix space added; no added token that
  strips the whitespace around it; offsets not trimmed (``trim_offsets``).
  A multi-character ``Replace`` that writes the same text, or a stripped space
  given back as a prefix space, leaves equal bytes but other offsets.
"""

from __future__ import annotations

import json
from functools import lru_cache
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import numpy as np


@lru_cache(maxsize=1)
def _byte_of_char() -> Dict[str, int]:
    """The byte-level alphabet backwards: the character each byte is written as in a byte-level
    BPE vocabulary (GPT-2's table, the one transformers converts such tokenizers with) -> that byte."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    return {c: b for b, c in bytes_to_unicode().items()}


def _walk(node) -> Iterator[dict]:
    """Every JSON object in a tokenizer component's serialisation."""
    if isinstance(node, dict):
        yield node
        for value in node.values():
            yield from _walk(value)
    elif isinstance(node, list):
        for value in node:
            yield from _walk(value)


def _component(backend, name: str) -> List[dict]:
    part = getattr(backend, name, None)
    return list(_walk(json.loads(part.__getstate__()))) if part is not None else []


# Normalizers that map each character on its own (a composed pair is one change): where the
# normalized text equals the original, every character keeps its own place.
PER_CHARACTER_NORMALIZERS = {"Sequence", "NFC", "NFD", "NFKC", "NFKD", "Lowercase"}


class CharOffsets(Sequence):
    """The character offsets of a text's tokens, as two arrays: ``starts`` and ``ends``, both
    non-decreasing and ends > starts (every token holds at least one byte). Indexing gives
    (start, end) as the tokenizer's offsets list does."""

    __slots__ = ("starts", "ends")

    def __init__(self, starts: np.ndarray, ends: np.ndarray):
        self.starts, self.ends = starts, ends

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, j):
        if isinstance(j, slice):
            return list(zip(self.starts[j].tolist(), self.ends[j].tolist()))
        return int(self.starts[j]), int(self.ends[j])


class ByteTokens:
    """A byte-level BPE tokenizer's tokens as bytes: ``flat`` holds every token's bytes, token
    i's at flat[first[i]:first[i] + length[i]]."""

    def __init__(self, pieces: Dict[int, bytes]):
        size = max(pieces) + 1 if pieces else 0
        self.length = np.zeros(size, dtype=np.int64)  # 0: an id without bytes (never read this way)
        self.first = np.zeros(size, dtype=np.int64)
        ids = sorted(pieces)
        lengths = np.array([len(pieces[i]) for i in ids], dtype=np.int64)
        self.length[ids] = lengths
        self.first[ids] = np.cumsum(lengths) - lengths
        self.flat = np.frombuffer(b"".join(pieces[i] for i in ids), dtype=np.uint8)
        self.checked = self.failed = 0  # texts tried, and those whose bytes did not match

    @property
    def worth_reading(self) -> bool:
        """False once more than a quarter of the texts fail the check (data its normalizer
        changes): a text read from bytes costs ~0.7 of one encoded with offsets, a failed one
        ~1.7 (it is encoded twice), so above ~30% failures the tokenizer's offsets are cheaper."""
        return self.checked < 64 or 4 * self.failed <= self.checked

    @classmethod
    def of(cls, backend) -> Optional["ByteTokens"]:
        """The table of a fast tokenizer's Rust backend, or None where its offsets are not read
        from bytes: not a byte-level decoder, a normalizer that is not per-character, a prefix
        space, an added token that strips whitespace, offsets trimmed by the post-processor, a
        component without a serialisation, or a vocabulary entry outside the byte-level alphabet."""
        if backend is None or not hasattr(backend, "get_vocab") or not hasattr(backend, "encode_batch_fast"):
            return None
        try:  # a custom (Python) component has no serialisation: not read this way
            decoders = _component(backend, "decoder")
            normalizers = _component(backend, "normalizer")
            pre_tokenizers = _component(backend, "pre_tokenizer")
            processors = _component(backend, "post_processor")
            added_tokens = backend.get_added_tokens_decoder()
        except Exception:
            return None
        if not any(d.get("type") == "ByteLevel" for d in decoders):
            return None
        if any(n.get("type") not in PER_CHARACTER_NORMALIZERS for n in normalizers):
            return None
        if any(p.get("add_prefix_space") or p.get("prepend_scheme", "never") != "never" for p in pre_tokenizers):
            return None
        if any(p.get("trim_offsets") for p in processors):
            return None  # offsets shrunk to exclude a token's leading spaces: not the token's bytes
        if any(t.lstrip or t.rstrip for t in added_tokens.values()):
            return None
        alphabet = _byte_of_char()
        # An added token is matched in the raw text as written (its vocabulary entry, if any, is
        # not byte-level: "<｜begin▁of▁sentence｜>").
        pieces = {i: added.content.encode("utf-8") for i, added in added_tokens.items()}
        for token, i in backend.get_vocab(with_added_tokens=False).items():
            if i not in pieces:
                try:
                    pieces[i] = bytes([alphabet[c] for c in token])
                except KeyError:
                    return None
        return cls(pieces)

    def offsets(self, text: str, ids: Sequence[int]) -> Optional[CharOffsets]:
        """The character offsets of ``ids`` in ``text``, or None where the tokens' bytes are not
        exactly the text's (the tokenizer's own offsets are needed there)."""
        n = len(ids)
        raw = text.encode("utf-8")  # (a lone surrogate never gets here: the tokenizer refuses it first)
        if n == 0:
            return CharOffsets(np.zeros(0, np.int64), np.zeros(0, np.int64)) if not raw else None
        tok = np.fromiter(ids, dtype=np.int64, count=n)
        if tok.min() < 0 or tok.max() >= len(self.length):
            return None
        lengths = self.length[tok]
        if lengths.min() == 0:
            return None
        ends = np.cumsum(lengths)
        if ends[-1] != len(raw):
            return None
        starts = ends - lengths
        # Byte k of the text is byte (k - starts[j]) of token j: gathered from the table in one step.
        where = np.arange(len(raw), dtype=np.int64) + np.repeat(self.first[tok] - starts, lengths)
        data = np.frombuffer(raw, dtype=np.uint8)
        if not np.array_equal(self.flat[where], data):
            return None
        if len(raw) != len(text):  # multi-byte characters: byte positions -> character positions
            char_of_byte = np.cumsum((data & 0xC0) != 0x80) - 1  # continuation bytes are 10xxxxxx
            starts, ends = char_of_byte[starts], char_of_byte[ends - 1] + 1
        return CharOffsets(starts, ends)


def offsets_from_bytes(table: ByteTokens, backend, texts: List[str]
                       ) -> List[Tuple[List[int], Sequence[Tuple[int, int]]]]:
    """[(ids, offsets)] of each text: encoded without offset tracking, the offsets read from the
    tokens' bytes; a text whose tokens fail the check is encoded again with the tokenizer's."""
    if not table.worth_reading:
        return [(enc.ids, enc.offsets) for enc in backend.encode_batch(texts, add_special_tokens=False)]
    out = []
    retry = []
    for k, enc in enumerate(backend.encode_batch_fast(texts, add_special_tokens=False)):
        ids = enc.ids
        offsets = table.offsets(texts[k], ids)
        if offsets is None:
            retry.append(k)
        out.append((ids, offsets))
    table.checked += len(texts)
    table.failed += len(retry)
    if retry:
        for k, enc in zip(retry, backend.encode_batch([texts[k] for k in retry], add_special_tokens=False)):
            out[k] = (enc.ids, enc.offsets)
    return out
