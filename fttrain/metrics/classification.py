"""Sequence classification metrics from logits, matching scikit-learn's definitions.

    single label   argmax(logits) vs int labels   -> accuracy, macro_f1, f1/<label>
    multi-label    sigmoid(logits) > threshold    -> subset_accuracy, micro_f1, macro_f1, f1/<label>
                   vs float multi-hot labels

An F1 whose precision and recall are both undefined (the label is neither in
the gold nor predicted) is 0, as scikit-learn's ``zero_division`` default. The
single-label macro average runs over the labels that occur in the gold or the
predictions (scikit-learn's ``labels=None``); the multi-label one over every
label column (what scikit-learn does for an indicator matrix).
"""

from __future__ import annotations

from typing import Dict, Sequence, Union

import numpy as np


def _array(x) -> np.ndarray:
    return np.asarray(x.detach().float().cpu().numpy() if hasattr(x, "detach") else x)


def _f1(tp: np.ndarray, fp: np.ndarray, fn: np.ndarray) -> np.ndarray:
    # 2tp / (2tp + fp + fn) is 2PR/(P+R) without dividing by an undefined P or R.
    denominator = 2 * tp + fp + fn
    return np.where(denominator > 0, 2 * tp / np.maximum(denominator, 1), 0.0)


def single_label_metrics(logits, labels, label_names: Sequence[str]) -> Dict[str, float]:
    """``logits`` [N, C], ``labels`` [N] label ids."""
    predicted = _array(logits).argmax(-1)
    gold = _array(labels).astype(int)
    classes = np.arange(len(label_names))[:, None]
    tp = ((predicted == classes) & (gold == classes)).sum(1)
    fp = ((predicted == classes) & (gold != classes)).sum(1)
    fn = ((predicted != classes) & (gold == classes)).sum(1)
    f1 = _f1(tp, fp, fn)
    present = (tp + fp + fn) > 0
    out = {
        "accuracy": float((predicted == gold).mean()),
        "macro_f1": float(f1[present].mean()) if present.any() else 0.0,
    }
    out.update({f"f1/{name}": float(f1[c]) for c, name in enumerate(label_names)})
    return out


def multi_label_metrics(
    logits, labels, label_names: Sequence[str], thresholds: Union[float, Sequence[float]] = 0.5
) -> Dict[str, float]:
    """``logits`` [N, C], ``labels`` [N, C] multi-hot; a label is predicted
    where sigmoid(logit) > its threshold (one for all, or one per label)."""
    probabilities = 1.0 / (1.0 + np.exp(-_array(logits).astype(np.float64)))
    predicted = probabilities > np.asarray(thresholds, dtype=np.float64)
    gold = _array(labels) > 0.5
    tp = (predicted & gold).sum(0)
    fp = (predicted & ~gold).sum(0)
    fn = (~predicted & gold).sum(0)
    f1 = _f1(tp, fp, fn)
    out = {
        "subset_accuracy": float((predicted == gold).all(1).mean()),
        "micro_f1": float(_f1(tp.sum(), fp.sum(), fn.sum())),
        "macro_f1": float(f1.mean()),
    }
    out.update({f"f1/{name}": float(f1[c]) for c, name in enumerate(label_names)})
    return out
