"""Small generated data sets, seeded and written to disk, for the demo and tests.

``builtin:<name>`` in ``data.train`` resolves to ``<cache>/data/<name>/train.jsonl``
and ``builtin:<name>/eval`` to its ``eval.jsonl``; the files are then read by
the same loader as any user file, so the demo exercises the real data path.

The demo task is *reversing a short sequence of letters*:

    reverse_text   pretraining documents: "Reverse: k q m t\\nt m q k"
    reverse_chat   chat SFT: user "Reverse: k q m t"  assistant "t m q k"

Train and eval sequences never overlap (eval rows are drawn first and
excluded from train), so exact match on eval measures generalisation, not
recall. A model that has not learnt the task scores about zero.
"""

from __future__ import annotations

import json
import os
import random
from pathlib import Path
from typing import Callable, Dict, Iterator, List, Tuple

from fttrain.paths import cache_dir

ALPHABET = list("abcdefghijklmnop")
MIN_LEN, MAX_LEN = 3, 6
SYSTEM_PROMPT = "You reverse sequences of letters."


def _sequences(seed: int, n: int, exclude: set) -> List[Tuple[str, ...]]:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    while len(out) < n:
        seq = tuple(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))
        if seq in seen:
            continue
        seen.add(seq)
        out.append(seq)
    return out


def _split(seed: int, n_train: int, n_eval: int):
    eval_seqs = _sequences(seed + 1, n_eval, set())
    train_seqs = _sequences(seed, n_train, set(eval_seqs))
    return train_seqs, eval_seqs


# Pretraining layouts vary the text between question and answer, so the model
# learns to reverse by content rather than by a fixed offset; that is what
# lets the SFT stage carry the skill into a chat template it never saw.
TEXT_LAYOUTS = [
    "Reverse: {s}\n{r}",
    "Reverse: {s}\n\n{r}",
    "Reverse: {s}\nReversed:\n\n{r}",
    "Reverse: {s}\nThe answer is\n{r}",
    "Reverse: {s}\nuser: thanks\nassistant:\n\n{r}",
]


def reverse_text_rows(seq: Tuple[str, ...]) -> Dict:
    layout = random.Random(" ".join(seq)).choice(TEXT_LAYOUTS)
    return {"text": layout.format(s=" ".join(seq), r=" ".join(reversed(seq)))}


def reverse_chat_rows(seq: Tuple[str, ...]) -> Dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Reverse: {' '.join(seq)}"},
            {"role": "assistant", "content": " ".join(reversed(seq))},
        ]
    }


# name -> (row builder, train size, eval size, seed)
BUILTIN: Dict[str, Tuple[Callable, int, int, int]] = {
    "reverse_text": (reverse_text_rows, 12000, 200, 7),
    "reverse_chat": (reverse_chat_rows, 2000, 100, 11),
}


def tokenizer_corpus() -> Iterator[str]:
    """Text the tiny model's tokenizer is trained on: the demo's vocabulary,
    chat words, and some general and non-Latin text so that any input
    tokenizes sensibly (the tokenizer is byte-level, so nothing is unknown)."""
    builder_text, *_ = BUILTIN["reverse_text"]
    for seq in _sequences(0, 2000, set()):
        yield builder_text(seq)["text"]
    yield SYSTEM_PROMPT
    general = (
        "The quick brown fox jumps over the lazy dog. What is the answer? "
        "Instruction input output question context answer system user assistant. "
        "0 1 2 3 4 5 6 7 8 9 + - = , . ! ? : ; ( ) [ ] { } \" ' "
        "안녕하세요 반갑습니다 한국어 문장입니다. "
    )
    for _ in range(50):
        yield general


def materialize(name: str) -> Path:
    """Write the named data set to the cache (once) and return its folder."""
    if name not in BUILTIN:
        raise ValueError(f"data: unknown builtin data set {name!r}; known: {sorted(BUILTIN)}")
    builder, n_train, n_eval, seed = BUILTIN[name]
    folder = cache_dir() / "data" / f"{name}-{n_train}-{n_eval}-{seed}"
    if (folder / "eval.jsonl").exists():
        return folder
    train_seqs, eval_seqs = _split(seed, n_train, n_eval)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, seqs in (("train", train_seqs), ("eval", eval_seqs)):
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for seq in seqs:
                f.write(json.dumps(builder(seq), ensure_ascii=False) + "\n")
    try:
        os.rename(tmp, folder)
    except OSError:  # another rank won the race; its files are identical
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return folder


def resolve_builtin(source: str) -> str:
    """``builtin:name`` -> train file, ``builtin:name/eval`` -> eval file."""
    spec = source[len("builtin:"):]
    name, _, split = spec.partition("/")
    return str(materialize(name) / f"{split or 'train'}.jsonl")
