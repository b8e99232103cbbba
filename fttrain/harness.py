"""Standard benchmarks through lm-evaluation-harness: ``fttrain eval`` and the post-training step.

    fttrain eval RUN_DIR|MODEL_DIR --tasks hellaswag,arc_easy [--limit N] [--num-fewshot K]
                 [--include-path DIR] [--apply-chat-template] [--system-instruction TEXT]
                 [--batch-size 8] [--base PATH] [--out FILE]

The model is loaded as fttrain loads a run's result for inference (an adapter on
its base, unmerged, or a merged/whole model; a QLoRA run's base in 4 bits as it
trained) and handed to lm_eval's Hugging Face model class (HFLM), so every task
lm_eval knows runs on it, and your own: a folder of task YAMLs (--include-path;
local JSON data through ``dataset_path: json``).

Written next to the model (RUN_DIR/eval_harness.json, or --out):

    results      lm_eval's numbers per task and group (acc, acc_norm, exact_match ... and stderrs)
    versions     each task's version; n-shot; n-samples (docs scored / in the split)
    configs      each task's resolved config, and config_sha256 of it
    task_hashes  sha256 over every scored doc, prompt and target (as lm_eval's own
                 tracker computes it): two results with equal hashes scored the same requests
    lm_eval      the harness version, with torch, transformers and peft

and eval_harness_samples.jsonl (each scored doc, its prompt hashes, response and
metrics). A run's flat numbers (``harness/<task>/<metric>``) are added to its
metrics.json and to the tracker runs it logged to (trackers.json).

After training: ``harness.tasks=[...]`` (and the other ``harness.*`` keys) runs the
same on the trained model once it is saved; a run whose evaluation fails is still
complete (model/, metrics.json, COMPLETE), writes eval_harness_error.txt and exits
2; ``fttrain eval RUN_DIR`` with the run's settings runs it again.
"""

from __future__ import annotations

import argparse
import difflib
import functools
import hashlib
import json
import logging
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional, Sequence

from fttrain import atomic, errors
from fttrain.errors import FttrainError

log = logging.getLogger(__name__)

RESULTS = "eval_harness.json"
SAMPLES = "eval_harness_samples.jsonl"
ERROR = "eval_harness_error.txt"
PIP = "pip install -e '.[eval]'  (lm_eval>=0.4.8)"
NOT_METRICS = ("sample_len",)  # lm_eval's count of the docs scored, beside the metrics (n-samples has it)


class HarnessError(FttrainError, RuntimeError):
    pass


# ------------------------------------------------------------ what to run
def missing() -> Optional[str]:
    """The pip command when lm_eval is not installed, else None."""
    import importlib.util

    return None if importlib.util.find_spec("lm_eval") else PIP


def task_manager(include_path: Optional[str], key: str = "--include-path "):
    """lm_eval's index of its own tasks plus those under include_path (which win on a name clash)."""
    if include_path is not None and not Path(include_path).is_dir():
        raise HarnessError(f"{key}{include_path}: no such folder (a folder of task YAMLs)")
    return _indexed(str(Path(include_path).resolve()) if include_path else None)


@functools.lru_cache(maxsize=4)
def _indexed(include_path: Optional[str]):
    # Indexing the thousands of task YAMLs lm_eval ships takes seconds: once per folder and process
    # (the config check, then the run's evaluation).
    from lm_eval.tasks import TaskManager

    return TaskManager(include_path=include_path)


def is_glob(name: str) -> bool:
    return any(c in name for c in "*?[")


def expand(tasks: Sequence[str], manager) -> List[str]:
    """Names as given; a glob (arc_*, mmlu_*) becomes the tasks it matches. Only tasks:
    matching groups as well would run a group and its own members twice."""
    import fnmatch

    out = []
    for name in tasks:
        out += sorted(fnmatch.filter(manager.all_subtasks, name)) if is_glob(name) else [name]
    return list(dict.fromkeys(out))


def unknown_tasks(tasks: Sequence[str], manager) -> List[str]:
    """One line per name that is no task, group or tag here (a glob: that matches no task), with the nearest."""
    known = manager.all_tasks
    out = []
    for name in tasks:
        if not expand([name], manager) or name not in known and not is_glob(name):
            near = difflib.get_close_matches(name, known, n=3)
            out.append(f"{name!r} is not a task lm_eval knows here" +
                       (f" (did you mean {', '.join(near)}?)" if near else
                        " (lm_eval --tasks list lists them; your own: an include_path folder of task YAMLs)"))
    return out


def config_problems(harness) -> List[str]:
    """For the config check: harness.tasks can run (lm_eval installed, tasks known), before training."""
    if not harness.tasks:
        return []
    pip = missing()
    if pip:
        return [f"harness.tasks is set but lm_eval is not installed ({pip})"]
    try:
        manager = task_manager(harness.include_path, "harness.include_path=")
    except HarnessError as e:
        return [str(e)]
    return [f"harness.tasks: {p}" for p in unknown_tasks(harness.tasks, manager)]


# ------------------------------------------------------------------ running
def evaluate(model, tokenizer, tasks: Sequence[str], include_path: Optional[str] = None,
             limit: Optional[float] = None, num_fewshot: Optional[int] = None, batch_size: Optional[int] = None,
             apply_chat_template: bool = False, system_instruction: Optional[str] = None, seed: int = 0,
             manager=None):
    """lm_eval's simple_evaluate on an already loaded model; returns (record, samples)."""
    import lm_eval
    from lm_eval.models.huggingface import HFLM

    from fttrain.config.schema import HarnessConfig

    batch_size = batch_size or HarnessConfig.batch_size
    manager = manager or task_manager(include_path)  # indexing every task lm_eval ships takes seconds
    unknown = unknown_tasks(tasks, manager)
    if unknown:
        raise HarnessError("; ".join(unknown))
    tasks = expand(tasks, manager)
    model.eval()
    # HFLM takes the loaded model (a PeftModel keeps its adapter unmerged) and runs on the device it is on.
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=batch_size)
    started = time.perf_counter()
    try:
        # (peft's prompt and p-tuning put virtual-token positions before the logits; lm_eval allows for them.)
        out = lm_eval.simple_evaluate(
            model=lm, tasks=tasks, num_fewshot=num_fewshot, limit=limit, task_manager=manager, log_samples=True,
            apply_chat_template=apply_chat_template, system_instruction=system_instruction,
            random_seed=seed, numpy_random_seed=seed, torch_random_seed=seed, fewshot_random_seed=seed)
    except (FttrainError, KeyboardInterrupt):
        raise
    except Exception as e:  # a task's data missing or not downloadable offline, a task definition lm_eval refuses
        raise HarnessError(f"lm_eval could not evaluate {', '.join(tasks)}: {type(e).__name__}: {e}") from e
    samples = out.pop("samples", {}) or {}
    configs = out.get("configs", {})
    record = {
        "tasks": list(tasks), "include_path": include_path, "limit": limit, "num_fewshot": num_fewshot,
        "apply_chat_template": apply_chat_template, "system_instruction": system_instruction,
        "batch_size": batch_size, "seed": seed,
        "seconds": round(time.perf_counter() - started, 2),
        "results": out.get("results", {}), "groups": out.get("groups", {}), "versions": out.get("versions", {}),
        "n-shot": out.get("n-shot", {}), "n-samples": out.get("n-samples", {}),
        "higher_is_better": out.get("higher_is_better", {}), "configs": configs,
        "config_sha256": {t: sha256(json.dumps(c, sort_keys=True, default=str)) for t, c in configs.items()},
        "task_hashes": task_hashes(samples),
        "lm_eval": versions(),
    }
    return json.loads(json.dumps(record, default=str)), samples  # plain JSON: configs hold functions


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def task_hashes(samples: Dict[str, List[Dict]]) -> Dict[str, str]:
    """Per task, sha256 over its scored docs' doc, prompt and target hashes (lm_eval's EvaluationTracker's)."""
    return {task: sha256("".join(s["doc_hash"] + s["prompt_hash"] + s["target_hash"] for s in rows))
            for task, rows in samples.items()}


def versions() -> Dict[str, str]:
    import lm_eval

    import fttrain
    from fttrain.env import library_versions

    return {"lm_eval": lm_eval.__version__, **library_versions(), "fttrain": fttrain.__version__}


def reported_numbers(record: Dict):
    """(task, metric, filter, value, the task's row) for every number lm_eval reported,
    tasks then groups: alias, "N/A" stderrs and the count of docs left out."""
    for table_name in ("results", "groups"):
        for task, metrics in record.get(table_name, {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                if isinstance(value, (int, float)) and not isinstance(value, bool) and metric not in NOT_METRICS:
                    yield task, metric, filt, value, metrics


def flat_metrics(record: Dict) -> Dict[str, float]:
    """``harness/<task>/<metric>`` for every number lm_eval reported (filter "none" left out of the name)."""
    return {f"harness/{task}/{metric if filt in ('', 'none') else f'{metric}_{filt}'}": float(value)
            for task, metric, filt, value, _ in reported_numbers(record)}


def write(folder: Path, record: Dict, samples: Dict[str, List[Dict]], out: Optional[Path] = None) -> Path:
    """eval_harness.json (or out) and the samples beside it."""
    path = Path(out) if out else folder / RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"task": task, **row}, default=str) for task, rows in samples.items() for row in rows]
    atomic.write_text(path.with_name(SAMPLES if path.name == RESULTS else path.stem + "_samples.jsonl"),
                      "\n".join(lines) + ("\n" if lines else ""))
    atomic.write_json(path, record)
    return path


def table(record: Dict) -> str:
    """Markdown: one row per task and metric (lm_eval's own layout)."""
    rows = ["| task | version | n-shot | metric | value | stderr |", "|---|---|---|---|---|---|"]
    for task, metric, filt, value, metrics in reported_numbers(record):
        if "_stderr" in metric:  # shown beside its metric
            continue
        err = metrics.get(f"{metric}_stderr,{filt}")  # a number, "N/A" or absent
        err = err if isinstance(err, str) else "-" if err is None else f"{err:.4f}"
        name = metric if filt in ("", "none") else f"{metric} ({filt})"
        rows.append(f"| {task} | {record['versions'].get(task, '-')} | {record['n-shot'].get(task, '-')} | "
                    f"{name} | {value:.4f} | {err} |")
    return "\n".join(rows)


# ------------------------------------------------------------------ a run's result
def add_to_metrics(run_dir: Path, flat: Dict[str, float]) -> int:
    """The flat numbers into a finished run's metrics.json, replacing an earlier
    evaluation's (other tasks, another limit) whole; returns the run's step count."""
    path = run_dir / "metrics.json"
    if not path.exists():
        return 0
    metrics = {k: v for k, v in json.loads(path.read_text()).items() if not k.startswith("harness/")}
    atomic.write_json(path, {**metrics, **flat})
    return int(metrics.get("steps") or 0)


def record_in_run(run_dir: Path, record: Dict) -> Dict[str, float]:
    """``fttrain eval`` on a run: its metrics.json and its tracker runs gain the flat numbers."""
    from fttrain.trackers import log_to_run

    flat = flat_metrics(record)
    step = add_to_metrics(run_dir, flat)
    done = log_to_run(run_dir, {f"final/{k}": v for k, v in flat.items()}, step)
    if done:
        log.info("harness results added to the %s run(s)", ", ".join(done))
    return flat


def rerun_command(run_dir: Path, harness) -> str:
    return f"fttrain eval {run_dir}" + (f" --tasks {','.join(harness.tasks)}" if harness.tasks else "")


def after_training(model, tokenizer, harness, run_dir: Path) -> Dict[str, float]:
    """The post-training step (harness.tasks): on the trained model in memory, main process.
    Returns the flat numbers, also written to metrics.json. Until it succeeds,
    eval_harness_error.txt says it has not (a job killed meanwhile leaves it)."""
    atomic.write_text(run_dir / ERROR, f"started {time.strftime('%Y-%m-%dT%H:%M:%S%z')} and not finished (stopped "
                                       f"or killed?); run it again: {rerun_command(run_dir, harness)}\n")
    try:
        record, samples = evaluate(model, tokenizer, list(harness.tasks), harness.include_path, harness.limit,
                                   harness.num_fewshot, harness.batch_size, harness.apply_chat_template,
                                   harness.system_instruction)
    except Exception as e:
        atomic.write_text(run_dir / ERROR, f"{type(e).__name__}: {e}\n")
        raise HarnessError(
            f"the evaluation after training failed ({e if isinstance(e, HarnessError) else f'{type(e).__name__}: {e}'})"
            f"; the run itself is complete and saved in {run_dir}/model. Run it again with: "
            f"{rerun_command(run_dir, harness)} (it reads the run's other harness settings)") from e
    record.update({"model": str(run_dir / "model"), "when": "after training"})
    write(run_dir, record, samples)
    flat = flat_metrics(record)
    add_to_metrics(run_dir, flat)
    (run_dir / ERROR).unlink()
    log.info("lm-evaluation-harness:\n%s", table(record))
    return flat


# -------------------------------------------------------------------- CLI
def main(argv=None) -> int:
    from fttrain.models.load import DTYPES

    parser = argparse.ArgumentParser(prog="fttrain eval", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter,
                                     epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    parser.add_argument("path", help="a run directory, an adapter folder or a merged/whole model")
    parser.add_argument("--tasks", help="comma-separated lm_eval tasks, groups or globs (default: the run's "
                                        "harness.tasks, with its other harness.* settings)")
    parser.add_argument("--include-path", help="a folder of your own task YAMLs")
    parser.add_argument("--limit", type=float, help="the first N docs per task (< 1: that fraction); a quick "
                                                    "look, not a score to compare with published ones")
    parser.add_argument("--num-fewshot", type=int, help="few-shot examples (default: each task's)")
    parser.add_argument("--batch-size", type=int, help="requests per forward pass (default: 8)")
    parser.add_argument("--apply-chat-template", action="store_true",
                        help="prompts through the tokenizer's chat template (instruct models)")
    parser.add_argument("--system-instruction", help="a system prompt before each prompt")
    parser.add_argument("--base", help="the base model of an adapter folder that names none")
    parser.add_argument("--out", type=Path, help="results file (default: MODEL_OR_RUN/eval_harness.json)")
    parser.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    parser.add_argument("--device", help="cuda, cuda:1, cpu (default: cuda when there is one)")
    args = parser.parse_args(argv)
    if args.limit is not None and args.limit <= 0:
        parser.error("--limit must be above 0")
    if args.batch_size is not None and args.batch_size < 1:
        parser.error("--batch-size must be at least 1")
    pip = missing()
    if pip:
        return errors.report("fttrain eval", HarnessError(f"lm_eval is not installed ({pip})"))
    try:
        return run_eval(args)
    except FttrainError as e:
        return errors.report("fttrain eval", e)


def run_eval(args) -> int:
    import torch

    from omegaconf import OmegaConf

    from fttrain.config.schema import HarnessConfig
    from fttrain.models.adapted import load_for_inference, model_folder, run_dir_of

    folder = model_folder(args.path)  # refuses a missing path, naming it
    run_dir = run_dir_of(folder)  # RUN/model; an export (RUN/merged) writes its results beside itself
    tasks = [t.strip() for t in (args.tasks or "").split(",") if t.strip()]
    if tasks:  # what the command line says, nothing of the run's
        h = HarnessConfig(tasks=tasks, include_path=args.include_path, limit=args.limit, num_fewshot=args.num_fewshot,
                          batch_size=args.batch_size or HarnessConfig.batch_size,
                          apply_chat_template=args.apply_chat_template, system_instruction=args.system_instruction)
    else:  # the run's own harness.* (the flags given still win)
        saved = OmegaConf.load(run_dir / "config.yaml").get("harness") if run_dir else None
        if not saved or not saved.get("tasks"):
            raise HarnessError("no tasks: give --tasks (e.g. --tasks hellaswag,arc_easy)" +
                               ("" if run_dir else "; only a run directory brings its own (harness.tasks)"))
        h = HarnessConfig(**{**OmegaConf.to_container(saved), **{k: v for k, v in (
            ("include_path", args.include_path), ("limit", args.limit), ("num_fewshot", args.num_fewshot),
            ("batch_size", args.batch_size), ("system_instruction", args.system_instruction)) if v is not None},
            **({"apply_chat_template": True} if args.apply_chat_template else {})})
    limit = int(h.limit) if h.limit is not None and float(h.limit) >= 1 else h.limit
    manager = task_manager(h.include_path)
    unknown = unknown_tasks(h.tasks, manager)  # before the model loads
    if unknown:
        raise HarnessError("; ".join(unknown))
    try:
        loaded = load_for_inference(args.path, base=args.base, dtype=args.dtype)
    except OSError as e:  # transformers' word for a hub id that is not there (offline) or unreadable files
        raise HarnessError(f"{args.path}: cannot be loaded: {e}") from None
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if not loaded.quantized:
        loaded.model.to(device)
    print(f"fttrain eval: {folder} ({loaded.kind}) on {', '.join(h.tasks)}", file=sys.stderr, flush=True)
    record, samples = evaluate(loaded.model, loaded.tokenizer, list(h.tasks), h.include_path, limit, h.num_fewshot,
                               h.batch_size, h.apply_chat_template, h.system_instruction, manager=manager)
    record.update({"model": str(folder), "kind": loaded.kind, "base": loaded.base_path, "dtype": args.dtype,
                   "device": device, "when": "fttrain eval"})
    path = write(folder if run_dir is None else run_dir, record, samples, args.out)
    if run_dir is not None and args.out is None:
        record_in_run(run_dir, record)
        (run_dir / ERROR).unlink(missing_ok=True)  # the post-training evaluation that failed is done now
    print(table(record))
    print(f"written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
