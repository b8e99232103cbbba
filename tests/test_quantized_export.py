"""fttrain export --quantize: a weight-only quantised model that plain transformers loads,
published only when its perplexity on the run's held-out rows stays within tolerance.

The numbers are recomputed here from the published folders (the learned run's fp32
export RUN/merged is the reference, the same weights exported without --quantize),
never pinned: the test checks that the report tells the truth and that the gate acts on it.
"""

import json
import shutil
from dataclasses import replace

import pytest
import torch

from conftest import fttrain_command

pytest.importorskip("bitsandbytes", reason="the qlora extra (bitsandbytes) is not installed")
pytestmark = pytest.mark.slow  # every test here reads the shared learned run (30 s to train when first asked)


def _export(argv, capsys):
    """fttrain export in this process (a fresh interpreter per export would cost seconds each)."""
    from fttrain.export import main

    code = main([str(a) for a in argv])
    out = capsys.readouterr()
    return code, out.out, out.err


def _quality(folder, run):
    """Eval loss and perplexity of a folder loaded as a user loads it, on the run's held-out rows."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from fttrain.compare import eval_set, quality
    from fttrain.data.store import PreparedRows
    from fttrain.models.load import disable_cpu_packed_4bit

    model = AutoModelForCausalLM.from_pretrained(str(folder))
    disable_cpu_packed_4bit(model)  # this CPU may have AVX512-BF16 (see that function)
    rows = PreparedRows(eval_set(run)["split"])
    pad = AutoTokenizer.from_pretrained(str(folder)).pad_token_id
    return model, quality(model, rows, pad, "cpu")


@pytest.fixture(scope="module")
def reference(learned_run):
    return _quality(learned_run["merged"], learned_run["run"])[1]


# format -> the bitsandbytes / torchao layer class the reloaded model must contain
FORMATS = {"nf4": "Linear4bit", "int8": "Linear8bitLt", "torchao-int8": None}


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_quantized_export_reloads_smaller_within_tolerance_as_reported(fmt, learned_run, reference, tmp_path, capsys):
    from fttrain.compare import weight_bytes
    from fttrain.export import QUANT_FORMATS

    if fmt.startswith("torchao"):
        pytest.importorskip("torchao", reason="the quantize extra (torchao) is not installed")
    run, out = learned_run["run"], tmp_path / fmt
    if fmt == "nf4":  # once as a user runs it: the console script, a fresh process
        proc = fttrain_command(["export", run, "--out", out, "--quantize", fmt], cwd=learned_run["cwd"])
        code, printed = proc.returncode, proc.stdout
        assert code == 0, proc.stderr[-3000:]
    else:
        code, printed, err = _export([run, "--out", out, "--quantize", fmt], capsys)
        assert code == 0, err[-3000:]
    report = json.loads((out / "export_report.json").read_text())["quantization"]
    assert not out.with_name(out.name + ".tmp").exists() and not out.with_name(out.name + ".quantized.tmp").exists()

    model, got = _quality(out, run)
    layers = [type(m).__name__ for m in model.modules()]
    if FORMATS[fmt]:
        assert FORMATS[fmt] in layers, f"{fmt}: no {FORMATS[fmt]} layer after reloading"
    else:  # torchao keeps nn.Linear and swaps the weight for its tensor subclass
        assert any(type(m.weight).__module__.startswith("torchao") for m in model.modules()
                   if isinstance(m, torch.nn.Linear)), "torchao-int8: no torchao weight after reloading"
    # What the report says is what a user measures.
    assert report["format"] == fmt and report["verified_on_cpu"] is True
    assert report["tolerance"] == QUANT_FORMATS[fmt].tolerance
    for key in ("eval_loss", "perplexity", "eval_tokens", "eval_rows"):
        assert report["reference"][key] == pytest.approx(reference[key], rel=1e-5), key
        assert report["quantized"][key] == pytest.approx(got[key], rel=1e-5), key
    increase = got["perplexity"] / reference["perplexity"] - 1
    assert report["perplexity_increase"] == pytest.approx(increase, abs=1e-6)
    assert increase <= report["tolerance"]
    # Smaller on disk than the same weights exported unquantised (RUN/merged, fp32).
    assert report["reference"]["size_bytes"] == weight_bytes(learned_run["merged"])
    assert report["quantized"]["size_bytes"] == weight_bytes(out) < weight_bytes(learned_run["merged"])
    assert f"{report['perplexity_increase']:+.2%}" in printed
    assert fmt in (out / "README.md").read_text()


def test_too_tight_tolerance_publishes_nothing(learned_run, tmp_path, capsys):
    """A tolerance just below the increase this export measures (read from a passing
    export of the same weights) fails it: exit 2, the numbers said, no folder left."""
    run = learned_run["run"]
    passed = tmp_path / "passed"
    code, _, err = _export([run, "--out", passed, "--quantize", "fp4"], capsys)
    assert code == 0, err[-3000:]
    increase = json.loads((passed / "export_report.json").read_text())["quantization"]["perplexity_increase"]
    out = tmp_path / "tight"
    code, printed, err = _export([run, "--out", out, "--quantize", "fp4", "--quantize-tolerance",
                                  repr(increase - 1e-4)], capsys)
    assert code == 2 and "Traceback" not in err
    assert "quality gate failed" in err and "--quantize-tolerance" in err and "perplexity" in err
    assert f"{increase:.2%}" in err
    assert not any(p.name.startswith("tight") for p in tmp_path.iterdir()), list(tmp_path.iterdir())


def _unmergeable_run(learned_run, tmp_path):
    """The learned run as if prompt tuning had made it (config.yaml says so): nothing to merge."""
    from omegaconf import OmegaConf

    run = tmp_path / "prompt_run"
    shutil.copytree(learned_run["run"] / "model", run / "model")
    cfg = OmegaConf.load(learned_run["run"] / "config.yaml")
    cfg.peft.method = "prompt_tuning"
    OmegaConf.save(cfg, run / "config.yaml")
    return run


@pytest.mark.parametrize("case", ["unknown format", "no merge", "unmergeable", "keep unmerged", "combined",
                                  "torchao missing", "int4 on cpu", "tolerance alone"])
def test_quantize_refusals(case, learned_run, tmp_path, capsys, monkeypatch):
    from fttrain import export

    run, out = learned_run["run"], tmp_path / "out"
    if case in ("unmergeable", "keep unmerged"):
        run = _unmergeable_run(learned_run, tmp_path)
    argv = {"unknown format": [run, "--out", out, "--quantize", "int3"],
            "no merge": [run, "--out", out, "--quantize", "nf4", "--no-merge"],
            "unmergeable": [run, "--out", out, "--quantize", "nf4"],
            "keep unmerged": [run, "--out", out, "--quantize", "nf4", "--keep-unmerged"],
            "combined": ["--adapter", f"a={run}", "--adapter", f"b={run}", "--weights", "a=0.5,b=0.5", "--out", out,
                         "--quantize", "nf4"],
            "torchao missing": [run, "--out", out, "--quantize", "torchao-int8"],
            "int4 on cpu": [run, "--out", out, "--quantize", "torchao-int4"],
            "tolerance alone": [run, "--out", out, "--quantize-tolerance", "0.1"]}[case]
    expect = {"unknown format": "--quantize: invalid choice: 'int3'", "no merge": "--no-merge",
              "unmergeable": "peft=prompt_tuning cannot be merged", "keep unmerged": "peft=prompt_tuning cannot",
              "combined": "combined --adapter exports are not quantised",
              "torchao missing": "needs torchao_missing, which is not installed (pip install 'fttrain[quantize]')",
              "int4 on cpu": "--quantize torchao-int4 needs a CUDA GPU",
              "tolerance alone": "--quantize-tolerance sets the --quantize gate"}[case]
    if case == "torchao missing":  # as on a machine without the quantize extra
        monkeypatch.setitem(export.QUANT_FORMATS, "torchao-int8",
                            replace(export.QUANT_FORMATS["torchao-int8"], library="torchao_missing"))
    if case == "int4 on cpu":
        if torch.cuda.is_available():
            pytest.skip("a GPU is here: torchao-int4 runs")
        # torchao installed or not: the GPU is what is missing
        monkeypatch.setitem(export.QUANT_FORMATS, "torchao-int4", replace(export.QUANT_FORMATS["torchao-int4"],
                                                                          library="torch"))
    if case == "unknown format":
        with pytest.raises(SystemExit) as exit_:
            _export(argv, capsys)
        code, err = exit_.value.code, capsys.readouterr().err
    else:
        code, _, err = _export(argv, capsys)
    assert code == 2 and "Traceback" not in err
    assert expect in err, err
    assert not out.exists() and not any(tmp_path.glob("out*"))
