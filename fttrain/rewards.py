"""Reward functions for ``task=grpo``, named in the config by ``_target_``.

    task:
      rewards:
        - _target_: fttrain.rewards.exact_match   # a built-in below, or mypkg.rewards.my_function
          weight: 1.0                             # its weight in the summed reward (optional)
          extract: last_number                    # any other key: a named parameter of the function

A reward function is called by TRL's GRPOTrainer once per batch of
completions as ``f(prompts=[...], completions=[...], completion_ids=[...],
**columns)``: every column of the data rows (``answer``, say) arrives as a
list aligned with ``completions``. A completion is a string, or for chat
prompts a list with one assistant message. It returns one float per
completion (``None`` skips a completion for this function).

Targets are imported and checked at config-check time, before any model loads.
"""

from __future__ import annotations

import functools
import inspect
import re
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

RESERVED = ("_target_", "weight")
NUMBER = re.compile(r"-?\d+(?:\.\d+)?")


def completion_text(completion) -> str:
    """The generated text of a plain or conversational completion."""
    if isinstance(completion, list):
        return "".join(m.get("content", "") for m in completion if isinstance(m, dict))
    return str(completion)


def extract_answer(text: str, extract: str) -> Optional[str]:
    """text: the whole stripped text; first_line: up to the first newline;
    last_number / first_number: a number in it (None when there is none)."""
    text = text.strip()
    if extract == "text":
        return text
    if extract == "first_line":
        return text.split("\n", 1)[0].strip()
    numbers = NUMBER.findall(text)
    if not numbers:
        return None
    return numbers[-1] if extract == "last_number" else numbers[0]


# ------------------------------------------------------------ built-ins
def exact_match(completions: Sequence, answer: Sequence[str], extract: str = "text", **_) -> List[float]:
    """1.0 where the extracted answer equals the row's ``answer`` column
    (case and surrounding space ignored; numbers compared as numbers)."""
    scores = []
    for completion, ref in zip(completions, answer):
        got = extract_answer(completion_text(completion), extract)
        scores.append(1.0 if got is not None and _same(got, str(ref)) else 0.0)
    return scores


def _same(got: str, ref: str) -> bool:
    try:
        return float(got) == float(ref)
    except ValueError:
        return got.strip().lower() == ref.strip().lower()


def regex_format(completions: Sequence, pattern: str, full: bool = True, **_) -> List[float]:
    """1.0 where the completion matches ``pattern`` (the whole stripped text
    with full=true, anywhere in it otherwise): a format check."""
    rx = re.compile(pattern, re.DOTALL)
    match = rx.fullmatch if full else rx.search
    return [1.0 if match(completion_text(c).strip()) else 0.0 for c in completions]


def length_penalty(completions: Sequence, max_chars: int = 200, scale: float = 1.0, **_) -> List[float]:
    """0 up to ``max_chars`` characters, then -scale per extra max_chars:
    discourages rambling without rewarding empty answers."""
    return [-scale * max(0, len(completion_text(c)) - max_chars) / max_chars for c in completions]


# -------------------------------------------------------- from config
def _plain(entry) -> Dict[str, Any]:
    from omegaconf import OmegaConf

    return OmegaConf.to_container(entry, resolve=True) if OmegaConf.is_config(entry) else dict(entry)


def _target(entry: Dict[str, Any], i: int) -> Callable:
    from hydra.utils import get_method

    target = entry.get("_target_")
    if not target:
        raise ValueError(f"task.rewards[{i}] has no _target_ (e.g. fttrain.rewards.exact_match)")
    try:
        fn = get_method(target)
    except Exception as e:  # ImportError, AttributeError, hydra's own wrapping
        raise ValueError(f"task.rewards[{i}]._target_={target!r} cannot be imported: {e}") from None
    return fn


def reward_problems(entries) -> List[str]:
    """Config-time checks: something to reward, importable targets, kwargs the function takes."""
    if not entries:
        return ["task.rewards is empty: name at least one reward function, e.g. "
                "{_target_: fttrain.rewards.exact_match}"]
    problems = []
    for i, entry in enumerate(entries):
        try:
            entry = _plain(entry)
        except (TypeError, ValueError):
            problems.append(f"task.rewards[{i}] must be a mapping with _target_")
            continue
        try:
            fn = _target(entry, i)
        except ValueError as e:
            problems.append(str(e))
            continue
        kwargs = {k: v for k, v in entry.items() if k not in RESERVED}
        # Named parameters only: every function also takes **kwargs (TRL passes
        # all data columns), which must not hide a misspelled config key.
        params = inspect.signature(fn).parameters
        unknown = [k for k in kwargs if k not in params or params[k].kind == params[k].VAR_KEYWORD]
        if unknown:
            problems.append(f"task.rewards[{i}]: {entry['_target_']} takes no argument(s) {unknown}")
        if not isinstance(entry.get("weight", 1.0), (int, float)):
            problems.append(f"task.rewards[{i}].weight must be a number")
    return problems


def build_rewards(entries) -> Tuple[List[Callable], List[float]]:
    """(functions with their keyword arguments bound, weights). Each keeps a
    readable __name__: TRL logs rewards/<name>/mean per function."""
    funcs, weights, seen = [], [], {}
    for i, entry in enumerate(entries):
        entry = _plain(entry)
        fn = _target(entry, i)
        kwargs = {k: v for k, v in entry.items() if k not in RESERVED}
        bound = functools.partial(fn, **kwargs)
        name = fn.__name__
        seen[name] = seen.get(name, 0) + 1
        if seen[name] > 1:  # the same function twice with different arguments
            name = f"{name}_{seen[name]}"

        def reward(prompts, completions, _f=bound, **columns):
            return _f(prompts=prompts, completions=completions, **columns)

        reward.__name__ = name
        reward._fttrain_target = bound  # its signature tells which data columns it reads
        funcs.append(reward)
        weights.append(float(entry.get("weight", 1.0)))
    return funcs, weights
