"""Examples -> token ids and labels, with the loss mask and the over-length policy.

The label rules, shown for a chat (``.`` = -100, not trained):

    tokens  <bos> <hdr>system ... <eot> <hdr>user ... <eot> <hdr>assistant\\n\\n  c  b  a  <eot>
    labels    .     .   ...      .     .    ...      .        .                  c  b  a  <eot>

* chat: with ``assistant_only_loss`` only tokens inside the template's
  ``{% generation %}`` blocks are trained: assistant turns and their end-of-turn
  token, so the model learns to stop. Otherwise every token is trained.
* prompt/completion: the prompt is masked, the completion and an EOS trained.
* text: every token is trained, and an EOS ends the document.
* the first label of every sample is always -100: no token precedes it, so it
  is never a prediction target. Keeping that explicit makes token counts (and
  so the loss normalisation) identical packed and unpacked.

Labels are built per token here, never from ``input_ids == pad``; a tokenizer
whose pad token is its EOS therefore still trains on EOS.
"""

from __future__ import annotations

from typing import Dict, List, Optional, Tuple

from fttrain.data.formats import Chat, Example, PromptCompletion, Text

IGNORE = -100


class TemplateError(ValueError):
    pass


def has_generation_markers(template: Optional[str]) -> bool:
    import re

    return bool(template) and re.search(r"\{%-?\s*generation\s*-?%\}", template) is not None


class Tokenizer:
    def __init__(self, tokenizer, chat_template: Optional[str], assistant_only_loss: bool):
        self.tok = tokenizer
        self.template = chat_template
        self.assistant_only_loss = assistant_only_loss

    def __call__(self, ex: Example) -> Tuple[List[int], List[int]]:
        if isinstance(ex, Chat):
            ids, labels = self._chat(ex)
        elif isinstance(ex, PromptCompletion):
            ids, labels = self._prompt_completion(ex)
        else:
            ids, labels = self._text(ex)
        if labels:
            labels[0] = IGNORE
        return ids, labels

    def _eos(self) -> List[int]:
        return [self.tok.eos_token_id] if self.tok.eos_token_id is not None else []

    def _chat(self, ex: Chat):
        if not self.template:
            raise TemplateError(
                "chat data needs a chat template: the tokenizer has none. Set data.chat_template to a shipped "
                "template (llama3, chatml) or use a tokenizer that has one."
            )
        out = self.tok.apply_chat_template(
            ex.messages,
            chat_template=self.template,
            tokenize=True,
            return_dict=True,
            return_assistant_tokens_mask=self.assistant_only_loss,
        )
        ids = list(out["input_ids"])
        if not self.assistant_only_loss:
            return ids, list(ids)
        mask = out["assistant_masks"]
        return ids, [t if m else IGNORE for t, m in zip(ids, mask)]

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
    return sum(1 for x in labels if x != IGNORE)


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
