"""Checkpoints are whole or absent, resume is exact, and a stop signal ends a
run cleanly at a step boundary on every rank (what Slurm's time-limit warning
and preemption rely on; the Slurm side is in test_slurm.py).

The equality tests compare a run stopped by SIGUSR1 and resumed with
resume_from=auto against the same run uninterrupted: per-step losses and the
saved adapter must be identical (same data order, RNG and optimizer state;
CPU fp32 is deterministic). Two ranks, with the signal reaching rank 0 only,
are tested through Slurm (test_slurm.py)."""

import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli, step_losses


# ------------------------------------------------------------------ unit: the checkpoint folder
def fake_checkpoint(folder, complete=True):
    folder.mkdir(parents=True)
    (folder / "adapter_model.safetensors").write_bytes(b"x")
    if complete:
        (folder / "trainer_state.json").write_text("{}")
    return folder


def test_latest_is_the_newest_complete_checkpoint_and_incomplete_ones_are_reported(tmp_path, caplog):
    from fttrain.checkpoints import STAGING, incomplete_checkpoints, latest_checkpoint

    ckpts = tmp_path / "checkpoints"
    fake_checkpoint(ckpts / "checkpoint-2")
    fake_checkpoint(ckpts / "checkpoint-10")
    fake_checkpoint(ckpts / STAGING / "checkpoint-12", complete=False)  # a save that died
    fake_checkpoint(ckpts / "checkpoint-14", complete=False)  # written in place by an older version, unfinished
    with caplog.at_level("WARNING", logger="fttrain"):
        assert latest_checkpoint(tmp_path) == ckpts / "checkpoint-10"  # numeric order, not text order
    assert {p.name for p in incomplete_checkpoints(tmp_path)} == {"checkpoint-12", "checkpoint-14"}
    assert "checkpoint-12" in caplog.text and "checkpoint-14" in caplog.text


def test_rotation_keeps_the_newest_k_and_drops_incomplete_only_behind_a_complete_one(tmp_path):
    from fttrain.checkpoints import STAGING, rotate

    ckpts = tmp_path / "checkpoints"
    for step in (2, 4, 6):
        fake_checkpoint(ckpts / f"checkpoint-{step}")
    fake_checkpoint(ckpts / STAGING / "checkpoint-5", complete=False)
    fake_checkpoint(ckpts / STAGING / "checkpoint-8", complete=False)  # newer than every complete one
    removed = rotate(tmp_path, keep=2)
    assert sorted(p.name for p in removed) == ["checkpoint-2", "checkpoint-5"]
    assert sorted(p.name for p in ckpts.glob("checkpoint-*")) == ["checkpoint-4", "checkpoint-6"]
    assert (ckpts / STAGING / "checkpoint-8").exists()  # no newer complete checkpoint yet: kept
    assert rotate(tmp_path, keep=0) == []  # 0 keeps every complete checkpoint
    # Resumed from an older checkpoint: the one just written is kept though it is not the newest by step.
    written = fake_checkpoint(ckpts / "checkpoint-5")
    assert rotate(tmp_path, keep=1, just_written=written) == [ckpts / "checkpoint-4"]
    assert written.exists() and (ckpts / "checkpoint-6").exists()


@pytest.mark.parametrize("overrides,message", [
    (["trainer.stop_signals=[SIGUSR9]"], "'SIGUSR9' is not a signal name"),
    (["trainer.stop_signals=[SIGTERM]"], "are not in trainer.stop_signals"),
    (["trainer.save_total_limit=-1"], "trainer.save_total_limit=-1 must be >= 0"),
])
def test_signal_config_problems(overrides, message):
    from conftest import config_error

    assert message in config_error(["+exp=tiny_sft", *overrides])


# ------------------------------------------------------------------ signal, stop, resume (processes)
def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "adapter_model.safetensors")


def start(args, cwd, launcher=None):
    cmd = (launcher or [sys.executable]) + ["-m", "fttrain", *args]
    return subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})


def signal_after(proc, run_dir, steps, sig=signal.SIGUSR1, timeout=240):
    """Send sig to the pid in rank0.pid once `steps` steps are logged."""
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None:
        log = run_dir / "train_log.jsonl"
        if log.exists() and sum('"loss"' in l for l in log.read_text().splitlines()) >= steps:
            os.kill(int((run_dir / "rank0.pid").read_text()), sig)
            return
        time.sleep(0.05)
    raise AssertionError(f"the run did not reach step {steps}: {proc.communicate()[0][-3000:]}")


RUN = ["+exp=tiny_sft", "trainer.max_steps=40", "trainer.logging_steps=1", "trainer.save_total_limit=1"]


@pytest.mark.slow
def test_stopped_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    run_dir = tmp_path / "outputs" / "tiny_sft"
    proc = start(RUN, tmp_path)
    signal_after(proc, run_dir, 5)
    out, _ = proc.communicate(timeout=240)
    assert proc.returncode == 0, out[-3000:]
    assert "SIGUSR1 received: stopping after step" in (run_dir / "train_rank0.log").read_text()
    (ckpt,) = (run_dir / "checkpoints").glob("checkpoint-*")
    stopped = int(ckpt.name.split("-")[1])
    assert 5 <= stopped < 40
    assert (ckpt / "trainer_state.json").exists() and (ckpt / "optimizer.pt").exists()
    assert not (run_dir / "COMPLETE").exists() and not (run_dir / "metrics.json").exists()
    assert not (run_dir / "rank0.pid").exists()

    resumed = run_cli([*RUN, "resume_from=auto"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert f"resuming from {ckpt}" in (run_dir / "train_rank0.log").read_text()
    assert (run_dir / "COMPLETE").exists()

    ref = run_cli([*RUN, "name=uninterrupted"], cwd=tmp_path)
    assert ref.returncode == 0, ref.stderr[-3000:]
    ref_dir = tmp_path / "outputs" / "uninterrupted"
    assert step_losses(run_dir) == step_losses(ref_dir) and len(step_losses(run_dir)) == 40
    a, b = adapter(run_dir), adapter(ref_dir)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_resume_auto_in_a_new_directory_starts_from_step_zero(tmp_path):
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=2", "resume_from=auto"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    log = (tmp_path / "outputs" / "tiny_sft" / "train_rank0.log").read_text()
    assert "no complete checkpoint" in log and "starting from step 0" in log


def test_resume_from_an_incomplete_checkpoint_path_is_refused(tmp_path):
    from fttrain.checkpoints import STAGING
    from fttrain.outputs import RunDirError, guard_run_dir

    staged = fake_checkpoint(tmp_path / "run" / "checkpoints" / STAGING / "checkpoint-4", complete=False)
    with pytest.raises(RunDirError, match="is not a whole checkpoint .no trainer_state.json"):
        guard_run_dir(tmp_path / "run", overwrite=False, resume_from=str(staged))
    done = fake_checkpoint(tmp_path / "run" / "checkpoints" / "checkpoint-2")
    guard_run_dir(tmp_path / "run", overwrite=False, resume_from=str(done))  # accepted
