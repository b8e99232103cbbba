"""Decoder tasks beyond SFT: continued pretraining in blocks, DPO, KTO, ORPO,
reward modelling and GRPO. Fast tests check data layout, row validation,
reward functions and config refusals; slow ones train the tiny model through
the real recipes and assert learning thresholds the untrained model misses."""

import json
import math

import pytest
import torch

from conftest import compose, config_error, run_cli, train_log


# ------------------------------------------------------------------ pt layout
def test_concat_blocks_keeps_every_token_and_fills_blocks():
    from fttrain.data.packing import concat_blocks
    from fttrain.data.tokenize import IGNORE

    docs = [{"input_ids": list(range(100 * i, 100 * i + n)) + [1], "labels": [], "sample_id": i}
            for i, n in enumerate([5, 17, 3, 30])]
    rows = concat_blocks(docs, 16)
    joined = [t for r in rows for t in r["input_ids"]]
    assert joined == [t for d in docs for t in d["input_ids"]]  # nothing dropped, order kept, EOS between docs
    assert all(len(r["input_ids"]) == 16 for r in rows[:-1]) and 0 < len(rows[-1]["input_ids"]) <= 16
    for r in rows:
        assert r["labels"][0] == IGNORE and r["labels"][1:] == r["input_ids"][1:]
    assert rows[1]["sample_ids"] == [1, 2, 3]  # a block names every document it holds


def test_pt_blocks_do_not_truncate_long_documents(tmp_path, tokenizer):
    from fttrain.data.pipeline import prepare_data

    rows = [{"text": " ".join(["word"] * 200)}, {"text": "short one"}]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = compose(["+exp=tiny_pretrain", f"data.train={path}", "data.eval=null", "data.eval_fraction=0",
                   "data.max_length=32", "data.max_samples=null"]).data
    blocks = prepare_data(cfg, tokenizer, None, False, blocks=True)
    total = sum(len(tokenizer(r["text"])["input_ids"]) + 1 for r in rows)
    assert sum(len(r["input_ids"]) for r in blocks.train.rows) == total
    assert blocks.train.report["truncated"] == 0 and "blocks" in blocks.train.report["layout"]
    per_doc = prepare_data(cfg, tokenizer, None, False, blocks=False)
    assert per_doc.train.report["truncated"] == 1  # the per-document layout cuts it


# --------------------------------------------------------------- validation
@pytest.mark.parametrize("row,field", [
    ({"prompt": "p", "rejected": "r"}, "chosen"),
    ({"prompt": "p", "chosen": "c", "rejected": "c"}, "rejected"),
    ({"prompt": "p", "chosen": "", "rejected": "r"}, "chosen"),
    ({"prompt": [{"role": "user", "content": "p"}], "chosen": [{"role": "user", "content": "c"}], "rejected": "r"},
     "chosen[0].role"),
    ({"prompt": "p", "chosen": [{"role": "assistant", "content": "c"}], "rejected": "r"}, "chosen"),
    ({"prompt": [{"role": "robot", "content": "p"}], "chosen": "c", "rejected": "r"}, "prompt[0].role"),
])
def test_preference_rows_name_the_bad_field(row, field):
    from fttrain.data.formats import RowError
    from fttrain.data.preference import PreferenceRows

    with pytest.raises(RowError) as e:
        PreferenceRows({}, {}, prompt_required=True)(row)
    assert e.value.field == field and field.split("[")[0] in str(e.value)


def test_chat_prompt_with_text_answers_becomes_assistant_turns():
    from fttrain.data.preference import PreferenceRows

    out = PreferenceRows({}, {"human": "user"}, True)({"prompt": [{"role": "human", "content": "hi"}],
                                                       "chosen": "a", "rejected": "b"})
    assert out == {"prompt": [{"role": "user", "content": "hi"}], "chosen": [{"role": "assistant", "content": "a"}],
                   "rejected": [{"role": "assistant", "content": "b"}]}


@pytest.mark.slow
def test_bad_preference_row_stops_the_cli_with_row_and_field(tmp_path):
    path = tmp_path / "pairs.jsonl"
    rows = [{"prompt": "Reverse: a b", "chosen": "b a", "rejected": "a b"}] * 3 + [{"prompt": "x", "chosen": "y"}]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    proc = run_cli(["+exp=tiny_dpo", f"data.train={path}", "data.eval=null", "data.eval_fraction=0",
                    "trainer.max_steps=1"], cwd=tmp_path)
    assert proc.returncode == 2
    assert f"{path} row 3: field 'rejected' is missing" in proc.stderr


def test_kto_unpairs_and_shuffles_with_the_seed():
    from fttrain.recipes.preference import unpair

    rows = [{"prompt": str(i), "chosen": "c", "rejected": "r"} for i in range(20)]
    a, b = unpair(rows, 1), unpair(rows, 1)
    assert a == b and len(a) == 40 and sum(r["label"] for r in a) == 20
    assert [r["label"] for r in a] != [True] * 20 + [False] * 20  # mixed, so batches hold both labels


def test_grpo_rows_need_the_columns_rewards_read():
    from fttrain.data.formats import RowError
    from fttrain.data.preference import PromptRows, reward_columns
    from fttrain.rewards import build_rewards

    funcs, weights = build_rewards([{"_target_": "fttrain.rewards.exact_match", "weight": 2},
                                    {"_target_": "fttrain.rewards.regex_format", "pattern": r"\d+"}])
    assert [f.__name__ for f in funcs] == ["exact_match", "regex_format"] and weights == [2.0, 1.0]
    assert reward_columns(funcs) == ["answer"]
    rows = PromptRows({}, {}, reward_columns(funcs))
    assert rows({"prompt": "1+1?", "answer": "2"}) == {"prompt": "1+1?", "answer": "2"}
    with pytest.raises(RowError, match="'answer' is missing"):
        rows({"prompt": "1+1?"})


# ------------------------------------------------------------------ rewards
def test_builtin_rewards():
    from fttrain.rewards import exact_match, length_penalty, regex_format

    chat = [[{"role": "assistant", "content": "It is 12."}], [{"role": "assistant", "content": "12 or 13"}]]
    assert exact_match(completions=chat, answer=["12", "12"], extract="last_number") == [1.0, 0.0]
    assert exact_match(completions=["12.0", "twelve"], answer=["12", "12"], extract="first_number") == [1.0, 0.0]
    assert exact_match(completions=[" Paris\n", "paris is"], answer=["paris", "paris"]) == [1.0, 0.0]
    assert regex_format(completions=["42", "x42"], pattern=r"\d+") == [1.0, 0.0]
    assert regex_format(completions=["42", "x42"], pattern=r"\d+", full=False) == [1.0, 1.0]
    assert length_penalty(completions=["a" * 10, "a" * 30], max_chars=20) == [0.0, -0.5]


@pytest.mark.parametrize("overrides,message", [
    (["task.rewards=[{_target_: fttrain.rewards.no_such}]"], "cannot be imported"),
    (["task.rewards=[{_target_: fttrain.rewards.regex_format, patern: x}]"], "takes no argument(s) ['patern']"),
    (["task.rewards=[]"], "task.rewards is empty"),
    (["task.num_generations=1"], "task.num_generations must be >= 2"),
    (["data.packing=true"], "TRL's trainer"),
    (["data.format=messages"], "task=grpo reads data.format prompt"),
])
def test_grpo_config_problems_fail_before_loading(overrides, message):
    assert message in config_error(["+exp=tiny_grpo", *overrides])


@pytest.mark.parametrize("overrides,message", [
    (["task=dpo", "task.loss_type=[sigmoid,sft]", "task.loss_weights=[1.0]"], "1 entries for 2 loss types"),
    (["task=dpo", "task.reference=/some/model"], "task.reference='/some/model' with peft=lora"),
    (["task=dpo", "peft=prompt_tuning"], "not supported by task=dpo"),
    (["task=sft", "data.format=preference"], "task=sft reads data.format"),
])
def test_preference_config_problems(overrides, message):
    assert message in config_error(["+exp=tiny_dpo", *overrides])


@pytest.mark.slow
def test_grpo_batch_must_split_into_groups(tmp_path):
    proc = run_cli(["+exp=tiny_grpo", "trainer.micro_batch_size=6", "trainer.max_steps=1"], cwd=tmp_path)
    assert proc.returncode == 2 and "groups of task.num_generations=8" in proc.stderr


# ------------------------------------------------------- training (slow)
def run_task(tmp_path, exp, *overrides):
    """Train in-process; returns (metrics, run dir)."""
    from fttrain.run import run

    cfg = compose([f"+exp={exp}", f"output_root={tmp_path}", "dist=single", *overrides])
    run_dir = tmp_path / cfg.name
    return run(cfg, run_dir), run_dir


def log_rows(run_dir):
    return train_log(run_dir)


@pytest.mark.slow
@pytest.mark.parametrize("task,exp", [("dpo", "tiny_dpo"), ("kto", "tiny_dpo"), ("orpo", "tiny_dpo"),
                                      ("rm", "tiny_rm"), ("grpo", "tiny_grpo")])
def test_trl_tasks_give_loraplus_b_matrices_the_larger_rate(tmp_path, task, exp):
    from fttrain.run import prepare_run_dir
    from fttrain.recipes import recipe_class

    cfg = compose([f"+exp={exp}", f"task={task}", "peft=loraplus", "peft.loraplus_lr_ratio=16",
                   "trainer.learning_rate=1e-3", f"output_root={tmp_path}", "dist=single"])
    prepare_run_dir(cfg, tmp_path / task)
    recipe = recipe_class(task)(cfg, tmp_path / task)
    recipe.setup()
    optimizer = recipe.trainer.create_optimizer()
    rate = {id(p): g["lr"] for g in optimizer.param_groups for p in g["params"]}
    trained = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad}
    assert any("lora_B" in n for n in trained)
    for name, p in trained.items():
        assert rate[id(p)] == pytest.approx(16e-3 if "lora_B" in name else 1e-3), name


@pytest.mark.slow
def test_pt_reports_perplexity_and_learns(tmp_path):
    from fttrain.run import prepare_run_dir
    from fttrain.recipes.sft import SFTRecipe

    cfg = compose(["+exp=tiny_pretrain", f"output_root={tmp_path}", "dist=single", "trainer.max_steps=12"])
    prepare_run_dir(cfg, tmp_path / "pt")
    recipe = SFTRecipe(cfg, tmp_path / "pt")
    recipe.setup()
    before = recipe.trainer.evaluate()
    recipe.train()
    metrics = recipe.save()
    assert recipe.batch_unit == "128-token blocks"
    assert all(len(r["input_ids"]) == 128 for r in recipe.data.train.rows[:-1])
    assert metrics["padding_fraction"] < 0.01  # blocks are full
    assert metrics["eval_perplexity"] == pytest.approx(math.exp(metrics["eval_loss"]), rel=1e-9)
    assert metrics["eval_perplexity"] < 0.5 * before["eval_perplexity"]


@pytest.mark.slow
def test_dpo_learns_the_preference_and_saves_only_the_trained_adapter(tmp_path):
    metrics, run_dir = run_task(tmp_path, "tiny_dpo")
    assert metrics["eval_rewards/accuracies"] >= 0.9 and metrics["eval_rewards/margins"] > 0.5
    first = [r for r in log_rows(run_dir) if "rewards/accuracies" in r][0]
    assert first["rewards/accuracies"] < 0.8  # the start: rewards are ~0 against the reference
    assert (run_dir / "model" / "adapter_model.safetensors").exists() and not (run_dir / "model" / "ref").exists()
    report = json.loads((run_dir / "data_report.json").read_text())
    assert report["train"]["kept"] == 500 and report["train"]["truncated_at_max_length"] == 0
    assert metrics["train_tokens"] > 0 and 0 < metrics["padding_fraction"] < 0.5


@pytest.mark.slow
def test_dpo_variants_full_reference_precomputed_and_mixed_losses(tmp_path):
    metrics, _ = run_task(tmp_path, "tiny_dpo", "peft=full", "trainer.learning_rate=1e-3", "trainer.max_steps=20",
                          "task.precompute_ref_log_probs=true", "task.loss_type=[sigmoid,sft]",
                          "task.loss_weights=[1.0,0.2]", "name=dpo_full")
    assert metrics["eval_rewards/accuracies"] >= 0.9


@pytest.mark.slow
@pytest.mark.parametrize("task", ["kto", "orpo"])
def test_kto_and_orpo_learn(tmp_path, task):
    lr = {"kto": "1e-2", "orpo": "5e-3"}[task]
    metrics, _ = run_task(tmp_path, "tiny_dpo", f"task={task}", f"trainer.learning_rate={lr}", f"name={task}")
    assert metrics["eval_rewards/margins"] > 0.3 if task == "kto" else metrics["eval_rewards/accuracies"] >= 0.9


@pytest.mark.slow
def test_reward_model_learns_and_reloads_to_the_same_scores(tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    metrics, run_dir = run_task(tmp_path, "tiny_rm")
    assert metrics["eval_pairwise_accuracy_before"] < 0.75
    assert metrics["eval_pairwise_accuracy_after"] >= 0.95
    # The saved adapter + head, reloaded without fttrain, scores the eval pairs the same.
    cfg = json.loads((run_dir / "run_info.json").read_text())
    base = AutoModelForSequenceClassification.from_pretrained(cfg["model_path"], num_labels=1)
    tok = AutoTokenizer.from_pretrained(run_dir / "model")
    base.config.pad_token_id = tok.pad_token_id
    model = PeftModel.from_pretrained(base, run_dir / "model").eval()
    from fttrain.data.sources import load_rows

    rows = load_rows("builtin:preference_chat/eval")
    wins, margins = 0, []
    with torch.no_grad():
        for r in rows:
            scores = []
            for k in ("chosen", "rejected"):
                ids = tok.apply_chat_template(r["prompt"] + r[k], tokenize=True, return_dict=True, return_tensors="pt")
                scores.append(model(**ids).logits[0, 0].item())
            wins += scores[0] > scores[1]
            margins.append(scores[0] - scores[1])
    assert wins / len(rows) == pytest.approx(metrics["eval_pairwise_accuracy_after"], abs=1e-9)
    assert sum(margins) / len(margins) == pytest.approx(metrics["eval_margin_after"], rel=1e-3, abs=1e-4)


@pytest.mark.slow
def test_grpo_raises_the_reward(tmp_path):
    metrics, run_dir = run_task(tmp_path, "tiny_grpo")
    rows = [r for r in log_rows(run_dir) if "reward" in r]
    assert len(rows) == 8 and all("reward_std" in r for r in rows)  # mean and spread every logged step
    assert metrics["train_reward_last"] > metrics["train_reward_first"] + 0.15
    assert metrics["eval_reward_after"] >= metrics["eval_reward_before"]
    assert metrics["train_tokens"] > 0


def test_unpaired_kto_rows_and_their_errors():
    from fttrain.data.formats import RowError
    from fttrain.data.preference import UnpairedRows

    rows = UnpairedRows({}, {})
    chat = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}], "label": False}
    assert rows(chat) == {"prompt": [{"role": "user", "content": "q"}],
                          "completion": [{"role": "assistant", "content": "a"}], "label": False}
    assert rows({"prompt": "q", "completion": "a", "label": 1})["label"] is True
    for bad, field in [({"prompt": "q", "completion": "a", "label": "yes"}, "label"),
                       ({"prompt": "q", "completion": "a"}, "label"),
                       ({"messages": [{"role": "user", "content": "q"}], "label": True}, "messages")]:
        with pytest.raises(RowError) as e:
            rows(bad)
        assert e.value.field == field


def test_preference_layouts_people_have():
    from fttrain.data.preference import PreferenceRows

    rows = PreferenceRows({}, {})
    want = {"prompt": [{"role": "user", "content": "q"}], "chosen": [{"role": "assistant", "content": "good"}],
            "rejected": [{"role": "assistant", "content": "bad"}]}
    sharegpt = {"conversations": [{"from": "human", "value": "q"}], "chosen": {"from": "gpt", "value": "good"},
                "rejected": {"from": "gpt", "value": "bad"}}
    alpaca = {"instruction": "q", "input": "", "chosen": "good", "rejected": "bad"}
    hh = {"chosen": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "good"}],
          "rejected": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "bad"}]}
    assert rows(sharegpt) == rows(alpaca) == rows(hh) == want
    with_system = rows({**sharegpt, "system": "be nice"})
    assert with_system["prompt"][0] == {"role": "system", "content": "be nice"}
