"""python -m fttrain.numerics: the comparison it prints and its verdict."""

import subprocess
import sys

import pytest

from fttrain.numerics import Variant, disagreements, table


def v(label, losses, norms):
    return Variant(label, [], losses=list(losses), grad_norms=list(norms))


def test_agreeing_variants_pass_and_a_drift_fails():
    ref = v("ref", [2.0, 1.5, 1.2], [1.0, 0.9, 0.8])
    assert disagreements(ref, v("same", [2.0 + 1e-7, 1.5, 1.2], [1.0, 0.9, 0.8 + 1e-7]), rtol=1e-4) == []
    # A mean of micro-batch means moves the loss in the third digit: caught.
    bad = disagreements(ref, v("mean-of-means", [2.0, 1.51, 1.2], [1.0, 0.9, 0.8]), rtol=1e-4)
    assert bad == ["mean-of-means: step 2 loss 1.51 vs 1.5 (ref)"]
    assert disagreements(ref, v("short", [2.0], [1.0]), rtol=1e-4)[0].startswith("short: 1 logged steps")
    assert disagreements(ref, v("nan", [2.0, float("nan"), 1.2], [1.0, 0.9, 0.8]), rtol=1e-4)


def test_a_failed_run_is_a_disagreement_and_shows_in_the_table():
    ref = v("ref", [2.0], [1.0])
    broken = Variant("zero3 x2", [], error="exit 1, see x.log: boom")
    assert disagreements(ref, broken, rtol=1e-4) == ["exit 1, see x.log: boom"]
    assert "FAILED: exit 1" in table("plans", [ref, broken], 1e-4)


@pytest.mark.slow
def test_numerics_command_on_the_tiny_experiment(tmp_path):
    proc = subprocess.run(
        [sys.executable, "-m", "fttrain.numerics", "+exp=tiny_sft", "--check", "accum", "packing", "--steps", "3",
         "--workdir", str(tmp_path)],
        capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "== accum" in proc.stdout and "== packing" in proc.stdout
    assert "micro 4 x accum 1" in proc.stdout and "padded" in proc.stdout
    assert "numerics check passed" in proc.stdout
    # Its runs are kept for inspection, one directory per variant.
    assert len(list(tmp_path.glob("*/train_log.jsonl"))) == 4


def test_numerics_rejects_an_unknown_option(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fttrain.numerics", "+exp=tiny_sft", "--chek", "accum"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "--chek" in proc.stderr
