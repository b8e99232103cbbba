"""``python -m fttrain +exp=NAME [overrides]``: compose, validate, run.

Under ``accelerate launch`` every rank runs this: each composes the same
config and writes into the same run directory (``output_root/name`` unless
``hydra.run.dir`` says otherwise; never a timestamp, which would differ per rank).
"""

import logging
import os
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from fttrain.config.schema import register_configs
from fttrain.env import is_main_process
from fttrain.errors import FttrainError, report
from fttrain.paths import CONF_DIR

register_configs()
log = logging.getLogger("fttrain")


_composed = False  # set once Hydra hands over a config: an exit before that is a compose error


def cli() -> None:
    """``python -m fttrain`` / ``fttrain train``. Hydra reports an override it cannot
    compose (a typo, a wrong type, an unknown option) in one message and exits 1;
    that is the user's to fix, so it exits 2 like every other user error."""
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _composed:
            raise SystemExit(2) from None
        raise


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig):
    from hydra.types import RunMode

    global _composed
    _composed = True
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    try:
        return _main(cfg)
    except FttrainError as e:
        if multirun:  # one failed trial must not end the sweep: recorded, the sweep goes on
            return _trial_failed(e)
        raise SystemExit(report("fttrain", e))
    except Exception as e:
        if multirun:
            log.exception("trial failed")
            return _trial_failed(e)
        raise


def _main(cfg: DictConfig):
    from fttrain.env import distributed_env_from_slurm

    distributed_env_from_slurm()  # one srun task per rank (Hydra's Slurm launcher): RANK etc. from Slurm
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = run_in_dir(cfg, run_dir, list(HydraConfig.get().overrides.task)) or {}
    # Returned for Hydra sweepers (Optuna optimises this value).
    value = metrics.get(cfg.objective)
    if value is None:
        log.warning("objective=%s is not among the run's metrics; returning nan to the sweeper", cfg.objective)
        return float("nan")
    return float(value)


def _trial_failed(error: Exception) -> float:
    from fttrain.sweep import FAILED

    run_dir = Path(HydraConfig.get().runtime.output_dir)
    print(f"fttrain: trial {run_dir.name} failed: {error}", file=sys.stderr, flush=True)
    if is_main_process():
        from fttrain import atomic

        run_dir.mkdir(parents=True, exist_ok=True)
        (run_dir / FAILED).write_text(f"{type(error).__name__}: {error}\n")
        if not (run_dir / "overrides.yaml").exists():  # failed before the run dir was prepared
            atomic.write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(list(HydraConfig.get().overrides.task)))
    return float("nan")


def run_in_dir(cfg: DictConfig, run_dir: Path, overrides=()) -> dict:
    """Check, prepare the run directory and run the task: what the CLI does
    after composing (tests call it in-process with a composed config)."""
    prepare_run_dir(cfg, run_dir, overrides)
    from fttrain.recipes import run_task

    return run_task(cfg, Path(run_dir))


def prepare_run_dir(cfg: DictConfig, run_dir: Path, overrides=()) -> None:
    from fttrain.config.checks import check_config
    from fttrain import atomic, outputs

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
        outputs.guard_run_dir(run_dir, cfg.overwrite, cfg.resume_from)
    if is_main_process() and not cfg.preflight:
        run_dir.mkdir(parents=True, exist_ok=True)
        outputs.unmark_complete(run_dir)
        from fttrain.sweep import FAILED

        (run_dir / FAILED).unlink(missing_ok=True)
        if cfg.overwrite:
            outputs.clear_previous_run(run_dir)
        atomic.write_text(run_dir / "config.yaml", OmegaConf.to_yaml(cfg, resolve=True))
        atomic.write_text(run_dir / "overrides.yaml", OmegaConf.to_yaml(list(overrides)))


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


if __name__ == "__main__":
    cli()
