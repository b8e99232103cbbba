"""End to end: a short SFT run writes the output contract, and what it saved
reloads with plain transformers/peft and generates."""

import json

import pytest
import torch

from conftest import run_cli
from fttrain.outputs import METRIC_KEYS

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("lora")
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=6"], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return cwd / "outputs" / "tiny_sft", proc


def test_run_dir_holds_the_output_contract(lora_run):
    run_dir, _ = lora_run
    for name in ["config.yaml", "overrides.yaml", "run_info.json", "data_report.json", "metrics.json",
                 "train_log.jsonl", "loss_curve.png", "samples.jsonl", "COMPLETE", "train_rank0.log"]:
        assert (run_dir / name).is_file(), name
    assert (run_dir / "model" / "adapter_config.json").is_file()
    assert (run_dir / "model" / "adapter_model.safetensors").is_file()
    assert (run_dir / "model" / "tokenizer.json").is_file()
    assert not (run_dir / "model.tmp").exists()
    assert (run_dir / "loss_curve.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_metrics_are_complete_and_sane(lora_run):
    run_dir, _ = lora_run
    m = json.loads((run_dir / "metrics.json").read_text())
    for key in METRIC_KEYS:
        assert m[key] is not None, key
    assert m["steps"] == 6 and m["world_size"] == 1 and m["global_batch_size"] == 2
    assert 0 < m["trainable_params"] < m["total_params"]
    assert m["train_tokens_per_second"] > 0 and 0 <= m["padding_fraction"] < 0.5
    assert m["peak_memory_bytes"] > 10 * 2**20
    steps = [json.loads(l) for l in (run_dir / "train_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in steps if "loss" in r] == [1, 2, 3, 4, 5, 6]
    info = json.loads((run_dir / "run_info.json").read_text())
    assert info["batch"]["global_batch_size"] == 2


def test_start_log_shows_batch_arithmetic_and_a_marked_sample(lora_run):
    run_dir, _ = lora_run
    log = (run_dir / "train_rank0.log").read_text()
    assert "global batch = 2 micro x 1 accumulation x 1 rank(s) = 2 packed rows per step" in log
    assert "[[" in log and "<|eot_id|>]]" in log


def test_adapter_reloads_with_plain_peft_and_generates(lora_run):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run_dir, _ = lora_run
    cfg = (run_dir / "config.yaml").read_text()
    base_path = json.loads((run_dir / "run_info.json").read_text())["model_path"]
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    base = AutoModelForCausalLM.from_pretrained(base_path)
    model = PeftModel.from_pretrained(base, run_dir / "model").eval()
    assert "tiny-llama" in base_path and "builtin:tiny-llama" in cfg
    ids = tok.apply_chat_template([{"role": "user", "content": "Reverse: a b c"}], add_generation_prompt=True,
                                  return_tensors="pt", return_dict=True)
    out = model.generate(**ids, max_new_tokens=5, do_sample=False)
    assert out.shape[1] > ids["input_ids"].shape[1]
    # The adapter changed the model: its outputs differ from the base's.
    with torch.no_grad():
        with model.disable_adapter():
            base_logits = model(**ids).logits
        tuned = model(**ids).logits
    assert (tuned - base_logits).abs().max() > 1e-4


def test_finished_run_is_not_overwritten(lora_run):
    run_dir, _ = lora_run
    cwd = run_dir.parent.parent
    before = (run_dir / "metrics.json").read_text()
    proc = run_cli(["+exp=tiny_sft", "trainer.max_steps=6"], cwd=cwd, timeout=120)
    assert proc.returncode == 2
    assert "holds a finished run" in proc.stderr and "resume_from=auto" in proc.stderr and "hydra.run.dir" in proc.stderr
    assert (run_dir / "metrics.json").read_text() == before


def test_full_finetune_reloads_with_automodel(tmp_path):
    from transformers import AutoModelForCausalLM

    proc = run_cli(["+exp=tiny_pretrain", "trainer.max_steps=3", "hydra.run.dir=custom_dir"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "custom_dir"
    m = json.loads((run_dir / "metrics.json").read_text())
    assert m["trainable_params"] == m["total_params"] and m["steps"] == 3
    samples = [json.loads(l) for l in (run_dir / "samples.jsonl").read_text().splitlines()]
    assert samples and all(s["prompt"] and "generated" in s for s in samples)  # continuations of eval documents
    model = AutoModelForCausalLM.from_pretrained(run_dir / "model")
    assert sum(p.numel() for p in model.parameters()) == m["total_params"]


def test_unpacked_run_reports_padding(tmp_path):
    proc = run_cli(["+exp=tiny_sft", "data.packing=false", "trainer.max_steps=2", "trainer.micro_batch_size=4"],
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    m = json.loads((tmp_path / "outputs" / "tiny_sft" / "metrics.json").read_text())
    assert m["padding_fraction"] > 0


def test_bad_data_file_stops_with_row_and_field(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"instruction": "a", "output": "b"}\n{"instruction": "c"}\n')
    proc = run_cli(["+exp=tiny_sft", f"data.train={path}", "data.format=alpaca", "data.eval=null",
                    "data.eval_fraction=0"], cwd=tmp_path,
                   timeout=120)
    assert proc.returncode == 2
    assert "bad.jsonl row 1: field 'output' is missing" in proc.stderr
    assert not (tmp_path / "outputs" / "tiny_sft" / "model").exists()


def test_resume_without_a_checkpoint_is_refused(tmp_path):
    first = run_cli(["+exp=tiny_sft", "trainer.max_steps=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    before = (tmp_path / "outputs" / "tiny_sft" / "metrics.json").read_text()
    again = run_cli(["+exp=tiny_sft", "trainer.max_steps=4", "resume_from=auto"], cwd=tmp_path, timeout=120)
    assert again.returncode == 2 and "no complete checkpoint" in again.stderr
    assert (tmp_path / "outputs" / "tiny_sft" / "metrics.json").read_text() == before


def test_gradient_checkpointing_runs(tmp_path):
    proc = run_cli(["+exp=tiny_sft", "trainer.gradient_checkpointing=true", "trainer.max_steps=2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "gradient checkpointing on" in (tmp_path / "outputs" / "tiny_sft" / "train_rank0.log").read_text()


def test_resume_continues_from_the_last_checkpoint(tmp_path):
    first = run_cli(["+exp=tiny_sft", "trainer.max_steps=4", "trainer.save_steps=2"], cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-4000:]
    run_dir = tmp_path / "outputs" / "tiny_sft"
    assert (run_dir / "checkpoints" / "checkpoint-4").is_dir()
    # A half-written checkpoint (no trainer_state.json yet) is never picked.
    (run_dir / "checkpoints" / "checkpoint-99").mkdir()
    more = run_cli(["+exp=tiny_sft", "trainer.max_steps=6", "trainer.save_steps=2", "resume_from=auto"], cwd=tmp_path)
    assert more.returncode == 0, more.stderr[-4000:]
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 6
    logged = [json.loads(l)["step"] for l in (run_dir / "train_log.jsonl").read_text().splitlines()
              if "loss" in json.loads(l)]
    assert logged == [1, 2, 3, 4, 5, 6]  # steps 1-4 kept from the first run, 5-6 appended

    # overwrite=true starts over and leaves nothing of the old run that a later
    # resume could pick up.
    again = run_cli(["+exp=tiny_sft", "trainer.max_steps=2", "overwrite=true"], cwd=tmp_path)
    assert again.returncode == 0, again.stderr[-4000:]
    assert not list((run_dir / "checkpoints").glob("checkpoint-*"))
    assert json.loads((run_dir / "metrics.json").read_text())["steps"] == 2
    assert len([l for l in (run_dir / "train_log.jsonl").read_text().splitlines() if '"loss"' in l]) == 2


def test_a_step_with_zero_trained_tokens_never_reaches_the_optimizer(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, TrainingArguments

    from fttrain.data.packing import PaddingCollator
    from fttrain.trainer import FTTrainer, ZeroTrainedTokensError

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    rows = [{"input_ids": [5, 6, 7], "labels": [-100, -100, -100], "sample_ids": [i]} for i in range(4)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=1, per_device_train_batch_size=2, use_cpu=True,
                             report_to="none", remove_unused_columns=False, disable_tqdm=True)
    trainer = FTTrainer(model=model, args=args, train_dataset=rows, data_collator=PaddingCollator(0),
                        rank_records=False)
    with pytest.raises(ZeroTrainedTokensError):
        trainer.train()
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_preflight_checks_data_and_stops_before_the_model(tmp_path):
    ok = run_cli(["+exp=tiny_sft", "preflight=true"], cwd=tmp_path, timeout=120)
    assert ok.returncode == 0, ok.stderr[-4000:]
    out = ok.stderr + ok.stdout
    assert "preflight passed" in out and "global batch = " in out and "[[" in out
    run_dir = tmp_path / "outputs" / "tiny_sft"
    assert not (run_dir / "model").exists() and not (run_dir / "config.yaml").exists()
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "q"}]}\n')
    proc = run_cli(["+exp=tiny_sft", "preflight=true", f"data.train={bad}", "data.eval_fraction=0", "data.eval=null"],
                   cwd=tmp_path, timeout=120)
    assert proc.returncode == 2 and "row 0" in proc.stderr and "no assistant turn" in proc.stderr
