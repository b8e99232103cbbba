"""Examples -> token ids and labels, with the loss mask and the over-length policy.

The label rules, shown for a chat (``.`` = -100, not trained):

    tokens  <bos> <hdr>system ... <eot> <hdr>user ... <eot> <hdr>assistant\\n\\n  c  b  a  <eot>
    labels    .     .   ...      .     .    ...      .        .                  c  b  a  <eot>

* chat: with ``assistant_only_loss`` the trained turns (assistant by default)
  and their end-of-turn token train, found for any chat template
  (``fttrain.data.chat``); otherwise every token trains.
* prompt/completion: the prompt is masked, the completion and an EOS trained.
* text: every token is trained, and an EOS ends the document.
* the first label of every sample is always -100: no token precedes it, so it
  is never a prediction target. Keeping that explicit makes token counts (and
  so the loss normalisation) identical packed and unpacked.

Labels are built per token here, never from ``input_ids == pad``; a tokenizer
whose pad token is its EOS therefore still trains on EOS.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple, Union

from fttrain.data.chat import IGNORE, ChatEncoder, EncodedChat, Labelling, MaskPolicy, prompt_tail, token_ids, \
    token_offsets
from fttrain.data.formats import Chat, Example, PromptCompletion, RowError, Text
from fttrain.data.templates import TemplateError, TemplateInfo


class Tokenizer:
    """One example -> one or more (input_ids, labels) samples (several when a
    chat is split per turn, see ``MaskPolicy.history_rewrite``)."""

    def __init__(self, tokenizer, chat_template: Optional[str], assistant_only_loss: bool,
                 policy: MaskPolicy = MaskPolicy(), info: Optional[TemplateInfo] = None):
        self.tok = tokenizer
        self.template = chat_template
        self.assistant_only_loss = assistant_only_loss
        self.info = info or (TemplateInfo.probe(tokenizer, chat_template) if chat_template else None)
        self.chats = ChatEncoder(tokenizer, self.info, policy) if self.info else None

    def encode(self, ex: Example) -> EncodedChat:
        out = self.encode_many([ex])[0]
        if isinstance(out, RowError):
            raise out
        return out

    def encode_many(self, examples: Sequence[Example]) -> List[Union[EncodedChat, RowError]]:
        """Each example's samples, or the RowError that rejected it. Chats are
        rendered first and tokenized together (one batch call), then labelled."""
        planned = []
        for ex in examples:
            try:
                planned.append(self._chat(ex) if isinstance(ex, Chat) else self._other(ex))
            except RowError as e:
                planned.append(e)
        # Offsets are read only to label a text with trained spans; unmasked texts need ids only.
        # A prompt (of the token-prefix check) is tokenized from its last special token on, the
        # tokens before it taken from the chat it starts (chat.prompt_tail).
        spanned, ids_only, prompts = {}, {}, {}
        for out in planned:
            for s in out.samples if isinstance(out, EncodedChat) else ():
                if isinstance(s, Labelling):
                    (spanned if s.spans is not None else ids_only)[s.text] = None
                    for prompt in filter(None, s.prompts):
                        prompts.setdefault(prompt, s.text)
        tokens = dict(zip(spanned, token_offsets(self.tok, list(spanned), self.chats.byte_tokens))) \
            if spanned else {}
        split = {prompt: prompt_tail(self.chats.split_tokens, prompt, text, *tokens.get(text, ([], None)))
                 for prompt, text in prompts.items() if prompt not in tokens}
        ids_only = [t for t in ids_only if t not in tokens]
        plain = list(dict.fromkeys([*ids_only, *(tail for _, tail in split.values())]))
        plain_ids = dict(zip(plain, token_ids(self.tok, plain))) if plain else {}
        tokens.update((t, (plain_ids[t], None)) for t in ids_only)
        tokens.update((prompt, (head + list(plain_ids[tail]), None)) for prompt, (head, tail) in split.items())
        results = []
        for out in planned:
            if isinstance(out, EncodedChat):
                try:
                    out = self.chats.finish(out, tokens.__getitem__) if self.chats else out
                except RowError as e:
                    out = e
                else:
                    for _, labels in out.samples:
                        if labels:
                            labels[0] = IGNORE
            results.append(out)
        return results

    def __call__(self, ex: Example) -> Tuple[List[int], List[int]]:
        """The one sample of an example (tests and tools; the pipeline uses encode)."""
        samples = self.encode(ex).samples
        if len(samples) != 1:
            raise ValueError(f"the example became {len(samples)} samples; use Tokenizer.encode")
        return samples[0]

    def _eos(self) -> List[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _other(self, ex: Example) -> EncodedChat:
        if isinstance(ex, PromptCompletion):
            return EncodedChat([self._prompt_completion(ex)])
        return EncodedChat([self._text(ex)])

    def _chat(self, ex: Chat) -> EncodedChat:
        """Planned only: ``encode_many`` tokenizes and labels it."""
        if self.chats is None:
            raise TemplateError(
                "chat data needs a chat template: the tokenizer has none. Set data.chat_template to a shipped "
                "template (llama3, chatml) or a .jinja file in the model's format."
            )
        if self.assistant_only_loss:
            return self.chats.plan(ex)
        return self.chats.plan_everything(ex)

    def _prompt_completion(self, ex: PromptCompletion):
        prompt = self.tok(ex.prompt, add_special_tokens=True)["input_ids"]
        completion = self.tok(ex.completion, add_special_tokens=False)["input_ids"] + self._eos()
        ids = prompt + completion
        if self.assistant_only_loss:
            return ids, [IGNORE] * len(prompt) + completion
        return ids, list(ids)

    def _text(self, ex: Text):
        ids = self.tok(ex.text, add_special_tokens=True)["input_ids"]
        if not ids or ids[-1] != self.tok.eos_token_id:
            ids = ids + self._eos()
        return ids, list(ids)


def count_trained(labels: List[int]) -> int:
    return len(labels) - labels.count(IGNORE)


def apply_overlength(ids: List[int], labels: List[int], max_length: int, policy: str) -> Tuple[Optional[Dict], str]:
    """Returns (sample or None, outcome) with outcome one of
    kept | truncated | overlength (dropped) | no_trained_tokens (dropped) | raise."""
    outcome = "kept"
    if len(ids) > max_length:
        if policy == "raise":
            return None, "raise"
        if policy == "drop":
            return None, "overlength"
        ids, labels = ids[:max_length], labels[:max_length]
        outcome = "truncated"
    if count_trained(labels) == 0:
        return None, "no_trained_tokens"
    return {"input_ids": ids, "labels": labels}, outcome
