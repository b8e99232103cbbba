"""Rows for TRL's trainers, checked before TRL sees them.

    preference  {prompt, chosen, rejected}        dpo, kto, orpo, rm (rm: prompt optional)
    unpaired    {prompt, completion, label}       kto: one judged completion per row
                or {messages, label}              (the last assistant turn is the completion)
    prompt      {prompt, <columns>}               grpo: the columns the reward functions read

A prompt is a string or a list of turns; chosen / rejected / completion are a
string, one turn object or a list of turns. Turns are read as in SFT data
(``formats.TurnReader``): ``{role, content}`` or ``{from, value}``, roles mapped by
``data.role_map``. Where the prompt column is absent, these are tried in order:

    conversations / messages   LLaMA-Factory's sharegpt preference layout (turns up to the answer)
    instruction (+ input)      its alpaca preference layout
    (nothing)                  chosen and rejected are whole conversations: their shared
                               start is the prompt (Anthropic HH style)

A ``system`` column is put in front of a chat prompt. TRL tokenizes these itself
(applying the chat template to conversational rows), so here each row is
validated and normalised: a missing or empty field, a bad role or an identical
chosen/rejected pair names the field, and the pipeline adds the file and row
index (``fttrain.data.rows.convert_rows``).
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence

from fttrain.data.formats import RowError, TurnReader

PROMPT_FALLBACKS = ("conversations", "messages")


class _Fields(TurnReader):
    def text_or_chat(self, row: Dict, name: str, required: bool = True, role: Optional[str] = None,
                     key: Optional[str] = None):
        """A string, or the turns of a list / one turn object (all of ``role`` if given)."""
        key = key or self.col(name)
        value = row.get(key)
        if value is None:
            if required:
                raise RowError(key, "missing_field", f"field '{key}' is missing")
            return None
        if isinstance(value, str):
            if not value.strip():
                raise RowError(key, "empty_field", f"field '{key}' is empty")
            return value
        if not isinstance(value, (list, dict)) or not value:
            raise RowError(key, "bad_type", f"field '{key}' must be a string, a turn or a non-empty list of turns")
        turns, _ = self.turns(value, key)
        for i, t in enumerate(turns):
            if role is not None and t["role"] != role:
                raise RowError(f"{key}[{i}].role", "bad_role", f"{key}[{i}] must be an {role} message, not {t['role']}")
            if not (t.get("content") or "").strip() and not t.get("tool_calls"):
                raise RowError(f"{key}[{i}].content", "empty_field", f"{key}[{i}].content must be a non-empty string")
        return turns

    def prompt_of(self, row: Dict, required: bool):
        """(prompt, the column it came from): the prompt column, else the fallbacks above."""
        key = self.col("prompt")
        if row.get(key) is None and "prompt" not in self.columns:
            for other in PROMPT_FALLBACKS:
                if isinstance(row.get(other), list):
                    return self.text_or_chat(row, other, key=other), other
            if isinstance(row.get("instruction"), str):
                extra = row.get("input")
                text = row["instruction"] + (f"\n\n{extra}" if isinstance(extra, str) and extra.strip() else "")
                return [{"role": "user", "content": text}], "instruction"
        return self.text_or_chat(row, "prompt", required=required), key

    def with_system(self, row: Dict, prompt):
        system = row.get(self.col("system"))
        if isinstance(prompt, list) and isinstance(system, str) and system.strip() and prompt[0]["role"] != "system":
            return [{"role": "system", "content": system}] + prompt
        return prompt


def split_shared_start(chosen: List[Dict], rejected: List[Dict]):
    """Two whole conversations -> (their shared start up to the answers, chosen rest, rejected rest)."""
    n = 0
    while n < min(len(chosen), len(rejected)) - 1 and chosen[n] == rejected[n]:
        n += 1
    while n > 0 and chosen[n - 1]["role"] == "assistant" and chosen[n]["role"] == "assistant":
        n -= 1  # the answers start at an assistant turn after a non-assistant one
    return chosen[:n], chosen[n:], rejected[n:]


class PreferenceRows(_Fields):
    """Row -> {prompt?, chosen, rejected} in TRL's standard or conversational form."""

    def __init__(self, columns, role_map, prompt_required: bool = True):
        super().__init__(columns, role_map)
        self.prompt_required = prompt_required

    def __call__(self, row: Dict) -> Dict:
        if not isinstance(row, dict):
            raise RowError("<row>", "bad_type", f"row is a {type(row).__name__}, not an object")
        implicit = row.get(self.col("prompt")) is None and not any(
            isinstance(row.get(k), (list, str)) for k in PROMPT_FALLBACKS + ("instruction",))
        if implicit and isinstance(row.get(self.col("chosen")), list) and isinstance(row.get(self.col("rejected")), list):
            return self._whole_conversations(row)
        prompt, _ = self.prompt_of(row, required=self.prompt_required)
        prompt = self.with_system(row, prompt)
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
        self._check_pair(out)
        return out

    def _whole_conversations(self, row: Dict) -> Dict:
        chosen = self.text_or_chat(row, "chosen")
        rejected = self.text_or_chat(row, "rejected")
        prompt, chosen, rejected = split_shared_start(chosen, rejected)
        for name, answer in (("chosen", chosen), ("rejected", rejected)):
            if not answer or any(t["role"] != "assistant" for t in answer):
                raise RowError(self.col(name), "bad_role",
                               f"field '{self.col(name)}': after the turns it shares with the other answer it must "
                               "hold assistant turns only")
        if not prompt and self.prompt_required:
            raise RowError(self.col("prompt"), "missing_field",
                           f"field '{self.col('prompt')}' is missing, and chosen/rejected share no prompt turns")
        out = {"prompt": self.with_system(row, prompt)} if prompt else {}
        out.update(chosen=chosen, rejected=rejected)
        self._check_pair(out)
        return out

    def _check_pair(self, out: Dict) -> None:
        if out["chosen"] == out["rejected"]:
            raise RowError(self.col("rejected"), "identical_pair",
                           f"field '{self.col('rejected')}' is identical to '{self.col('chosen')}': no preference to learn")


class UnpairedRows(_Fields):
    """Row -> {prompt, completion, label} for KTO from rows that each hold one judged completion."""

    def __call__(self, row: Dict) -> Dict:
        if not isinstance(row, dict):
            raise RowError("<row>", "bad_type", f"row is a {type(row).__name__}, not an object")
        label_key = self.col("label")
        label = row.get(label_key)
        if isinstance(label, int) and not isinstance(label, bool) and label in (0, 1):
            label = bool(label)
        if not isinstance(label, bool):
            raise RowError(label_key, "bad_type" if label is not None else "missing_field",
                           f"field '{label_key}' must be true (desirable) or false (undesirable), not {label!r}")
        if row.get(self.col("completion")) is None:  # {messages, label}: the last assistant turn is judged
            turns, source = self.prompt_of(row, required=True)
            if not isinstance(turns, list) or turns[-1]["role"] != "assistant":
                raise RowError(source, "no_assistant_turn",
                               f"field '{source}' must end with the assistant turn the label judges")
            cut = len(turns)
            while cut > 0 and turns[cut - 1]["role"] == "assistant":
                cut -= 1
            prompt, completion = turns[:cut], turns[cut:]
            if not prompt:
                raise RowError(source, "missing_field", f"field '{source}' has no prompt turns before the answer")
        else:
            prompt, _ = self.prompt_of(row, required=True)
            completion = self.text_or_chat(row, "completion", role="assistant" if isinstance(prompt, list) else None)
            if isinstance(prompt, list) and isinstance(completion, str):
                completion = [{"role": "assistant", "content": completion}]
            if isinstance(prompt, str) and isinstance(completion, list):
                raise RowError(self.col("completion"), "bad_type",
                               f"field '{self.col('completion')}' is a message list but the prompt is a string")
        return {"prompt": self.with_system(row, prompt), "completion": completion, "label": label}


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
