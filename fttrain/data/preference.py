"""Rows for TRL's trainers, checked before TRL sees them.

    preference  {prompt, chosen, rejected}   dpo, kto, orpo, rm (rm: prompt optional)
                strings, or chat: prompt a list of messages, chosen/rejected an
                assistant message list (a plain string is taken as one)
    prompt      {prompt, <columns>}           grpo: the columns the reward functions read

TRL tokenizes these itself (applying the chat template to conversational rows),
so here each row is validated and normalised: a missing or empty field, a bad
role or an identical chosen/rejected pair names the field, and the pipeline
adds the file and row index (``fttrain.data.rows.convert_rows``).
"""

from __future__ import annotations

from typing import Dict, List, Sequence

from fttrain.data.formats import DEFAULT_ROLE_MAP, ROLES, RowError


class _Fields:
    def __init__(self, columns: Dict[str, str], role_map: Dict[str, str]):
        self.columns = dict(columns)
        self.role_map = {**DEFAULT_ROLE_MAP, **dict(role_map)}

    def col(self, name: str) -> str:
        return self.columns.get(name, name)

    def text_or_chat(self, row: Dict, name: str, required: bool = True, role: str = None):
        key = self.col(name)
        value = row.get(key)
        if value is None:
            if required:
                raise RowError(key, "missing_field", f"field '{key}' is missing")
            return None
        if isinstance(value, str):
            if not value.strip():
                raise RowError(key, "empty_field", f"field '{key}' is empty")
            return value
        if not isinstance(value, list) or not value:
            raise RowError(key, "bad_type", f"field '{key}' must be a string or a non-empty list of messages")
        turns = []
        for i, turn in enumerate(value):
            if not isinstance(turn, dict) or "role" not in turn or "content" not in turn:
                raise RowError(f"{key}[{i}]", "missing_field", f"{key}[{i}] needs keys 'role' and 'content'")
            r = self.role_map.get(turn["role"], turn["role"])
            if r not in ROLES:
                raise RowError(f"{key}[{i}].role", "bad_role",
                               f"{key}[{i}].role is {turn['role']!r}, not one of {list(ROLES)}; map it with data.role_map")
            if role is not None and r != role:
                raise RowError(f"{key}[{i}].role", "bad_role", f"{key}[{i}] must be an {role} message, not {r}")
            if not isinstance(turn["content"], str) or not turn["content"].strip():
                raise RowError(f"{key}[{i}].content", "empty_field", f"{key}[{i}].content must be a non-empty string")
            turns.append({"role": r, "content": turn["content"]})
        return turns


class PreferenceRows(_Fields):
    """Row -> {prompt?, chosen, rejected} in TRL's standard or conversational form."""

    def __init__(self, columns, role_map, prompt_required: bool = True):
        super().__init__(columns, role_map)
        self.prompt_required = prompt_required

    def __call__(self, row: Dict) -> Dict:
        if not isinstance(row, dict):
            raise RowError("<row>", "bad_type", f"row is a {type(row).__name__}, not an object")
        prompt = self.text_or_chat(row, "prompt", required=self.prompt_required)
        chat = isinstance(prompt, list)
        out = {} if prompt is None else {"prompt": prompt}
        for name in ("chosen", "rejected"):
            value = self.text_or_chat(row, name, role="assistant" if chat else None)
            if chat and isinstance(value, str):  # a chat prompt answered by plain text: one assistant turn
                value = [{"role": "assistant", "content": value}]
            if not chat and isinstance(value, list) and prompt is not None:
                raise RowError(self.col(name), "bad_type",
                               f"field '{self.col(name)}' is a message list but 'prompt' is a string; use one form")
            out[name] = value
        if out["chosen"] == out["rejected"]:
            raise RowError(self.col("rejected"), "identical_pair",
                           f"field '{self.col('rejected')}' is identical to '{self.col('chosen')}': no preference to learn")
        return out


class PromptRows(_Fields):
    """Row -> {prompt, <columns the reward functions read>} for GRPO."""

    def __init__(self, columns, role_map, required_columns: Sequence[str]):
        super().__init__(columns, role_map)
        self.required = list(required_columns)

    def __call__(self, row: Dict) -> Dict:
        if not isinstance(row, dict):
            raise RowError("<row>", "bad_type", f"row is a {type(row).__name__}, not an object")
        out = {k: v for k, v in row.items() if k != self.col("prompt")}
        out["prompt"] = self.text_or_chat(row, "prompt", role=None)
        if isinstance(out["prompt"], list) and out["prompt"][-1]["role"] == "assistant":
            raise RowError(f"{self.col('prompt')}[-1]", "bad_role", "the prompt ends with an assistant turn: nothing to generate")
        for name in self.required:
            if row.get(name) is None:
                raise RowError(name, "missing_field", f"field '{name}' is missing (a reward function reads it)")
        return out


def reward_columns(funcs) -> List[str]:
    """Data columns the reward functions require: their parameters without a default."""
    import inspect

    needed = []
    for f in funcs:
        target = getattr(f, "_fttrain_target", f)
        for name, p in inspect.signature(target).parameters.items():
            if name in ("prompts", "completions", "completion_ids", "trainer_state", "log_extra", "log_metric"):
                continue
            if p.default is p.empty and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY) and name not in needed:
                needed.append(name)
    return needed
