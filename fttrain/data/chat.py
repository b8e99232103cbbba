"""A chat -> token ids and labels that train exactly the chosen turns, for any chat template.

The trained tokens of a turn are found in this order:

1. ``{% generation %}`` markers, when the template has them (and only
   assistant turns train): the template says itself which text is generated.
2. Otherwise the template is rendered turn by turn. For a trained turn k:

       prompt_k = render(messages[:k], add_generation_prompt=True)
       turn_k   = render(messages[:k+1])
       trained  = turn_k[len(prompt_k):]  cut after its end-of-turn marker

   checked three ways: prompt_k is the start of turn_k (text), turn_k is how the
   whole conversation starts (text), and prompt_k tokenized alone is how the
   conversation's tokens start (token level), i.e. what the model sees at
   inference is what it trains on. (Each prefix of the chat is rendered once,
   and prompt_k is tokenized from its last special token on: ``prompt_tail``.)
   A turn-k span for a ChatML template:

       <|im_start|>user\\nhi<|im_end|>\\n<|im_start|>assistant\\n  hello<|im_end|>  \\n
       '-------------------- prompt_k -----------------------'  '-- trained --'  after EOT: not trained

3. A template that writes earlier turns differently once later turns follow
   (Qwen3 drops earlier ``<think>`` blocks) cannot train every turn in one
   sequence; ``task.history_rewrite`` says what happens: ``split`` (one sample
   per trained turn, each with the history as the template writes it then),
   ``last`` (train the last turn only) or ``raise``. Never silently.

Each trained span ends with its end-of-turn marker (``<|eot_id|>``,
``<|im_end|>``, ``</s>``, ``<end_of_turn>``, ``<|end|>``), so the model learns
to stop; whitespace after it is context. An empty ``<think></think>`` block the
template writes before an answer is not trained unless
``task.train_empty_think``.

Tokens are labelled by their character offsets in the one tokenization of the
whole text, so a sample's ids are exactly what the tokenizer makes of the
rendered conversation. A byte-level BPE tokenizer's offsets are read from its
tokens' bytes, checked against the text (``fttrain.data.byte_offsets``).
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from operator import eq, itemgetter

import json
import re
from dataclasses import dataclass
from functools import cached_property
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import numpy as np

from fttrain.data.byte_offsets import ByteTokens, CharOffsets, offsets_from_bytes
from fttrain.data.formats import Chat, RowError
from fttrain.data.templates import EMPTY_THINK_RE, TemplateError, TemplateInfo, has_generation_markers, render

IGNORE = -100
_start, _end = itemgetter(0), itemgetter(1)
_THINK_BLOCK_RE = re.compile(r"<think>.*?</think>", re.S)


def _batch_backend(tokenizer):
    """A fast tokenizer's own (Rust) tokenizer, when calling it directly gives the wrapper's ids:
    only without truncation or padding left set in tokenizer.json (the wrapper resets those per call)."""
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is not None and hasattr(backend, "encode_batch") and backend.truncation is None \
            and backend.padding is None:
        return backend
    return None


def token_offsets(tokenizer, texts: Sequence[str], byte_tokens: Optional[ByteTokens] = None
                  ) -> List[Tuple[List[int], Sequence[Tuple[int, int]]]]:
    """[(ids, character offsets)] of each text, without special tokens added. A
    fast tokenizer's own batch encoder is called directly: the same ids as the
    Python wrapper's, without its per-call cost (a fifth of the tokenizing time).
    With ``byte_tokens`` (a byte-level BPE tokenizer's table) the offsets are read
    from the tokens' bytes where they match the text (``fttrain.data.byte_offsets``)."""
    backend = _batch_backend(tokenizer)
    if backend is not None and byte_tokens is not None:
        return offsets_from_bytes(byte_tokens, backend, list(texts))
    if backend is not None:
        return [(enc.ids, enc.offsets) for enc in backend.encode_batch(list(texts), add_special_tokens=False)]
    out = []
    fast = bool(getattr(tokenizer, "is_fast", False))  # a Python tokenizer has no character offsets (None)
    for text in texts:
        enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=fast)
        out.append((list(enc["input_ids"]), enc.get("offset_mapping")))
    return out


def token_ids(tokenizer, texts: Sequence[str]) -> List[List[int]]:
    """The ids of each text, as ``token_offsets`` gives them, without the offsets: turning
    those into Python tuples costs a sixth of the tokenizing, and the prompts of the
    token-prefix check need the ids only."""
    backend = _batch_backend(tokenizer)
    if backend is not None:
        # encode_batch_fast (tokenizers >= 0.20.2) is the same encoding without tracking offsets.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        return [enc.ids for enc in encode(list(texts), add_special_tokens=False)]
    return [list(tokenizer(text, add_special_tokens=False)["input_ids"]) for text in texts]


def split_tokens(tokenizer) -> Dict[int, str]:
    """{id: text} of the added tokens a fast tokenizer cuts the raw text at before anything else
    (``normalized=False``, without whitespace stripping or a word-boundary rule). The pieces
    between them are then normalized, pre-tokenized and tokenized each on its own, so the tokens
    of a text that has one at character a are the tokens of text[:a] followed by those of
    text[a:]. Empty when the tokenizer is called through its Python wrapper, and when its
    added-token matcher may drop a match (a ``single_word`` token failing its word test, a
    special token read as plain text): the dropped stretch then goes to the model as text, which
    may give a cut token's id where the text was not cut."""
    backend = _batch_backend(tokenizer)
    if backend is None or not hasattr(backend, "get_added_tokens_decoder"):
        return {}
    added = backend.get_added_tokens_decoder()
    as_text = bool(getattr(backend, "encode_special_tokens", False))
    if any(not t.normalized and (t.single_word or (t.special and as_text)) for t in added.values()):
        return {}
    return {i: t.content for i, t in added.items() if t.content and not (t.normalized or t.lstrip or t.rstrip)}


def prompt_tail(split: Dict[int, str], prompt: str, text: str, ids: List[int], offsets) -> Tuple[List[int], str]:
    """(head, tail): ``prompt`` tokenized alone is ``head`` + the tokens of ``tail``.

    A prompt is how ``text`` (ids and offsets given) starts. Where it holds a token of
    ``split`` (``split_tokens``), the last one at character a, its tokens alone are the
    text's own tokens before that token, then the tokens of prompt[a:]: only that tail
    is tokenized again (a few tokens: "<|end_header_id|>\\n\\n"), not the whole
    conversation before each answer. Without one, the tail is the whole prompt."""
    if not split or offsets is None or not text.startswith(prompt):
        return [], prompt
    n = len(prompt)
    # Offsets run left to right (else the search starts elsewhere: the token found is checked all the same).
    inside = bisect_right(offsets, n, key=_start)
    for j in range(inside - 1, -1, -1):
        a, b = offsets[j]
        content = split.get(ids[j])
        if content is not None and b <= n and text[a:b] == content:
            return list(ids[:j]), prompt[a:]
    return [], prompt


@dataclass(frozen=True)
class MaskPolicy:
    """Which turns of a chat train (task.* knobs of sft)."""

    roles: Tuple[str, ...] = ("assistant",)
    last_turn_only: bool = False
    train_empty_think: bool = False
    history_rewrite: str = "split"  # split | last | raise (fttrain.tasks.HistoryRewrite)


@dataclass
class Labelling:
    """A sample waiting for its tokens: what ``ChatEncoder.plan`` leaves for ``finish``."""

    text: str
    spans: Optional[List[Tuple[int, int]]]  # trained character spans; None: every token trains
    prompts: Sequence[str] = ()  # must tokenize alone as the start of text's tokens


@dataclass
class EncodedChat:
    # (input_ids, labels), several when split per turn; Labelling until finished
    samples: List[Union[Tuple[List[int], List[int]], Labelling]]
    trained_turns: int = 0
    turns_without_end_of_turn: int = 0
    empty_think_masked: int = 0
    split: bool = False  # the template rewrote history: one sample per trained turn


class ChatEncoder:
    def __init__(self, tokenizer, info: TemplateInfo, policy: MaskPolicy = MaskPolicy()):
        self.tok = tokenizer
        self.info = info
        self.split_tokens = split_tokens(tokenizer)
        self.policy = policy
        self.use_markers = has_generation_markers(info.template) and tuple(policy.roles) == ("assistant",)

    @cached_property
    def byte_tokens(self) -> Optional[ByteTokens]:
        """The tokens' bytes, where the offsets can be read from them (a byte-level BPE
        tokenizer); built where first needed: in each worker that labels chats."""
        return ByteTokens.of(_batch_backend(self.tok))

    # ------------------------------------------------------------ public
    # A chat is planned (rendered, checked, its trained spans found), then, with the other chats
    # of its batch tokenized in one call (``Tokenizer.encode_many``), finished (labelled).
    def finish(self, out: EncodedChat, tokens: Callable[[str], Tuple[List[int], list]]) -> EncodedChat:
        """The planned samples labelled, ``tokens(text)`` giving (ids, offsets)."""
        out.samples = [self._labelled(s, tokens) if isinstance(s, Labelling) else s for s in out.samples]
        return out

    def plan(self, chat: Chat) -> EncodedChat:
        """Rendered, checked and spanned, but not yet tokenized: tokenizing a batch
        of chats after rendering them all costs ~12 % less CPU than one by one
        (the tokenizer and the template each stay in the CPU caches)."""
        msgs = chat.messages
        self._check_tools(chat)
        # A message trains if the data says so (train: true), or if its role trains and the data does not forbid it.
        targets = [i for i, m in enumerate(msgs)
                   if chat.train[i] is True or (m["role"] in self.policy.roles and chat.train[i] is not False)]
        if self.policy.last_turn_only:
            targets = targets[-1:]
        if not targets:
            raise RowError(chat.field, "no_trained_turn",
                           f"field '{chat.field}' has no turn to train (roles {list(self.policy.roles)}, "
                           "train flags, task.last_turn_only)")
        use_markers = self.use_markers and all(msgs[k]["role"] == "assistant" for k in targets)
        full, generation = self._render(msgs, track=use_markers, tools=chat.tools)
        self._check_rendered(chat, full)
        out = EncodedChat(samples=[])
        if use_markers:
            spans = self._generation_spans(chat, generation, targets)
            out.samples.append(Labelling(full, [self._trim(chat, k, full, s, e, out) for k, (s, e) in spans]))
            return out
        # The first n messages rendered, by (n, generation prompt): the last turn is the whole chat, and a
        # user turn's prompt is the turn before it, so each is rendered once.
        rendered = {(len(msgs), False): full}
        turns = [self._turn(chat, k, rendered) for k in targets]
        consistent = [full.startswith(turn[:end]) for (_, turn, _, end) in turns]
        if all(consistent):
            spans = [self._trim(chat, k, full, start, end, out) for k, (_, _, start, end) in zip(targets, turns)]
            out.samples.append(Labelling(full, spans, prompts=[p for p, *_ in turns]))
            return out
        first_bad = targets[consistent.index(False)]
        policy = self.policy.history_rewrite
        if policy == "raise" or (policy == "last" and not consistent[-1]):
            raise RowError(f"{chat.field}[{first_bad}]", "template_rewrites_history",
                           f"{chat.field}[{first_bad}]: the chat template writes this turn differently once later "
                           "turns follow (e.g. it drops earlier <think> blocks), so one sequence cannot train every "
                           "turn; set task.history_rewrite=split (one sample per trained turn) or last")
        if policy == "last":
            prompt, _, start, end = turns[-1]
            out.samples.append(Labelling(full, [self._trim(chat, targets[-1], full, start, end, out)],
                                         prompts=[prompt]))
            return out
        out.split = True
        for k, (prompt, turn, start, end) in zip(targets, turns):  # each turn with the history as written before it
            out.samples.append(Labelling(turn, [self._trim(chat, k, turn, start, end, out)], prompts=[prompt]))
        return out

    def plan_everything(self, chat: Chat) -> EncodedChat:
        """task.assistant_only_loss=false: every token of the rendered chat trains."""
        self._check_tools(chat)
        text, _ = self._render(chat.messages, tools=chat.tools)
        self._check_rendered(chat, text)
        return EncodedChat([Labelling(text, None)])

    # ---------------------------------------------------------- rendering
    def _render(self, messages: Sequence[Dict], gen: bool = False, track: bool = False, tools=None):
        try:
            return render(self.tok, self.info.template, messages, add_generation_prompt=gen, tools=tools,
                          track_generation=track)
        except Exception as e:  # jinja's TemplateError, the template's raise_exception, ...
            raise RowError("<chat template>", "template_error", f"the chat template rejected it: {e}") from None

    def _check_tools(self, chat: Chat) -> None:
        """A template without tool support would drop `tools` and tool calls silently."""
        uses_tools = chat.tools or any(m.get("tool_calls") or m["role"] == "tool" for m in chat.messages)
        if uses_tools and not self.info.tool_aware:
            raise RowError(chat.field, "tools_not_rendered",
                           "the row has tools, tool calls or tool results, and the chat template does not write them "
                           "(it never reads `tools` or `tool_calls`); use a template with tool support")

    def _check_rendered(self, chat: Chat, text: str) -> None:
        """Nothing of the row may vanish in rendering: some templates drop a
        system turn, an earlier turn's content or a role they do not know."""
        for i, m in enumerate(chat.messages):
            content = _THINK_BLOCK_RE.sub("", m.get("content") or "").strip()
            if content and content not in text and json.dumps(m["content"], ensure_ascii=False) not in text:
                raise RowError(f"{chat.field}[{i}]", "template_dropped_content",
                               f"{chat.field}[{i}] ({m['role']}) does not appear in the rendered chat: the chat "
                               "template drops it")
            for call in m.get("tool_calls") or []:
                if call["function"]["name"] not in text:
                    raise RowError(f"{chat.field}[{i}].tool_calls", "template_dropped_content",
                                   f"{chat.field}[{i}]: the chat template does not write its tool call "
                                   f"{call['function']['name']!r}")
        for tool in chat.tools or []:
            if tool["function"]["name"] not in text:
                raise RowError("tools", "template_dropped_content",
                               f"tool {tool['function']['name']!r} does not appear in the rendered chat")

    def _first(self, chat: Chat, n: int, gen: bool, rendered: Dict[Tuple[int, bool], str]) -> str:
        """The chat's first n messages rendered (with the generation prompt if ``gen``), once per chat."""
        if (n, gen) not in rendered:
            rendered[n, gen] = self._render(chat.messages[:n], gen=gen, tools=chat.tools)[0]
        return rendered[n, gen]

    def _turn(self, chat: Chat, k: int, rendered: Dict[Tuple[int, bool], str]) -> Tuple[str, str, int, int]:
        """(the text before turn k's trained part, the chat rendered up to turn k,
        where the trained part starts, where turn k's own text ends)."""
        msgs = chat.messages
        gen = msgs[k]["role"] == "assistant"
        turn = self._first(chat, k + 1, False, rendered)
        tail = self.info.closing_tail
        end = len(turn) - len(tail) if tail and turn.endswith(tail) else len(turn)
        try:
            prompt = self._first(chat, k, gen, rendered)
        except RowError:
            if k > 0:
                raise
            prompt = None  # templates that read messages[0] cannot write an empty chat
        if prompt is not None and gen:
            if not turn.startswith(prompt):
                at = next((i for i, (a, b) in enumerate(zip(prompt, turn)) if a != b), min(len(prompt), len(turn)))
                raise RowError(f"{chat.field}[{k}]", "template_prompt_mismatch",
                               f"{chat.field}[{k}]: the chat template's generation prompt is not how it starts the "
                               f"answered turn ({prompt[at:at + 30]!r} vs {turn[at:at + 30]!r}), so the answer cannot "
                               "be told apart from the prompt. Seen with templates whose generation prompt opens a "
                               "<think> block their answered turns drop, and with one that writes the system prompt "
                               "only before a final question; use a .jinja template whose prompt matches its turns")
            return prompt, turn, len(prompt), end
        # A user/system/tool turn, or a first answer with nothing before it: its trained part starts at its content.
        before = prompt[:-len(tail)] if prompt and tail and prompt.endswith(tail) else prompt or ""
        lo = len(before) if turn.startswith(before) else 0
        m = msgs[k]
        for form in ((m.get("content") or "").strip(), json.dumps(m.get("content") or "", ensure_ascii=False)):
            at = turn.rfind(form, lo, end) if form.strip('"') else -1
            if at >= 0:
                return turn[:at], turn, at, end
        raise RowError(f"{chat.field}[{k}]", "turn_not_found",
                       f"{chat.field}[{k}] ({m['role']}): its content is not where the chat template writes the turn, "
                       "so its trained part cannot be found")

    def _generation_spans(self, chat: Chat, spans: List[Tuple[int, int]], targets: List[int]):
        """[(message index or None, span)] of the {% generation %} blocks that train."""
        assistant = [i for i, m in enumerate(chat.messages) if m["role"] == "assistant"]
        if len(spans) == len(assistant):
            wanted = set(targets)
            return [(i, s) for i, s in zip(assistant, spans) if i in wanted]
        if any(f is False for f in chat.train):
            raise RowError(chat.field, "generation_blocks",
                           f"the template has {len(spans)} {{% generation %}} blocks for {len(assistant)} assistant "
                           "turns, so per-message train flags cannot be applied")
        return [(None, s) for s in (spans[-1:] if self.policy.last_turn_only else spans)]

    # ------------------------------------------------------- trained span
    def _trim(self, chat: Chat, k, text: str, start: int, end: int, out: EncodedChat) -> Tuple[int, int]:
        """The span of message k narrowed to what the model generates: an empty
        <think></think> block off its start (unless trained), whitespace after its
        end-of-turn marker off its end. Its reasoning, if it has any, must be in it."""
        if k is not None:
            m = chat.messages[k]
            found = _THINK_BLOCK_RE.search(m.get("content") or "")
            reasoning = (m.get("reasoning_content") or (found.group()[7:-8] if found else "")).strip()
            if reasoning and reasoning not in text[start:end]:
                raise RowError(f"{chat.field}[{k}]", "template_drops_reasoning",
                               f"{chat.field}[{k}] has reasoning the chat template does not write into the trained "
                               "answer, so it would be lost without a word; use a template that writes reasoning "
                               "for the answer it trains (Qwen3-style), or remove it from the data")
        if not self.policy.train_empty_think:
            m = EMPTY_THINK_RE.match(text, start, end)
            if m and m.end() < end:
                start = m.end()
                out.empty_think_masked += 1
        segment = text[start:end]
        end = start + len(segment.rstrip())
        out.trained_turns += 1
        if self.info.ends_turn(segment) is None:
            out.turns_without_end_of_turn += 1
        return start, end

    def _labelled(self, planned: Labelling, tokens: Callable[[str], Tuple[List[int], list]]):
        ids, offsets = tokens(planned.text)
        ids, spans = list(ids), planned.spans
        if spans is None:
            return ids, list(ids)
        if offsets is None:
            raise TemplateError("task.assistant_only_loss=true finds the trained tokens by their character offsets, "
                                "which this (Python, not fast) tokenizer does not give; use the model's fast "
                                "tokenizer (tokenizer.json), or task.assistant_only_loss=false")
        for prompt in planned.prompts:
            if prompt:
                self._check_token_prefix(prompt, ids, tokens(prompt)[0])
        labels = [IGNORE] * len(ids)
        if not spans or not ids:
            return ids, labels
        # A token (characters [a, b)) trains when it overlaps a span; zero-width tokens never train.
        # Offsets run left to right, so each span is one slice of tokens, found by bisection
        # (the checks and the bisection run in C: a tenth of a per-token Python loop).
        if isinstance(offsets, CharOffsets):  # read from the bytes: left to right, none zero-width
            s, e = np.array(spans, dtype=np.int64).T
            for j0, j1 in zip(np.searchsorted(offsets.ends, s, "right").tolist(),
                              np.searchsorted(offsets.starts, e, "left").tolist()):
                labels[j0:j1] = ids[j0:j1]
            return ids, labels
        starts, ends = list(map(_start, offsets)), list(map(_end, offsets))
        zero_width = any(map(eq, starts, ends))
        if zero_width or starts != sorted(starts) or ends != sorted(ends):  # starts and ends both left to right
            return ids, self._labelled_token_by_token(ids, offsets, spans)
        for s, e in spans:
            j0, j1 = bisect_right(ends, s), bisect_left(starts, e)
            labels[j0:j1] = ids[j0:j1]
        return ids, labels

    @staticmethod
    def _labelled_token_by_token(ids, offsets, spans) -> List[int]:
        """The same rule where the bisection cannot be used: zero-width tokens, or
        offsets that do not run left to right."""
        labels = [IGNORE] * len(ids)
        for j, (a, b) in enumerate(offsets):
            if b > a and any(a < e and b > s for s, e in spans):
                labels[j] = ids[j]
        return labels

    def _check_token_prefix(self, prompt: str, ids: List[int], alone: List[int]) -> None:
        """The prompt tokenized alone (what generation starts from) must be how
        the conversation's tokens start: a boundary token that merges prompt and
        answer would train on a tokenization the model never sees."""
        alone = list(alone)
        n = len(alone)
        if ids[:n] == alone:
            return
        at = next((i for i, (a, b) in enumerate(zip(alone, ids)) if a != b), min(n, len(ids)))
        raise RowError("<chat template>", "prompt_not_token_prefix",
                       f"the prompt tokenized alone ends {self.tok.convert_ids_to_tokens(alone[max(0, at - 2):at + 2])}"
                       f" but inside the conversation {self.tok.convert_ids_to_tokens(ids[max(0, at - 2):at + 2])}: "
                       "the boundary between prompt and answer tokenizes differently than at inference")
