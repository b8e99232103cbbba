"""Compare a base model with what was trained from it: size, memory, speed, quality.

    fttrain compare RUN_DIR [EXPORTED_DIR ...] [--base PATH] [--out DIR] [--runs 5]
                    [--prompt-tokens 32] [--new-tokens 32] [--eval-rows N]

Each argument is a run directory, an adapter folder, or a merged/whole model
(``fttrain export``). The base comes first (--base, else the base of the
first run); every row is labelled by kind: base, adapter (loaded on the base,
unmerged), merged (an export) or full (a whole model trained or given). For
each model:

    parameters   adapter: its own weights / base + adapter; a whole model: all / all
    size         bytes of the weight files of its folder (an adapter: the adapter alone)
    memory       peak RSS of a fresh process that loads it and generates, and the increase
                 over that process after importing torch; on a GPU torch.cuda.max_memory_allocated
    latency      time to first token and ms per further token, greedy, --new-tokens forced
                 (EOS cannot end it early), on seeded random prompts of --prompt-tokens
                 tokens: median of --runs runs after a warm-up, with and without the KV cache
    quality      eval loss per trained token (the run's masking) and its exp (perplexity) on
                 the eval split of the first run, rebuilt from its config.yaml through the
                 run's data cache, so every model is scored on the same rows (--eval-rows:
                 the first N); exact match where the run scored it (task.generation_eval)

Each model is measured in its own spawned process, so one model's memory never
counts towards the next. compare.json, compare.md (one table row per model) and
compare.png go to --out (default RUN_DIR/compare). Adapter against merged shows
what merging buys at inference.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from fttrain import atomic, errors
from fttrain.errors import FttrainError
from fttrain.env import rss_bytes

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
NOT_WEIGHTS = ("training_args.bin",)  # the Trainer's arguments, saved beside the adapter


# What a row is: the base; an adapter on it, unmerged; a merged export; a whole model trained or given.
KINDS = ("base", "adapter", "merged", "full")


class CompareError(FttrainError, ValueError):
    pass


# ------------------------------------------------------------ what to compare
def describe(arg: str) -> Dict:
    """One model given on the command line: its folder, kind, run and the base it names."""
    from fttrain.models.adapted import adapter_base, folder_kind, model_folder, run_dir_of

    folder = model_folder(arg)  # refuses a missing path, naming it
    if not folder.is_dir():
        raise CompareError(f"{arg}: not a folder; give a run directory, an adapter folder or a model folder")
    kind = folder_kind(folder)  # refuses a folder that holds no model, naming it
    run = run_dir_of(folder)
    named = None
    if kind != "full":
        try:
            named = adapter_base(folder, None)
        except FttrainError:  # the adapter names no base: --base must
            named = None
    elif (folder / "export_report.json").exists():
        named = json.loads((folder / "export_report.json").read_text()).get("base")
    elif run is not None and (run / "run_info.json").exists():
        named = json.loads((run / "run_info.json").read_text()).get("model_path")
    label = "adapter" if kind != "full" else ("merged" if (folder / "export_report.json").exists() else "full")
    # An export inside a run (RUN/merged, RUN/merged-nf4) is named with its run.
    inside = folder.parent if run is None and (folder.parent / "config.yaml").exists() else None
    name = f"{inside.resolve().name}/{folder.name}" if inside else (run or folder).resolve().name
    return {"name": name, "kind": label, "path": str(folder), "base": named,
            "run": str(run) if run else None}


def same_model(a: str, b: str) -> bool:
    if os.path.exists(a) and os.path.exists(b):
        return os.path.realpath(a) == os.path.realpath(b)
    return a == b


def tokenizer_difference(folder: str, base: str) -> Optional[str]:
    from transformers import AutoTokenizer

    from fttrain.models.load import vocabulary_difference

    return vocabulary_difference(AutoTokenizer.from_pretrained(base), AutoTokenizer.from_pretrained(folder))


def plan(paths: List[str], base: Optional[str]) -> List[Dict]:
    """The base first, then each model: adapters of that base, whole models with its tokenizer."""
    from fttrain.models.adapted import folder_kind

    models = [describe(p) for p in paths]
    base = base or next((m["base"] for m in models if m["base"]), None)
    if base is None:
        raise CompareError(f"no base model known for {paths[0]}: pass --base PATH")
    if os.path.isabs(base) or os.path.exists(base) or base.startswith("."):  # a folder, not a hub id
        if not os.path.isdir(base):
            raise CompareError(f"base model {base}: no such folder")  # also a file: a model is a folder
        if folder_kind(Path(base)) != "full":
            raise CompareError(f"base model {base} is an adapter, not a model")
    for m in models:
        if m["base"] is not None and not same_model(m["base"], base):
            if m["kind"] == "adapter":  # it loads on the table's base
                raise CompareError(f"{m['path']} was trained from {m['base']}, not from the base {base}: compare "
                                   "adapters of one base, or export it merged (fttrain export) and compare that")
            # A whole model of another base (pruned, distilled): scored on the same rows, so the
            # same tokenizer, or its loss on them means nothing.
            difference = tokenizer_difference(m["path"], base)
            if difference:
                raise CompareError(f"{m['path']} (from {m['base']}) has another tokenizer than the base {base}: "
                                   f"{difference}; compare models that share one")
        if m["kind"] == "adapter":
            m["base"] = base
    names = [m["name"] for m in models]
    for i, m in enumerate(models):  # two folders of one name (RUN_A/model, RUN_B/model) stay apart
        if names.count(m["name"]) > 1:
            m["name"] = f"{m['name']}#{i + 1}"
    return [{"name": "base", "kind": "base", "path": base, "base": None, "run": None}, *models]


# ---------------------------------------------------------------- eval set
def eval_set(run_dir: Path, base: Optional[str] = None) -> Dict:
    """The run's eval split, prepared as the run prepared it (same cache entry when it is
    still there): where it is, the chat template, and what the run scored exact match on."""
    from omegaconf import OmegaConf

    from fttrain.data.templates import TOKENIZER, resolve_chat_template
    from fttrain.models.load import load_tokenizer, resolve_model_path
    from fttrain.recipes.sft import prepared_data
    from fttrain.tasks import TASKS, task_of

    cfg = OmegaConf.load(run_dir / "config.yaml")
    if not task_of(cfg.task).token_rows:
        scored = sorted(t.name for t in TASKS.values() if t.token_rows)
        raise CompareError(f"{run_dir}: task={cfg.task.name} is not trained on a token loss; compare scores "
                           f"causal LMs trained with task={' or task='.join(scored)}")
    info = run_dir / "run_info.json"
    model_path = base or (json.loads(info.read_text())["model_path"] if info.exists() else
                          resolve_model_path(cfg.model))
    if os.path.isabs(model_path) and not os.path.isdir(model_path):
        raise CompareError(f"{run_dir}: its base model {model_path} is not there any more (moved or deleted); "
                           "pass --base PATH where it is now")
    # The tokenizer and template as the recipe sets them up (Recipe.setup_chat_template): they are in the cache key.
    tokenizer, _ = load_tokenizer(cfg.model, model_path)
    template = resolve_chat_template(cfg.data.chat_template, tokenizer)
    if template is not None and cfg.data.chat_template != TOKENIZER:
        tokenizer.chat_template = template
    data = prepared_data(cfg, tokenizer, template)
    if data.eval is None:
        raise CompareError(f"{run_dir}: the run has no eval split (data.eval or data.eval_fraction), "
                           "so there is nothing to score quality on")
    gen = getattr(cfg.task, "generation_eval", None)
    return {"run": str(run_dir), "split": str(data.eval.rows.folder), "template": template,
            "exact_match_rows": int(gen.exact_match_samples) if gen is not None else 0,
            "max_new_tokens": int(gen.max_new_tokens) if gen is not None else 0}


def eval_items(rows, limit: Optional[int]) -> List[Dict]:
    """Held-out samples one by one: a packed row's loss is the sum of its samples' (positions
    restart at each), so unpacking keeps the run's numbers. Pretraining blocks stay blocks."""
    blocks = rows.layout == "blocks"
    n = len(rows) if blocks else rows.num_samples
    return [rows[i] if blocks else {**rows.sample(i), "sample_ids": [i]} for i in range(min(n, limit or n))]


@torch.no_grad()
def eval_loss(model, items: List[Dict], pad_id: int, device, batch_size: int = 8):
    """(summed token loss / trained tokens, trained tokens), as FTTrainer.evaluate counts them."""
    import torch.nn.functional as F

    from fttrain.data.packing import PaddingCollator
    from fttrain.data.tokenize import IGNORE

    collate, total, tokens = PaddingCollator(pad_id), 0.0, 0
    for start in range(0, len(items), batch_size):
        batch = collate(items[start:start + batch_size])
        labels = batch["labels"][:, 1:].to(device)
        logits = model(input_ids=batch["input_ids"].to(device), attention_mask=batch["attention_mask"].to(device),
                       use_cache=False).logits[:, :-1]
        total += float(F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=IGNORE,
                                       reduction="sum"))
        tokens += int((labels != IGNORE).sum())
    return total / max(tokens, 1), tokens


def perplexity(loss: float) -> float:
    """exp(loss), capped at exp(50): an untrained model's loss must not overflow the table."""
    return float(torch.tensor(min(loss, 50.0)).exp())


def quality(model, rows, pad_id: int, device, limit: Optional[int] = None) -> Dict:
    """Eval loss per trained token and perplexity on the first ``limit`` held-out rows
    (fttrain compare's quality columns; fttrain export --quantize's gate)."""
    items = eval_items(rows, limit)
    loss, tokens = eval_loss(model, items, pad_id, device)
    return {"eval_loss": loss, "eval_tokens": tokens, "eval_rows": len(items), "perplexity": perplexity(loss)}


# ----------------------------------------------------------------- latency
def _sync(device) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


@torch.no_grad()
def latency(model, vocab: int, pad_id: int, device, prompt_tokens: int, new_tokens: int, runs: int,
            use_cache: bool) -> Dict:
    """Median time to first token and ms per further token over ``runs`` seeded prompts."""
    prompts = [torch.randint(0, vocab, (1, prompt_tokens), generator=torch.Generator().manual_seed(i)).to(device)
               for i in range(runs)]

    def timed(ids, n):
        _sync(device)
        start = time.perf_counter()
        # min_new_tokens = max_new_tokens: every model generates exactly n tokens, whatever it predicts.
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=n, min_new_tokens=n,
                             do_sample=False, use_cache=use_cache, pad_token_id=pad_id)
        _sync(device)
        return time.perf_counter() - start, out.shape[1] - ids.shape[1]

    timed(prompts[0], new_tokens)  # warm-up: lazy initialisation and first-call allocations are not latency
    first = statistics.median(timed(p, 1)[0] for p in prompts)
    full = [timed(p, new_tokens) for p in prompts]
    total = statistics.median(t for t, _ in full)
    return {"ttft_ms": 1000 * first, "ms_per_token": 1000 * max(total - first, 0.0) / (new_tokens - 1),
            "new_tokens": min(n for _, n in full)}


# ------------------------------------------------------------ one model
def weight_bytes(folder) -> Optional[int]:
    """Bytes of the weight files in a model or adapter folder (a hub id: its local snapshot, if any)."""
    folder = Path(folder)
    if not folder.is_dir():
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(str(folder), local_files_only=True))
        except Exception:  # not downloaded here: the size is unknown, not an error
            return None
    return sum(p.stat().st_size for p in folder.iterdir()
               if p.suffix in WEIGHT_SUFFIXES and p.name not in NOT_WEIGHTS)


def adapter_params(folder: Path) -> int:
    """Parameters an adapter folder saves (peft's and fttrain's bottleneck adapters alike)."""
    from safetensors import safe_open

    n = 0
    for path in Path(folder).iterdir():
        if path.suffix == ".safetensors":
            with safe_open(str(path), "pt") as f:  # shapes from the header; no tensor is read
                n += sum(torch.Size(f.get_slice(key).get_shape()).numel() for key in f.keys())
        elif path.suffix == ".bin" and path.name not in NOT_WEIGHTS:
            n += sum(t.numel() for t in torch.load(path, map_location="cpu", weights_only=True).values())
    return n


def measure(model: Dict, settings: Dict) -> Dict:
    """Everything about one model, in a fresh process (see main)."""
    from fttrain.data.store import PreparedRows
    from fttrain.generation_eval import exact_match, generate_answers
    from fttrain.models.adapted import load_for_inference
    from fttrain.models.load import param_counts

    device = settings["device"]
    baseline = rss_bytes()  # this process after importing torch and fttrain: loading adds to this
    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    try:
        loaded = load_for_inference(model["path"], base=model["base"], dtype=settings["dtype"])
    except OSError as e:  # transformers' word for a hub id that is not there (offline) or unreadable files
        raise CompareError(f"{model['path']}: cannot be loaded: {e}") from None
    net, tokenizer = loaded.model, loaded.tokenizer
    if not loaded.quantized:
        net.to(device)
    total = param_counts(net)[1]  # peft's count for a 4-bit base (packed weights)
    trainable = adapter_params(loaded.folder) if model["kind"] == "adapter" else total
    row = {**model, "trainable_params": trainable, "total_params": total,
           "size_bytes": weight_bytes(loaded.folder if model["kind"] != "base" else model["path"])}
    for use_cache in (True, False):
        timing = latency(net, len(tokenizer), tokenizer.pad_token_id, device, settings["prompt_tokens"],
                         settings["new_tokens"], settings["runs"], use_cache)
        row.update({f"{k}_{'cache' if use_cache else 'no_cache'}": v for k, v in timing.items()})
    # Measured after generating: loading and inference together, before the eval data is touched.
    row["peak_rss_bytes"] = rss_bytes("VmHWM")
    row["rss_increase_bytes"] = row["peak_rss_bytes"] - baseline
    row["cuda_peak_bytes"] = int(torch.cuda.max_memory_allocated()) if device.startswith("cuda") else None

    ev = settings["eval"]
    rows = PreparedRows(ev["split"])
    row.update(quality(net, rows, tokenizer.pad_token_id, device, settings["eval_rows"]))
    row["exact_match"] = None
    n = min(ev["exact_match_rows"], settings["eval_rows"] or ev["exact_match_rows"])
    if n > 0:
        results = generate_answers(net, tokenizer, ev["template"], rows.examples(), n, ev["max_new_tokens"])
        row["exact_match"], row["exact_match_rows"] = exact_match(results), len(results)
    return row


def measure_apart(model: Dict, settings: Dict) -> Dict:
    """measure() in a spawned process: a fresh interpreter, so peak memory is this model's alone."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        try:
            return pool.submit(measure, model, settings).result()  # its FttrainError is raised here
        except BrokenProcessPool:
            raise CompareError(f"{model['path']}: the process measuring it died (killed, e.g. out of memory)") \
                from None


# ---------------------------------------------------------------- outputs
MiB = 2 ** 20
COLUMNS = [  # (header with unit, key, format)
    ("model", "name", "{}"), ("kind", "kind", "{}"),
    ("trainable / total params", None, None),
    ("size (MiB)", "size_bytes", "{:.2f}"),
    ("peak RSS (MiB)", "peak_rss_bytes", "{:.0f}"),
    ("RSS over torch (MiB)", "rss_increase_bytes", "{:.0f}"),
    ("CUDA peak (MiB)", "cuda_peak_bytes", "{:.0f}"),
    ("TTFT cache (ms)", "ttft_ms_cache", "{:.2f}"),
    ("per token cache (ms)", "ms_per_token_cache", "{:.2f}"),
    ("TTFT no cache (ms)", "ttft_ms_no_cache", "{:.2f}"),
    ("per token no cache (ms)", "ms_per_token_no_cache", "{:.2f}"),
    ("eval loss (nats/token)", "eval_loss", "{:.4f}"),
    ("perplexity", "perplexity", "{:.2f}"),
    ("exact match", "exact_match", "{:.3f}"),
]


def _cell(row: Dict, key, fmt) -> str:
    if key is None:
        return f"{row['trainable_params']:,} / {row['total_params']:,}"
    value = row.get(key)
    if value is None:
        return "-"
    return fmt.format(value / MiB if key.endswith("_bytes") else value)


def markdown(report: Dict) -> str:
    s, ev = report["settings"], report["eval"]
    lines = [
        f"# fttrain compare: base {report['base']}",
        "",
        f"Eval: {report['models'][0]['eval_rows']} rows ({report['models'][0]['eval_tokens']} trained tokens) of the "
        f"eval split of {ev['run']}. Latency: median of {s['runs']} runs after a warm-up, {s['prompt_tokens']}-token "
        f"prompts, {s['new_tokens']} new tokens forced, greedy, batch 1, {s['dtype']} on {s['device']}.",
        "",
        "| " + " | ".join(h for h, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" for _ in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(_cell(r, k, f) for _, k, f in COLUMNS) + " |" for r in report["models"]]
    return "\n".join(lines) + "\n"


def plot(report: Dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = report["models"]
    gpu = any(r["cuda_peak_bytes"] is not None for r in rows)
    memory = ("CUDA peak (MiB)", "cuda_peak_bytes") if gpu else ("RSS over torch (MiB)", "rss_increase_bytes")
    panels = [("size on disk (MiB)", "size_bytes"), memory,
              ("time to first token, cache (ms)", "ttft_ms_cache"), ("per new token, cache (ms)", "ms_per_token_cache"),
              ("per new token, no cache (ms)", "ms_per_token_no_cache"), ("eval loss (nats/token)", "eval_loss")]
    colours = dict(zip(KINDS, ("tab:gray", "tab:blue", "tab:green", "tab:orange")))
    fig, axes = plt.subplots(2, 3, figsize=(12, 6), dpi=100)
    labels = [f"{r['name']}\n({r['kind']})" for r in rows]
    for ax, (title, key) in zip(axes.flat, panels):
        values = [(r[key] or 0) / (MiB if key.endswith("_bytes") else 1) for r in rows]
        ax.bar(range(len(rows)), values, color=[colours[r["kind"]] for r in rows])
        ax.set_xticks(range(len(rows)), labels, fontsize=7)
        ax.set_title(title, fontsize=9)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)  # whole or absent, like atomic.write_text


# -------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from fttrain.models.load import DTYPES

    parser = argparse.ArgumentParser(prog="fttrain compare", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("paths", nargs="+", help="run directories, adapter folders or merged/whole models")
    parser.add_argument("--base", help="the base model (default: the first run's)")
    parser.add_argument("--out", type=Path, help="output folder (default: FIRST_RUN/compare)")
    parser.add_argument("--runs", type=int, default=5, help="timed generations per measurement (the median)")
    parser.add_argument("--prompt-tokens", type=int, default=32, help="tokens of each seeded random prompt")
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens generated, forced (at least 2)")
    parser.add_argument("--eval-rows", type=int, help="score the first N rows of the eval split (default: all)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    for flag, value, least in (("--runs", args.runs, 1), ("--prompt-tokens", args.prompt_tokens, 1),
                               ("--new-tokens", args.new_tokens, 2), ("--eval-rows", args.eval_rows or 1, 1)):
        if value < least:
            parser.error(f"{flag} must be at least {least}")
    try:
        models = plan(args.paths, args.base)
        run = next((Path(m["run"]) for m in models if m["run"]), None)
        if run is None:
            raise CompareError(f"none of {', '.join(args.paths)} is a run directory: give one, its eval set "
                               "scores every model")
        settings = {"dtype": args.dtype, "device": args.device, "runs": args.runs,
                    "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "eval_rows": args.eval_rows,
                    "eval": eval_set(run, models[0]["path"])}
        rows = []
        for m in models:
            print(f"fttrain compare: measuring {m['name']} ({m['kind']}) ...", file=sys.stderr, flush=True)
            rows.append(measure_apart(m, settings))
    except FttrainError as e:
        return errors.report("fttrain compare", e)
    report = {"base": models[0]["path"], "eval": settings["eval"],
              "settings": {k: v for k, v in settings.items() if k != "eval"}, "models": rows}
    out = args.out or run / "compare"
    out.mkdir(parents=True, exist_ok=True)
    atomic.write_json(out / "compare.json", report)
    atomic.write_text(out / "compare.md", markdown(report))
    plot(report, out / "compare.png")
    print(markdown(report))
    print(f"written to {out}: compare.json, compare.md, compare.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
