"""lm-evaluation-harness on what a run trained: after training (harness.tasks) and
``fttrain eval`` on the run, its merged export and the base, with the example tasks
of examples/harness_tasks (local JSON data, YAML task definitions, offline)."""

import json
from pathlib import Path

import pytest

from conftest import (HARNESS_LIMIT as LIMIT, HARNESS_SYSTEM as SYSTEM, HARNESS_TASKS as EXAMPLES, compose_error,
                      config_error, fttrain_command as command, run_cli)
from fttrain.export import DEFAULT_TOLERANCE

TASKS = ["reverse_letters_choice", "reverse_letters_gen"]


def samples(path):
    """{(task, doc_id): the harness's raw responses}: log-likelihoods per choice, generated text."""
    rows = [json.loads(line) for line in Path(path).read_text().splitlines()]
    return {(r["task"], r["doc_id"]): r["resps"] for r in rows}


def choice_lls(resps):
    return {k: [choice[0][0] for choice in v] for k, v in resps.items() if k[0] == "reverse_letters_choice"}


# ------------------------------------------------------------------ before any model loads
@pytest.mark.slow
def test_an_unknown_task_is_refused_at_the_config_check_with_the_nearest_names():
    message = config_error(["+exp=tiny_sft", "harness.tasks=[revers_letters_choice]",
                            f"harness.include_path={EXAMPLES}"])
    assert "harness.tasks: 'revers_letters_choice' is not a task lm_eval knows here" in message
    assert "did you mean reverse_letters_choice" in message


@pytest.mark.slow
def test_a_missing_task_folder_and_a_misspelt_key_are_refused():
    assert "harness.include_path=/no/such/tasks: no such folder" in \
        config_error(["+exp=tiny_sft", "harness.tasks=[arc_easy]", "harness.include_path=/no/such/tasks"])
    assert "taks" in compose_error(["+exp=tiny_sft", "harness.taks=[arc_easy]"])
    assert "harness.limit" in config_error(["+exp=tiny_sft", "harness.tasks=[arc_easy]", "harness.limit=0"])


def test_tasks_without_a_causal_lm_and_sharded_plans_are_refused():
    message = config_error(["+exp=minilm_cls", "harness.tasks=[arc_easy]"])
    assert "scores causal LMs; task=cls trains a SEQ_CLS head" in message
    message = config_error(["+exp=tiny_sft", "dist=fsdp", "harness.tasks=[arc_easy]"])
    assert "shards the weights" in message and "fttrain eval RUN_DIR" in message


def test_a_missing_lm_eval_is_refused_with_the_pip_command(monkeypatch):
    import fttrain.harness

    monkeypatch.setattr(fttrain.harness, "missing", lambda: fttrain.harness.PIP)
    message = config_error(["+exp=tiny_sft", "harness.tasks=[arc_easy]"])
    assert "lm_eval is not installed (pip install -e '.[eval]'" in message


def test_results_flatten_to_one_number_per_task_and_metric():
    from fttrain.harness import flat_metrics, table

    record = {"results": {"t": {"alias": "t", "acc,none": 0.5, "acc_stderr,none": 0.1, "sample_len": 6,
                                "exact_match,strip": 1.0, "exact_match_stderr,strip": "N/A"}},
              "groups": {"g": {"acc,none": 0.25}}, "versions": {"t": 1.0}, "n-shot": {"t": 0}}
    assert flat_metrics(record) == {"harness/t/acc": 0.5, "harness/t/acc_stderr": 0.1,
                                    "harness/t/exact_match_strip": 1.0, "harness/g/acc": 0.25}
    lines = table(record).splitlines()
    assert "| t | 1.0 | 0 | acc | 0.5000 | 0.1000 |" in lines
    assert "| t | 1.0 | 0 | exact_match (strip) | 1.0000 | N/A |" in lines
    assert not any("sample_len" in line for line in lines)


@pytest.mark.slow
def test_eval_refuses_a_missing_path_and_an_unknown_task_before_loading(tmp_path):
    proc = command(["eval", str(tmp_path / "nothing"), "--tasks", "arc_easy"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert f"{tmp_path / 'nothing'}: no such file or directory" in proc.stderr
    (tmp_path / "model").mkdir()
    proc = command(["eval", str(tmp_path / "model"), "--tasks", "no_such_task_anywhere"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'no_such_task_anywhere' is not a task lm_eval knows here" in proc.stderr


def test_prompt_tuning_logits_are_read_at_the_input_positions(tiny_dir, tokenizer):
    """peft's prompt tuning puts its virtual tokens' positions before the logits;
    lm_eval (0.4.13) allows for them and scores the continuation's own positions."""
    import peft
    import torch
    from lm_eval.api.instance import Instance
    from lm_eval.models.huggingface import HFLM
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    n = 4
    model = peft.get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_dir),
                                peft.PromptTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=n)).eval()
    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=2)
    request = ("Reverse: a b c\n", "c b a")
    context, continuation = lm._encode_pair(*request)  # lm_eval's own tokens for the request
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([context + continuation])).logits[0].float()
    assert logits.shape[0] == n + len(context) + len(continuation)
    logprobs = torch.log_softmax(logits[n:], -1)  # one row per input token
    want = sum(float(logprobs[len(context) - 1 + i, t]) for i, t in enumerate(continuation))

    got = lm.loglikelihood([Instance("loglikelihood", {}, request, 0)], disable_tqdm=True)[0][0]
    assert got == pytest.approx(want, abs=1e-4)
    shifted = sum(float(torch.log_softmax(logits, -1)[len(context) - 1 + i, t]) for i, t in enumerate(continuation))
    assert abs(shifted - want) > 1e-3  # reading the rows n positions early would be another number


def test_a_new_or_continued_run_drops_the_old_models_results(tmp_path):
    from fttrain import outputs

    for clear in (outputs.unmark_complete, outputs.clear_previous_run):
        for name in ("eval_harness.json", "eval_harness_samples.jsonl", "eval_harness_error.txt", "COMPLETE"):
            (tmp_path / name).write_text("{}")
        clear(tmp_path)
        assert not list(tmp_path.glob("eval_harness*")) and not (tmp_path / "COMPLETE").exists()


# ------------------------------------------------------------------ on a trained run
@pytest.fixture(scope="module")
def evaluated(learned_run, tiny_dir):
    """The shared learned run (evaluated after training), then `fttrain eval` on it (its
    own settings), on its merged export and on the base."""
    cwd, run, merged, kept = learned_run["cwd"], learned_run["run"], learned_run["merged"], learned_run["after"]
    after = {"record": json.loads((kept / "eval_harness.json").read_text()),
             "samples": samples(kept / "eval_harness_samples.jsonl"),
             "metrics": json.loads((kept / "metrics.json").read_text())}
    # No task options: the run's harness.* settings are used.
    proc = command(["eval", str(run)], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    flags = ["--tasks", "reverse_letters", "--include-path", str(EXAMPLES), "--limit", str(LIMIT),
             "--apply-chat-template", "--system-instruction", SYSTEM]
    proc = command(["eval", str(merged), *flags], cwd=cwd)  # RUN/merged: its results stay its own
    assert proc.returncode == 0, proc.stderr[-4000:]
    proc = command(["eval", str(tiny_dir), *flags, "--out", str(cwd / "base.json")], cwd=cwd)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return {"run": run, "cwd": cwd, "after": after, "tensorboard_after": kept / "tensorboard",
            "eval": {"record": json.loads((run / "eval_harness.json").read_text()),
                     "samples": samples(run / "eval_harness_samples.jsonl")},
            "merged": {"record": json.loads((merged / "eval_harness.json").read_text()),
                       "samples": samples(merged / "eval_harness_samples.jsonl")},
            "base": {"record": json.loads((cwd / "base.json").read_text()),
                     "samples": samples(cwd / "base_samples.jsonl")}}


@pytest.mark.slow
def test_the_record_holds_results_versions_and_task_hashes(evaluated):
    import lm_eval

    record = evaluated["after"]["record"]
    assert sorted(record["results"]) == TASKS  # the tag expanded to its tasks
    assert record["results"]["reverse_letters_choice"]["acc,none"] is not None
    assert "exact_match,strip" in record["results"]["reverse_letters_gen"]
    assert record["lm_eval"]["lm_eval"] == lm_eval.__version__
    for task in TASKS:
        assert record["n-samples"][task] == {"effective": LIMIT, "original": 100}
        assert record["versions"][task] == 1.0 and record["n-shot"][task] == 0
        assert len(record["task_hashes"][task]) == 64 and len(record["config_sha256"][task]) == 64
    assert record["when"] == "after training" and record["system_instruction"] == SYSTEM
    prompts = [json.loads(line)["arguments"][0][0] for line in
               (evaluated["cwd"] / "after_training" / "eval_harness_samples.jsonl").read_text().splitlines()]
    assert all(SYSTEM in p and "<|start_header_id|>assistant" in p for p in prompts)  # through the chat template


@pytest.mark.slow
def test_the_run_stays_complete_and_its_metrics_gain_the_flat_numbers(evaluated):
    from fttrain.harness import flat_metrics

    run, after = evaluated["run"], evaluated["after"]
    assert (run / "COMPLETE").exists() and not (run / "eval_harness_error.txt").exists()
    flat = flat_metrics(after["record"])
    assert {k: v for k, v in after["metrics"].items() if k.startswith("harness/")} == flat
    assert "harness/reverse_letters_choice/acc" in flat and "harness/reverse_letters_gen/exact_match_strip" in flat


@pytest.mark.slow
def test_eval_on_the_saved_run_scores_what_training_scored(evaluated):
    """The model in memory after training and the one reloaded from model/ give the
    harness the same requests (task hashes) and the same answers."""
    after, again = evaluated["after"], evaluated["eval"]
    assert again["record"]["task_hashes"] == after["record"]["task_hashes"]
    # RUN/eval_harness.json is the run's model's, written by fttrain eval RUN (not by the later eval of RUN/merged).
    assert again["record"]["kind"] == "peft" and again["record"]["when"] == "fttrain eval"
    assert again["record"]["limit"] == LIMIT and again["record"]["system_instruction"] == SYSTEM  # the run's own
    lls, lls_again = choice_lls(after["samples"]), choice_lls(again["samples"])
    assert lls.keys() == lls_again.keys() and len(lls) == LIMIT
    for key in lls:
        assert lls_again[key] == pytest.approx(lls[key], abs=1e-4)
    generated = {k: v for k, v in after["samples"].items() if k[0] == "reverse_letters_gen"}
    assert generated == {k: v for k, v in again["samples"].items() if k[0] == "reverse_letters_gen"}


@pytest.mark.slow
def test_the_merged_export_scores_as_the_adapter_and_the_base_does_not(evaluated):
    adapter, merged, base = (choice_lls(evaluated[k]["samples"]) for k in ("eval", "merged", "base"))
    assert evaluated["merged"]["record"]["task_hashes"] == evaluated["eval"]["record"]["task_hashes"]
    for key in adapter:
        # The export gate's tolerance on logits; a choice's log-likelihood sums about ten tokens' log-probabilities.
        assert merged[key] == pytest.approx(adapter[key], abs=10 * DEFAULT_TOLERANCE["fp32"])
    # The adapter is applied: the base's log-likelihoods are not the tuned model's.
    assert max(abs(a - b) for key in adapter for a, b in zip(adapter[key], base[key])) > 0.05


@pytest.mark.slow
def test_the_trackers_get_the_numbers_after_training_and_from_fttrain_eval(evaluated):
    from test_trackers import mlflow_run, tensorboard_values

    metrics = evaluated["after"]["metrics"]
    steps = metrics["steps"]
    key = "final/harness/reverse_letters_choice/acc"
    _, values = tensorboard_values(evaluated["tensorboard_after"])
    assert values[(key, steps)] == pytest.approx(metrics["harness/reverse_letters_choice/acc"])
    client, run = mlflow_run(evaluated["run"])
    history = client.get_metric_history(run.info.run_id, key)
    assert len(history) == 2  # after training, then fttrain eval added its own at the same step
    assert all(m.step == steps for m in history)
    assert history[-1].value == pytest.approx(evaluated["eval"]["record"]["results"]["reverse_letters_choice"]
                                              ["acc,none"])


@pytest.mark.slow
def test_a_failed_evaluation_keeps_the_trained_run_and_fttrain_eval_completes_it(tmp_path):
    broken = tmp_path / "tasks"
    broken.mkdir()
    (broken / "gone.yaml").write_text(
        "task: gone_data\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {tmp_path / 'deleted.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\ndoc_to_text: '{{q}}'\n"
        "doc_to_choice: '{{[a, b]}}'\ndoc_to_target: 0\nmetadata:\n  version: 1.0\n")
    proc = run_cli(["+exp=tiny_sft", "harness.tasks=[gone_data]", f"harness.include_path={broken}"], cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    run = tmp_path / "outputs" / "tiny_sft"
    assert "the evaluation after training failed" in proc.stderr and f"fttrain eval {run}" in proc.stderr
    assert (run / "COMPLETE").exists() and (run / "model" / "adapter_model.safetensors").exists()
    assert "deleted.jsonl" in (run / "eval_harness_error.txt").read_text()
    assert not (run / "eval_harness.json").exists()
    proc = command(["eval", str(run)], cwd=tmp_path)  # the run's own settings: the data is still missing
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "lm_eval could not evaluate gone_data" in proc.stderr and "deleted.jsonl" in proc.stderr
    # --tasks: the command line's settings alone, none of the run's (its include_path, with the broken task).
    proc = command(["eval", str(run), "--tasks", "reverse_letters_choice", "--include-path", str(EXAMPLES),
                    "--limit", "2"], cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert not (run / "eval_harness_error.txt").exists()
    assert json.loads((run / "eval_harness.json").read_text())["tasks"] == ["reverse_letters_choice"]
    assert "harness/reverse_letters_choice/acc" in json.loads((run / "metrics.json").read_text())

