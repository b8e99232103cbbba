"""Extractive QA: start/end logits -> answer text -> SQuAD exact match and F1.

    eval features (QAEncoder.eval_features, example_id + offset_mapping)
      + start_logits, end_logits [n_features, seq_len]
      -> postprocess_qa -> {example_id: answer text ("" = no answer)}
      -> squad_metrics(predictions, {example_id: gold texts}) -> exact_match, f1 (percent)

Scores follow the official SQuAD v2.0 script (which agrees with v1.1 on
answerable questions): answers are compared after lower-casing and removing
punctuation, articles and extra spaces; the score of a question is the best
over its gold answers; an unanswerable question (no gold text) scores 1 only
for an empty prediction. Results are percentages, as the official scripts
report them.
"""

from __future__ import annotations

import re
import string
from collections import Counter, defaultdict
from typing import Dict, Mapping, Sequence

import numpy as np

_ARTICLES = re.compile(r"\b(a|an|the)\b", re.UNICODE)
_PUNCTUATION = set(string.punctuation)


def normalize_answer(text: str) -> str:
    text = "".join(ch for ch in text.lower() if ch not in _PUNCTUATION)
    return " ".join(_ARTICLES.sub(" ", text).split())


def _best(score, prediction: str, gold_answers: Sequence[str]) -> float:
    # An unanswerable question is scored against the empty answer.
    golds = [g for g in gold_answers if normalize_answer(g)] or [""]
    return max(score(prediction, g) for g in golds)


def _exact(prediction: str, gold: str) -> float:
    return float(normalize_answer(prediction) == normalize_answer(gold))


def _f1(prediction: str, gold: str) -> float:
    pred_tokens, gold_tokens = normalize_answer(prediction).split(), normalize_answer(gold).split()
    if not pred_tokens or not gold_tokens:  # no answer: right only if both say so
        return float(pred_tokens == gold_tokens)
    same = sum((Counter(pred_tokens) & Counter(gold_tokens)).values())
    if same == 0:
        return 0.0
    precision, recall = same / len(pred_tokens), same / len(gold_tokens)
    return 2 * precision * recall / (precision + recall)


def exact_match(prediction: str, gold_answers: Sequence[str]) -> float:
    """1.0 when the prediction equals one gold answer after normalisation, else 0.0."""
    return _best(_exact, prediction, gold_answers)


def token_f1(prediction: str, gold_answers: Sequence[str]) -> float:
    """Bag-of-tokens F1 against the best-matching gold answer, 0.0 .. 1.0."""
    return _best(_f1, prediction, gold_answers)


def squad_metrics(predictions: Mapping, references: Mapping[object, Sequence[str]]) -> Dict[str, float]:
    """``exact_match`` and ``f1`` in percent over every reference; with any
    unanswerable reference also ``has_answer_*`` and ``no_answer_*``."""
    missing = [k for k in references if k not in predictions]
    if missing:
        raise ValueError(f"no prediction for {len(missing)} examples, e.g. {missing[:3]}")
    groups = defaultdict(list)
    for key, golds in references.items():
        scores = (exact_match(predictions[key], golds), token_f1(predictions[key], golds))
        groups["all"].append(scores)
        groups["has_answer" if any(normalize_answer(g) for g in golds) else "no_answer"].append(scores)
    out = {}
    for group, scores in groups.items():
        if group != "all" and "no_answer" not in groups:
            continue
        prefix = "" if group == "all" else f"{group}_"
        out[f"{prefix}exact_match"] = 100.0 * float(np.mean([s[0] for s in scores]))
        out[f"{prefix}f1"] = 100.0 * float(np.mean([s[1] for s in scores]))
    return out


def postprocess_qa(
    contexts: Mapping[int, str],
    features: Sequence[Mapping],
    start_logits,
    end_logits,
    n_best: int = 20,
    max_answer_length: int = 30,
    version_2_with_negative: bool = False,
    null_score_diff_threshold: float = 0.0,
) -> Dict[int, str]:
    """The answer text for each example that has features, as HF's run_qa.

    ``contexts`` maps example_id to its context (a list of contexts indexed by
    row works). In every window the ``n_best`` start and end tokens are paired;
    a pair is a candidate when both tokens are in the context (offset not None),
    end >= start and it spans at most ``max_answer_length`` tokens. Its score
    is start + end logit, and its text the context characters the tokens
    cover. The best candidate over all windows wins.

    With ``version_2_with_negative`` the null score is start + end logit at
    [CLS] (index 0), from the window where it is lowest (the one most sure an
    answer is there); the prediction is "" when null score minus the best
    candidate's score exceeds ``null_score_diff_threshold``. Without it, or
    without any candidate, the prediction is the best candidate or "".
    """
    start_logits, end_logits = np.asarray(start_logits), np.asarray(end_logits)
    by_example = defaultdict(list)
    for index, feature in enumerate(features):
        by_example[feature["example_id"]].append(index)
    predictions = {}
    for example_id, indices in by_example.items():
        best_score, best_span, null_score = -np.inf, None, np.inf
        for index in indices:
            starts, ends = start_logits[index], end_logits[index]
            offsets = features[index]["offset_mapping"]
            null_score = min(null_score, float(starts[0] + ends[0]))
            # Logits can be longer than the feature: batches are padded together.
            for s in np.argsort(starts)[::-1][:n_best]:
                for e in np.argsort(ends)[::-1][:n_best]:
                    if s >= len(offsets) or e >= len(offsets) or offsets[s] is None or offsets[e] is None:
                        continue
                    if e < s or e - s + 1 > max_answer_length:
                        continue
                    score = float(starts[s] + ends[e])
                    if score > best_score:
                        best_score, best_span = score, (offsets[s][0], offsets[e][1])
        text = "" if best_span is None else contexts[example_id][best_span[0] : best_span[1]]
        if version_2_with_negative and null_score - best_score > null_score_diff_threshold:
            text = ""
        predictions[example_id] = text
    return predictions
