"""Every GPU check of fttrain's speed paths in one run, one table (run by gpu_check.sh).

    python benchmarks/gpu_check.py [--dry-run] [--budget-seconds 420] [--out DIR]

On a GPU: a random-init Llama-shaped model of about 1.2B parameters (hidden
2048, 16 layers, 128,256 vocabulary, bf16), packed variable-length chats at
sequence 2048, 20 optimizer steps per variant through ``fttrain bench``:

    lora sdpa / flex_attention / flash_attention_2 (if flash-attn is installed)
    full sdpa
    lora loss chunked                     (trainer.loss=chunked)
    lora liger (loss + kernels)           (trainer.loss=liger trainer.liger_kernels=true, if liger-kernel imports)
    lora loss cce                         (trainer.loss=cce, if cut-cross-entropy imports)
    lora compiled                         (trainer.compile=true)
    qlora nf4                             (if bitsandbytes imports)
    trl defaults                          (TRL SFTTrainer, the same model and data)
    full zero3 / fsdp at world size 1     (if deepspeed imports, for zero3)

and for each fttrain row ``fttrain estimate``'s peak beside the measured
``max_memory_allocated`` (the error in percent). Checks run in that order
until the budget is spent; a check that fails prints its error in the table
and the rest go on.

--dry-run: the same plumbing on CPU with the tiny model and 3 steps, the
GPU-only checks listed as skipped (the CPU suite's smoke test).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

GPU_MODEL = dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                 num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096)


def importable(name: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(name) is not None


def build_model(folder: Path) -> Path:
    """A random-init Llama of GPU_MODEL's shape with the tiny tokenizer (its
    ids are a few hundred of the 128k rows: the lm_head and logits are full size)."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from fttrain.config.schema import TinyModelConfig
    from fttrain.models.tiny import tiny_model_dir

    if (folder / "config.json").exists():
        return folder
    tiny = tiny_model_dir(TinyModelConfig())
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny)
    config = LlamaConfig(**GPU_MODEL, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def checks(dry: bool):
    """(name, fttrain overrides, bench variants, runs only if)"""
    full = ["peft=full", "trainer.learning_rate=1e-5"]
    yield "lora sdpa", [], ["fttrain"], True
    yield "lora flex_attention", ["model.attn_implementation=flex_attention"], ["fttrain"], not dry
    yield "lora flash_attention_2", ["model.attn_implementation=flash_attention_2"], ["fttrain"], \
        not dry and importable("flash_attn")
    yield "full sdpa", full, ["fttrain"], True
    yield "lora loss chunked", [], ["fttrain_chunked"], True
    yield "lora liger (loss + kernels)", [], ["fttrain_liger"], not dry and importable("liger_kernel")
    yield "lora loss cce", [], ["fttrain_cce"], not dry and importable("cut_cross_entropy")
    yield "lora compiled", ["trainer.compile=true"], ["fttrain"], not dry
    yield "qlora nf4", ["peft=qlora", "peft.compute_dtype=bfloat16"], ["fttrain"], not dry and importable("bitsandbytes")
    yield "trl defaults (lora)", [], ["trl_default"], importable("trl")
    yield "full zero3 (1 GPU)", full + ["dist=zero3"], ["fttrain"], importable("deepspeed")
    yield "full fsdp (1 GPU)", full + ["dist=fsdp"], ["fttrain"], True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny model, 3 steps")
    parser.add_argument("--budget-seconds", type=float, default=420)
    parser.add_argument("--out", default="/tmp/fttrain_gpu_check")
    args = parser.parse_args(argv)
    import torch

    from fttrain import bench
    from fttrain.config.compose import compose_config
    from fttrain.estimate import estimate

    start, out = time.time(), Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.dry_run:
        base = ["+exp=tiny_sft", "data.max_length=512", "trainer.micro_batch_size=4"]
        steps, chats = 3, 200
    else:
        if not torch.cuda.is_available():
            print("gpu_check: no GPU here; run with --dry-run on CPU", file=sys.stderr)
            return 2
        model = build_model(out / "llama1b")
        base = ["+exp=tiny_sft", f"model.name_or_path={model}", "precision=bf16", "data.max_length=2048",
                "trainer.micro_batch_size=4", "trainer.learning_rate=1e-4"]
        steps, chats = 20, 4000
    rows = []
    for name, extra, variants, runs in checks(args.dry_run):
        if not runs:
            rows.append({"check": name, "note": "skipped (not available here)"})
            continue
        if time.time() - start > args.budget_seconds:
            rows.append({"check": name, "note": "skipped (time budget spent)"})
            continue
        folder = out / name.replace(" ", "_").replace("(", "").replace(")", "")
        argv_bench = [*base, *extra, "--variants", ",".join(variants), "--steps", str(steps), "--warmup", "2",
                      "--chats", str(chats), "--out", str(folder)]
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            code = bench.main(argv_bench)
        if code != 0:
            rows.append({"check": name, "note": "FAILED: " + err.getvalue().strip().splitlines()[-1][:120]})
            continue
        result = json.loads((folder / "bench.json").read_text())["variants"][0]
        row = {"check": name, "tokens_per_second": result["tokens_per_second"], "mfu": result["mfu"],
               "peak": result["peak_memory_bytes"], "first_step_s": result["time_to_first_step_s"]}
        if variants[0].startswith("fttrain"):
            kind, knobs = bench.VARIANTS[variants[0]]
            cfg = compose_config(bench.bench_overrides([*base, *extra, *knobs], steps, None))
            row["estimate"] = estimate(cfg).total
        rows.append(row)
    print(render(rows, "cpu (dry run)" if args.dry_run else torch.cuda.get_device_name(), time.time() - start))
    (out / "gpu_check.json").write_text(json.dumps(rows, indent=1))
    return 0


def render(rows, device: str, seconds: float) -> str:
    gib = 2 ** 30
    lines = [f"fttrain GPU check on {device}, {seconds:.0f} s",
             "| check | tokens/s | MFU | peak GiB | estimate GiB | estimate error | 1st step s |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        if "note" in r:
            lines.append(f"| {r['check']} | {r['note']} | | | | | |")
            continue
        est = r.get("estimate")
        err = f"{(est - r['peak']) / r['peak']:+.0%}" if est else "-"
        lines.append(f"| {r['check']} | {r['tokens_per_second']:,.0f} | "
                     f"{'-' if r['mfu'] is None else format(r['mfu'], '.1%')} | {r['peak'] / gib:.2f} | "
                     f"{'-' if not est else format(est / gib, '.2f')} | {err} | {r['first_step_s']:.1f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
