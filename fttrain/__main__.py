"""``python -m fttrain +exp=NAME [overrides]``: compose, validate, run.

Under ``accelerate launch`` every rank runs this: each composes the same
config and writes into the same run directory (``output_root/name`` unless
``hydra.run.dir`` says otherwise; never a timestamp, which would differ per rank).
"""

from fttrain.early_signals import catch_early

catch_early()  # before the imports below, which take seconds: a stop signal then is remembered, not fatal

import json  # noqa: E402
import logging  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402

import hydra  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import DictConfig, OmegaConf  # noqa: E402

from fttrain.config.schema import register_configs  # noqa: E402
from fttrain.env import is_main_process  # noqa: E402
from fttrain.errors import FttrainError, report  # noqa: E402
from fttrain.harness import HarnessError  # noqa: E402
from fttrain.run import run  # noqa: E402
from fttrain.paths import CONF_DIR  # noqa: E402

register_configs()
log = logging.getLogger("fttrain")


_composed = False  # set once Hydra hands over a config in this process


def cli() -> None:
    """``python -m fttrain`` / ``fttrain train``. Hydra reports an override it cannot
    compose (a typo, a wrong type, an unknown option) in one message and exits 1
    (with HYDRA_FULL_ERROR=1 it raises instead); that is the user's to fix, so it
    exits 2 like every other user error. Only a Hydra or OmegaConf error raised
    before any config reached fttrain counts: a sweep's failed trials, a Slurm
    launcher's failure or a bug keep exit 1."""
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    compose_errors = (HydraException, OmegaConfBaseException)
    problem = run_dir_problem(sys.argv[1:])
    if problem:  # Hydra creates the run directory (and its log) before fttrain sees the config
        raise SystemExit(report("fttrain", FttrainError(problem)))
    try:
        main()
    except SystemExit as e:
        if e.code == 1 and not _composed and isinstance(e.__context__, compose_errors):
            raise SystemExit(2) from None
        raise
    except compose_errors:
        if _composed:
            raise
        import traceback

        traceback.print_exc()  # HYDRA_FULL_ERROR=1 asked for it
        raise SystemExit(2) from None


def several_options_chosen(choices) -> str:
    """GROUP=[a,b] merges both options into one node, lists replaced by the last
    (logger=[mlflow,tensorboard] would report to tensorboard alone): refused."""
    from fttrain.config.schema import GROUP_SCHEMAS

    groups = [g for g in GROUP_SCHEMAS if g not in choices]
    if not groups:
        return ""
    hint = " (several trackers: logger.report_to=[mlflow,tensorboard])" if "logger" in groups else ""
    return (f"{', '.join(groups)}: one option per config group; a list of options is merged into one config, "
            f"the last list winning{hint}")


def run_dir_problem(args) -> str:
    """A run directory given on the command line (output_root=, hydra.run.dir=) that
    cannot be created or written: said here, before Hydra fails on it with a traceback.
    Values with interpolations (${...}) are left to Hydra."""
    import os

    given = {}
    for a in args:
        if "=" in a and not a.startswith("-"):
            key, value = a.split("=", 1)
            given[key.lstrip("+~")] = value.strip("'\"")
    for key in ("hydra.run.dir", "output_root"):
        value = given.get(key)
        if not value or "${" in value:
            continue
        path = Path(value).expanduser().absolute()
        for part in (path, *path.parents):
            if part.exists():
                if not part.is_dir():
                    return f"{key}={value}: {part} is a file, not a directory"
                if not os.access(part, os.W_OK | os.X_OK):
                    return f"{key}={value}: {part} is not writable by this user"
                break
    return ""


@hydra.main(version_base=None, config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig):
    from hydra.types import RunMode

    global _composed
    _composed = True
    multirun = HydraConfig.get().mode == RunMode.MULTIRUN
    if not multirun:  # a sweep's trials share this process and may differ
        from fttrain.import_scope import keep_out_unused

        keep_out_unused(cfg)
    try:
        return _main(cfg)
    except FttrainError as e:
        if multirun and isinstance(e, HarnessError):  # trained and complete; only its benchmark failed
            log.error("%s", e)
            return _objective(cfg, json.loads((Path(HydraConfig.get().runtime.output_dir) / "metrics.json")
                                              .read_text()))
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
    several = several_options_chosen(HydraConfig.get().runtime.choices)
    if several:
        raise FttrainError(several)
    shared = liger_in_shared_process(cfg)
    if shared:
        raise FttrainError(shared)
    run_dir = Path(HydraConfig.get().runtime.output_dir)
    metrics = run(cfg, run_dir, list(HydraConfig.get().overrides.task)) or {}
    if cfg.preflight:  # nothing trained: no objective to warn about
        return float("nan")
    return _objective(cfg, metrics)


def liger_in_shared_process(cfg: DictConfig) -> str:
    """Liger rebinds transformers' module-level classes for the rest of the process: in a sweep
    whose trials share this process, every later trial would train with its kernels."""
    from hydra.types import RunMode

    from fttrain.loss import liger_kernel_config, liger_knobs

    hydra_cfg = HydraConfig.get()
    if hydra_cfg.mode != RunMode.MULTIRUN or liger_kernel_config(cfg.trainer) is None \
            or not hydra_cfg.launcher._target_.endswith("BasicLauncher"):
        return ""
    return (f"{liger_knobs(cfg.trainer)}: Liger-Kernel patches transformers' modules for the whole process, and this sweep runs its "
            "trials in one process, so the trials after this one would train with its kernels too; sweep with "
            "hydra/launcher=slurm (a process per trial) or run these trials on their own")


def _objective(cfg: DictConfig, metrics: dict) -> float:
    """Returned for Hydra sweepers (Optuna optimises this value)."""
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


if __name__ == "__main__":
    cli()
