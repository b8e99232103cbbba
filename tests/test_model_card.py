"""Every export writes a model card; --push-to-hub refuses offline before any
work; an adapter exported unmerged loads with plain peft from any folder."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import run_cli


def fttrain_command(args, env=None):
    """`fttrain ARGS` as a user runs it (the console script's module), without HF_TOKEN unless env sets it."""
    full = {k: v for k, v in os.environ.items() if k != "HF_TOKEN"}
    return subprocess.run([sys.executable, "-m", "fttrain.cli", *args], capture_output=True, text=True,
                          env={**full, **(env or {})}, timeout=600)


def fake_run(root):
    """A run dir with what the card reads, no model: the card is text from files."""
    run = root / "outputs" / "my_run"
    (run / "model").mkdir(parents=True)
    (run / "config.yaml").write_text(
        "name: my_run\nmodel:\n  name_or_path: Qwen/Qwen2.5-0.5B-Instruct\npeft:\n  method: lora\n  r: 8\n  alpha: 16\n"
        "task:\n  name: sft\ntrainer:\n  learning_rate: 0.0002\n  lr_scheduler: cosine\n  max_steps: 100\n"
        "  micro_batch_size: 4\n")
    (run / "overrides.yaml").write_text("- +exp=my_run\n- logger.report_to=[mlflow]\n")
    (run / "metrics.json").write_text(json.dumps({"eval_loss": 1.2345678, "steps": 100, "dist_plan": "ddp"}))
    (run / "run_info.json").write_text(json.dumps({"precision": "bf16", "versions": {"peft": "9.9"}}))
    (run / "data_report.json").write_text(json.dumps({"train": {"source": "chats.jsonl", "rows": 1000, "kept": 990,
                                                                "tokens": 50000, "trained_tokens": 20000}}))
    return run


def test_the_card_names_base_method_data_metrics_command_and_versions(tmp_path):
    import fttrain
    from fttrain.model_card import card_text

    card = card_text(fake_run(tmp_path), {"method": "lora", "merged": False})
    header = card.split("---")[1]
    assert "library_name: peft" in header and "base_model: Qwen/Qwen2.5-0.5B-Instruct" in header
    assert "- sft" in header and "- lora" in header and "- fttrain" in header
    assert "- r: 8" in card and "- alpha: 16" in card
    assert "| train | `chats.jsonl` | 1000 | 990 | 50000 | 20000 |" in card
    assert "| eval_loss | 1.235 |" in card and "| steps | 100 |" in card
    assert "python -m fttrain +exp=my_run 'logger.report_to=[mlflow]'" in card
    assert f"fttrain {fttrain.__version__}" in card and "peft 9.9" in card and "precision bf16" in card


def test_the_card_shows_the_runs_benchmark_results(tmp_path):
    from fttrain.model_card import card_text

    run = fake_run(tmp_path)
    assert "lm-evaluation-harness" not in card_text(run, {"method": "lora"})
    (run / "eval_harness.json").write_text(json.dumps({
        "results": {"arc_easy": {"alias": "arc_easy", "acc,none": 0.61, "acc_stderr,none": 0.01}},
        "versions": {"arc_easy": 1.0}, "n-shot": {"arc_easy": 0}, "limit": 100, "lm_eval": {"lm_eval": "0.4.13"}}))
    card = card_text(run, {"method": "lora"})
    assert "lm_eval 0.4.13 on the run's model, the first 100 docs of each task" in card
    assert "| arc_easy | 1.0 | 0 | acc | 0.6100 | 0.0100 |" in card


def test_a_local_base_is_not_claimed_as_a_hub_base_model(tmp_path):
    from fttrain.model_card import card_text

    run = fake_run(tmp_path)
    (run / "config.yaml").write_text((run / "config.yaml").read_text().replace("Qwen/Qwen2.5-0.5B-Instruct",
                                                                              "/models/local-llama"))
    card = card_text(run, {"method": "lora", "merged": True})
    assert "base_model:" not in card and "library_name: transformers" in card


@pytest.mark.parametrize("env, says", [({"HF_HUB_OFFLINE": "1"}, "HF_HUB_OFFLINE=1"),
                                       ({"HF_HUB_OFFLINE": "0", "HF_HOME": "{tmp}/hf"}, "no Hugging Face token")],
                         ids=["offline", "no-token"])
def test_push_to_hub_refuses_before_any_work_offline_or_without_a_token(tmp_path, env, says):
    run = fake_run(tmp_path)
    env = {k: v.replace("{tmp}", str(tmp_path)) for k, v in env.items()}
    proc = fttrain_command(["export", str(run), "--out", str(tmp_path / "out"), "--push-to-hub", "me/model"], env)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert says in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "out").exists()  # refused before the export, which would have failed on the empty model/


@pytest.mark.slow
def test_exports_carry_the_card_and_the_unmerged_adapter_loads_with_plain_peft_anywhere(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=4"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "outputs" / "tiny_sft"
    merged, adapter = tmp_path / "merged", tmp_path / "adapter"
    for extra, out in (([], merged), (["--no-merge"], adapter)):
        p = fttrain_command(["export", str(run), "--out", str(out), *extra])
        assert p.returncode == 0, p.stderr[-3000:]
    metrics = json.loads((run / "metrics.json").read_text())
    for folder, library in ((merged, "transformers"), (adapter, "peft")):
        card = (folder / "README.md").read_text()
        assert f"library_name: {library}" in card and f"| steps | {metrics['steps']} |" in card
    # The adapter, moved to a folder of its own, loads on its base with plain peft and equals the merged model.
    moved = tmp_path / "elsewhere" / "adapter"
    shutil.copytree(adapter, moved)
    base_path = json.loads((run / "run_info.json").read_text())["model_path"]
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path), moved).eval()
    whole = AutoModelForCausalLM.from_pretrained(merged).eval()
    ids = torch.tensor([[1, 5, 9, 20, 33, 7]])
    with torch.no_grad():
        assert (model(ids).logits - whole(ids).logits).abs().max() < 1e-3  # export's fp32 gate tolerance
