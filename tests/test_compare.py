"""fttrain compare: a base, the LoRA adapter trained from it and its merged export,
measured side by side on the run's own eval set."""

import json

import pytest

from conftest import fttrain_command
from fttrain.export import DEFAULT_TOLERANCE

NEW_TOKENS = 6


@pytest.fixture(scope="module")
def compared(learned_run):
    run_dir, merged = learned_run["run"], learned_run["merged"]
    proc = fttrain_command(["compare", str(run_dir), str(merged), "--runs", "2", "--prompt-tokens", "16",
                            "--new-tokens", str(NEW_TOKENS)], cwd=learned_run["cwd"])
    assert proc.returncode == 0, proc.stderr[-4000:]
    out = run_dir / "compare"
    report = json.loads((out / "compare.json").read_text())
    return run_dir, out, report, {r["kind"]: r for r in report["models"]}


@pytest.mark.slow
def test_rows_are_the_base_then_each_model_by_kind(compared):
    _, _, report, _ = compared
    assert [r["kind"] for r in report["models"]] == ["base", "adapter", "merged"]
    assert [r["name"] for r in report["models"]] == ["base", "tiny_sft", "tiny_sft/merged"]  # an export inside its run
    assert "tiny-llama" in report["base"]


@pytest.mark.slow
def test_parameters_sizes_and_memory_are_sane(compared):
    _, _, _, rows = compared
    base, adapter, merged = rows["base"], rows["adapter"], rows["merged"]
    assert 0 < adapter["trainable_params"] < adapter["total_params"]
    assert adapter["total_params"] == base["total_params"] + adapter["trainable_params"]  # LoRA adds, merging folds
    assert merged["trainable_params"] == merged["total_params"] == base["total_params"]
    assert 0 < adapter["size_bytes"] < merged["size_bytes"]
    assert merged["size_bytes"] == pytest.approx(base["size_bytes"], rel=0.05)
    for row in rows.values():
        assert row["peak_rss_bytes"] > 50 * 2**20 and row["rss_increase_bytes"] > 0
        assert row["cuda_peak_bytes"] is None  # CPU


@pytest.mark.slow
def test_latency_is_measured_on_forced_lengths(compared):
    _, _, report, rows = compared
    assert report["settings"]["new_tokens"] == NEW_TOKENS and report["settings"]["runs"] == 2
    for row in rows.values():
        for mode in ("cache", "no_cache"):
            assert row[f"ttft_ms_{mode}"] > 0 and row[f"ms_per_token_{mode}"] > 0
            assert row[f"new_tokens_{mode}"] == NEW_TOKENS  # EOS could not cut generation short


@pytest.mark.slow
def test_quality_is_scored_on_the_runs_eval_set(compared):
    run_dir, _, report, rows = compared
    metrics = json.loads((run_dir / "metrics.json").read_text())
    eval_report = json.loads((run_dir / "data_report.json").read_text())["eval"]
    for row in rows.values():  # every model on the same rows and trained tokens: the run's whole eval split
        assert row["eval_rows"] == eval_report["kept"] and row["eval_tokens"] == eval_report["trained_tokens"]
        assert row["exact_match_rows"] == 4 and 0 <= row["exact_match"] <= 1
    # The adapter's loss is the run's own eval loss: same rows, same masking, same token weighting.
    assert rows["adapter"]["eval_loss"] == pytest.approx(metrics["eval_loss"], abs=1e-4)
    assert abs(rows["merged"]["eval_loss"] - rows["adapter"]["eval_loss"]) <= DEFAULT_TOLERANCE["fp32"]
    assert rows["adapter"]["eval_loss"] < rows["base"]["eval_loss"] - 0.1  # training helped on held-out rows
    for row in rows.values():
        assert row["perplexity"] == pytest.approx(2.718281828 ** row["eval_loss"], rel=1e-6)


@pytest.mark.slow
def test_markdown_table_and_chart(compared):
    _, out, _, _ = compared
    lines = [line for line in (out / "compare.md").read_text().splitlines() if line.startswith("|")]
    assert len(lines) == 2 + 3  # header, separator, one row per model
    assert "size (MiB)" in lines[0] and "TTFT cache (ms)" in lines[0] and "eval loss" in lines[0]
    assert [line.split("|")[2].strip() for line in lines[2:]] == ["base", "adapter", "merged"]
    assert (out / "compare.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(out.glob("*.tmp*"))


def test_bad_input_is_refused_naming_the_path(tmp_path):
    missing = tmp_path / "no_such_run"
    proc = fttrain_command(["compare", str(missing)], cwd=tmp_path)
    assert proc.returncode == 2 and str(missing) in proc.stderr and "Traceback" not in proc.stderr

    not_a_model = tmp_path / "notes"
    not_a_model.mkdir()
    (not_a_model / "readme.txt").write_text("hello")
    proc = fttrain_command(["compare", str(not_a_model)], cwd=tmp_path)
    assert proc.returncode == 2 and str(not_a_model) in proc.stderr and "Traceback" not in proc.stderr


def test_an_adapter_of_another_base_is_refused(tmp_path, capsys):
    from fttrain.compare import main

    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    (base / "config.json").write_text("{}")
    adapter.mkdir()
    (adapter / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "/elsewhere/other-base"}))
    assert main([str(adapter), "--base", str(base)]) == 2
    err = capsys.readouterr().err
    assert str(adapter) in err and "/elsewhere/other-base" in err and str(base) in err
    # Without a run directory there is no eval set to score on.
    assert main([str(base), "--base", str(base)]) == 2
    assert "run directory" in capsys.readouterr().err
