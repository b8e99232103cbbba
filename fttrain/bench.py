"""``fttrain bench OVERRIDES [--variants A,B] [--steps 40] [--warmup 2] [--repeats 3] [--chats N] [--out DIR]``

The same workload trained several ways, each in its own process, in
alternating order (A B C, B C A, ...), medians over the repeats:

    fttrain            fttrain's own run (fttrain.run's recipe, trainer and collator)
    fttrain_chunked    the same with trainer.loss=chunked
    fttrain_liger      the same with Liger-Kernel's fused loss and kernels (a CUDA GPU)
    fttrain_cce        the same with cut-cross-entropy's loss (a CUDA GPU)
    trl_default        TRL's SFTTrainer with its defaults (a padded batch per step)
    trl_packed         SFTTrainer with packing=true, padding_free=true
    raw_loop           a plain PyTorch loop (AdamW, the same packed batches, no Trainer)

Model, PEFT method, data, micro batch, accumulation, sequence length and
precision come from the composed config (``+exp=...`` and overrides), so the
same command runs on the tiny model on CPU and on a 1B-8B model on a GPU.
``--chats N`` swaps in N generated chats of variable length (20-510 tokens,
a letter-reversal task) in messages format.

Measured per variant:
    tokens_per_second    real (non-pad) tokens over steps warmup+1 .. steps, counted on the
                         host from each collated batch, over the wall time of those steps
    padding_fraction     pad slots / all slots the model ran on in those steps
    step_time_s          mean seconds per optimizer step in that window
    peak_memory_bytes    torch.cuda.max_memory_allocated on a GPU; peak RSS of the process on CPU
    time_to_first_step_s from starting the process to the end of the first optimizer step
    mfu                  GPU only: model FLOPs / (seconds x the GPU's dense bf16 peak). FLOPs per
                         token: 6 N for full fine-tuning; with an adapter 4 N_frozen + 6 N_trained
                         (no weight gradient for frozen weights); plus attention 12 x layers x
                         hidden x row length (the standard count, as if rows were one document)
    ratio                fttrain's tokens/s / this variant's

Prints one table and writes ``bench.json`` (one entry per variant) in --out.
Figures depend on the machine and its load: compare ratios from one run.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

VARIANTS = {  # name -> (kind, fttrain overrides or TRL SFTConfig settings)
    "fttrain": ("fttrain", []),
    "fttrain_chunked": ("fttrain", ["trainer.loss=chunked"]),
    "fttrain_liger": ("fttrain", ["trainer.loss=liger", "trainer.liger_kernels=true"]),  # CUDA GPU
    "fttrain_cce": ("fttrain", ["trainer.loss=cce"]),  # CUDA GPU
    "trl_default": ("trl", {}),
    "trl_packed": ("trl", {"packing": True, "padding_free": True}),
    "raw_loop": ("raw", {}),
}
CUDA_ONLY = ("fttrain_liger", "fttrain_cce")  # Triton kernels: refused on CPU


def default_variants() -> List[str]:
    import torch

    return [v for v in VARIANTS if v not in CUDA_ONLY or torch.cuda.is_available()]


# Dense bf16 peak FLOP/s by GPU name, for MFU.
PEAK_FLOPS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "A10G": 125e12}
LETTERS = "abcdefghijklmnop"


class BenchError(Exception):
    pass


# ------------------------------------------------------------------ workload
def write_chats(path: Path, n: int, seed: int = 0) -> None:
    """n chats, 1-245 letters each way (about 20-510 tokens with a chat template)."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for _ in range(n):
            letters = [rng.choice(LETTERS) for _ in range(rng.randint(1, 245))]
            f.write(json.dumps({"messages": [{"role": "user", "content": "reverse: " + " ".join(letters)},
                                             {"role": "assistant", "content": " ".join(reversed(letters))}]}) + "\n")


def bench_overrides(overrides: List[str], steps: int, chats: Optional[Path]) -> List[str]:
    """The user's run, trained for `steps` steps with nothing else in the way:
    no evaluation, generations, checkpoints or rank records; the default logging interval."""
    from fttrain.config.schema import TrainerConfig

    out = list(overrides) + [f"trainer.max_steps={steps}", f"trainer.logging_steps={TrainerConfig.logging_steps}",
                             "trainer.save_steps=null", "trainer.eval_steps=null", "trainer.rank_records=false",
                             "trainer.dataloader_num_workers=0",  # the meter counts batches in this process
                             "data.eval=null", "data.eval_fraction=0", "logger.progress_bar=false",
                             "++task.generation_eval.num_samples=0", "++task.generation_eval.exact_match_samples=0"]
    if chats is not None:
        out += [f"data.train={chats}", "data.format=messages", "data.max_samples=null"]
    return out


# ------------------------------------------------------------------ measuring (in each worker)
REAL, SLOTS = "bench_real_tokens", "bench_slot_tokens"  # a collated batch's counts, read when it is trained on


class Meter:
    """Real and slot tokens of the micro-batches trained on (counted on the
    host when collated, added up when consumed: a prefetched batch is not
    counted early) and the clock at the window's edges (after a device sync)."""

    def __init__(self, warmup: int, steps: int):
        self.warmup, self.steps = warmup, steps
        self.real = self.slots = 0  # so far
        self.marks: Dict[int, tuple] = {}  # step -> (clock, real, slots)
        self.first_step_at: Optional[float] = None

    @staticmethod
    def count(batch) -> dict:
        """The batch with its real and slot token counts added."""
        ids = batch["input_ids"]
        if batch.get("num_real_tokens") is not None:
            real = int(batch["num_real_tokens"])
        elif batch.get("attention_mask") is not None:
            real = int(batch["attention_mask"].sum())
        else:  # padding-free rows: every slot is a token
            real = ids.numel()
        return {**batch, REAL: real, SLOTS: ids.numel()}

    def consume(self, batch) -> dict:
        """The batch without the counts, which now count as trained on."""
        batch = dict(batch)
        self.real += batch.pop(REAL)
        self.slots += batch.pop(SLOTS)
        return batch

    def wrap(self, collate):
        return lambda rows: self.count(collate(rows))

    def wrap_training_step(self, training_step):
        return lambda model, inputs, *args, **kwargs: training_step(model, self.consume(inputs), *args, **kwargs)

    def attach(self, trainer) -> None:
        """Count the trainer's batches and time its steps."""
        from transformers import TrainerCallback

        meter = self

        class StepEnds(TrainerCallback):
            def on_step_end(self, args, state, control, **kwargs):
                meter.step_end(state.global_step)

        trainer.data_collator = self.wrap(trainer.data_collator)
        trainer.training_step = self.wrap_training_step(trainer.training_step)
        trainer.add_callback(StepEnds())

    def step_end(self, step: int) -> None:
        if step == 1:
            sync()
            self.first_step_at = time.time()
        if step in (self.warmup, self.steps):
            sync()
            self.marks[step] = (time.perf_counter(), self.real, self.slots)

    def result(self) -> dict:
        if self.warmup not in self.marks or self.steps not in self.marks:
            raise BenchError(f"the run stopped before step {self.steps} (too little data for the steps asked?)")
        (t0, real0, slots0), (t1, real1, slots1) = self.marks[self.warmup], self.marks[self.steps]
        real, slots, seconds = real1 - real0, slots1 - slots0, t1 - t0
        return {"tokens_per_second": real / seconds, "padding_fraction": 1 - real / max(slots, 1),
                "step_time_s": seconds / (self.steps - self.warmup), "tokens": real, "seconds": seconds,
                "first_step_at": self.first_step_at, "peak_memory_bytes": peak_memory()}


def sync() -> None:
    import torch

    if torch.cuda.is_available():
        torch.cuda.synchronize()


def peak_memory() -> int:
    import torch

    if torch.cuda.is_available():
        return int(torch.cuda.max_memory_allocated())
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB




def model_flops_per_token(model, row_length: int) -> float:
    def weights(p) -> int:  # a 4-bit weight stores two per byte: count the matrix it stands for
        state = getattr(p, "quant_state", None)
        return int(torch.Size(state.shape).numel()) if state is not None else p.numel()

    import torch

    embeddings, head = model.get_input_embeddings(), model.get_output_embeddings()
    # An embedding lookup is no matmul, unless the weight is tied to the lm_head's.
    lookups = {id(p) for p in embeddings.parameters()} if embeddings is not None else set()
    lookups -= {id(p) for p in head.parameters()} if head is not None else set()
    params = [p for p in model.parameters() if id(p) not in lookups]
    trained = sum(weights(p) for p in params if p.requires_grad)
    total = sum(weights(p) for p in params)
    config = getattr(model, "config", None)
    layers, hidden = getattr(config, "num_hidden_layers", 0), getattr(config, "hidden_size", 0)
    return 4 * (total - trained) + 6 * trained + 12 * layers * hidden * row_length


# ------------------------------------------------------------------ the variants
def run_fttrain(cfg, run_dir: Path, meter: Meter) -> dict:
    from fttrain.recipes import recipe_class
    from fttrain.run import prepare_run_dir

    prepare_run_dir(cfg, run_dir)
    recipe = recipe_class(cfg.task.name)(cfg, run_dir)
    try:
        recipe.setup()
        trainer = recipe.trainer
        meter.attach(trainer)
        recipe.train()
        return {"flops_per_token": model_flops_per_token(trainer.model, cfg.data.max_length)}
    finally:
        recipe.stop_on_signal.restore()


def setup_like_fttrain(cfg, run_dir: Path):
    """fttrain's recipe set up (tokenizer, prepared data, PEFT model, its
    trainer built but not run): the baselines take its model and data."""
    from fttrain.recipes import recipe_class
    from fttrain.run import prepare_run_dir

    prepare_run_dir(cfg, run_dir)
    recipe = recipe_class(cfg.task.name)(cfg, run_dir)
    recipe.setup()
    recipe.stop_on_signal.restore()
    return recipe


def run_raw_loop(cfg, run_dir: Path, meter: Meter) -> dict:
    """fttrain's model, data and collator in a loop of forward, backward, AdamW."""
    import torch

    recipe = setup_like_fttrain(cfg, run_dir)
    t, model = cfg.trainer, recipe.model
    device = recipe.args.device
    model.to(device).train()
    collate = meter.wrap(recipe.trainer.data_collator)
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=t.learning_rate, weight_decay=t.weight_decay)
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(recipe.runtime.precision)
    rows, accumulation, mb = recipe.trainer.train_dataset, recipe.accum, t.micro_batch_size
    order = torch.randperm(len(rows), generator=torch.Generator().manual_seed(t.seed)).tolist()
    batch_index = 0
    for step in range(1, meter.steps + 1):
        batches = []
        for _ in range(accumulation):
            start = (batch_index * mb) % len(order)
            batches.append(collate([rows[i] for i in order[start:start + mb]]))
            batch_index += 1
        trained = torch.tensor(sum(b["num_trained_tokens"] for b in batches), device=device)
        for b in batches:
            b = meter.consume(b)
            inputs = {k: v.to(device) for k, v in b.items() if k in ("input_ids", "labels", "position_ids",
                                                                     "attention_mask")}
            with torch.autocast(device.type, dtype=dtype, enabled=dtype is not None):
                loss = model(**inputs, num_items_in_batch=trained).loss
            loss.backward()
        torch.nn.utils.clip_grad_norm_(params, t.max_grad_norm)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        meter.step_end(step)
    return {"flops_per_token": model_flops_per_token(model, cfg.data.max_length)}


def chat_messages(cfg) -> List[dict]:
    """The train rows as TRL reads them: {"messages": [...]} per chat."""
    from fttrain.data.formats import Chat, Formatter
    from fttrain.data.rows import load_splits

    data = cfg.data
    fmt = getattr(data.format, "value", data.format)
    formatter = Formatter(str(fmt), dict(data.columns), dict(data.role_map), data.system_prompt)
    split, _ = load_splits(data)
    out = []
    for i in split.ids:
        example = formatter(split.rows[i])
        if not isinstance(example, Chat):
            raise BenchError(f"the TRL variants read chats; data.format={fmt} gives {type(example).__name__}")
        out.append({"messages": example.messages})
    return out


def run_trl(cfg, run_dir: Path, meter: Meter, settings: dict) -> dict:
    import datasets
    from trl import SFTConfig, SFTTrainer

    recipe = setup_like_fttrain(cfg, run_dir)
    t = cfg.trainer
    args = SFTConfig(
        output_dir=str(run_dir / "trl"), per_device_train_batch_size=t.micro_batch_size,
        gradient_accumulation_steps=recipe.accum, max_steps=meter.steps, learning_rate=t.learning_rate,
        max_grad_norm=t.max_grad_norm, logging_steps=t.logging_steps, save_strategy="no", report_to=[],
        bf16=recipe.runtime.precision == "bf16", fp16=recipe.runtime.precision == "fp16",
        use_cpu=recipe.runtime.use_cpu, seed=t.seed, max_length=cfg.data.max_length, disable_tqdm=True,
        dataloader_num_workers=0, **settings)
    dataset = datasets.Dataset.from_list(chat_messages(cfg))
    trainer = SFTTrainer(model=recipe.model, args=args, train_dataset=dataset, processing_class=recipe.tokenizer)
    meter.attach(trainer)
    trainer.train()
    return {"flops_per_token": model_flops_per_token(trainer.model, cfg.data.max_length)}


def worker(spec: dict) -> dict:
    """One variant, in this process: its measurements as a dict."""
    from fttrain.config.compose import compose_config

    kind, extra = VARIANTS[spec["variant"]]
    # The baselines run the model as it loads: fttrain's loss knob would change their forward.
    cfg = compose_config(spec["overrides"] + (extra if kind == "fttrain" else ["trainer.loss=default"]),
                         config_dirs=spec.get("config_dirs", ()))
    run_dir = Path(spec["work"]) / spec["variant"]
    cfg.output_root, cfg.name, cfg.overwrite = str(run_dir.parent), run_dir.name, True
    meter = Meter(spec["warmup"], cfg.trainer.max_steps)
    if kind == "fttrain":
        from fttrain.import_scope import keep_out_unused

        keep_out_unused(cfg)  # as python -m fttrain does for a single run
        extra_info = run_fttrain(cfg, run_dir, meter)
    elif kind == "raw":
        extra_info = run_raw_loop(cfg, run_dir, meter)
    else:
        extra_info = run_trl(cfg, run_dir, meter, extra)
    out = {**meter.result(), **extra_info}
    out["time_to_first_step_s"] = out.pop("first_step_at") - spec["started"]
    return out


# ------------------------------------------------------------------ the parent
def run_variant(variant: str, overrides: List[str], args, work: Path) -> dict:
    result = work / f"{variant}.json"
    result.unlink(missing_ok=True)
    spec = {"variant": variant, "overrides": overrides, "warmup": args.warmup, "work": str(work),
            "config_dirs": args.config_dir, "started": time.time()}
    env = {**os.environ, "FTTRAIN_BENCH_SPEC": json.dumps(spec)}
    proc = subprocess.run([sys.executable, "-m", "fttrain.bench", "--worker", str(result)], env=env,
                          capture_output=True, text=True)
    if proc.returncode != 0 or not result.exists():
        raise BenchError(f"variant {variant} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return json.loads(result.read_text())


def summarise(runs: Dict[str, List[dict]], gpu_name: Optional[str]) -> List[dict]:
    peak = next((v for k, v in PEAK_FLOPS.items() if gpu_name and k in gpu_name), None)
    rows = []
    for name, results in runs.items():
        row = {"name": name}
        for key in ("tokens_per_second", "padding_fraction", "peak_memory_bytes", "time_to_first_step_s",
                    "step_time_s"):
            row[key] = statistics.median(r[key] for r in results)
        flops = statistics.median(r["flops_per_token"] for r in results)
        row["mfu"] = flops * row["tokens_per_second"] / peak if peak else None
        row["runs"] = results
        rows.append(row)
    base = next((r["tokens_per_second"] for r in rows if r["name"] == "fttrain"), None)
    for row in rows:
        row["ratio"] = base / row["tokens_per_second"] if base else None
    return rows


def table(rows: List[dict]) -> str:
    head = ("variant", "tokens/s", "padding", "peak mem", "step s", "1st step s", "MFU", "fttrain / this")
    lines = [head]
    for r in rows:
        lines.append((r["name"], f"{r['tokens_per_second']:,.0f}", f"{r['padding_fraction']:.1%}",
                      f"{r['peak_memory_bytes'] / 2**30:.2f} GiB", f"{r['step_time_s']:.3f}",
                      f"{r['time_to_first_step_s']:.1f}", "-" if r["mfu"] is None else f"{r['mfu']:.1%}",
                      "-" if r["ratio"] is None else f"{r['ratio']:.2f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    out = ["| " + " | ".join(c.ljust(w) for c, w in zip(line, widths)) + " |" for line in lines]
    out.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="fttrain bench", description=__doc__.split("\n\n")[1],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variants", default=None, help=f"comma-separated, of {', '.join(VARIANTS)} (default: "
                        f"all; {', '.join(CUDA_ONLY)} only on a CUDA GPU)")
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=2, help="steps left out of the measurement")
    parser.add_argument("--repeats", type=int, default=1, help="runs per variant, in rotating order; medians")
    parser.add_argument("--chats", type=int, default=None, help="train on N generated variable-length chats")
    parser.add_argument("--out", default="bench", help="folder for bench.json and the runs")
    parser.add_argument("--config-dir", "-cd", action="append", default=[], help="your config folder")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("overrides", nargs="*", help="Hydra overrides, as for fttrain train")
    args = parser.parse_intermixed_args(argv)
    if args.worker:
        result = worker(json.loads(os.environ["FTTRAIN_BENCH_SPEC"]))
        Path(args.worker).write_text(json.dumps(result))
        return 0
    variants = args.variants.split(",") if args.variants else default_variants()
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or not 0 < args.warmup < args.steps:
        print(f"fttrain bench: unknown variants {unknown} (one of {list(VARIANTS)})" if unknown else
              f"fttrain bench: --warmup={args.warmup} must be between 0 and --steps={args.steps}", file=sys.stderr)
        return 2
    work = Path(args.out).resolve()
    work.mkdir(parents=True, exist_ok=True)
    chats = None
    if args.chats:
        chats = work / f"chats_{args.chats}.jsonl"
        write_chats(chats, args.chats)
    overrides = bench_overrides(args.overrides, args.steps, chats)
    runs: Dict[str, List[dict]] = {v: [] for v in variants}
    try:
        for r in range(args.repeats):
            for v in variants[r % len(variants):] + variants[:r % len(variants)]:  # rotate the order
                runs[v].append(run_variant(v, overrides, args, work))
                print(f"fttrain bench: {v} run {r + 1}/{args.repeats}: "
                      f"{runs[v][-1]['tokens_per_second']:,.0f} tokens/s", file=sys.stderr)
    except BenchError as e:
        print(f"fttrain bench: {e}", file=sys.stderr)
        return 1
    import torch

    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    rows = summarise(runs, gpu)
    report = {"command": "fttrain bench " + " ".join(argv if argv is not None else sys.argv[1:]),
              "device": gpu or "cpu", "steps": args.steps, "warmup": args.warmup, "repeats": args.repeats,
              "variants": rows}
    (work / "bench.json").write_text(json.dumps(report, indent=1))
    print(table(rows))
    print(f"fttrain bench: wrote {work / 'bench.json'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
