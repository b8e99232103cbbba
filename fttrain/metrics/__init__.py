"""Evaluation metrics for encoder tasks, in plain numpy (no scikit-learn, no seqeval).

    classification  accuracy, macro/micro F1, per-label F1     (fractions, 0..1)
    entities        entity-level precision/recall/F1, as seqeval's default (conlleval) mode  (0..1)
    squad           exact match and token F1, as the official SQuAD v1.1/v2.0 scripts  (percent, 0..100)
"""
