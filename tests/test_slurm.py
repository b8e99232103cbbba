"""Slurm: rendered scripts (golden files), refusals before sbatch, and real
jobs on the local cluster (slurm/local_cluster.sh): a job trains to
completion; a job signalled mid-training checkpoints, requeues itself, resumes
and ends with the same per-step losses and weights as an uninterrupted run;
sweeps as a job array and through Hydra's Slurm launcher finish with a summary.

The cluster tests start the cluster when run as root (CI does); they skip with
the reason only where sbatch is absent and the install script cannot run.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import REPO, run_cli, step_losses

GOLDEN = Path(__file__).parent / "golden" / "slurm"


# ------------------------------------------------------------------ rendering (no cluster)
def render(tmp_path, overrides, array=False):
    """Render as python -m fttrain.slurm does, without asking a cluster."""
    from fttrain import slurm

    overrides = [*overrides, f"output_root={tmp_path}/out"]
    if array:
        trials = slurm.expand_trials(overrides)
        for t in trials:
            slurm.check(t.cfg, t.run_dir, against_cluster=False)
        return slurm.render_array(overrides, trials, max_parallel=2)
    cfg, run_dir = slurm.compose(overrides)
    slurm.check(cfg, run_dir, against_cluster=False)
    return slurm.render_run(overrides, cfg, run_dir)


def normalised(text, tmp_path):
    return text.replace(str(tmp_path), "<TMP>").replace(sys.executable, "<PYTHON>")


CASES = {
    "single_node": ["+exp=tiny_sft", "slurm.partition=gpu", "slurm.account=proj42", "dist=fsdp",
                    "slurm.setup=[module load cuda/12.4,source .venv/bin/activate]", "+slurm.env.HF_HOME=/scratch/hf"],
    "multi_node": ["+exp=tiny_sft", "slurm.partition=gpu", "slurm.nodes=4", "dist=fsdp_hybrid",
                   "slurm.sbatch=[--exclusive]", "slurm.nccl_debug=INFO"],
    "array": ["+exp=tiny_sft", "slurm=local", "peft.r=8,16", "trainer.learning_rate=1e-3,2e-3"],
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_rendered_script_matches_golden_file(case, tmp_path):
    """Regenerate after an intended change with FTTRAIN_UPDATE_GOLDEN=1 and review the diff."""
    script = render(tmp_path, CASES[case], array=case == "array")
    text = normalised(script.read_text(), tmp_path)
    path = GOLDEN / f"{case}.sbatch"
    if os.environ.get("FTTRAIN_UPDATE_GOLDEN"):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    assert path.exists(), f"no golden file {path}; run with FTTRAIN_UPDATE_GOLDEN=1 and review it"
    assert text == path.read_text(), f"{case} renders differently from {path}"
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr  # valid bash


def test_the_job_carries_its_config(tmp_path):
    script = render(tmp_path, CASES["single_node"])
    run_dir = script.parent
    assert (run_dir / "job" / "conf" / "exp" / "tiny_sft.yaml").exists()
    expected = (run_dir / "job" / "config.yaml").read_text()
    assert "resume_from: null" in expected and "partition: gpu" in expected  # restarts resume by themselves
    # The job composes from the copy with its own arguments and the rendered config: identical.
    args = re.search(r"--config-path (\S+) (.*) &$", script.read_text(), re.M)
    assert args.group(1) == str(run_dir / "job" / "conf")


@pytest.mark.slow
def test_a_job_whose_config_changed_after_rendering_refuses_to_train(tmp_path):
    script = render(tmp_path, ["+exp=tiny_sft", "slurm=local", "trainer.max_steps=2"])
    expected = script.parent / "job" / "config.yaml"
    expected.write_text(expected.read_text().replace("max_steps: 2", "max_steps: 3"))
    proc = run_cli(["+exp=tiny_sft", "slurm=local", "trainer.max_steps=2", f"hydra.run.dir={script.parent}"],
                   cwd=tmp_path, env={"FTTRAIN_EXPECT_CONFIG": str(expected)}, timeout=120)
    assert proc.returncode == 2 and "differs from the rendered" in proc.stderr and "trainer.max_steps" in proc.stderr


@pytest.mark.parametrize("overrides,message", [
    (["slurm.partitoin=gpu"], "partitoin"),  # a typo in a cluster key fails at compose
    ([], "slurm.partition is not set"),
    (["slurm.partition=gpu", "slurm.processes_per_node=4"], "does not match slurm.gpus_per_node=8"),
    (["slurm.partition=gpu", "dist.expected_world_size=4"], "dist.expected_world_size=4 but the job starts"),
    (["slurm.partition=gpu", "slurm.nodes=1", "dist=fsdp_hybrid"], "dist.hybrid=true"),
    (["slurm.partition=gpu", "trainer.global_batch_size=12"], "on 1 node(s) x 8 process(es)"),
    (["slurm.partition=gpu", "peft.r=8,16"], "need --array"),
    (["slurm.partition=gpu", "overwrite=true"], "overwrite=true would clear"),
])
def test_bad_input_is_refused_before_sbatch(overrides, message, tmp_path, capsys, monkeypatch):
    from fttrain import slurm

    monkeypatch.chdir(tmp_path)
    # The cluster is not asked: with sinfo installed and slurmctld down each query waits ~9 s to fail.
    monkeypatch.setattr(slurm, "slurm_query", lambda args: (None, f"{args[0]}: not asked in this test"))
    called = []
    monkeypatch.setattr(slurm, "submit", lambda script: called.append(script))
    assert slurm.main(["+exp=tiny_sft", *overrides, "--submit"]) == 2
    assert message in capsys.readouterr().err
    assert not called


def test_submitting_where_slurm_is_not_installed_says_so(tmp_path, capsys, monkeypatch):
    from fttrain import slurm

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("PATH", str(tmp_path))  # no sinfo, squeue or sbatch
    assert slurm.main(["+exp=tiny_sft", "slurm.partition=gpu", "--submit"]) == 2
    err = capsys.readouterr().err
    assert "sinfo is not on PATH here" in err and "leave out --submit to only render" in err
    assert "Traceback" not in err


# ------------------------------------------------------------------ sweeps without Slurm
@pytest.mark.slow
def test_local_sweep_survives_a_failed_trial_and_summarises(tmp_path):
    # A negative learning rate is refused by the run's config check: two trials fail.
    proc = run_cli(["-m", "+exp=tiny_sft", "trainer.max_steps=2", "peft.r=4,8", "trainer.learning_rate=1e-3,-1"],
                   cwd=tmp_path, timeout=600)
    sweep = tmp_path / "outputs" / "multirun" / "tiny_sft"
    assert proc.returncode == 1, proc.stderr[-3000:]  # failures are reported after every trial ran
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 5 and rows[0].startswith("trial,status")
    assert sum(",complete," in r for r in rows) == 2 and sum(",failed: " in r for r in rows) == 2
    assert (sweep / "peft.r=8,trainer.learning_rate=0.001,trainer.max_steps=2" / "COMPLETE").exists()
    assert "learning_rate=-1.0 must be > 0" in (sweep / "peft.r=8,trainer.learning_rate=-1,trainer.max_steps=2" /
                                                 "FAILED").read_text()
    assert "2 of 4 trials failed" in proc.stderr


@pytest.mark.slow
def test_optuna_search_returns_the_objective_and_records_the_best(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper", reason="pip install 'fttrain[sweep]'")
    proc = run_cli(["-m", "+exp=tiny_sft", "+hparams_search=tiny_sft_optuna", "trainer.max_steps=3",
                    "hydra.sweeper.n_trials=3"], cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "tiny_sft"
    import yaml

    best = yaml.safe_load((sweep / "optimization_results.yaml").read_text())
    losses = [json.loads((d / "metrics.json").read_text())["eval_loss"] for d in sweep.iterdir() if d.is_dir()]
    assert len(losses) == 3 and best["best_value"] == pytest.approx(min(losses))
    assert set(best["best_params"]) == {"trainer.learning_rate", "peft.r"}


# ------------------------------------------------------------------ the local cluster
@pytest.fixture(scope="module")
def cluster():
    script = REPO / "slurm" / "local_cluster.sh"
    ready = shutil.which("sbatch") and subprocess.run(["sinfo", "-h"], capture_output=True).returncode == 0
    if not ready:
        if os.geteuid() != 0:
            pytest.skip("no running Slurm here and slurm/local_cluster.sh must run as root to start one")
        done = subprocess.run(["bash", str(script)], capture_output=True, text=True, timeout=600)
        if done.returncode != 0:
            pytest.skip(f"slurm/local_cluster.sh could not start a cluster here:\n{done.stdout[-1500:]}{done.stderr[-1500:]}")
    return True


def job_state(job):
    out = subprocess.run(["scontrol", "show", "job", "-o", str(job)], capture_output=True, text=True).stdout
    return dict(re.findall(r"(\w+)=(\S*)", out))


def wait_for_state(job, states=("COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY"),
                   timeout=400, on_pending=None):
    deadline = time.time() + timeout
    while time.time() < deadline:
        info = job_state(job)
        if info.get("JobState") in states:
            return info
        if on_pending and info.get("JobState") == "PENDING":
            on_pending(info)
        time.sleep(1)
    raise AssertionError(f"job {job} still {job_state(job).get('JobState')} after {timeout} s")


def submit(tmp_path, overrides, array=False):
    cmd = [sys.executable, "-m", "fttrain.slurm", "--submit", "--quiet", *(["--array"] if array else []), *overrides]
    done = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout.strip()


def adapter(run_dir):
    from safetensors.torch import load_file

    return load_file(run_dir / "model" / "adapter_model.safetensors")


@pytest.mark.slurm
@pytest.mark.slow
def test_cluster_refuses_what_it_cannot_run_and_shows_sbatch_errors(cluster, tmp_path, capsys, monkeypatch):
    from fttrain import slurm

    monkeypatch.chdir(tmp_path)

    def refused(*overrides):
        assert slurm.main(["--submit", "--quiet", "+exp=tiny_sft", "slurm=local", *overrides]) == 2
        return capsys.readouterr().err

    assert "partition debug has 1 node(s)" in refused("slurm.nodes=5")
    assert "no such partition" in refused("slurm.partition=nope")
    assert "have 0 GPU(s)" in refused("slurm.gpus_per_node=2", "slurm.processes_per_node=null")
    # Checks pass, Slurm refuses: its own message is shown.
    err = refused("slurm.mem=9999999")
    assert "sbatch" in err and "Memory specification can not be satisfied" in err
    assert slurm.gpu_count("gpu:a100:4(S:0-1),shard:8") == 4 and slurm.gpu_count("(null)") == 0


LONG_RUN = ["+exp=tiny_sft", "slurm=local", "trainer.max_steps=40", "trainer.logging_steps=1",
            "trainer.save_total_limit=1"]


@pytest.fixture(scope="module")
def uninterrupted_job(cluster, tmp_path_factory):
    """A rendered job trained to completion: the reference for the signalled one."""
    tmp_path = tmp_path_factory.mktemp("uninterrupted")
    job = submit(tmp_path, LONG_RUN)
    return job, wait_for_state(job), tmp_path / "outputs" / "tiny_sft"


@pytest.mark.slurm
@pytest.mark.slow
def test_rendered_job_trains_to_completion(uninterrupted_job):
    job, info, run_dir = uninterrupted_job
    assert info["JobState"] == "COMPLETED", (run_dir / f"slurm-{job}.err").read_text()[-3000:]
    metrics = json.loads((run_dir / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["steps"] == 40 and (run_dir / "COMPLETE").exists()
    assert f"job {job} on" in (run_dir / f"slurm-{job}.out").read_text()
    assert info["Restarts"] == "0" and not (run_dir / "rank0.pid").exists()


@pytest.mark.slurm
@pytest.mark.slow
def test_signalled_job_checkpoints_requeues_and_matches_an_uninterrupted_run(uninterrupted_job, tmp_path):
    job = submit(tmp_path, LONG_RUN)
    run_dir = tmp_path / "outputs" / "tiny_sft"
    log = run_dir / "train_log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and sum('"loss"' in l for l in log.read_text().splitlines()) >= 5):
        assert time.time() < deadline and job_state(job)["JobState"] in ("PENDING", "RUNNING", "CONFIGURING")
        time.sleep(0.2)
    # What Slurm does at --signal=B:USR1@N: USR1 to the batch script, which forwards it to rank 0.
    subprocess.run(["scancel", "--signal=USR1", "--batch", job], check=True)

    # The job requeues itself; make it eligible at once (Slurm would wait ~10 s on this cluster).
    def now(info):
        if info.get("Reason") == "BeginTime":
            subprocess.run(["scontrol", "update", f"JobId={job}", "StartTime=now"], capture_output=True)

    info = wait_for_state(job, on_pending=now)
    out = (run_dir / f"slurm-{job}.out").read_text()
    assert info["JobState"] == "COMPLETED" and info["Restarts"] == "1", out[-3000:]
    assert "USR1 forwarded to rank 0" in out and "restart 1" in out
    rank_logs = [(run_dir / f"train_rank{r}.log").read_text() for r in (0, 1)]
    stopped = re.search(r"stopping after step (\d+)", rank_logs[0]).group(1)
    assert int(stopped) < 40
    assert all(f"stopping after step {stopped} on this rank" in t for t in rank_logs)  # both ranks, same step
    assert f"requeueing Slurm job {job}" in rank_logs[0] and "Slurm restart 1: resume_from=auto" in rank_logs[0]
    assert f"checkpoint-{stopped} (step {stopped})" in rank_logs[0]

    # The same job uninterrupted (two gloo ranks as well): same per-step losses, same weights.
    _, _, ref_dir = uninterrupted_job
    assert step_losses(run_dir) == step_losses(ref_dir) and len(step_losses(run_dir)) == 40
    a, b = adapter(run_dir), adapter(ref_dir)
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.slurm
@pytest.mark.slow
def test_array_sweep_runs_every_trial(cluster, tmp_path):
    # One process and one CPU per trial, so the two trials run side by side on the 2-CPU cluster.
    job = submit(tmp_path, ["+exp=tiny_sft", "slurm=local", "slurm.processes_per_node=1", "slurm.cpus_per_task=1",
                            "trainer.max_steps=3", "peft.r=4,8"], array=True)
    sweep = tmp_path / "outputs" / "multirun" / "tiny_sft"
    for task in (0, 1):
        info = wait_for_state(f"{job}_{task}")
        assert info["JobState"] == "COMPLETED", (sweep / f"slurm-{job}_{task}.err").read_text()[-3000:]
    from fttrain.sweep import write_summary

    rows = write_summary(sweep)
    assert sorted(r["peft.r"] for r in rows) == ["4", "8"] and all(r["status"] == "complete" for r in rows)
    assert all(r["steps"] == 3 for r in rows)


@pytest.mark.slurm
@pytest.mark.slow
def test_sweep_through_hydra_slurm_launcher(cluster, tmp_path):
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher", reason="pip install 'fttrain[sweep]'")
    proc = run_cli(["-m", "hydra/launcher=slurm_local", "+exp=tiny_sft", "trainer.max_steps=3", "peft.r=4,8"],
                   cwd=tmp_path, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    sweep = tmp_path / "outputs" / "multirun" / "tiny_sft"
    rows = (sweep / "summary.csv").read_text().splitlines()
    assert len(rows) == 3 and all(",complete," in r for r in rows[1:])
    for d in sweep.glob("peft.r=*"):
        metrics = json.loads((d / "metrics.json").read_text())
        assert metrics["world_size"] == 2  # two srun tasks, ranks from Slurm's variables
