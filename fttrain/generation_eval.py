"""Greedy generations on held-out prompts, and exact match against references.

Run before and after training, this shows whether the model learnt the task
rather than only lowered its loss. It uses the KV cache (generation is
unpacked), unlike the packed loss evaluation.
"""

from __future__ import annotations

from typing import Dict, List

import torch

from fttrain.data.formats import example_prompt_and_reference


def _prompt_ids(tokenizer, prompt, chat_template, tools=None):
    if isinstance(prompt, list):  # chat messages up to the answer, with the row's tools as in training
        return tokenizer.apply_chat_template(
            prompt, chat_template=chat_template, tools=tools, add_generation_prompt=True, tokenize=True,
            return_dict=True,
        )["input_ids"]
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


@torch.no_grad()
def generate_answers(model, tokenizer, chat_template, examples: Dict[int, object], limit: int, max_new_tokens: int,
                     batch_size: int = 32, synced_gpus: bool = False) -> List[Dict]:
    """synced_gpus: every rank runs this with the same prompts and keeps
    stepping until all are done (needed when weights are sharded)."""
    items = []
    for row_id in sorted(examples)[:limit]:
        prompt, reference = example_prompt_and_reference(examples[row_id])
        if prompt is None:
            continue
        tools = getattr(examples[row_id], "tools", None)
        items.append((row_id, prompt, reference, _prompt_ids(tokenizer, prompt, chat_template, tools)))
    if not items:
        return []
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    eos = model.generation_config.eos_token_id if model.generation_config.eos_token_id is not None else tokenizer.eos_token_id
    out = []
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        width = max(len(x[3]) for x in chunk)
        # Left padding so every prompt ends where generation starts.
        ids = torch.full((len(chunk), width), tokenizer.pad_token_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for i, (_, _, _, p) in enumerate(chunk):
            ids[i, width - len(p):] = torch.tensor(p)
            mask[i, width - len(p):] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            use_cache=True,
            eos_token_id=eos,
            pad_token_id=tokenizer.pad_token_id,
            synced_gpus=synced_gpus,
        )
        for (row_id, prompt, reference, _), seq in zip(chunk, gen[:, width:]):
            text = tokenizer.decode(seq, skip_special_tokens=True).strip()
            out.append({
                "row": row_id,
                "prompt": prompt,
                "reference": reference,
                "generated": text,
                "exact_match": text == str(reference).strip(),
            })
    if was_training:
        model.train()
    return out


def exact_match(results: List[Dict]) -> float:
    return sum(r["exact_match"] for r in results) / len(results) if results else 0.0
