"""The model card (README.md) every export writes, and the upload to the Hub.

    fttrain export RUN_DIR --out DIR [--push-to-hub REPO [--private]]

The card says what a reader of a Hub page needs to trust the model: the base
model, the PEFT method and its settings, the data (sources and row counts from
data_report.json), the metrics, the command that trained it and the fttrain
and library versions. Its YAML header is the Hub's metadata (base_model,
library_name, tags), so the Hub links the model to its base.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from fttrain.errors import FttrainError

# The metrics.json numbers worth a line on the card, in this order.
CARD_METRICS = ("eval_loss", "eval_perplexity", "eval_exact_match_before", "eval_exact_match_after", "train_loss",
                "steps", "train_tokens", "global_batch_size", "trainable_params", "total_params")


class HubError(FttrainError, RuntimeError):
    pass


def hub_problem() -> str:
    """Why an upload cannot work here ('' when it can): checked before any export work."""
    from huggingface_hub import constants, get_token

    offline = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")
    if offline or constants.HF_HUB_OFFLINE:
        return "--push-to-hub: HF_HUB_OFFLINE=1 is set; unset it to upload (the export itself works offline)"
    if not get_token():
        return "--push-to-hub: no Hugging Face token; run `hf auth login` or set HF_TOKEN"
    return ""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def card_text(run_dir: Optional[Path], report: dict) -> str:
    """The card for an export of run_dir (None: an adapter folder with no run around it)."""
    import fttrain

    cfg = {}
    if run_dir is not None and (run_dir / "config.yaml").exists():
        import yaml

        cfg = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    metrics = _read_json(run_dir / "metrics.json") if run_dir else {}
    info = _read_json(run_dir / "run_info.json") if run_dir else {}
    data_report = _read_json(run_dir / "data_report.json") if run_dir else {}
    overrides = []
    if run_dir is not None and (run_dir / "overrides.yaml").exists():
        import yaml

        overrides = yaml.safe_load((run_dir / "overrides.yaml").read_text()) or []
    peft = cfg.get("peft", {})
    method = report.get("method") or peft.get("method") or "unknown"
    base = cfg.get("model", {}).get("name_or_path") or report.get("base") or info.get("model_path") or "unknown"
    merged = report.get("merged", False)
    from fttrain.methods import METHODS

    whole = merged or (method in METHODS and METHODS[method].saves == "model")
    library = "transformers" if whole else "peft"
    task = cfg.get("task", {}).get("name") or info.get("task") or "unknown"

    header = ["---", f"library_name: {library}"]
    if not str(base).startswith(("builtin:", "/", ".")):  # a Hub id: the Hub links the model to its base
        header.append(f"base_model: {base}")
    header += ["tags:", "- fttrain", f"- {task}", f"- {method}", "---", ""]

    name = cfg.get("name") or (run_dir.name if run_dir else "model")
    lines = [f"# {name}", "",
             f"Fine-tuned from `{base}` with fttrain {fttrain.__version__} ({task}, peft={method}).", ""]
    lines += ["## Model", "", f"- base model: `{base}`", f"- method: {method}"]
    for key in ("r", "alpha", "dropout", "target_modules"):
        if key in peft:
            lines.append(f"- {key}: {peft[key]}")
    lines.append("- this folder: " + ("the whole model (load with `AutoModelForCausalLM.from_pretrained`)" if whole
                                      and not merged else "the adapter merged into the base weights (load with "
                                      "`AutoModelForCausalLM.from_pretrained`)" if merged else
                                      "the adapter (load with `peft.PeftModel.from_pretrained(base, folder)`)"))
    if "max_abs_logit_diff" in report:
        check, against = (("save check", "the model as trained") if whole and not merged
                          else ("merge check", "the adapter model"))
        lines.append(f"- {check}: largest |logit difference| to {against} "
                     f"{report['max_abs_logit_diff']:.3g} (tolerance {report['tolerance']:g}), "
                     f"argmax agreement {report['argmax_agreement']:.3f}")
    if "quantization" in report:
        from fttrain.export import quantization_summary

        q = report["quantization"]
        lines.append(f"- weight-only quantised, {quantization_summary(q)}")
        if q.get("load_note"):
            lines.append(f"- loading it: {q['load_note']}")
    lines.append("")
    if data_report:
        lines += ["## Data", "", "| split | source | rows | kept | tokens | trained tokens |", "|---|---|---|---|---|---|"]
        for split, r in data_report.items():
            if isinstance(r, dict):
                lines.append(f"| {split} | `{r.get('source', '')}` | {r.get('rows', '')} | {r.get('kept', '')} | "
                             f"{r.get('tokens', '')} | {r.get('trained_tokens', '')} |")
        lines.append("")
    shown = [(k, metrics[k]) for k in CARD_METRICS if metrics.get(k) is not None]
    if shown:
        lines += ["## Metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v:.4g} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in shown]
        lines.append("")
    harness = _read_json(run_dir / "eval_harness.json") if run_dir else {}
    if harness.get("results"):
        from fttrain.harness import table

        lines += ["## Benchmarks (lm-evaluation-harness)", "",
                  f"lm_eval {harness.get('lm_eval', {}).get('lm_eval', '?')} on the run's model"
                  + (f", the first {harness['limit']} docs of each task" if (harness.get("limit") or 0) >= 1 else
                     f", the first {harness['limit']:.0%} of each task's docs" if harness.get("limit") else "")
                  + (", chat template applied" if harness.get("apply_chat_template") else "") + ":", "",
                  table(harness), ""]
    if cfg:
        import shlex

        command = "python -m fttrain " + " ".join(shlex.quote(str(o)) for o in overrides)
        lines += ["## Training", "", "```", command.strip(), "```", ""]
        t = cfg.get("trainer", {})
        lines.append(f"learning rate {t.get('learning_rate')}, {t.get('lr_scheduler')} schedule, "
                     f"max_steps {t.get('max_steps')}, micro batch {t.get('micro_batch_size')}, "
                     f"precision {info.get('precision', 'unknown')}, plan {metrics.get('dist_plan', 'unknown')}.")
        lines.append("")
    versions = info.get("versions") or {}
    lines += ["## Versions", "", f"fttrain {fttrain.__version__}"
              + "".join(f", {k} {v}" for k, v in sorted(versions.items())), ""]
    return "\n".join(header + lines)


def write_card(folder: Path, run_dir: Optional[Path], report: dict) -> Path:
    path = Path(folder) / "README.md"
    path.write_text(card_text(run_dir, report))
    return path


def push(folder: Path, repo: str, private: bool) -> str:
    """Upload an exported folder to the Hub repo (created when missing); returns its URL."""
    from huggingface_hub import HfApi

    api = HfApi()
    try:
        url = api.create_repo(repo, private=private, exist_ok=True)
        api.upload_folder(folder_path=str(folder), repo_id=repo, commit_message="Upload from fttrain export")
    except Exception as e:  # network, permissions, a name the Hub refuses
        raise HubError(f"--push-to-hub {repo}: the upload failed ({type(e).__name__}: {e}); {folder} is complete "
                       f"locally: retry, or `hf upload {repo} {folder}`") from e
    return str(url)

