"""Experiment trackers: MLflow, Weights & Biases and TensorBoard, fed from what
the run itself records.

    python -m fttrain +exp=NAME logger=mlflow                               # sqlite:///<output_root>/mlflow.db
    python -m fttrain +exp=NAME logger=wandb                                # WANDB_MODE=offline: files only
    python -m fttrain +exp=NAME logger.report_to=[mlflow,tensorboard]       # several at once

Each tracker in ``logger.report_to`` gets, from the main process only:
- at the first step: tags (experiment, task, PEFT method, plan, world size,
  and the sweep and trial in a Hydra sweep) and the resolved config as
  parameters (dotted keys: ``trainer.learning_rate``);
- every line ``train_log.jsonl`` gets (training and eval numbers), at its
  step, the same values: one callback writes both;
- at the end, the numbers of ``metrics.json`` as ``final/<key>`` and the
  files ``loss_curve.png``, ``data_report.json``, ``metrics.json`` and
  ``config.yaml`` as artifacts.

fttrain talks to these three itself rather than through transformers'
``report_to`` (which sends the TrainingArguments, not the run's config, and
cannot resume a tracker run); other trackers transformers knows (comet_ml,
clearml, ...) are passed on to it as before.

The tracker runs' ids are kept in ``trackers.json`` in the run dir: a resumed
run (``resume_from``, a Slurm requeue) continues the same MLflow run, W&B run
and TensorBoard log instead of starting new ones, and ``fttrain eval`` adds
its results to them. A run that fails ends its tracker runs as failed; one
stopped by a signal as killed, to be continued by its resume.
"""

from __future__ import annotations

import json
import logging
import math
import os
import uuid
from pathlib import Path
from typing import Dict, List, Optional

from transformers import TrainerCallback

from fttrain import atomic
from fttrain.env import is_main_process

log = logging.getLogger("fttrain.trackers")

RECORD = "trackers.json"
ARTIFACTS = ("loss_curve.png", "data_report.json", "metrics.json", "config.yaml")


class Tracker:
    """One tracker's run. start() opens it (or reopens the run whose ids ``saved``
    holds) and returns the ids to keep; the rest log to it."""

    name = ""
    package = ""  # the module to import, and the pip install line below
    pip = ""

    def start(self, ctx: "RunContext", saved: Optional[dict]) -> dict:
        raise NotImplementedError

    def attach(self, saved: dict) -> None:
        """Reopen the run ``saved`` names (its ids from trackers.json) to add to it."""
        raise NotImplementedError

    def log_params(self, params: Dict[str, str]) -> None:
        raise NotImplementedError

    def log_metrics(self, metrics: Dict[str, float], step: int) -> None:
        raise NotImplementedError

    def log_final(self, metrics: Dict[str, float], step: int) -> None:
        self.log_metrics(metrics, step)

    def log_artifacts(self, paths: List[Path]) -> None:
        raise NotImplementedError

    def end(self, status: Optional[str]) -> None:
        """status: FINISHED | FAILED | KILLED (MLflow's words; the others map them);
        None: close without changing the run's status (a later addition)."""
        raise NotImplementedError


class RunContext:
    """What every tracker is told about the run: where, what, and its group in a sweep."""

    def __init__(self, cfg, run_dir: Path, world_size: int, resuming: bool, resume_step: int = 0):
        from fttrain.plan import plan_label

        self.cfg, self.run_dir = cfg, Path(run_dir)
        self.resuming, self.resume_step = resuming, resume_step
        self.name = cfg.name
        self.project = cfg.logger.project
        self.tags = {"experiment": cfg.name, "task": cfg.task.name, "peft_method": cfg.peft.method,
                     "plan": plan_label(cfg.dist), "world_size": str(world_size)}
        self.sweep = sweep_of_this_job()
        if self.sweep:
            self.tags.update(self.sweep)
        # One group per sweep: every trial of `python -m fttrain -m ...` is one run in it.
        self.group = f"{cfg.name}-sweep" if self.sweep else None
        self.run_name = self.run_dir.name if self.sweep else cfg.name


def sweep_of_this_job() -> Dict[str, str]:
    """{'sweep_dir', 'trial'} inside a Hydra multirun job, else {}."""
    try:
        from hydra.core.hydra_config import HydraConfig
        from hydra.types import RunMode

        if not HydraConfig.initialized() or HydraConfig.get().mode != RunMode.MULTIRUN:
            return {}
        hc = HydraConfig.get()
        return {"sweep_dir": str(Path(hc.sweep.dir).resolve()), "trial": str(hc.job.num)}
    except Exception:  # Hydra absent or not running this job (a test calling run() directly)
        return {}


# ------------------------------------------------------------------ MLflow
class MlflowTracker(Tracker):
    name, package, pip = "mlflow", "mlflow", "mlflow"

    def start(self, ctx, saved):
        from mlflow.tracking import MlflowClient

        if saved and saved.get("run_id"):
            self.attach(saved)
            self.client.update_run(self.run_id, status="RUNNING")
            return saved
        uri = ctx.cfg.logger.tracking_uri or default_mlflow_uri(ctx.cfg)
        self.client = MlflowClient(uri)
        experiment = (ctx.project or ctx.name) + ("-sweep" if ctx.sweep else "")
        found = self.client.get_experiment_by_name(experiment)
        if found is not None:
            experiment_id = found.experiment_id
        else:
            # The local store keeps its artifacts beside it; a server decides for itself.
            local = uri.startswith("sqlite:///") and ctx.cfg.logger.tracking_uri is None
            where = (Path(ctx.cfg.output_root).resolve() / "mlartifacts" / experiment).as_uri() if local else None
            experiment_id = self.client.create_experiment(experiment, artifact_location=where)
        run = self.client.create_run(experiment_id, tags=ctx.tags, run_name=ctx.run_name)
        self.run_id = run.info.run_id
        return {"tracking_uri": uri, "experiment": experiment, "experiment_id": experiment_id, "run_id": self.run_id}

    def attach(self, saved):
        from mlflow.tracking import MlflowClient

        self.client, self.run_id = MlflowClient(saved["tracking_uri"]), saved["run_id"]

    def log_params(self, params):
        from mlflow.entities import Param

        # MLflow caps a value at 6000 characters and a batch at 100 parameters.
        items = [Param(k, v[:6000]) for k, v in params.items()]
        existing = self.client.get_run(self.run_id).data.params
        items = [p for p in items if p.key not in existing]  # a resumed run: parameters cannot be logged twice
        for i in range(0, len(items), 100):
            self.client.log_batch(self.run_id, params=items[i:i + 100])

    def log_metrics(self, metrics, step):
        import time

        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, step) for k, v in metrics.items()])

    def log_artifacts(self, paths):
        for p in paths:
            self.client.log_artifact(self.run_id, str(p))

    def end(self, status):
        if status:
            self.client.set_terminated(self.run_id, status=status)


def default_mlflow_uri(cfg) -> str:
    """A local SQLite store shared by every run under output_root (MLflow's file
    store is deprecated): ``mlflow ui --backend-store-uri sqlite:///outputs/mlflow.db``."""
    return "sqlite:///" + str(Path(cfg.output_root).resolve() / "mlflow.db")


# ------------------------------------------------------------------ W&B
class WandbTracker(Tracker):
    name, package, pip = "wandb", "wandb", "wandb"

    def start(self, ctx, saved):
        saved = saved or {"id": uuid.uuid4().hex[:12],
                          "project": ctx.project or os.environ.get("WANDB_PROJECT") or "fttrain",
                          "dir": str(ctx.run_dir)}
        self.attach(saved, name=ctx.run_name, group=ctx.group, tags=[f"{k}:{v}" for k, v in ctx.tags.items()])
        # An offline run stays offline when continued later (a resume, fttrain eval) without WANDB_MODE set.
        return {**saved, "mode": "offline" if self.run.offline else "online"}

    def attach(self, saved, **init):
        import wandb

        # Online, or offline (files under <run>/wandb, `wandb sync` later) with WANDB_MODE=offline.
        mode = os.environ.get("WANDB_MODE") or saved.get("mode")
        self.run = wandb.init(project=saved["project"], id=saved["id"], resume="allow", dir=saved["dir"],
                              reinit="create_new", settings=wandb.Settings(silent=True, console="off"),
                              **({"mode": mode} if mode else {}), **init)

    def log_params(self, params):
        self.run.config.update(params, allow_val_change=True)

    def log_metrics(self, metrics, step):
        # W&B drops a step below one it has (a resumed run replaying steps): it warns, the history keeps the first.
        self.run.log(metrics, step=step)

    def log_final(self, metrics, step):
        self.run.summary.update(metrics)  # a run's final numbers are its summary in W&B

    def log_artifacts(self, paths):
        import wandb

        artifact = wandb.Artifact(f"{self.run.id}-outputs", type="run-outputs")
        for p in paths:
            artifact.add_file(str(p))
        self.run.log_artifact(artifact)

    def end(self, status):
        self.run.finish(exit_code=0 if status in ("FINISHED", None) else 1)


# ------------------------------------------------------------------ TensorBoard
class TensorboardTracker(Tracker):
    name, package, pip = "tensorboard", "tensorboard", "tensorboard"

    def start(self, ctx, saved):
        saved = saved or {"log_dir": str(ctx.run_dir / "tensorboard")}
        # A resume replays the steps after its checkpoint: the earlier events of those steps are dropped.
        self.attach(saved, purge_step=ctx.resume_step + 1 if ctx.resuming else None)
        self.step = ctx.resume_step
        self.writer.add_text("tags", "\n".join(f"- {k}: {v}" for k, v in ctx.tags.items()), 0)
        return saved

    def attach(self, saved, purge_step=None):
        from torch.utils.tensorboard import SummaryWriter

        self.writer, self.step = SummaryWriter(log_dir=saved["log_dir"], purge_step=purge_step), 0

    def log_params(self, params):
        table = "| key | value |\n|---|---|\n" + "".join(f"| {k} | {v} |\n" for k, v in params.items())
        self.writer.add_text("config", table, 0)

    def log_metrics(self, metrics, step):
        self.step = step
        for k, v in metrics.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def log_artifacts(self, paths):
        for p in paths:
            if p.suffix == ".png":
                import matplotlib.image

                self.writer.add_image(p.stem, matplotlib.image.imread(str(p))[..., :3], self.step, dataformats="HWC")
            else:
                self.writer.add_text(p.name, "```\n" + p.read_text()[:100_000] + "\n```", self.step)

    def end(self, status):
        if status:
            self.writer.add_text("status", status, self.step)
        self.writer.close()


TRACKERS: Dict[str, type] = {t.name: t for t in (MlflowTracker, WandbTracker, TensorboardTracker)}


def ours(report_to) -> List[str]:
    """The trackers of logger.report_to fttrain feeds itself, in order."""
    return [t for t in report_to if t in TRACKERS]


def passed_to_transformers(report_to):
    """What TrainingArguments.report_to gets: the other integrations, or 'none'."""
    rest = [t for t in report_to if t not in TRACKERS and t != "none"]
    return rest or "none"


def missing_package(name: str) -> Optional[str]:
    """The pip command that installs a tracker fttrain feeds, when it is not importable."""
    import importlib.util

    tracker = TRACKERS[name]
    return None if importlib.util.find_spec(tracker.package) else f"pip install {tracker.pip}"


# ------------------------------------------------------------------ values
def flat_params(cfg) -> Dict[str, str]:
    """The resolved config as {dotted.key: text}; lists and empty dicts as JSON."""
    from omegaconf import OmegaConf

    out: Dict[str, str] = {}

    def walk(node, prefix):
        if isinstance(node, dict) and node:
            for k, v in node.items():
                walk(v, f"{prefix}{k}.")
        else:
            out[prefix[:-1]] = node if isinstance(node, str) else json.dumps(node)

    walk(OmegaConf.to_container(cfg, resolve=True), "")
    return out


def numbers(row: dict) -> Dict[str, float]:
    """The numeric entries of a log line or metrics.json (booleans, text, nested and NaN left out)."""
    return {k: float(v) for k, v in row.items()
            if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "step" and math.isfinite(v)}


# ------------------------------------------------------------------ the run's trackers
class RunTrackers:
    """The trackers of one run, opened at its first step and ended once."""

    def __init__(self, names: List[str], run_dir: Path):
        self.names, self.run_dir = names, Path(run_dir)
        self.open: List[Tracker] = []
        self.ended = False

    def start(self, ctx: RunContext) -> None:
        """Open every tracker; one that cannot start (a wrong tracking_uri, no
        W&B login) stops the run before its first step, naming it."""
        from fttrain.errors import FttrainError

        record_path = self.run_dir / RECORD
        saved = json.loads(record_path.read_text()) if ctx.resuming and record_path.exists() else {}
        record = {}
        for name in self.names:
            tracker = TRACKERS[name]()
            try:
                record[name] = tracker.start(ctx, saved.get(name))
            except Exception as e:
                self.end("FAILED")
                raise FttrainError(f"logger.report_to: could not start the {name} run: {type(e).__name__}: {e}") from e
            self.open.append(tracker)
        atomic.write_json(record_path, record)
        params = flat_params(ctx.cfg)
        self._each("log_params", params)
        log.info("tracking with %s (%s)", ", ".join(self.names), record_path)

    def log(self, row: dict, step: int) -> None:
        values = numbers(row)
        if values:
            self._each("log_metrics", values, step)

    def finish(self, metrics: dict, step: int) -> None:
        """metrics.json's numbers as final/<key>, the run's files as artifacts, then end."""
        final = {f"final/{k}": v for k, v in numbers(metrics).items()}
        self._each("log_final", final, step)
        self._each("log_artifacts", [self.run_dir / n for n in ARTIFACTS if (self.run_dir / n).exists()])
        self.end("FINISHED")

    def end(self, status: str) -> None:
        if self.ended:
            return
        self.ended = True
        for t in self.open:
            try:
                t.end(status)
            except Exception as e:  # ending one must not keep the others open
                log.warning("could not end the %s run: %s", t.name, e)

    def _each(self, method: str, *args) -> None:
        # A tracker that fails mid-run (a server gone) is dropped with a warning:
        # the training run is worth more than its curve on a dashboard.
        for t in list(self.open):
            try:
                getattr(t, method)(*args)
            except Exception as e:
                log.warning("%s: %s failed (%s: %s); no more is sent to it in this run; train_log.jsonl "
                            "has everything", t.name, method, type(e).__name__, e)
                self.open.remove(t)


class TrackerCallback(TrainerCallback):
    """Opens the run's trackers at the first step and sends each log line, on
    the main process; the same rows the JSONL logger writes."""

    def __init__(self, trackers: RunTrackers, cfg):
        self.trackers, self.cfg = trackers, cfg
        self.resume_step: Optional[int] = None  # set by the recipe when resuming from a checkpoint

    def on_train_begin(self, args, state, control, **kwargs):
        if not is_main_process() or self.trackers.open:
            return
        resuming = self.resume_step is not None
        self.trackers.start(RunContext(self.cfg, self.trackers.run_dir, args.world_size, resuming,
                                       self.resume_step or 0))

    def on_log(self, args, state, control, logs=None, **kwargs):
        if is_main_process() and logs and self.trackers.open:
            self.trackers.log(logs, state.global_step)


def log_to_run(run_dir: Path, metrics: Dict[str, float], step: int = 0) -> List[str]:
    """Add final numbers measured after a run (``fttrain eval``) to the tracker runs
    it logged to (``trackers.json``), at ``step``, as the run's own final metrics
    are; returns the trackers written to. One that cannot be reached (no W&B login,
    a server gone) is skipped with a warning: the numbers are in the run dir."""
    record_path = Path(run_dir) / RECORD
    values = numbers(metrics)
    if not record_path.exists() or not values:
        return []
    done = []
    for name, saved in json.loads(record_path.read_text()).items():
        if name not in TRACKERS or missing_package(name):
            log.warning("%s: not adding to the %s run (%s is not installed here)", run_dir, name, name)
            continue
        tracker = TRACKERS[name]()
        try:
            tracker.attach(saved)
            tracker.log_final(values, step)
            tracker.end(None)
        except Exception as e:
            log.warning("%s: could not add to the %s run (%s: %s); the numbers are in the run dir", run_dir, name,
                        type(e).__name__, e)
            continue
        done.append(name)
    return done
