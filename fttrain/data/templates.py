"""Which chat template a run trains with, and what fttrain learns about it before any row.

    data.chat_template   "tokenizer"      the model's own template (the default)
                         a shipped name   fttrain/data/templates/<name>.jinja (llama3, chatml)
                         a path           any .jinja file

The template chosen here is the one the run trains with *and* the one saved
with the model (``tokenizer.chat_template``), so inference prompts in the
format the model was trained on.

``TemplateInfo`` probes the template once with a short made-up conversation:

* its end-of-turn marker: the text it writes after an assistant's content
  (``<|eot_id|>``, ``<|im_end|>``, ``</s>``, ``<end_of_turn>``, ``<|end|>``);
* its closing tail: text it writes only at the very end of a conversation
  (Phi-3 appends EOS there), which is not part of the last turn;
* its turn markers (``<|im_start|>``, ``[INST]``, ...): each must be one token of
  this tokenizer, or a sequence the tokenizer's own template also writes. A
  marker that falls apart into plain-text pieces (``<|im_end|>`` in a Mistral
  vocabulary is six tokens) means the template does not belong to the model.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from fttrain.errors import FttrainError

TEMPLATE_DIR = Path(__file__).resolve().parent / "templates"
TOKENIZER = "tokenizer"

# End-of-turn markers of the common families; the probe adds the template's own.
KNOWN_END_OF_TURN = ("<|eot_id|>", "<|eom_id|>", "<|im_end|>", "</s>", "<end_of_turn>", "<|end|>", "<|endoftext|>",
                     "<|end_of_text|>", "<｜end▁of▁sentence｜>", "<eos>", "<|return|>")
# What a turn marker looks like: <|...|>, <｜...｜>, <tag> / </tag>, [INST] / [/INST].
MARKER_RE = re.compile(r"<\|[^<>|\s]{1,40}\|>|<｜[^<>｜]{1,40}｜>|</?[A-Za-z_][A-Za-z0-9_]{0,30}>|\[/?[A-Z_]{2,24}\]")
EMPTY_THINK_RE = re.compile(r"\s*<think>\s*</think>\s*")
_PROBE = ("fttrain probe question", "fttrain probe answer", "fttrain probe system")


class TemplateError(FttrainError, ValueError):
    """The chat template cannot be used as configured; the message says what to change."""


def shipped_templates() -> List[str]:
    return sorted(p.stem for p in TEMPLATE_DIR.glob("*.jinja"))


def is_template_path(name: str) -> bool:
    return name.endswith((".jinja", ".j2")) or os.sep in name or "/" in name


def template_choice_problem(name: str) -> Optional[str]:
    """For the config check (before the tokenizer loads): a problem with data.chat_template, or None."""
    if name == TOKENIZER or name in shipped_templates():
        return None
    if is_template_path(name):
        return None if os.path.isfile(name) else f"data.chat_template={name!r}: no such file"
    return (f"data.chat_template={name!r}: not 'tokenizer' (the model's own), a shipped template "
            f"{shipped_templates()}, nor a path to a .jinja file")


def own_template(tokenizer) -> Optional[str]:
    """The tokenizer's own template; of a set of named ones, "default"."""
    t = getattr(tokenizer, "chat_template", None)
    if isinstance(t, dict):
        return t.get("default")
    return t


def resolve_chat_template(name: str, tokenizer) -> Optional[str]:
    """The template text for data.chat_template (None: the tokenizer has none)."""
    if name == TOKENIZER:
        return own_template(tokenizer)
    if name in shipped_templates():
        return (TEMPLATE_DIR / f"{name}.jinja").read_text()
    if is_template_path(name) and os.path.isfile(name):
        return Path(name).read_text()
    raise TemplateError(template_choice_problem(name) or f"data.chat_template={name!r}")


def has_generation_markers(template: Optional[str]) -> bool:
    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


def normalize_messages(messages: Sequence[Dict]) -> List[Dict]:
    """As transformers does before rendering: keys whose value is None are dropped."""
    return [{k: v for k, v in m.items() if v is not None} for m in messages]


def render(tokenizer, template: str, messages: Sequence[Dict], add_generation_prompt: bool = False,
           tools: Optional[list] = None, track_generation: bool = False) -> Tuple[str, List[Tuple[int, int]]]:
    """(text, character spans of {% generation %} blocks): the template rendered as
    tokenizer.apply_chat_template renders it, special-token names included."""
    from transformers.utils.chat_template_utils import render_jinja_template

    texts, spans = render_jinja_template(
        conversations=[normalize_messages(messages)], tools=tools, chat_template=template,
        return_assistant_tokens_mask=track_generation, add_generation_prompt=add_generation_prompt,
        **tokenizer.special_tokens_map,
    )
    return texts[0], (spans[0] if track_generation else [])


def _marker_boundary(text: str, at: int) -> int:
    """``at`` moved back to the start of a turn marker it would cut in two."""
    for m in MARKER_RE.finditer(text):
        if m.start() < at < m.end():
            return m.start()
    return at


def common_prefix_length(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


@dataclass
class TemplateInfo:
    """What the probe found out about a template; read by the chat encoder and the checks."""

    template: str
    end_of_turn: Tuple[str, ...]  # markers an assistant turn ends with, longest first
    closing_tail: str = ""  # written only after the last message of a conversation
    markers: Tuple[str, ...] = ()  # turn markers the template writes around messages
    probe_error: Optional[str] = None  # the template rejected the probe conversation
    tool_aware: bool = False  # the template reads `tools` / `tool_calls`

    @classmethod
    def probe(cls, tokenizer, template: str) -> "TemplateInfo":
        question, answer, system = _PROBE
        one = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
        two = one + [{"role": "user", "content": question + " 2"}, {"role": "assistant", "content": answer + " 2"}]
        error, suffix, tail, scaffold = None, "", "", ""
        try:
            first, _ = render(tokenizer, template, one)
            both, _ = render(tokenizer, template, two)
            # What follows the answer when the conversation ends there, and when
            # it goes on: their common start is the turn's own end (the
            # end-of-turn marker and a newline), the rest of the first is the
            # conversation's closing tail (Phi-3 writes EOS there).
            after_last = first[first.rfind(answer) + len(answer):]
            after_turn = both[both.find(answer) + len(answer):]
            shared = _marker_boundary(after_last, common_prefix_length(after_last, after_turn))
            first = MARKER_RE.match(after_last.lstrip())
            ends = set(KNOWN_END_OF_TURN) | {tokenizer.eos_token}
            if not after_last[:shared].strip() and first and first.group() in ends:
                # The last answer ends with another marker than the others (gpt-oss: <|return|>
                # vs <|end|>): still the end of that turn, not a tail after it.
                shared = len(after_last) - len(after_last.lstrip()) + first.end()
            suffix, tail = after_last[:shared].strip(), after_last[shared:]
            scaffold = both + "\0" + render(tokenizer, template, one[:1], add_generation_prompt=True)[0]
            try:  # a system turn too, where the template takes one (Gemma refuses it)
                with_system, _ = render(tokenizer, template, [{"role": "system", "content": system}] + one)
                scaffold += "\0" + with_system
            except Exception:
                pass
        except Exception as e:  # the template's raise_exception or a jinja error
            error = str(e)
        for text in (question + " 2", answer + " 2", question, answer, system):
            scaffold = scaffold.replace(text, "\0")
        markers = tuple(dict.fromkeys(MARKER_RE.findall(scaffold)))
        candidates = set(KNOWN_END_OF_TURN)
        if tokenizer.eos_token:
            candidates.add(tokenizer.eos_token)
        present = {m for m in candidates if m in template or m == tokenizer.eos_token or m == suffix}
        if suffix:
            present.add(suffix)
        end_of_turn = tuple(sorted(present, key=len, reverse=True))
        tool_aware = bool(re.search(r"\btools\b|\btool_calls\b", template))
        return cls(template, end_of_turn, tail, markers, error, tool_aware)

    # ------------------------------------------------------------ checks
    def split_markers(self, tokenizer) -> List[Tuple[str, List[str]]]:
        """Turn markers this tokenizer splits into several tokens that its own
        template does not write either: (marker, the pieces it becomes)."""
        own = own_template(tokenizer) or ""
        out = []
        for marker in self.markers:
            ids = tokenizer(marker, add_special_tokens=False)["input_ids"]
            if len(ids) > 1 and marker not in own:
                out.append((marker, tokenizer.convert_ids_to_tokens(ids)))
        return out

    def ends_turn(self, text: str) -> Optional[str]:
        """The end-of-turn marker ``text`` ends with (after trailing whitespace), or None."""
        s = text.rstrip()
        for m in self.end_of_turn:
            if s.endswith(m):
                return m
        return None


def check_template_fits(tokenizer, info: TemplateInfo, allow_split_markers: bool) -> List[str]:
    """Problems that make a template wrong for this tokenizer, each with the fix."""
    problems = []
    if info.probe_error:
        problems.append(f"the chat template rejects a plain user/assistant conversation: {info.probe_error}")
    split = [] if allow_split_markers else info.split_markers(tokenizer)
    if split:
        shown = "; ".join(f"{m!r} -> {len(p)} tokens {p}" for m, p in split[:4])
        problems.append(
            f"the chat template writes turn markers this tokenizer does not know as tokens ({shown}), and the "
            "model's own template does not write them either: the model would learn a format it is never served "
            "with. Use the model's own template (data.chat_template=tokenizer), a .jinja file in its format, or, "
            "for a base model learning a new format, data.allow_split_markers=true")
    if not info.end_of_turn:
        problems.append("the chat template ends assistant turns with no end-of-turn marker and the tokenizer has no "
                        "EOS: the model could never learn to stop")
    return problems


def describe_choice(name: str, template: Optional[str], tokenizer) -> Tuple[str, bool]:
    """(one line for the start-up log, whether the template differs from the model's own one)."""
    own = own_template(tokenizer)
    source = "the model's own" if name == TOKENIZER else (f"shipped {name!r}" if name in shipped_templates() else name)
    if name == TOKENIZER or template == own:
        return f"chat template: {source}", False
    if own is None:
        return f"chat template: {source} (the model has none of its own)", False
    return f"chat template: {source}, which DIFFERS from the model's own", True
