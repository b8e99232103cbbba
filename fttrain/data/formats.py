"""Turn raw rows of each supported format into one of three example kinds.

    alpaca             {instruction, input?, output, system?, history?}   -> Chat
    sharegpt           {conversations: [{from, value}], system?, tools?}  -> Chat
    messages           {messages: [{role, content}], tools?}              -> Chat
    prompt_completion  {prompt, completion}                               -> PromptCompletion
                       (lists of messages in both fields                  -> Chat, completion trained)
    text               {text}                                             -> Text

Turns are read the same way in every format (and by the preference rows of
``preference.py``): a turn is ``{role, content}`` or ``{from, value}``, whichever
keys it has (``data.columns.role`` / ``data.columns.content`` name others).
Roles are mapped to system / user / assistant / tool by ``data.role_map``
on top of the usual names (human, gpt, model, observation, ipython, ...).

Tool calls, in the two layouts people have:

    OpenAI             assistant {content, tool_calls: [{type: function, function: {name, arguments}}]},
                       {role: tool, content, tool_call_id?, name?}
    LLaMA-Factory      {from: function_call, value: '{"name": ..., "arguments": ...}'}  (trained)
    / Glaive           {from: observation, value: ...}                                   (a tool result, masked)

Both become HF's form (assistant ``tool_calls`` with ``arguments`` as an object,
``tool`` result turns), and a ``tools`` column (a JSON schema list, or its JSON
string) is passed to the chat template.

A message may carry ``train: false`` (or the key named by ``data.columns.train``):
it stays in the context and is not trained.

Each converter checks its row and raises ``RowError(field, reason, message)``
naming the field; the caller adds the file and row index. Column names can be
remapped with ``data.columns`` and role names with ``data.role_map``.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Tuple, Union

ROLES = ("system", "user", "assistant", "tool")
TOOL_CALL = "tool_call"  # a turn whose content is a call (LLaMA-Factory's function_call): an assistant message
DEFAULT_ROLE_MAP = {
    "human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant",
    "observation": "tool", "function": "tool", "ipython": "tool", "function_call": TOOL_CALL,
}
# Keys of a message that chat templates read besides role and content.
MESSAGE_EXTRAS = ("tool_calls", "tool_call_id", "name", "reasoning_content")
# Formats whose every field is text (or turns of text): their CSV columns are read as strings.
# The others hold labels, ids, offsets or reward columns whose CSV types matter.
TEXT_FORMATS = ("alpaca", "sharegpt", "messages", "prompt_completion", "text", "preference")
PLACEHOLDER_RE = re.compile(r"\{\{\s*[A-Za-z_][\w.]*\s*\}\}")


class RowError(ValueError):
    def __init__(self, field: str, reason: str, message: str):
        super().__init__(message)
        self.field, self.reason = field, reason


@dataclass
class Chat:
    messages: List[Dict]
    tools: Optional[List[Dict]] = None
    # Per message: False keeps it out of the loss (the data's `train: false`); None: the role decides.
    train: List[Optional[bool]] = field(default_factory=list)
    field: str = "messages"  # the column the turns came from, for errors

    def __post_init__(self):
        if not self.train:
            self.train = [None] * len(self.messages)

    def role_pattern(self) -> str:
        """e.g. "system,user,assistant(tool_calls),tool,assistant", for one preflight sample per pattern."""
        return ",".join(m["role"] + ("(tool_calls)" if m.get("tool_calls") else "") for m in self.messages)


@dataclass
class PromptCompletion:
    prompt: str
    completion: str


@dataclass
class Text:
    text: str


Example = Union[Chat, PromptCompletion, Text]


def placeholders(value) -> List[str]:
    """Template placeholders ({{name}}) left in a row's strings: a sign of an unfilled prompt template."""
    if isinstance(value, str):
        return PLACEHOLDER_RE.findall(value) if "{{" in value else []
    if isinstance(value, dict):
        return [p for v in value.values() for p in placeholders(v)]
    if isinstance(value, (list, tuple)):
        return [p for v in value for p in placeholders(v)]
    return []


# ------------------------------------------------------------------ tools
def _json_value(value, field: str, what: str):
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError as e:
            raise RowError(field, "bad_json", f"{field}: {what} is not valid JSON ({e.msg})") from None
    return value


def normalize_tools(value, field: str) -> Optional[List[Dict]]:
    """A tools column -> [{type: function, function: {name, description, parameters}}]."""
    value = _json_value(value, field, "the tool list")
    if value in (None, "", []):
        return None
    if isinstance(value, dict):
        value = [value]
    if not isinstance(value, list):
        raise RowError(field, "bad_type", f"field '{field}' must be a list of tool schemas")
    tools = []
    for i, tool in enumerate(value):
        if isinstance(tool, dict) and isinstance(tool.get("function"), dict) and "name" in tool["function"]:
            tools.append({"type": tool.get("type", "function"), "function": tool["function"]})
        elif isinstance(tool, dict) and "name" in tool:
            tools.append({"type": "function", "function": tool})
        else:
            raise RowError(f"{field}[{i}]", "bad_type", f"{field}[{i}] is not a tool schema (needs a 'name')")
    return tools


def normalize_tool_calls(value, field: str) -> List[Dict]:
    """One call or a list, as objects or their JSON string, OpenAI or LLaMA-Factory
    shaped -> [{type: function, function: {name, arguments: {...}}, id?}]."""
    value = _json_value(value, field, "the tool call")
    calls = value if isinstance(value, list) else [value]
    out = []
    for i, call in enumerate(calls):
        where = f"{field}[{i}]" if isinstance(value, list) else field
        fn = call.get("function") if isinstance(call, dict) and isinstance(call.get("function"), dict) else call
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str) or not fn["name"]:
            raise RowError(where, "bad_tool_call", f"{where}: a tool call needs a 'name'")
        args = fn.get("arguments", fn.get("parameters", {}))
        if isinstance(args, str):
            try:
                args = json.loads(args) if args.strip() else {}
            except json.JSONDecodeError:
                pass  # kept as the string it is; templates print it as given
        entry = {"type": "function", "function": {"name": fn["name"], "arguments": args}}
        if isinstance(call, dict) and call.get("id"):
            entry["id"] = call["id"]
        out.append(entry)
    if not out:
        raise RowError(field, "bad_tool_call", f"{field}: an empty list of tool calls")
    return out


# ------------------------------------------------------------------ turns
class TurnReader:
    """Turns -> messages in HF's form, with their train flags; shared by the SFT
    formats and the preference rows."""

    def __init__(self, columns: Dict[str, str], role_map: Dict[str, str]):
        self.columns = dict(columns)
        self.role_map = {**DEFAULT_ROLE_MAP, **dict(role_map)}
        allowed = ROLES + (TOOL_CALL,)
        for src, dst in dict(role_map).items():
            if dst not in allowed:
                raise ValueError(f"data.role_map.{src}: {dst!r} is not one of {list(allowed)}")

    def col(self, name: str) -> str:
        return self.columns.get(name, name)

    def keys_of(self, turn: Dict) -> Tuple[str, str]:
        """(role key, content key) of one turn: data.columns.role/content, else role/content or from/value."""
        if "role" in self.columns or "content" in self.columns:
            return self.col("role"), self.col("content")
        if "from" in turn and "role" not in turn:
            return "from", "value"
        return "role", "content"

    def turn(self, turn, where: str) -> Tuple[Dict, Optional[bool]]:
        if not isinstance(turn, dict):
            raise RowError(where, "missing_field", f"{where} needs keys 'role' and 'content' (or 'from' and 'value')")
        role_key, content_key = self.keys_of(turn)
        has_calls = bool(turn.get("tool_calls") or turn.get("function_call"))
        if role_key not in turn or (content_key not in turn and not has_calls):
            raise RowError(where, "missing_field", f"{where} needs keys '{role_key}' and '{content_key}'")
        source = turn[role_key]
        role = self.role_map.get(source, source)
        if role not in ROLES + (TOOL_CALL,):
            raise RowError(f"{where}.{role_key}", "bad_role",
                           f"{where}.{role_key} is {source!r}, not one of {list(ROLES)}; map it with data.role_map")
        content = turn.get(content_key)
        message: Dict = {"role": role}
        if role == TOOL_CALL:  # the content is the call itself
            message = {"role": "assistant", "content": "",
                       "tool_calls": normalize_tool_calls(content, f"{where}.{content_key}")}
        else:
            if content is None:
                content = ""
            if role == "tool" and isinstance(content, (dict, list)):  # a structured tool result
                content = json.dumps(content, ensure_ascii=False)
            if not isinstance(content, str):
                raise RowError(f"{where}.{content_key}", "bad_type", f"{where}.{content_key} must be a string")
            message["content"] = content
            calls = turn.get("tool_calls") or turn.get("function_call")  # OpenAI's current and legacy keys
            if calls and role == "assistant":
                message["tool_calls"] = normalize_tool_calls(calls, f"{where}.tool_calls")
        for key in MESSAGE_EXTRAS:
            if key != "tool_calls" and turn.get(key) is not None:
                message[key] = turn[key]
        if message["role"] == "assistant" and not message["content"].strip() and not message.get("tool_calls") \
                and not message.get("reasoning_content"):
            raise RowError(f"{where}.{content_key}", "empty_response", f"{where} is an empty assistant response")
        flag = turn.get(self.col("train"), turn.get("training"))
        if flag is not None and not isinstance(flag, bool):
            raise RowError(f"{where}.{self.col('train')}", "bad_type", f"{where}.{self.col('train')} must be true or false")
        return message, flag

    def turns(self, raw, field: str) -> Tuple[List[Dict], List[Optional[bool]]]:
        if isinstance(raw, dict):  # one turn object (a chosen/rejected answer)
            raw = [raw]
        if not isinstance(raw, list) or not raw:
            raise RowError(field, "missing_field", f"field '{field}' must be a non-empty list of turns")
        messages, flags = [], []
        for i, t in enumerate(raw):
            m, f = self.turn(t, f"{field}[{i}]")
            messages.append(m)
            flags.append(f)
        return messages, flags


class Formatter(TurnReader):
    def __init__(self, fmt: str, columns: Dict[str, str], role_map: Dict[str, str], system_prompt: Optional[str]):
        super().__init__(columns, role_map)
        self.fmt = fmt
        self.system_prompt = system_prompt

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

    def _chat(self, turns: List[Dict], field: str, system: Optional[str], row: Dict,
              flags: Optional[List[Optional[bool]]] = None) -> Chat:
        flags = list(flags) if flags else [None] * len(turns)
        if system is None:
            system = self.system_prompt
        if system and (not turns or turns[0]["role"] != "system"):
            turns, flags = [{"role": "system", "content": system}] + turns, [None] + flags
        if not any(t["role"] == "assistant" for t in turns):
            raise RowError(field, "no_assistant_turn", f"field '{field}' has no assistant turn to train on")
        for i, t in enumerate(turns):
            if t["role"] == "system" and i != 0:
                raise RowError(f"{field}[{i}]", "bad_role", f"{field}[{i}]: a system message must come first")
        tools = normalize_tools(row.get(self.col("tools")), self.col("tools")) if isinstance(row, dict) else None
        return Chat(turns, tools, flags, field)

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
        turns = []
        history = self._get(row, "history", required=False, expect=list) or []  # LLaMA-Factory: [[query, answer], ...]
        for i, pair in enumerate(history):
            if not (isinstance(pair, (list, tuple)) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise RowError(f"{self.col('history')}[{i}]", "bad_type",
                               f"{self.col('history')}[{i}] must be a [query, answer] pair of strings")
            turns += [{"role": "user", "content": pair[0]}, {"role": "assistant", "content": pair[1]}]
        turns += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
        return self._chat(turns, self.col("output"), self._get(row, "system", required=False, expect=str), row)

    def _fmt_sharegpt(self, row: Dict) -> Example:
        field = self.col("conversations")
        turns, flags = self.turns(self._get(row, "conversations"), field)
        return self._chat(turns, field, self._get(row, "system", required=False, expect=str), row, flags)

    def _fmt_messages(self, row: Dict) -> Example:
        field = self.col("messages")
        turns, flags = self.turns(self._get(row, "messages"), field)
        return self._chat(turns, field, None, row, flags)

    def _fmt_prompt_completion(self, row: Dict) -> Example:
        prompt = self._get(row, "prompt", allow_empty=True)
        completion = self._get(row, "completion", required=False, allow_empty=True)
        ckey = self.col("completion")
        if completion is None or (isinstance(completion, str) and not completion.strip()):
            raise RowError(ckey, "empty_response", f"field '{ckey}' is missing or empty")
        if isinstance(prompt, list) and isinstance(completion, (list, dict)):  # conversational
            turns, _ = self.turns(prompt, self.col("prompt"))
            answer, answer_flags = self.turns(completion, ckey)
            # Only the completion trains: assistant turns inside the prompt are context.
            flags = [False] * len(turns) + answer_flags
            return self._chat(turns + answer, ckey, None, row, flags)
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
