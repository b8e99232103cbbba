"""Sweep summaries: one row per trial with its overrides and final metrics.

``python -m fttrain -m +exp=NAME peft.r=8,16 trainer.learning_rate=1e-4,2e-4``
runs every combination, each trial in ``<output_root>/multirun/<name>/<overrides>``
(hydra.sweep in fttrain/conf/config.yaml). A trial that fails is recorded (FAILED in
its directory, with the error) and the sweep goes on. At the end
``SweepSummary`` (a Hydra callback) writes ``summary.csv`` in the sweep
directory and prints the table; ``python -m fttrain.sweep DIR`` does the same
for any sweep directory, e.g. a Slurm job array's while it runs.
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path
from typing import Dict, List

import yaml
from hydra.experimental.callback import Callback

from fttrain.outputs import COMPLETE

FAILED = "FAILED"
# Shown first when present; then every other eval_* metric.
METRICS = ["train_loss", "eval_loss", "steps", "train_tokens_per_second", "peak_memory_bytes"]
HIDDEN_OVERRIDES = ("resume_from", "hydra.run.dir", "output_root")


def trial_dirs(sweep_dir: Path) -> List[Path]:
    return sorted(p.parent for p in Path(sweep_dir).glob("*/overrides.yaml"))


def status_of(run_dir: Path) -> str:
    if (run_dir / COMPLETE).exists():
        return "complete"
    if (run_dir / FAILED).exists():
        return "failed: " + (run_dir / FAILED).read_text().strip().splitlines()[0][:120]
    return "unfinished"


def summarise(sweep_dir: Path) -> List[Dict]:
    rows = []
    for d in trial_dirs(sweep_dir):
        overrides = [o for o in (yaml.safe_load((d / "overrides.yaml").read_text()) or [])
                     if o.split("=", 1)[0].lstrip("+~") not in HIDDEN_OVERRIDES]
        metrics = json.loads((d / "metrics.json").read_text()) if (d / "metrics.json").exists() else {}
        row = {"trial": d.name, "status": status_of(d)}
        row.update(dict(o.split("=", 1) for o in overrides if "=" in o))
        for key in METRICS + sorted(k for k in metrics if k.startswith("eval_") and k not in METRICS):
            if key in metrics and not isinstance(metrics[key], (dict, list)):
                row[key] = metrics[key]
        rows.append(row)
    return rows


def columns_of(rows: List[Dict]) -> List[str]:
    cols: List[str] = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    # Overrides every trial shares say nothing about the difference between trials.
    shared = {c for c in cols if c not in ("trial", "status") and c not in METRICS and not c.startswith("eval_")
              and len({str(r.get(c)) for r in rows}) == 1}
    return [c for c in cols if c not in shared]


def write_summary(sweep_dir: Path, out=sys.stdout) -> List[Dict]:
    sweep_dir = Path(sweep_dir)
    rows = summarise(sweep_dir)
    if not rows:
        print(f"fttrain.sweep: no trials in {sweep_dir}", file=out)
        return rows
    cols = columns_of(rows)
    with open(sweep_dir / "summary.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    fmt = lambda v: f"{v:.4g}" if isinstance(v, float) else ("" if v is None else str(v))
    cols = [c for c in cols if c != "trial"]  # printed: the override columns say which trial it is
    table = [cols] + [[fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max(len(line[i]) for line in table) for i in range(len(cols))]
    print(f"sweep {sweep_dir} ({len(rows)} trials; summary.csv):", file=out)
    for line in table:
        print("  " + "  ".join(v.ljust(w) for v, w in zip(line, widths)), file=out)
    return rows


class SweepSummary(Callback):
    """Hydra callback (fttrain/conf/config.yaml): the summary table after a multirun.
    Exits non-zero after printing it when a trial failed."""

    def on_multirun_end(self, config, **kwargs) -> None:
        rows = write_summary(Path(str(config.hydra.sweep.dir)))
        failed = [r["trial"] for r in rows if r["status"].startswith("failed")]
        if failed:
            print(f"fttrain: {len(failed)} of {len(rows)} trials failed: {', '.join(failed)}", file=sys.stderr)
            raise SystemExit(1)


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m fttrain.sweep SWEEP_DIR", file=sys.stderr)
        return 2
    write_summary(Path(args[0]))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
