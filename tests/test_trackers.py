"""MLflow, W&B (offline) and TensorBoard get what the run recorded: each is read
back with its own library (MLflow's client, the W&B run file, TensorBoard's
event reader) and compared with train_log.jsonl and metrics.json."""

import json
import math
import struct
import sys
from pathlib import Path

import pytest

from conftest import HARNESS_TASKS, REPO, config_error, fttrain_command, run_cli, train_log

ALL = "logger.report_to=[mlflow,tensorboard,wandb]"
OFFLINE = {"WANDB_MODE": "offline", "WANDB_SILENT": "true"}


# ------------------------------------------------------------------ readers
def logged_values(run_dir):
    """{(key, step): value} of every number train_log.jsonl holds: what the trackers must hold too."""
    out = {}
    for row in train_log(run_dir):
        for k, v in row.items():
            if k != "step" and isinstance(v, (int, float)) and math.isfinite(v):
                out[(k, row["step"])] = float(v)
    return out


def mlflow_run(run_dir):
    from mlflow.tracking import MlflowClient

    ids = json.loads((Path(run_dir) / "trackers.json").read_text())["mlflow"]
    client = MlflowClient(ids["tracking_uri"])
    return client, client.get_run(ids["run_id"])


def mlflow_values(client, run):
    out = {}
    for key in run.data.metrics:
        for m in client.get_metric_history(run.info.run_id, key):
            out[(key, m.step)] = m.value
    return out


def tensorboard_values(log_dir):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(log_dir), size_guidance={"scalars": 0, "tensors": 0, "images": 0})
    events.Reload()
    values = {(tag, e.step): e.value for tag in events.Tags()["scalars"] for e in events.Scalars(tag)}
    return events, values


def wandb_records(run_dir):
    """Every record of the offline run file(s) under run_dir/wandb, as W&B's protobuf
    Records. The file is a LevelDB-style log: a 7-byte header, then 32 KiB blocks of
    chunks (crc32, length, kind: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2 as pb

    records = []
    for path in sorted(Path(run_dir).glob("wandb/offline-run-*/run-*.wandb")):
        data = path.read_bytes()
        ident, magic, _ = struct.unpack("<4sHB", data[:7])
        assert ident == b":W&B" and magic == 0xBEE1, path
        pos, pending = 7, b""
        while pos + 7 <= len(data):
            left = 32768 - pos % 32768
            if left < 7:  # a block's tail too short for a chunk header is padding
                pos += left
                continue
            _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
            if length == 0 and kind == 0:
                pos += left
                continue
            pending += data[pos + 7:pos + 7 + length]
            pos += 7 + length
            if kind in (1, 4):
                record = pb.Record()
                record.ParseFromString(pending)
                records.append(record)
                pending = b""
    return records


def wandb_run(run_dir):
    """(run record, {(key, step): value} of the history, summary, config, artifact files) of the W&B run."""
    run, history, summary, config, files = None, {}, {}, {}, []
    for r in wandb_records(run_dir):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            run = r.run
            for item in r.run.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "config":
            for item in r.config.update:
                config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            for item in r.history.item:
                key = item.key or "/".join(item.nested_key)
                if not key.startswith("_"):
                    history[(key, r.history.step.num)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in r.summary.update:
                summary[item.key or "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "artifact":
            files += [c.path for c in r.artifact.manifest.contents]
    return run, history, summary, config, files


def assert_same(got, want, rel=1e-6):
    missing = sorted(set(want) - set(got))
    assert not missing, f"not logged: {missing[:10]}"
    wrong = {k: (got[k], v) for k, v in want.items() if not math.isclose(got[k], v, rel_tol=rel, abs_tol=1e-9)}
    assert not wrong, wrong


# ------------------------------------------------------------------ fast
def test_unknown_tracker_is_refused_naming_the_choices():
    message = config_error(["+exp=tiny_sft", "logger.report_to=[mlfow]"])
    assert "'mlfow'" in message and "mlflow" in message and "tensorboard" in message


def test_a_missing_tracker_package_is_refused_with_the_pip_command(monkeypatch):
    from fttrain.trackers import TensorboardTracker

    monkeypatch.setattr(TensorboardTracker, "package", "not_installed_tensorboard_twin")
    message = config_error(["+exp=tiny_sft", "logger=tensorboard"])
    assert "tensorboard is not installed (pip install tensorboard)" in message


def test_a_list_of_logger_options_is_refused_pointing_to_report_to():
    from conftest import compose
    from fttrain.__main__ import several_options_chosen

    choices = compose(["+exp=tiny_sft", "logger=[mlflow,tensorboard]"], return_hydra_config=True).hydra.runtime.choices
    assert "logger.report_to=[mlflow,tensorboard]" in several_options_chosen(choices)
    one = compose(["+exp=tiny_sft", "logger=mlflow"], return_hydra_config=True).hydra.runtime.choices
    assert several_options_chosen(one) == ""


def test_other_integrations_are_passed_to_transformers():
    from fttrain.trackers import ours, passed_to_transformers

    assert ours(["mlflow", "comet_ml", "wandb"]) == ["mlflow", "wandb"]
    assert passed_to_transformers(["mlflow", "comet_ml"]) == ["comet_ml"]
    assert passed_to_transformers(["mlflow", "tensorboard"]) == "none"


def test_the_resolved_config_becomes_dotted_parameters():
    from conftest import compose
    from fttrain.trackers import flat_params

    params = flat_params(compose(["+exp=tiny_sft", "trainer.learning_rate=0.002"]))
    assert params["trainer.learning_rate"] == "0.002" and params["name"] == "tiny_sft"
    assert params["peft.method"] == "lora" and json.loads(params["peft.target_modules"])


# ------------------------------------------------------------------ one run, three trackers
@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("tracked")
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=6", "trainer.eval_steps=3", "trainer.save_steps=3", ALL],
                   cwd=cwd, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "outputs" / "tiny_sft"


@pytest.mark.slow
def test_mlflow_holds_the_config_every_metric_the_final_numbers_and_the_files(tracked_run):
    client, run = mlflow_run(tracked_run)
    assert run.info.status == "FINISHED"
    values = mlflow_values(client, run)
    assert_same(values, logged_values(tracked_run))
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert values[("final/eval_loss", 6)] == pytest.approx(metrics["eval_loss"])
    assert values[("final/trainable_params", 6)] == metrics["trainable_params"]
    config = (tracked_run / "config.yaml").read_text()
    assert "learning_rate: 0.001" in config and run.data.params["trainer.learning_rate"] == "0.001"
    assert run.data.params["trainer.max_steps"] == "6"
    tags = run.data.tags
    assert (tags["experiment"], tags["task"], tags["peft_method"], tags["world_size"]) == ("tiny_sft", "sft", "lora",
                                                                                           "1")
    assert tags["plan"] and "trial" not in tags
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"loss_curve.png", "data_report.json", "metrics.json", "config.yaml"} <= artifacts


@pytest.mark.slow
def test_tensorboard_events_hold_every_metric_the_config_and_the_loss_curve(tracked_run):
    events, values = tensorboard_values(tracked_run / "tensorboard")
    assert_same(values, logged_values(tracked_run), rel=1e-6)  # events store float32
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert values[("final/eval_loss", 6)] == pytest.approx(metrics["eval_loss"], rel=1e-6)
    assert events.Tags()["images"] == ["loss_curve"]
    texts = set(events.Tags()["tensors"])
    assert {"config/text_summary", "tags/text_summary", "data_report.json/text_summary"} <= texts
    config = events.Tensors("config/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "| trainer.max_steps | 6 |" in config


@pytest.mark.slow
def test_wandb_offline_run_holds_every_metric_the_config_and_the_files(tracked_run):
    run, history, summary, config, files = wandb_run(tracked_run)
    ids = json.loads((tracked_run / "trackers.json").read_text())["wandb"]
    assert run.run_id == ids["id"] and run.project == "fttrain" and run.display_name == "tiny_sft"
    assert {"experiment:tiny_sft", "task:sft", "peft_method:lora", "world_size:1"} <= set(run.tags)
    assert_same(history, logged_values(tracked_run))
    metrics = json.loads((tracked_run / "metrics.json").read_text())
    assert summary["final/eval_loss"] == pytest.approx(metrics["eval_loss"])
    assert config["trainer.learning_rate"] == "0.001" and config["task.name"] == "sft"
    assert {"loss_curve.png", "data_report.json", "metrics.json", "config.yaml"} <= set(files)


@pytest.mark.slow
def test_a_resumed_run_continues_the_same_tracker_runs(tracked_run, tmp_path):
    import shutil

    # A copy of the finished run, continued to step 9 (the plan grew): same MLflow run, W&B id, TensorBoard log.
    root = tmp_path / "outputs"
    shutil.copytree(tracked_run.parent, root)
    run_dir = root / "tiny_sft"
    record = json.loads((run_dir / "trackers.json").read_text())
    record["mlflow"]["tracking_uri"] = "sqlite:///" + str(root / "mlflow.db")
    record["tensorboard"]["log_dir"] = str(run_dir / "tensorboard")
    record["wandb"]["dir"] = str(run_dir)
    (run_dir / "trackers.json").write_text(json.dumps(record))
    before = json.loads((run_dir / "trackers.json").read_text())
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=9", "trainer.eval_steps=3", "trainer.save_steps=3", ALL,
                    "resume_from=auto"], cwd=tmp_path, env=OFFLINE)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after = json.loads((run_dir / "trackers.json").read_text())
    assert after == before
    client, run = mlflow_run(run_dir)
    assert run.info.status == "FINISHED"
    assert len(client.search_runs([run.info.experiment_id])) == 1
    losses = client.get_metric_history(run.info.run_id, "loss")
    assert sorted(m.step for m in losses) == list(range(1, 10))
    assert_same(mlflow_values(client, run), logged_values(run_dir))
    _, tb = tensorboard_values(run_dir / "tensorboard")
    assert sorted(s for k, s in tb if k == "loss") == list(range(1, 10))
    _, history, _, _, _ = wandb_run(run_dir)
    assert sorted(s for k, s in history if k == "loss") == list(range(1, 10))


@pytest.mark.slow
def test_a_sweep_is_one_mlflow_experiment_with_one_run_per_trial(tmp_path):
    proc = run_cli(["-m", "+exp=tiny_sft", "trainer.max_steps=2", "trainer.learning_rate=0.001,0.002",
                    "logger=mlflow", "data.eval_fraction=0"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    from mlflow.tracking import MlflowClient

    client = MlflowClient("sqlite:///" + str(tmp_path / "outputs" / "mlflow.db"))
    experiment = client.get_experiment_by_name("tiny_sft-sweep")
    runs = client.search_runs([experiment.experiment_id])
    assert sorted(r.data.tags["trial"] for r in runs) == ["0", "1"]
    assert sorted(r.data.params["trainer.learning_rate"] for r in runs) == ["0.001", "0.002"]
    assert len({r.info.run_name for r in runs}) == 2 and all(r.info.status == "FINISHED" for r in runs)
    assert len({r.data.tags["sweep_dir"] for r in runs}) == 1


@pytest.mark.slow
def test_a_failed_run_ends_its_tracker_run_as_failed(tmp_path):
    # lr=1e6 diverges within a few steps (tests/test_faults.py): the run fails, and so does its MLflow run.
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=12", "trainer.learning_rate=1e6", "logger=mlflow"],
                   cwd=tmp_path)
    assert proc.returncode == 2 and "diverged" in proc.stderr, proc.stderr[-3000:]
    _, run = mlflow_run(tmp_path / "outputs" / "tiny_sft")
    assert run.info.status == "FAILED"


@pytest.mark.slow
def test_only_the_main_process_logs_and_evaluates_under_two_ranks(tmp_path):
    launcher = [sys.executable, "-m", "accelerate.commands.launch", "--config_file",
                str(REPO / "launch" / "cpu_2proc.yaml"), "--main_process_port", "29541"]
    harness = ["harness.tasks=[reverse_letters_choice]", f"harness.include_path={HARNESS_TASKS}", "harness.limit=4"]
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=3", "logger.report_to=[mlflow,tensorboard]", *harness],
                   cwd=tmp_path, launcher=launcher)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "outputs" / "tiny_sft"
    # lm-evaluation-harness after training: once, on rank 0, on the model DDP trained, as the saved one scores.
    assert "lm-evaluation-harness" in (run_dir / "train_rank0.log").read_text()
    assert "lm-evaluation-harness" not in (run_dir / "train_rank1.log").read_text()
    proc = fttrain_command(["eval", str(run_dir), "--out", str(tmp_path / "again.json")], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    after, again = (json.loads(p.read_text()) for p in (run_dir / "eval_harness.json", tmp_path / "again.json"))
    assert after["n-samples"]["reverse_letters_choice"]["effective"] == 4
    assert again["task_hashes"] == after["task_hashes"]
    assert again["results"] == after["results"]
    client, run = mlflow_run(run_dir)
    assert len(client.search_runs([run.info.experiment_id])) == 1 and run.data.tags["world_size"] == "2"
    assert_same(mlflow_values(client, run), logged_values(run_dir))
    steps = sorted(m.step for m in client.get_metric_history(run.info.run_id, "loss"))
    assert steps == [r["step"] for r in train_log(run_dir) if "loss" in r]  # each step once: one process logged
    assert len(list((run_dir / "tensorboard").glob("events.out.tfevents.*"))) == 1
