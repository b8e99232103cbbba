"""Turn raw rows of each supported format into one of three example kinds.

    alpaca             {instruction, input?, output, system?}    -> Chat
    sharegpt           {conversations: [{from, value}], system?} -> Chat
    messages           {messages: [{role, content}]}             -> Chat
    prompt_completion  {prompt, completion}                      -> PromptCompletion
                       (lists of messages in both fields         -> Chat)
    text               {text}                                    -> Text

Each converter checks its row and raises ``RowError(field, reason, message)``
naming the field; the caller adds the file and row index. Column names can be
remapped with ``data.columns`` and role names with ``data.role_map``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, List, Optional, Union

ROLES = ("system", "user", "assistant")
DEFAULT_ROLE_MAP = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


class RowError(ValueError):
    def __init__(self, field: str, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason = field, reason


@dataclass
class Chat:
    messages: List[Dict[str, str]]


@dataclass
class PromptCompletion:
    prompt: str
    completion: str


@dataclass
class Text:
    text: str


Example = Union[Chat, PromptCompletion, Text]


class Formatter:
    def __init__(self, fmt: str, columns: Dict[str, str], role_map: Dict[str, str], system_prompt: Optional[str]):
        self.fmt = fmt
        self.columns = dict(columns)
        self.role_map = {**DEFAULT_ROLE_MAP, **{k: v for k, v in role_map.items()}}
        for src, dst in role_map.items():
            if dst not in ROLES:
                raise ValueError(f"data.role_map.{src}: {dst!r} is not one of {ROLES}")
        self.system_prompt = system_prompt

    def col(self, name: str) -> str:
        return self.columns.get(name, name)

    # ------------------------------------------------------------- helpers
    def _get(self, row: Dict, name: str, required: bool = True, allow_empty: bool = False, expect=None):
        key = self.col(name)
        value = row.get(key) if isinstance(row, dict) else None
        if value is None:
            if required:
                raise RowError(key, "missing_field", f"field '{key}' is missing")
            return None
        if expect is not None and not isinstance(value, expect):
            raise RowError(key, "bad_type", f"field '{key}' must be a {expect.__name__}, not {type(value).__name__}")
        if isinstance(value, str) and not value.strip() and not allow_empty:
            if required:
                raise RowError(key, "empty_field", f"field '{key}' is empty")
            return None
        return value

    def _chat(self, turns: List[Dict[str, str]], field: str, system: Optional[str]) -> Chat:
        if system is None:
            system = self.system_prompt
        if system and (not turns or turns[0]["role"] != "system"):
            turns = [{"role": "system", "content": system}] + turns
        if not any(t["role"] == "assistant" for t in turns):
            raise RowError(field, "no_assistant_turn", f"field '{field}' has no assistant turn to train on")
        for i, t in enumerate(turns):
            if t["role"] == "system" and i != 0:
                raise RowError(f"{field}[{i}]", "bad_role", f"{field}[{i}]: a system message must come first")
        return Chat(turns)

    def _turns(self, raw, field: str, role_key: str, content_key: str) -> List[Dict[str, str]]:
        if not isinstance(raw, list) or not raw:
            raise RowError(field, "missing_field", f"field '{field}' must be a non-empty list of turns")
        turns = []
        for i, turn in enumerate(raw):
            if not isinstance(turn, dict) or role_key not in turn or content_key not in turn:
                raise RowError(
                    f"{field}[{i}]", "missing_field", f"{field}[{i}] needs keys '{role_key}' and '{content_key}'"
                )
            role = self.role_map.get(turn[role_key], turn[role_key])
            if role not in ROLES:
                raise RowError(
                    f"{field}[{i}].{role_key}",
                    "bad_role",
                    f"{field}[{i}].{role_key} is {turn[role_key]!r}, not one of {list(ROLES)}; "
                    "map it with data.role_map",
                )
            content = turn[content_key]
            if not isinstance(content, str):
                raise RowError(f"{field}[{i}].{content_key}", "bad_type", f"{field}[{i}].{content_key} must be a string")
            if role == "assistant" and not content.strip():
                raise RowError(f"{field}[{i}].{content_key}", "empty_response", f"{field}[{i}] is an empty assistant response")
            turns.append({"role": role, "content": content})
        return turns

    # ----------------------------------------------------------- formats
    def __call__(self, row: Dict) -> Example:
        if not isinstance(row, dict):
            raise RowError("<row>", "bad_type", f"row is a {type(row).__name__}, not an object")
        return getattr(self, f"_fmt_{self.fmt}")(row)

    def _fmt_alpaca(self, row: Dict) -> Example:
        instruction = self._get(row, "instruction", expect=str)
        extra = self._get(row, "input", required=False, expect=str)
        output = self._get(row, "output", allow_empty=True, expect=str)
        if not isinstance(output, str) or not output.strip():
            raise RowError(self.col("output"), "empty_response", f"field '{self.col('output')}' is an empty response")
        user = f"{instruction}\n\n{extra}" if extra else instruction
        turns = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return self._chat(turns, self.col("output"), self._get(row, "system", required=False, expect=str))

    def _fmt_sharegpt(self, row: Dict) -> Example:
        field = self.col("conversations")
        turns = self._turns(self._get(row, "conversations"), field, "from", "value")
        return self._chat(turns, field, self._get(row, "system", required=False, expect=str))

    def _fmt_messages(self, row: Dict) -> Example:
        field = self.col("messages")
        turns = self._turns(self._get(row, "messages"), field, "role", "content")
        return self._chat(turns, field, None)

    def _fmt_prompt_completion(self, row: Dict) -> Example:
        prompt = self._get(row, "prompt", allow_empty=True)
        completion = self._get(row, "completion", required=False, allow_empty=True)
        ckey = self.col("completion")
        if completion is None or (isinstance(completion, str) and not completion.strip()):
            raise RowError(ckey, "empty_response", f"field '{ckey}' is missing or empty")
        if isinstance(prompt, list) and isinstance(completion, list):  # conversational
            turns = self._turns(prompt, self.col("prompt"), "role", "content")
            turns += self._turns(completion, ckey, "role", "content")
            return self._chat(turns, ckey, None)
        if not isinstance(prompt, str) or not isinstance(completion, str):
            raise RowError(ckey, "bad_type", "prompt and completion must both be strings or both be message lists")
        return PromptCompletion(prompt, completion)

    def _fmt_text(self, row: Dict) -> Example:
        text = self._get(row, "text")
        if not isinstance(text, str):
            raise RowError(self.col("text"), "bad_type", f"field '{self.col('text')}' must be a string")
        return Text(text)


def example_prompt_and_reference(example: Example):
    """For generation eval: the part the model is given and the expected answer."""
    if isinstance(example, Chat):
        last = max(i for i, t in enumerate(example.messages) if t["role"] == "assistant")
        return example.messages[:last], example.messages[last]["content"]
    if isinstance(example, PromptCompletion):
        return example.prompt, example.completion
    # Text: the model continues the first half of the document.
    words = example.text.split(" ")
    half = max(1, len(words) // 2)
    return " ".join(words[:half]), " ".join(words[half:])
