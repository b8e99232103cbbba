"""Generate with a trained model: one prompt, a file of prompts, or a chat.

    python -m fttrain.generate RUN_DIR --prompt "Reverse: a b c"
    python -m fttrain.generate RUN_DIR --prompts prompts.jsonl --out answers.jsonl
    python -m fttrain.generate RUN_DIR --chat
    python -m fttrain.generate BASE --adapter fr=RUN_A --adapter de=RUN_B --use de --prompt "..."

RUN_DIR may be a run directory, its model/ folder, an adapter folder (the
base is the one it names, or --base), or a merged/whole model. A QLoRA
adapter is loaded on its 4-bit base, as it trained (--no-quantized: on the
16-bit base). The chat template is applied with the generation prompt when
the tokenizer has one (--raw: plain text). Sampling: --temperature (0:
greedy), --top-p, --top-k, --max-new-tokens. Single prompts and chat turns
stream to the terminal; a prompts file (JSONL with "prompt" as text or
"messages" as a chat) gives one JSONL line per prompt with "generated".
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Dict, List, Union

import torch

from fttrain.errors import FttrainError, report
from fttrain.models.adapted import DTYPES, LoadError, load_for_inference

Prompt = Union[str, List[Dict[str, str]]]


def prompt_ids(tokenizer, prompt: Prompt, raw: bool) -> List[int]:
    if isinstance(prompt, str) and (raw or not getattr(tokenizer, "chat_template", None)):
        return tokenizer(prompt)["input_ids"]
    messages = [{"role": "user", "content": prompt}] if isinstance(prompt, str) else prompt
    if not getattr(tokenizer, "chat_template", None):
        raise LoadError("the tokenizer has no chat template for chat prompts; pass text prompts with --raw")
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"]


def sampling_kwargs(args) -> dict:
    if args.temperature <= 0:
        return {"do_sample": False}
    return {"do_sample": True, "temperature": args.temperature, "top_p": args.top_p, "top_k": args.top_k}


@torch.no_grad()
def generate_one(model, tokenizer, prompt: Prompt, args, stream: bool = False) -> str:
    from transformers import TextStreamer

    ids = torch.tensor([prompt_ids(tokenizer, prompt, args.raw)], device=next(model.parameters()).device)
    streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
    out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=args.max_new_tokens,
                         pad_token_id=tokenizer.pad_token_id, streamer=streamer, **sampling_kwargs(args))
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


def read_prompts(path: Path) -> List[dict]:
    if not Path(path).is_file():
        raise LoadError(f"--prompts {path}: no such file")
    rows = []
    for i, line in enumerate(path.read_text().splitlines()):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise LoadError(f"{path} line {i + 1}: not JSON ({e})")
        if not isinstance(row, dict) or not ("prompt" in row or "messages" in row):
            raise LoadError(f"{path} line {i + 1}: needs a 'prompt' (text) or 'messages' (chat) field")
        rows.append(row)
    return rows


def chat_loop(model, tokenizer, args, read=input, write=print) -> None:
    """Interactive chat; the history is kept. /reset clears it, /exit or EOF ends."""
    history: List[Dict[str, str]] = []
    if args.system:
        history.append({"role": "system", "content": args.system})
    write("chat: type a message; /reset clears the history, /exit quits")
    while True:
        try:
            text = read("you> ")
        except EOFError:
            break
        if text.strip() in ("/exit", "/quit"):
            break
        if text.strip() == "/reset":
            history = history[:1] if args.system else []
            continue
        history.append({"role": "user", "content": text})
        write("model> ", end="")
        answer = generate_one(model, tokenizer, history, args, stream=True)
        history.append({"role": "assistant", "content": answer})


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fttrain.generate", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    p.add_argument("path", help="run directory, model/adapter folder, or a base model with --adapter")
    p.add_argument("--base", help="base model for an adapter (default: the one it names)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="more peft adapters on the same base (repeat); pick one with --use")
    p.add_argument("--use", help="the adapter to generate with (default: the first)")
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--prompt", help="one prompt, streamed")
    g.add_argument("--prompts", type=Path, help="JSONL of {'prompt': ...} or {'messages': [...]}")
    g.add_argument("--chat", action="store_true", help="interactive chat")
    p.add_argument("--out", type=Path, help="with --prompts: output JSONL (default: stdout)")
    p.add_argument("--system", help="system message for --chat")
    p.add_argument("--raw", action="store_true", help="do not apply the chat template to text prompts")
    p.add_argument("--temperature", type=float, default=0.7, help="0: greedy")
    p.add_argument("--top-p", type=float, default=0.9)
    p.add_argument("--top-k", type=int, default=50)
    p.add_argument("--max-new-tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--no-quantized", action="store_true", help="load a QLoRA adapter on the 16-bit base")
    args = p.parse_args(argv)

    try:
        extra = {}
        for item in args.adapter:
            if "=" not in item:
                raise LoadError(f"--adapter {item!r}: expected NAME=PATH")
            name, path = item.split("=", 1)
            extra[name] = path
        path, extra_adapters = args.path, {}
        if extra:
            # `BASE --adapter a=.. --adapter b=..`: the first adapter is loaded as "default".
            first_name, first_path = next(iter(extra.items()))
            path, args.base = first_path, args.base or args.path
            extra_adapters = {n: v for n, v in list(extra.items())[1:]}
        loaded = load_for_inference(path, base=args.base, dtype=args.dtype,
                                    quantized=False if args.no_quantized else None, extra_adapters=extra_adapters)
        model, tok = loaded.model, loaded.tokenizer
        if extra:
            names = {first_name: "default", **{n: n for n in extra_adapters}}
            use = args.use or first_name
            if use not in names:
                raise LoadError(f"--use {use!r}: loaded adapters are {sorted(names)}")
            model.set_adapter(names[use])
        if not loaded.quantized:
            model.to(args.device)
        torch.manual_seed(args.seed)
        if args.prompt is not None:
            generate_one(model, tok, args.prompt, args, stream=True)
        elif args.chat:
            chat_loop(model, tok, args)
        else:
            rows = read_prompts(args.prompts)
            sink = open(args.out, "w") if args.out else sys.stdout
            try:
                for row in rows:
                    prompt = row.get("messages", row.get("prompt"))
                    sink.write(json.dumps({**row, "generated": generate_one(model, tok, prompt, args)}) + "\n")
                    sink.flush()
            finally:
                if args.out:
                    sink.close()
            if args.out:
                print(f"{len(rows)} generations written to {args.out}", file=sys.stderr)
    except FttrainError as e:
        return report("fttrain.generate", e)
    return 0


if __name__ == "__main__":
    sys.exit(main())
