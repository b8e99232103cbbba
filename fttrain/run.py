"""One run, top to bottom. Each step is a call here; a recipe
(``fttrain/recipes/<family>.py`` over ``recipes/base.py``) holds only what its
task does differently.

    compose   Hydra (fttrain.__main__, fttrain train): fttrain/conf/ + overrides,
              typed by fttrain.config.schema; a typo or wrong type stops here (exit 2)
    check     check_config: every cross-field rule, all problems at once (exit 2)
    run dir   never clobber a finished run; a Slurm restart resumes from its newest
              complete checkpoint; config.yaml and overrides.yaml written
    setup     recipe.setup():
                launch   world size, plan check (fttrain.plan.check), process group,
                         stop-signal handlers, TrainingArguments (fttrain.plan.translate)
                model    tokenizer, chat template, weights, the PEFT method (fttrain.methods)
                data     prepared once per node (local rank 0), memory-mapped by every rank
                trainer  the task's Trainer with fttrain's accounting and atomic checkpoints
    train     recipe.train(): resume, steps, evals; a signal checkpoints, then stops (or requeues)
    save      recipe.save(): model/ whole or absent, metrics.json, loss curve, COMPLETE last
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from omegaconf import DictConfig, OmegaConf

from fttrain import atomic
from fttrain.env import is_main_process
from fttrain.recipes import recipe_class

log = logging.getLogger("fttrain")


def run(cfg: DictConfig, run_dir: Path, overrides=()) -> dict:
    """The run after composing (``fttrain train`` / ``python -m fttrain``; tests call
    it in-process with a composed config). Returns the metrics ({} for preflight,
    a stopped run's for a signal)."""
    from fttrain.config.checks import check_config
    from fttrain.outputs import RunLock

    run_dir = Path(run_dir)
    check_config(cfg)
    # One run per directory: a second one started into it is refused while this one lives.
    lock = RunLock(run_dir) if is_main_process() and not cfg.preflight else None
    recipe = None
    try:
        finished = prepare_run_dir(cfg, run_dir, overrides)  # check, guard, Slurm restart, config.yaml
        if finished is not None:
            log.info("resume_from=auto: %s is a finished run of %s steps and no more are planned (raise "
                     "trainer.max_steps to continue it); nothing to do", run_dir, finished.get("steps"))
            return finished
        recipe = recipe_class(cfg.task.name)(cfg, run_dir)  # the task's recipe (fttrain.tasks)
        recipe.setup()
        if cfg.preflight:
            if recipe.is_main:
                if recipe.task.token_loss:  # the estimate models a causal LM's token loss
                    from fttrain.estimate import report

                    try:
                        report(cfg, recipe.topology.world_size, log)
                    except Exception as e:  # an estimate it cannot make never fails a valid run's preflight
                        log.warning("no memory estimate for this model: %s: %s", type(e).__name__, e)
                log.info("preflight passed: config, launch, tokenizer and the data are valid (%s); "
                         "run again without preflight=true to train", recipe.data_report)
            return {}
        if recipe.is_main:
            write_run_info(cfg, run_dir, recipe)
        recipe.train()
        if recipe.stop_on_signal.stopped:
            return recipe.finish_stopped()
        return recipe.save()
    finally:
        # Also after a failed setup: the next in-process run (a sweep's trial) installs its own handlers.
        trackers = getattr(recipe, "trackers", None)  # still open: the run failed, or a signal stopped it
        if trackers is not None:
            trackers.end("KILLED" if getattr(recipe.stop_on_signal, "stopped", False) else "FAILED")
        stop = getattr(recipe, "stop_on_signal", None)  # absent when the launch checks failed
        if stop is not None:
            stop.restore()
        if getattr(recipe, "is_main", False):
            from fttrain.preemption import remove_pid_file

            remove_pid_file(run_dir)
        if lock is not None:
            lock.release()


def prepare_run_dir(cfg: DictConfig, run_dir: Path, overrides=()):
    """None, or (resume_from=auto on a finished run with no more steps planned) its metrics: nothing to do."""
    from fttrain import outputs
    from fttrain.config.checks import check_config

    check_config(cfg)  # cross-field rules; types and key names were checked while composing
    check_expected_config(cfg)
    warn_inherited_data_settings(cfg, overrides)
    run_dir = Path(run_dir)
    restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
    if restarts > 0:
        # A requeued Slurm job continues its first start: from the newest complete
        # checkpoint when there is one (not the resume_from PATH it started from),
        # and never by clearing the run directory again.
        from fttrain.checkpoints import complete_checkpoints

        cfg.overwrite = False
        if complete_checkpoints(run_dir):
            cfg.resume_from = "auto"
        log.info("Slurm restart %d: resume_from=%s", restarts, cfg.resume_from)
    if not cfg.preflight:  # preflight writes nothing, so it may look at any directory
        finished = outputs.finished_run_metrics(run_dir, cfg.trainer, cfg.resume_from, cfg.overwrite)
        if finished is not None:
            return finished
        outputs.guard_run_dir(run_dir, cfg.overwrite, cfg.resume_from, hashes=cfg.trainer.verify_checkpoints == "hash")
    if is_main_process() and not cfg.preflight:
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs.unmark_complete(run_dir)
        from fttrain.sweep import FAILED

        (run_dir / FAILED).unlink(missing_ok=True)
        if cfg.overwrite:
            outputs.clear_previous_run(run_dir)
        atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic.write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))
    return None


def warn_inherited_data_settings(cfg: DictConfig, overrides) -> None:
    """data.train from the command line on an experiment made for a built-in
    set: say which of that set's settings still apply (eval set, row cap, length)."""
    from fttrain.config.checks import inherited_data_settings

    inherited = inherited_data_settings(cfg, overrides)
    if inherited and is_main_process():
        log.warning("data.train=%s is yours, but these data settings come from the experiment, not your command line: "
                    "%s. Set them if they do not suit your data (e.g. data.max_samples=null, data.max_length=2048).",
                    cfg.data.train, ", ".join(inherited))


def check_expected_config(cfg: DictConfig) -> None:
    """A Slurm job (fttrain.slurm) trains exactly the config that was rendered:
    FTTRAIN_EXPECT_CONFIG names that resolved config; any difference stops the run."""
    from fttrain.config.checks import ConfigCheckError

    path = os.environ.get("FTTRAIN_EXPECT_CONFIG")
    if not path:
        return
    want = OmegaConf.to_container(OmegaConf.load(path), resolve=True)
    got = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)), resolve=True)
    diffs = sorted(_differences(want, got))
    if diffs:
        raise ConfigCheckError([f"this job's config differs from the rendered {path} at: {', '.join(diffs[:20])} "
                                "(fttrain/conf/ or the overrides changed after rendering; render the job again)"])


def _differences(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        for k in set(a) | set(b):
            yield from _differences(a.get(k, "<missing>"), b.get(k, "<missing>"), f"{path}.{k}" if path else str(k))
    elif a != b:
        yield path or "<root>"


def write_run_info(cfg: DictConfig, run_dir: Path, recipe) -> None:
    import torch

    from fttrain.env import library_versions

    versions = library_versions()
    info = {
        "name": cfg.name,
        "task": cfg.task.name,
        "model_path": recipe.model_path,
        "batch": recipe.batch_info,
        "precision": recipe.runtime.precision,
        "device": "cpu" if recipe.runtime.use_cpu else torch.cuda.get_device_name(),
        "pad_token_strategy": recipe.pad_strategy,
        "versions": versions,
    }
    atomic.write_json(run_dir / "run_info.json", info)
