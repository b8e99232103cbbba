"""fttrain bench: what it counts, and a 2-step smoke run of every variant (the
figures themselves go in the README, never into a timed test)."""

import json
import subprocess
import sys

import pytest
import torch



def test_bench_is_an_fttrain_command():
    from fttrain.cli import COMMANDS

    assert COMMANDS["bench"] == "fttrain.bench"


def test_the_meter_counts_real_tokens_of_the_measured_steps_only():
    from fttrain.bench import Meter

    meter = Meter(warmup=1, steps=3)
    padded = {"input_ids": torch.zeros(2, 10), "attention_mask": torch.tensor([[1] * 10, [1] * 4 + [0] * 6])}
    packed = {"input_ids": torch.zeros(2, 10), "num_real_tokens": 17}
    flat = {"input_ids": torch.zeros(1, 12)}  # padding-free: every slot is a token
    collated = [meter.count(b) for b in (padded, padded, packed, flat, packed, flat, padded)]
    trained = iter(collated)
    # Step 1 trains 2 micro-batches; step 2 three (an epoch's last step can be short or long);
    # step 3 one; the 7th batch was prefetched and never trained on.
    for step, n in ((1, 2), (2, 3), (3, 1)):
        for _ in range(n):
            batch = meter.consume(next(trained))
            assert set(batch) <= {"input_ids", "attention_mask", "num_real_tokens"}  # the counts are taken out
        meter.step_end(step)
    result = meter.result()
    # Steps 2 and 3: packed, flat, packed, flat = 17 + 12 + 17 + 12 real of 20 + 12 + 20 + 12 slots.
    assert result["tokens"] == 58
    assert result["padding_fraction"] == pytest.approx(1 - 58 / 64)
    assert result["tokens_per_second"] == pytest.approx(58 / result["seconds"])


def test_a_run_that_ends_early_is_an_error_not_a_figure():
    from fttrain.bench import BenchError, Meter

    meter = Meter(warmup=1, steps=5)
    meter.step_end(1)
    with pytest.raises(BenchError, match="before step 5"):
        meter.result()


def test_ratios_are_fttrains_rate_over_each_variants():
    from fttrain.bench import summarise

    run = {"padding_fraction": 0.0, "peak_memory_bytes": 1, "time_to_first_step_s": 1.0, "step_time_s": 1.0,
           "flops_per_token": 6.0}
    rows = summarise({"fttrain": [{**run, "tokens_per_second": 300.0}, {**run, "tokens_per_second": 100.0},
                                  {**run, "tokens_per_second": 200.0}],
                      "trl_default": [{**run, "tokens_per_second": 50.0}]}, gpu_name=None)
    by_name = {r["name"]: r for r in rows}
    assert by_name["fttrain"]["tokens_per_second"] == 200.0  # the median
    assert by_name["trl_default"]["ratio"] == 4.0 and by_name["fttrain"]["ratio"] == 1.0
    assert by_name["fttrain"]["mfu"] is None  # no GPU, no MFU
    on_h200 = summarise({"fttrain": [{**run, "tokens_per_second": 1e12}]}, gpu_name="NVIDIA H200")
    assert on_h200[0]["mfu"] == pytest.approx(6e12 / 989e12)


@pytest.mark.slow
def test_bench_runs_every_variant_and_writes_bench_json(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "fttrain.bench", "+exp=tiny_sft", "--steps", "2", "--warmup", "1",
                           "--out", str(tmp_path / "b")], cwd=tmp_path, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "b" / "bench.json").read_text())
    names = [v["name"] for v in report["variants"]]
    assert {"fttrain", "trl_default", "trl_packed", "raw_loop"} <= set(names)
    for v in report["variants"]:
        assert v["tokens_per_second"] > 0 and 0 <= v["padding_fraction"] < 1, v
        assert v["peak_memory_bytes"] > 0 and v["time_to_first_step_s"] > 0 and v["ratio"] > 0, v
    assert "| trl_default" in proc.stdout and "fttrain / this" in proc.stdout


@pytest.mark.slow
def test_the_gpu_check_runs_end_to_end_on_cpu_as_a_dry_run(tmp_path):
    from conftest import REPO

    proc = subprocess.run(["bash", str(REPO / "benchmarks" / "gpu_check.sh"), "--dry-run", "--out", str(tmp_path)],
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["check"]: r for r in json.loads((tmp_path / "gpu_check.json").read_text())}
    for measured in ("lora sdpa", "full sdpa", "lora loss chunked", "trl defaults (lora)", "full fsdp (1 GPU)"):
        assert rows[measured]["tokens_per_second"] > 0, rows[measured]
    assert rows["lora compiled"]["note"].startswith("skipped")  # GPU-only checks say so
    assert "| lora sdpa |" in proc.stdout and "estimate error" in proc.stdout


def test_flops_per_token_count_matmuls_only(tiny_dir):
    from transformers import AutoModelForCausalLM

    from fttrain.bench import model_flops_per_token
    from fttrain.methods import apply_peft
    from conftest import compose

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    c = model.config
    total = sum(p.numel() for p in model.parameters())
    matmul = total - c.vocab_size * c.hidden_size  # the input embedding is a lookup
    attention = 12 * c.num_hidden_layers * c.hidden_size * 128
    assert model_flops_per_token(model, 128) == 6 * matmul + attention
    lora = apply_peft(model, compose(["+exp=tiny_sft"]).peft, False)
    trained = sum(p.numel() for p in lora.parameters() if p.requires_grad)
    # Frozen weights: forward and the activation gradient (4 N); trained ones also their own gradient (6 N).
    assert model_flops_per_token(lora, 128) == 4 * matmul + 6 * trained + attention
