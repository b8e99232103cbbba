"""Trust under faults: a diverged run is never saved as finished, a damaged
checkpoint is named and skipped, a failed write keeps the previous checkpoint,
one run per directory, a finished run is not retrained, bad configs and bad
files stop with the key or the file named (exit 2, no traceback), and a hung
rank ends the job with its stack on disk."""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import REPO, compose, run_cli, train_log

BASE = ["+exp=tiny_sft", "trainer.logging_steps=1"]


def run_dir_of(cwd, name="tiny_sft") -> Path:
    return Path(cwd) / "outputs" / name


def checkpoint_steps(run_dir) -> list:
    from fttrain.checkpoints import checkpoint_step, complete_checkpoints

    return [checkpoint_step(p) for p in complete_checkpoints(run_dir)]


def all_finite(folder) -> bool:
    from safetensors.torch import load_file

    files = list(Path(folder).glob("*.safetensors"))
    assert files, f"no weights in {folder}"
    return all(torch.isfinite(t).all() for f in files for t in load_file(f).values())


# ------------------------------------------------------------------ divergence
def test_the_stop_poll_carries_a_non_finite_step_and_blocks_that_save():
    """The first non-finite step is agreed with the stop signals, on the steps the poll
    reads (every stop_check_steps, the last, and any step that saves or evaluates)."""
    from fttrain.preemption import StopOnSignal

    poll = StopOnSignal([], [], check_steps=5)
    poll.trainer = SimpleNamespace(first_nonfinite_step=lambda: torch.tensor(3))
    args, state = SimpleNamespace(device="cpu"), SimpleNamespace(global_step=4, max_steps=20)
    quiet = SimpleNamespace(should_save=False, should_evaluate=False, should_training_stop=False)
    poll.on_step_end(args, state, quiet)
    assert poll.diverged_at is None and not quiet.should_training_stop  # step 4 is not a polled step
    saving = SimpleNamespace(should_save=True, should_evaluate=False, should_training_stop=False)
    poll.on_step_end(args, state, saving)
    assert poll.diverged_at == 3 and not saving.should_save and saving.should_training_stop
    poll.restore()


def test_a_signal_alone_reads_the_non_finite_flag_so_it_never_checkpoints_a_diverged_model():
    from fttrain.preemption import StopOnSignal

    poll = StopOnSignal(["SIGUSR1"], [], check_steps=5)
    poll.trainer = SimpleNamespace(first_nonfinite_step=lambda: torch.tensor(2))
    poll._handle(signal.SIGUSR1, None)
    control = SimpleNamespace(should_save=False, should_evaluate=False, should_training_stop=False)
    poll.on_step_end(SimpleNamespace(device="cpu"), SimpleNamespace(global_step=3, max_steps=20), control)
    assert poll.diverged_at == 2 and not control.should_save and control.should_training_stop
    assert poll.stopped_at is None  # a divergence, not a clean stop to resume from
    poll.restore()


def test_non_finite_weights_are_found_before_the_final_save():
    from fttrain.recipes.base import nonfinite_weights

    model = torch.nn.Sequential(torch.nn.Linear(3, 3), torch.nn.Linear(3, 1))
    model[0].weight.requires_grad_(False)
    trainer = SimpleNamespace(model=model, args=SimpleNamespace(device="cpu", world_size=1),
                              accelerator=SimpleNamespace(unwrap_model=lambda m: m))
    assert nonfinite_weights(trainer) == ""
    with torch.no_grad():
        model[0].weight[0, 0] = float("nan")  # frozen: not what training changed
    assert nonfinite_weights(trainer) == ""
    with torch.no_grad():
        model[1].bias[0] = float("inf")
    assert nonfinite_weights(trainer) == "1.bias"


DIVERGE = ["trainer.max_steps=12", "trainer.save_steps=2", "trainer.save_total_limit=0", "trainer.learning_rate=1e6"]


@pytest.mark.slow
@pytest.mark.parametrize("extra", [
    ["+exp=tiny_sft"],  # LoRA, fp32
    ["+exp=tiny_full"],  # every weight trained
    ["+exp=tiny_sft", "trainer.stop_check_steps=50"],  # only the checkpoint steps' polls guard the saves
], ids=["lora", "full", "lora-rare-polls"])
def test_a_diverged_run_is_never_saved_or_marked_complete(tmp_path, extra):
    name = extra[0].split("=")[1]
    r = run_cli([*extra, "trainer.logging_steps=1", *DIVERGE], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-3000:]
    assert "Traceback" not in r.stderr
    found = re.search(r"training diverged: the loss or gradient norm was not finite at step (\d+)", r.stderr)
    assert found, r.stderr[-2000:]
    bad = int(found[1])
    run_dir = run_dir_of(tmp_path, name)
    assert not (run_dir / "COMPLETE").exists() and not (run_dir / "model").exists()
    assert not (run_dir / "metrics.json").exists()
    steps = checkpoint_steps(run_dir)
    assert steps and max(steps) < bad  # nothing at or after the step that diverged was checkpointed
    assert f"last good checkpoint is {run_dir / 'checkpoints' / f'checkpoint-{max(steps)}'}" in r.stderr
    for step in steps:
        assert all_finite(run_dir / "checkpoints" / f"checkpoint-{step}")
    # The log shows where it went wrong: the first non-finite value is at the step named.
    logged = [row for row in train_log(run_dir) if "loss" in row]
    first = next(row["step"] for row in logged
                 if not all(map(lambda v: v == v and abs(v) != float("inf"), (row["loss"], row["grad_norm"]))))
    assert first == bad


@pytest.mark.slow
def test_a_diverged_two_rank_run_stops_both_ranks_without_saving(tmp_path):
    from test_distributed import shipped_cpu_config

    r = run_cli(BASE + DIVERGE + ["hydra.run.dir=two"], cwd=tmp_path, launcher=shipped_cpu_config(29521))
    assert r.returncode != 0
    assert r.stderr.count("training diverged") >= 2, r.stderr[-3000:]  # each rank stops with the message
    run_dir = tmp_path / "two"
    assert not (run_dir / "COMPLETE").exists() and not (run_dir / "model").exists()
    steps = checkpoint_steps(run_dir)
    bad = int(re.search(r"not finite at step (\d+)", r.stderr)[1])
    assert steps and max(steps) < bad
    assert all(all_finite(run_dir / "checkpoints" / f"checkpoint-{s}") for s in steps)


# ------------------------------------------------------------------ verified checkpoints
FILES = ("adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "rng_state.pth", "trainer_state.json")


def fake_checkpoints(run_dir: Path, steps=(2, 4)):
    from fttrain.checkpoints import write_manifest

    for step in steps:
        folder = run_dir / "checkpoints" / f"checkpoint-{step}"
        folder.mkdir(parents=True)
        for i, name in enumerate(FILES):
            data = json.dumps({"global_step": step}) if name == "trainer_state.json" else os.urandom(200 + i)
            (folder / name).write_bytes(data.encode() if isinstance(data, str) else data)
        write_manifest(folder)
    return run_dir


def damage(path: Path, how: str) -> None:
    data = path.read_bytes()
    if how == "deleted":
        path.unlink()
    elif how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "zeroed":
        path.write_bytes(bytes(len(data)))
    else:  # one flipped bit
        flipped = bytearray(data)
        flipped[len(data) // 2] ^= 0x01
        path.write_bytes(bytes(flipped))


@pytest.mark.parametrize("how", ["deleted", "truncated", "zeroed", "flipped"])
@pytest.mark.parametrize("name", FILES)
def test_a_damaged_checkpoint_is_named_and_skipped_for_the_previous_one(tmp_path, caplog, name, how):
    from fttrain.checkpoints import latest_checkpoint, verify

    run_dir = fake_checkpoints(tmp_path)
    newest = run_dir / "checkpoints" / "checkpoint-4"
    assert latest_checkpoint(run_dir) == newest and verify(newest) is None
    damage(newest / name, how)
    with caplog.at_level("WARNING", logger="fttrain"):
        assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-2"
    assert f"checkpoint {newest} is damaged and skipped" in caplog.text and name in caplog.text
    from fttrain.outputs import RunDirError, guard_run_dir

    with pytest.raises(RunDirError, match=f"is not a whole checkpoint .*{re.escape(name)}"):
        guard_run_dir(run_dir, overwrite=False, resume_from=str(newest))


def test_sizes_only_verification_misses_a_flipped_bit_but_not_a_truncation(tmp_path):
    from fttrain.checkpoints import verify

    folder = fake_checkpoints(tmp_path, steps=(2,)) / "checkpoints" / "checkpoint-2"
    damage(folder / "optimizer.pt", "flipped")
    assert verify(folder, hashes=False) is None and "optimizer.pt differs" in verify(folder)
    damage(folder / "optimizer.pt", "truncated")
    assert "optimizer.pt has" in verify(folder, hashes=False)


def test_a_checkpoint_without_a_manifest_is_trusted_as_before(tmp_path):
    from fttrain.checkpoints import MANIFEST, latest_checkpoint

    run_dir = fake_checkpoints(tmp_path)
    (run_dir / "checkpoints" / "checkpoint-4" / MANIFEST).unlink()
    assert latest_checkpoint(run_dir) == run_dir / "checkpoints" / "checkpoint-4"


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """One finished 6-step run with checkpoints at 2, 4 and 6, copied by the tests that change it."""
    cwd = tmp_path_factory.mktemp("finished")
    r = run_cli(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=0"], cwd=cwd)
    assert r.returncode == 0, r.stderr[-3000:]
    return run_dir_of(cwd)


def copy_run(run_dir: Path, cwd: Path) -> Path:
    dest = run_dir_of(cwd)
    shutil.copytree(run_dir, dest)
    (dest / "run.lock").unlink(missing_ok=True)
    return dest


def unfinished_copy(run_dir: Path, cwd: Path) -> Path:
    """The finished run as if killed during its final save: checkpoints whole, no model, not complete."""
    dest = copy_run(run_dir, cwd)
    for name in ("COMPLETE", "metrics.json"):
        (dest / name).unlink()
    shutil.rmtree(dest / "model")
    return dest


def adapter_bytes(run_dir) -> bytes:
    return (Path(run_dir) / "model" / "adapter_model.safetensors").read_bytes()


@pytest.mark.slow
def test_checkpoints_carry_a_manifest_of_every_file(finished):
    from fttrain.checkpoints import MANIFEST, verify

    for step in (2, 4, 6):
        folder = finished / "checkpoints" / f"checkpoint-{step}"
        files = json.loads((folder / MANIFEST).read_text())["files"]
        assert set(files) == {p.name for p in folder.iterdir() if p.name != MANIFEST}
        assert {"adapter_model.safetensors", "optimizer.pt", "scheduler.pt", "trainer_state.json"} <= set(files)
        assert verify(folder) is None


@pytest.mark.slow
def test_resume_skips_a_flipped_adapter_and_ends_equal_to_the_uninterrupted_run(finished, tmp_path):
    run_dir = unfinished_copy(finished, tmp_path)
    damage(run_dir / "checkpoints" / "checkpoint-6" / "adapter_model.safetensors", "flipped")
    r = run_cli(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=0",
                        "resume_from=auto"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (run_dir / "train_rank0.log").read_text()
    assert "checkpoint-6 is damaged and skipped: adapter_model.safetensors differs" in log
    assert "resuming from" in log and "checkpoint-4 (step 4)" in log
    assert adapter_bytes(run_dir) == adapter_bytes(finished)  # steps 5-6 trained again, exactly


# ------------------------------------------------------------------ finished runs and resume
@pytest.mark.slow
def test_resume_auto_on_a_finished_run_changes_nothing(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    before = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
              if p.is_file() and p.suffix != ".log" and "heartbeat" not in p.parts}
    r = run_cli(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=0",
                        "resume_from=auto"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "nothing to do" in (run_dir / "train_rank0.log").read_text()
    after = {p.relative_to(run_dir): p.read_bytes() for p in run_dir.rglob("*")
             if p.is_file() and p.suffix != ".log" and "heartbeat" not in p.parts and p.name != "run.lock"}
    assert after == before


@pytest.mark.slow
def test_a_run_killed_in_its_final_save_resumes_without_another_step(finished, tmp_path):
    run_dir = unfinished_copy(finished, tmp_path)
    r = run_cli(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=0",
                        "resume_from=auto"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert checkpoint_steps(run_dir) == [2, 4, 6]  # no checkpoint-7
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6
    assert adapter_bytes(run_dir) == adapter_bytes(finished) and (run_dir / "COMPLETE").exists()


@pytest.mark.slow
def test_a_longer_plan_continues_the_schedule_as_if_planned_from_the_start(finished, tmp_path):
    run_dir = copy_run(finished, tmp_path)
    longer = BASE + ["trainer.max_steps=9", "trainer.save_steps=2", "trainer.save_total_limit=0"]
    r = run_cli([*longer, "resume_from=auto"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    ref = run_cli([*longer, "name=planned"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]

    def rates(d):
        return {row["step"]: row["learning_rate"] for row in train_log(d) if "loss" in row}

    got, want = rates(run_dir), rates(run_dir_of(tmp_path, "planned"))
    assert sorted(got) == list(range(1, 10))
    assert [got[s] for s in (7, 8, 9)] == pytest.approx([want[s] for s in (7, 8, 9)], rel=1e-9)
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 9


# ------------------------------------------------------------------ one run per directory
@pytest.mark.slow
def test_a_second_run_into_a_busy_directory_is_refused(tmp_path):
    first = subprocess.Popen([sys.executable, "-m", "fttrain", *BASE, "trainer.max_steps=400"], cwd=tmp_path,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "PYTHONUNBUFFERED": "1"})
    run_dir = run_dir_of(tmp_path)
    try:
        deadline = time.time() + 120
        while not (run_dir / "rank0.pid").exists() and time.time() < deadline:
            time.sleep(0.1)
        second = run_cli(BASE + ["trainer.max_steps=2"], cwd=tmp_path)
        assert second.returncode == 2 and "Traceback" not in second.stderr
        assert f"is in use by another run (pid {first.pid}" in second.stderr
        first.kill()  # SIGKILL: no cleanup runs, and the kernel drops the lock
        first.wait(timeout=60)
        third = run_cli(BASE + ["trainer.max_steps=2", "overwrite=true"], cwd=tmp_path)
        assert third.returncode == 0, third.stderr[-3000:]
    finally:
        if first.poll() is None:
            first.kill()


# ------------------------------------------------------------------ write errors
def test_a_failed_checkpoint_write_keeps_the_previous_one_and_says_why(tmp_path, monkeypatch):
    """torch.save reports a full disk from its C++ writer, not as an OSError."""
    from fttrain.checkpoints import CheckpointError, STAGING, verify
    from fttrain.run import run

    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-4" in str(f) and str(f).endswith("optimizer.pt"):
            raise RuntimeError("[enforce fail at inline_container.cc:664] . unexpected pos 64 vs 12")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    cfg = compose(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=0"])
    run_dir = tmp_path / "run"
    with pytest.raises(CheckpointError) as err:
        run(cfg, run_dir)
    message = str(err.value)
    assert "writing checkpoint checkpoint-4" in message and "unexpected pos" in message and "MiB free" in message
    assert f"previous checkpoint {run_dir / 'checkpoints' / 'checkpoint-2'} is whole" in message
    assert not any((run_dir / "checkpoints" / STAGING).iterdir())  # the partial checkpoint is gone
    assert checkpoint_steps(run_dir) == [2] and verify(run_dir / "checkpoints" / "checkpoint-2") is None
    assert not (run_dir / "COMPLETE").exists()


def can_mount_tmpfs(path: Path) -> bool:
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(path)], capture_output=True)
    return done.returncode == 0


@pytest.mark.slow
def test_a_full_disk_ends_cleanly_with_the_previous_checkpoint_intact(tmp_path):
    disk = tmp_path / "disk"
    if not can_mount_tmpfs(disk):
        pytest.skip("mounting a 4 MiB tmpfs needs root (CAP_SYS_ADMIN); the simulated write error above still runs")
    try:
        r = run_cli(BASE + ["trainer.max_steps=30", "trainer.save_steps=2", "trainer.save_total_limit=0",
                            f"hydra.run.dir={disk}/run"], cwd=tmp_path)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert "No space left on device" in r.stderr and "The partial checkpoint was removed" in r.stderr
        from fttrain.checkpoints import STAGING, latest_checkpoint, verify

        steps = checkpoint_steps(disk / "run")
        assert steps and all(verify(disk / "run" / "checkpoints" / f"checkpoint-{s}") is None for s in steps)
        assert f"previous checkpoint {latest_checkpoint(disk / 'run')} is whole" in r.stderr
        assert not any((disk / "run" / "checkpoints" / STAGING).iterdir())
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)


# ------------------------------------------------------------------ invalid configs
INVALID = [  # (override, the key the refusal must name)
    ("trainer.global_batch_size=0", "trainer.global_batch_size"),
    ("peft.dropout=1.5", "peft.dropout"),
    ("peft.alpha=0", "peft.alpha"),
    ("peft.r=0", "peft.r"),
    ("trainer.logging_steps=0", "trainer.logging_steps"),
    ("trainer.lr_scheduler=bogus", "trainer.lr_scheduler"),
    ("logger.report_to=[bogus]", "logger.report_to"),
    ("trainer.stop_signals=[KILL]", "trainer.stop_signals"),
    ("trainer.seed=-1", "trainer.seed"),
    ("trainer.dataloader_num_workers=-1", "trainer.dataloader_num_workers"),
    ("model.tiny.num_attention_heads=3", "model.tiny.num_attention_heads"),
    ("task.generation_eval.max_new_tokens=-1", "task.generation_eval.max_new_tokens"),
    ("trainer.max_steps=0", "trainer.max_steps"),
    ("trainer.eval_steps=-1", "trainer.eval_steps"),
    ("trainer.save_steps=-1", "trainer.save_steps"),
    ("trainer.weight_decay=-1", "trainer.weight_decay"),
    ("trainer.max_grad_norm=-1", "trainer.max_grad_norm"),
    ("trainer.learning_rate=0", "trainer.learning_rate"),
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio"),
    ("trainer.step_timeout_seconds=0", "trainer.step_timeout_seconds"),
    ("data.max_samples=-1", "data.max_samples"),
    ("data.max_length=4", "data.max_length"),
    ("data.eval_fraction=1", "data.eval_fraction"),
    ("model.dropout=1", "model.dropout"),
    ("name=", "name"),
    ("name=..", "name"),
    ("name=a/b", "name"),
]


@pytest.mark.parametrize("override,key", INVALID, ids=[o for o, _ in INVALID])
def test_an_invalid_override_is_refused_before_any_model_loads(override, key):
    from conftest import config_error

    message = config_error(["+exp=tiny_sft", override])
    assert f"{key}=" in message or f"{key}:" in message, message


def test_every_bounded_knob_reports_its_range():
    """The ranges are declared on the schema fields; a value just outside each is refused."""
    import dataclasses

    from fttrain.config.bounds import Bounds
    from fttrain.config.schema import GROUP_SCHEMAS, FTConfig, TinyModelConfig

    seen = 0
    schemas = {s for group in GROUP_SCHEMAS.values() for s in group.values()} | {FTConfig, TinyModelConfig}
    for schema in schemas:
        for f in dataclasses.fields(schema):
            bounds = f.metadata.get("bounds")
            if not isinstance(bounds, Bounds):
                continue
            seen += 1
            if bounds.lo is not None:
                assert bounds.problem(f.name, bounds.lo - 1) is not None
                assert (bounds.problem(f.name, bounds.lo) is not None) == bounds.lo_open
            if bounds.hi is not None:
                assert bounds.problem(f.name, bounds.hi + 1) is not None
            default = f.default
            assert default is dataclasses.MISSING or bounds.problem(f.name, default) is None, (schema, f.name)
    assert seen >= 90


# Through the CLI, one of each way a refusal is reached (a schema bound, a value checked
# against transformers, a tracker, a signal name, the model's shape, the data, the run
# name, the output root); every override above is checked in process, without the start-up.
CLI_INVALID = [case for case in INVALID if case[0] in (
    "trainer.learning_rate=0", "trainer.lr_scheduler=bogus", "logger.report_to=[bogus]", "trainer.stop_signals=[KILL]",
    "model.tiny.num_attention_heads=3", "data.max_length=4", "name=a/b")] + [("output_root=/etc/hostname", "output_root")]


@pytest.mark.slow
@pytest.mark.parametrize("override,key", CLI_INVALID, ids=[o for o, _ in CLI_INVALID])
def test_an_invalid_override_exits_2_naming_its_key(tmp_path, override, key):
    r = run_cli(["+exp=tiny_sft", override], cwd=tmp_path)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr and key in r.stderr.split("fttrain: error:")[-1]
    assert not (tmp_path / "outputs" / "tiny_sft" / "model").exists()


# ------------------------------------------------------------------ bad data files
ROW = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello there"}]}


def bad_file(tmp_path: Path, kind: str) -> Path:
    import gzip

    line = json.dumps(ROW) + "\n"
    paths = {
        "ragged.csv": lambda p: p.write_text("prompt,completion\na,b,c\nd\n"),
        "empty.csv": lambda p: p.write_text(""),
        "corrupt.parquet": lambda p: p.write_bytes(b"PAR1" + os.urandom(64) + b"PAR1"),
        "latin1.jsonl": lambda p: p.write_bytes(json.dumps({"messages": [
            {"role": "user", "content": "caf\u00e9"}, {"role": "assistant", "content": "ol\u00e9"}]},
            ensure_ascii=False).encode("latin-1") + b"\n"),
        "latin1.json": lambda p: p.write_bytes(json.dumps([ROW | {"x": "\u00e9"}], ensure_ascii=False)
                                               .encode("latin-1")),
        "latin1.csv": lambda p: p.write_bytes("prompt,completion\ncaf\u00e9,ol\u00e9\n".encode("latin-1")),
        "utf16.jsonl": lambda p: p.write_bytes(line.encode("utf-16")),
        "rows.txt": lambda p: p.write_text(line),
        "rows.jsonl.gz": lambda p: p.write_bytes(gzip.compress(line.encode())),
        "emptydir": lambda p: p.mkdir(),
        "nested.jsonl": lambda p: p.write_text(line + '{"messages": ' + "[" * 100000 + "]" * 100000 + "}\n"),
        "scalar.jsonl": lambda p: p.write_text(line + "42\n"),
    }
    path = tmp_path / kind
    paths[kind](path)
    return path


BAD_FILES = {  # kind -> what the message must say besides the file's path
    "ragged.csv": "Expected 2 columns, got 3",
    "empty.csv": "the CSV file is empty",
    "corrupt.parquet": "not a readable Parquet file",
    "latin1.jsonl": "row 0 (line 1): not UTF-8",
    "latin1.json": "not UTF-8",
    "latin1.csv": "not UTF-8",
    "utf16.jsonl": "UTF-16 or UTF-32",
    "rows.txt": "not this suffix (.txt)",
    "rows.jsonl.gz": "not this suffix (.jsonl.gz)",
    "emptydir": "the folder is empty",
    "nested.jsonl": "row 1 (line 2): nested too deeply",
    "scalar.jsonl": "row 1 (line 2): a row must be a JSON object",
}


@pytest.mark.parametrize("kind", sorted(BAD_FILES))
def test_a_bad_file_is_refused_naming_it(tmp_path, tokenizer, kind):
    from fttrain.data.pipeline import prepare_data
    from fttrain.data.sources import DataError

    path = bad_file(tmp_path, kind)
    fmt = "prompt_completion" if kind.endswith(".csv") else "messages"
    cfg = compose(["+exp=tiny_sft", f"data.train={path}", f"data.format={fmt}", "data.eval=null",
                   "data.max_samples=null", "data.num_proc=1"]).data
    with pytest.raises(DataError) as err:
        prepare_data(cfg, tokenizer, tokenizer.chat_template, True)
    assert str(path) in str(err.value) and BAD_FILES[kind] in str(err.value)


def test_a_missing_path_without_a_suffix_is_named(tmp_path):
    from fttrain.data.sources import DataError, open_rows

    with pytest.raises(DataError, match=f"not found: {re.escape(str(tmp_path / 'nothing'))}"):
        open_rows(str(tmp_path / "nothing"))


def test_csv_answers_that_look_like_numbers_stay_text(tmp_path, tokenizer):
    from fttrain.data.pipeline import prepare_data

    path = tmp_path / "sums.csv"
    path.write_text("prompt,completion\n" + "".join(f"what is {i}+{i},{2 * i}\n" for i in range(12)))
    cfg = compose(["+exp=tiny_sft", f"data.train={path}", "data.format=prompt_completion", "data.eval=null",
                   "data.eval_fraction=0", "data.max_samples=null", "data.num_proc=1"]).data
    data = prepare_data(cfg, tokenizer, tokenizer.chat_template, True)
    assert data.train.report["kept"] == 12 and data.train.report["dropped"] == {}


def mutated_rows(n: int, seed: int = 0):
    """Valid chats and chats broken in the ways real files are: lines that are not
    JSON, rows of the wrong type, missing, empty or mistyped fields, odd text."""
    import random

    rng = random.Random(seed)

    def chat(i):
        return {"messages": [{"role": "user", "content": f"q{i} " + "w " * rng.randint(0, 20)},
                             {"role": "assistant", "content": f"a{i} " + "r " * rng.randint(0, 20)}]}

    mutators = [
        lambda r: "{not json",
        lambda r: json.dumps([r]),
        lambda r: json.dumps("text"),
        lambda r: json.dumps({}),
        lambda r: json.dumps({"messages": None}),
        lambda r: json.dumps({"messages": []}),
        lambda r: json.dumps({"messages": [{"role": "user"}]}),
        lambda r: json.dumps({"messages": [{"role": "assistant", "content": 5}]}),
        lambda r: json.dumps({"messages": [{"role": "wizard", "content": "x"}, r["messages"][1]]}),
        lambda r: json.dumps({"messages": [r["messages"][0]]}),  # nothing to train
        lambda r: json.dumps({"messages": [{"role": "user", "content": "\u0000\ud7ff\U0001F600"},
                                           r["messages"][1]]}),
        lambda r: json.dumps(r)[:-3],
    ]
    lines, broken = [], []
    for i in range(n):
        if rng.random() < 0.3:
            lines.append(rng.choice(mutators)(chat(i)))
            broken.append(i)
        else:
            lines.append(json.dumps(chat(i)))
    return lines, broken


def test_fuzzed_rows_are_refused_naming_the_row_or_dropped_with_a_count(tmp_path, tokenizer):
    from fttrain.data.pipeline import prepare_data
    from fttrain.data.sources import DataError

    lines, broken = mutated_rows(300)
    path = tmp_path / "fuzz.jsonl"
    path.write_text("\n".join(lines) + "\n")
    overrides = ["+exp=tiny_sft", f"data.train={path}", "data.eval=null", "data.max_samples=null",
                 "data.num_proc=1", "data.max_length=512", "data.eval_fraction=0"]
    with pytest.raises(DataError) as err:
        prepare_data(compose(overrides).data, tokenizer, tokenizer.chat_template, True)
    first_bad = re.search(r"row (\d+)", str(err.value))
    assert first_bad and int(first_bad[1]) <= broken[0]  # the first refused row is at or before the first mutated
    data = prepare_data(compose(overrides + ["data.strict=false"]).data, tokenizer, tokenizer.chat_template, True)
    report = data.train.report
    assert report["kept"] + sum(report["dropped"].values()) == 300  # every row kept or counted
    assert report["kept"] >= 300 - len(broken) and report["dropped"].get("invalid_json", 0) >= 1


# ------------------------------------------------------------------ hangs
STALL = '''
import os, time
import fttrain.trainer as t

step = t.FTTrainer.training_step

def stalled(self, *args, **kwargs):
    if os.environ.get("RANK") == "1" and self.state.global_step == 2:
        time.sleep(3600)  # a rank stuck inside a step
    return step(self, *args, **kwargs)

t.FTTrainer.training_step = stalled
'''


@pytest.mark.slow
def test_a_stalled_rank_ends_the_job_within_the_timeout_with_its_stacks_on_disk(tmp_path):
    from test_distributed import shipped_cpu_config

    hook = tmp_path / "hook"
    hook.mkdir()
    (hook / "sitecustomize.py").write_text(STALL)
    env = {"PYTHONPATH": os.pathsep.join([str(hook), os.environ.get("PYTHONPATH", "")])}
    start = time.time()
    r = run_cli(BASE + ["trainer.max_steps=20", "trainer.step_timeout_seconds=20", "hydra.run.dir=hung"],
                cwd=tmp_path, launcher=shipped_cpu_config(29523), env=env, timeout=300)
    took = time.time() - start
    assert r.returncode != 0
    assert took < 150, took  # start-up, two steps, then the 20 s timeout; never the hour the rank sleeps
    stacks = (tmp_path / "hung" / "stacks" / "rank1.txt").read_text()
    assert "Timeout (0:00:20)!" in stacks
    assert "in stalled" in stacks  # the hung rank's Python stack, down to the function that hangs
    beat = json.loads((tmp_path / "hung" / "heartbeat" / "rank1.json").read_text())
    assert beat["step"] == 2 and beat["rank"] == 1


def test_a_step_that_ends_in_time_leaves_a_heartbeat_and_no_stacks(tmp_path):
    from fttrain.trainer import StepWatchdog

    dog = StepWatchdog(tmp_path, rank=0, timeout_seconds=60)
    state = SimpleNamespace(global_step=0)
    dog.on_train_begin(None, state, None)
    dog.on_step_begin(None, state, None)
    state.global_step = 1
    dog.on_step_end(None, state, None)
    dog.on_train_end(None, state, None)
    assert json.loads((tmp_path / "heartbeat" / "rank0.json").read_text())["step"] == 1
    assert not (tmp_path / "stacks").exists()


@pytest.mark.slow
def test_a_stop_signal_during_start_up_stops_before_the_first_step(tmp_path):
    """USR1 while the process still imports: remembered (not fatal), and the run stops before training."""
    proc = subprocess.Popen([sys.executable, "-m", "fttrain", *BASE], cwd=tmp_path, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    time.sleep(1.0)  # python -m fttrain takes seconds to import; its first statement installs the early handlers
    proc.send_signal(signal.SIGUSR1)
    _, err = proc.communicate(timeout=240)
    assert proc.returncode == 0, err[-3000:]
    run_dir = run_dir_of(tmp_path)
    log = (run_dir / "train_rank0.log").read_text()
    assert "SIGUSR1 received during start-up: stopping before training (at step 0)" in log
    assert not (run_dir / "COMPLETE").exists() and checkpoint_steps(run_dir) == []
    assert not (run_dir / "train_log.jsonl").exists() and "stopped after step 0" in log  # no step was taken


def test_status_reads_the_run_directory(tmp_path):
    from fttrain.outputs import RunLock, run_status

    run_dir = fake_checkpoints(tmp_path / "run")
    (run_dir / "heartbeat").mkdir()
    for rank, (step, t) in enumerate([(12, 1000.0), (11, 460.0)]):
        (run_dir / "heartbeat" / f"rank{rank}.json").write_text(json.dumps(
            {"rank": rank, "step": step, "time": t, "pid": 100 + rank}))
    (run_dir / "stacks").mkdir()
    (run_dir / "stacks" / "rank1.txt").write_text("Timeout (0:00:20)!\nThread 0x01 (most recent call first):\n")
    lock = RunLock(run_dir)
    try:
        text = run_status(run_dir, now=1010.0)
    finally:
        lock.release()
    assert f"{run_dir}: running (pid {os.getpid()}" in text
    assert "newest whole checkpoint: checkpoint-4" in text
    assert "rank 0: step 12 done 10 s ago" in text and "rank 1: step 11 done 550 s ago" in text
    assert "rank1: Timeout (0:00:20)!" in text
    assert run_status(run_dir).startswith(f"{run_dir}: not running")  # the lock was released


@pytest.mark.slow
def test_resuming_a_good_checkpoint_with_a_lower_rate_applies_it(finished, tmp_path):
    """What the divergence message advises: resume_from=<last good checkpoint> with a lower learning rate."""
    run_dir = unfinished_copy(finished, tmp_path)
    ckpt = run_dir / "checkpoints" / "checkpoint-4"
    r = run_cli(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "trainer.save_total_limit=0",
                        "trainer.learning_rate=1e-4", f"resume_from={ckpt}"], cwd=tmp_path)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "trainer.learning_rate is 0.0001, the checkpoint was trained at 0.001" in (
        run_dir / "train_rank0.log").read_text()
    old = {row["step"]: row["learning_rate"] for row in train_log(finished) if "loss" in row}
    new = {row["step"]: row["learning_rate"] for row in train_log(run_dir) if "loss" in row}
    assert [new[s] for s in (5, 6)] == pytest.approx([old[s] / 10 for s in (5, 6)], rel=1e-9)


@pytest.mark.slow
def test_a_whole_checkpoint_of_another_setup_is_refused_naming_it(finished, tmp_path):
    """Its files verify, but it was written with peft.r=16 and this run asks for r=4."""
    run_dir = unfinished_copy(finished, tmp_path)
    r = run_cli(BASE + ["trainer.max_steps=6", "trainer.save_steps=2", "peft.r=4", "resume_from=auto"], cwd=tmp_path)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr[-3000:]
    assert f"resuming from {run_dir / 'checkpoints' / 'checkpoint-6'} failed while loading the weights" in r.stderr
    assert "size mismatch" in r.stderr and not (run_dir / "COMPLETE").exists()
