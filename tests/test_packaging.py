"""fttrain as a user gets it: a wheel, the `fttrain` command, their own config folder."""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from conftest import CONF, REPO, run_cli


def test_the_config_groups_ship_inside_the_package():
    import fttrain

    assert CONF.parent == Path(fttrain.__file__).resolve().parent
    assert (CONF / "config.yaml").exists() and (CONF / "exp" / "tiny_sft.yaml").exists()
    assert not (REPO / "conf").exists()


def test_ls_lists_groups_and_options(capsys, tmp_path):
    from fttrain.cli import main

    assert main(["ls", "peft", "exp"]) == 0
    lines = dict(line.split(": ", 1) for line in capsys.readouterr().out.splitlines())
    assert set(lines) == {"exp", "peft"}
    assert {"lora", "qlora", "prompt_tuning", "full"} <= set(lines["peft"].split())
    assert "tiny_sft" in lines["exp"].split()
    (tmp_path / "exp").mkdir()
    (tmp_path / "exp" / "mine.yaml").write_text("# @package _global_\nname: mine\n")
    assert main(["ls", "exp", "--config-dir", str(tmp_path)]) == 0
    assert "mine" in capsys.readouterr().out.split()
    assert main(["ls", "nope"]) == 2
    assert "no config group nope" in capsys.readouterr().err


def test_unknown_command_exits_2(capsys):
    from fttrain.cli import main

    assert main(["trian"]) == 2
    assert "unknown command 'trian'" in capsys.readouterr().err
    assert main([]) == 2


def user_config(folder, data_file):
    """An experiment of the user's own, on their data, built on a shipped one."""
    (folder / "exp").mkdir(parents=True)
    (folder / "data").mkdir()
    (folder / "exp" / "mine.yaml").write_text(textwrap.dedent("""\
        # @package _global_
        # fttrain train --config-dir DIR +exp=mine
        defaults:
          - /exp/tiny_sft
          - override /data: my_chats
        name: mine
        trainer:
          max_steps: 2
        """))
    (folder / "data" / "my_chats.yaml").write_text(textwrap.dedent(f"""\
        # fttrain train --config-dir DIR +exp=mine
        defaults:
          - jsonl
          - _self_
        train: {data_file}
        max_length: 256
        """))
    rows = [{"messages": [{"role": "user", "content": f"say {i}"}, {"role": "assistant", "content": str(i)}]}
            for i in range(40)]
    data_file.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_a_users_config_folder_composes_with_the_shipped_groups(tmp_path):
    from fttrain.config.compose import compose_config

    user_config(tmp_path / "conf", tmp_path / "chats.jsonl")
    cfg = compose_config(["+exp=mine"], config_dirs=[str(tmp_path / "conf")])
    assert cfg.name == "mine" and cfg.data.train == str(tmp_path / "chats.jsonl")
    assert cfg.trainer.max_steps == 2 and cfg.peft.method == "lora"  # the rest from tiny_sft
    # The same through Hydra's own override
    cfg = compose_config([f"hydra.searchpath=[file://{tmp_path / 'conf'}]", "+exp=mine"])
    assert cfg.name == "mine"


def test_a_compose_error_exits_2_with_one_message(tmp_path):
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=abc"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2
    assert "trainer.max_steps" in proc.stderr and "Traceback" not in proc.stderr
    proc = run_cli(["+exp=no_such_experiment"], cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "Could not find 'exp/no_such_experiment'" in proc.stderr


@pytest.mark.slow
def test_a_wheel_in_a_fresh_venv_trains_from_another_directory(tmp_path):
    """pip install of the built wheel (not the source tree) runs `fttrain train` from
    an unrelated directory, with the user's own config folder, and the adapter it saves
    is usable from yet another directory (its base model is named by an absolute path)."""
    import shutil

    wheels, venv, work, elsewhere = (tmp_path / d for d in ("wheels", "venv", "work", "elsewhere"))
    for d in (work, elsewhere):
        d.mkdir()
    # Built from a copy of the tree without build outputs: a stale build/lib would ship removed modules.
    source = tmp_path / "source"
    def build_outputs(folder, names):
        top = {".git", "build", "dist", "outputs"} if Path(folder) == REPO else set()
        return [n for n in names if n in top or n.endswith(".egg-info") or n in ("__pycache__", ".pytest_cache")]

    shutil.copytree(REPO, source, ignore=build_outputs)
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(wheels), str(source)], check=True, capture_output=True, timeout=300)
    # The venv sees this interpreter's packages (torch, transformers, ...), not this checkout.
    subprocess.run([sys.executable, "-m", "venv", "--system-site-packages", str(venv)], check=True, timeout=300)
    wheel = next(wheels.glob("fttrain-*.whl"))
    import zipfile

    shipped = zipfile.ZipFile(wheel).namelist()
    assert "fttrain/conf/hydra/launcher/slurm.yaml" in shipped and "fttrain/sbatch/single_node.sbatch.j2" in shipped
    assert not any(n.endswith(("peft_setup.py", "fttrain/distributed.py")) for n in shipped)
    subprocess.run([str(venv / "bin" / "python"), "-m", "pip", "install", "-q", "--no-deps", str(wheel)],
                   check=True, capture_output=True, timeout=300)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    where = subprocess.run([str(venv / "bin" / "python"), "-c", "import fttrain; print(fttrain.__file__)"],
                           cwd=work, capture_output=True, text=True, env=env, check=True)
    assert where.stdout.strip().startswith(str(venv)), where.stdout

    fttrain = str(venv / "bin" / "fttrain")
    proc = subprocess.run([fttrain, "train", "+exp=tiny_sft", "trainer.max_steps=2"], cwd=work, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run_dir = work / "outputs" / "tiny_sft"
    assert (run_dir / "COMPLETE").exists()
    base = json.loads((run_dir / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(base), base

    user_config(work / "conf", work / "chats.jsonl")
    proc = subprocess.run([fttrain, "train", "--config-dir", "conf", "+exp=mine"], cwd=work, capture_output=True,
                          text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert json.loads((work / "outputs" / "mine" / "metrics.json").read_text())["steps"] == 2

    proc = subprocess.run([fttrain, "generate", str(run_dir), "--prompt", "Reverse: a b", "--max-new-tokens", "3"],
                          cwd=elsewhere, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr[-3000:]
    proc = subprocess.run([fttrain, "train", "+exp=tiny_sft", "trainer.max_stepz=2"], cwd=work, capture_output=True,
                          text=True, env=env, timeout=300)
    assert proc.returncode == 2 and "max_stepz" in proc.stderr


def test_a_relative_base_model_is_saved_absolute_and_read_from_anywhere(tmp_path, monkeypatch):
    from omegaconf import OmegaConf

    from fttrain.models.adapted import adapter_base
    from fttrain.models.load import resolve_model_path

    (tmp_path / "models" / "base").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)
    assert resolve_model_path(OmegaConf.create({"name_or_path": "models/base"})) == str(tmp_path / "models" / "base")
    assert resolve_model_path(OmegaConf.create({"name_or_path": "org/hub-model"})) == "org/hub-model"
    # An adapter saved before paths were absolute: found relative to a folder above the run.
    adapter = tmp_path / "outputs" / "run" / "model"
    adapter.mkdir(parents=True)
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "models/base"}))
    monkeypatch.chdir(adapter)
    assert adapter_base(adapter, None) == str(tmp_path / "models" / "base")
    assert adapter_base(adapter, "other/base") == "other/base"


def test_config_folders_with_unusual_names_compose(tmp_path):
    from fttrain.config.compose import compose_config

    folder = tmp_path / "my, conf (é) = 'x'"
    user_config(folder, tmp_path / "chats.jsonl")
    cfg = compose_config(["+exp=mine"], config_dirs=[str(folder)])
    assert cfg.name == "mine" and cfg.data.train == str(tmp_path / "chats.jsonl")


def test_only_compose_errors_exit_2(tmp_path):
    """A typo exits 2 with or without HYDRA_FULL_ERROR; a failure after composing does not."""
    proc = run_cli(["+exp=tiny_sft", "trainer.max_stepz=3"], cwd=tmp_path, timeout=120, env={"HYDRA_FULL_ERROR": "1"})
    assert proc.returncode == 2 and "max_stepz" in proc.stderr
    from fttrain import __main__ as entry

    def fails_after_composing():
        entry._composed = True
        raise SystemExit(1)  # as Hydra exits after a task function's exception, or a sweep with failed trials

    old = entry.main
    entry.main = fails_after_composing
    try:
        with pytest.raises(SystemExit) as exit_:
            entry.cli()
        assert exit_.value.code == 1
    finally:
        entry.main, entry._composed = old, False
