"""Entity-level precision, recall and F1 from tag sequences, as seqeval's default mode.

seqeval's default mode is conlleval's chunking, which is lenient about how a
span starts: an entity begins at a B- (or S-) tag, at an I-/E- tag that
follows O or another type, or at any change of type, and ends before O, B-,
S-, a change of type, or after E-/S-. So IOB2, IOB1 and IOBES all read:

    B-PER I-PER O      -> PER[0..1]
    I-PER I-PER O      -> PER[0..1]          (I- without B- starts one)
    B-PER I-LOC        -> PER[0..0] LOC[1..1] (type change mid-span)
    B-PER I-PER B-PER  -> PER[0..1] PER[2..2]
    S-PER B-LOC E-LOC  -> PER[0..0] LOC[1..2]

An entity is correct only when type, first and last word all match the
gold. Sentences are scored as one stream with an O between them (so no
entity crosses a sentence). Per type, precision is 0 when nothing of that
type was predicted and recall 0 when the gold has none, as in seqeval.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

PREFIXES = ("B", "I", "E", "S")


def _split(tag: str) -> Tuple[str, str]:
    """'B-PER' -> ('B', 'PER'); 'O' -> ('O', '_'), seqeval's placeholder type."""
    if tag in ("O", *PREFIXES):
        return tag, "_"
    if len(tag) < 3 or tag[0] not in PREFIXES or tag[1] != "-":
        raise ValueError(f"invalid tag {tag!r}: expected O or a B-/I-/E-/S- prefix and a type")
    return tag[0], tag[2:]


def _ends(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if prev_tag in ("E", "S"):
        return True
    if prev_tag in ("B", "I") and tag in ("B", "S", "O"):
        return True
    return prev_tag != "O" and prev_type != type_


def _starts(prev_tag: str, tag: str, prev_type: str, type_: str) -> bool:
    if tag in ("B", "S"):
        return True
    if prev_tag in ("E", "S", "O") and tag in ("E", "I"):
        return True
    return tag != "O" and prev_type != type_


def entity_spans(tags: Sequence[str]) -> List[Tuple[str, int, int]]:
    """(type, first word, last word) of each entity in one tag sequence, inclusive."""
    spans, prev_tag, prev_type, begin = [], "O", "", 0
    for i, raw in enumerate(list(tags) + ["O"]):  # the trailing O closes a span at the end
        tag, type_ = _split(raw)
        if _ends(prev_tag, tag, prev_type, type_):
            spans.append((prev_type, begin, i - 1))
        if _starts(prev_tag, tag, prev_type, type_):
            begin = i
        prev_tag, prev_type = tag, type_
    return spans


def _prf(correct: int, predicted: int, gold: int) -> Tuple[float, float, float]:
    precision = correct / predicted if predicted else 0.0
    recall = correct / gold if gold else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return precision, recall, f1


def entity_metrics(gold: Sequence[Sequence[str]], predicted: Sequence[Sequence[str]]) -> Dict[str, float]:
    """Micro precision/recall/F1 over all entities, token accuracy, and per type
    ``precision/T``, ``recall/T``, ``f1/T``, ``support/T`` (gold entities of T)
    for every type in the gold or the predictions."""
    if len(gold) != len(predicted):
        raise ValueError(f"{len(gold)} gold sequences but {len(predicted)} predicted")
    gold_set, pred_set = set(), set()
    tokens = correct_tokens = 0
    for s, (g, p) in enumerate(zip(gold, predicted)):
        if len(g) != len(p):
            raise ValueError(f"sequence {s}: {len(g)} gold tags but {len(p)} predicted")
        gold_set.update((s, *span) for span in entity_spans(g))
        pred_set.update((s, *span) for span in entity_spans(p))
        tokens += len(g)
        correct_tokens += sum(a == b for a, b in zip(g, p))
    precision, recall, f1 = _prf(len(gold_set & pred_set), len(pred_set), len(gold_set))
    out = {"precision": precision, "recall": recall, "f1": f1, "accuracy": correct_tokens / tokens if tokens else 0.0}
    for type_ in sorted({e[1] for e in gold_set | pred_set}):
        g = {e for e in gold_set if e[1] == type_}
        p = {e for e in pred_set if e[1] == type_}
        out[f"precision/{type_}"], out[f"recall/{type_}"], out[f"f1/{type_}"] = _prf(len(g & p), len(p), len(g))
        out[f"support/{type_}"] = float(len(g))
    return out
