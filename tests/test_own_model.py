"""The path a user walks with an instruct model of their own: its chat template,
their file, a preflight, a run whose saved model carries the template it trained with.

The "instruct model" is the tiny Llama given a Qwen2.5-style tokenizer (ChatML
turn markers as special tokens, the template of tests/templates/qwen25.jinja
with its default system prompt), saved as a local folder like a hub download.
"""

import json
from pathlib import Path

import pytest

from conftest import compose, run_cli

TEMPLATES = Path(__file__).resolve().parent / "templates"


@pytest.fixture(scope="session")
def instruct_dir(tiny_dir, tmp_path_factory):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    out = tmp_path_factory.mktemp("tiny-qwen")
    tok = AutoTokenizer.from_pretrained(tiny_dir)
    tok.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tok.eos_token = "<|im_end|>"
    tok.chat_template = (TEMPLATES / "qwen25.jinja").read_text()
    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    model.resize_token_embeddings(len(tok))
    model.config.eos_token_id = model.generation_config.eos_token_id = tok.eos_token_id
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out


def chats_file(path: Path, n: int = 24) -> str:
    rows = []
    for i in range(n):
        word = "abcdefgh"[i % 8] * (1 + i % 3)
        rows.append({"conversations": [{"from": "human", "value": f"Echo {word}"}, {"from": "gpt", "value": word},
                                       {"from": "human", "value": "Again?"}, {"from": "gpt", "value": word}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def user_overrides(instruct_dir, data_file, tmp_path, *extra):
    return ["model=local", f"model.name_or_path={instruct_dir}", "data=jsonl", f"data.train={data_file}",
            "data.format=sharegpt", "data.max_length=256", "trainer.max_steps=2", "trainer.micro_batch_size=2",
            f"output_root={tmp_path}", "name=mine", "dist=single", "logger.progress_bar=false",
            "task.generation_eval.num_samples=1", "task.generation_eval.max_new_tokens=4", *extra]


def test_preflight_names_the_template_and_shows_each_role_pattern(instruct_dir, tmp_path, caplog):
    rows = [{"conversations": [{"from": "human", "value": "Echo a"}, {"from": "gpt", "value": "a"}]},
            {"conversations": [{"from": "system", "value": "Be terse."}, {"from": "human", "value": "Echo {{name}}"},
                               {"from": "gpt", "value": "b"}]}] * 4
    path = tmp_path / "mixed.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    from fttrain.run import run

    cfg = compose(user_overrides(instruct_dir, path, tmp_path, "preflight=true", "data.eval_fraction=0"))
    with caplog.at_level("INFO", logger="fttrain"):
        assert run(cfg, tmp_path / "mine") == {}
    text = caplog.text
    assert "chat template: the model's own" in text
    # One sample per role pattern, trained tokens marked; the template's default system prompt is context.
    assert "sample (user,assistant)" in text and "sample (system,user,assistant)" in text
    assert "You are Qwen, created by Alibaba Cloud." in text and "[[a<|im_end|>]]" in text and "[[b<|im_end|>]]" in text
    assert "'rows_with_placeholders': 4" in text  # {{name}} left in the data, counted
    assert not (tmp_path / "mine").exists()  # preflight writes nothing


@pytest.mark.slow
def test_the_saved_model_carries_the_template_it_trained_with(instruct_dir, tmp_path):
    from fttrain.run import run

    data = chats_file(tmp_path / "chats.jsonl")
    run(compose(user_overrides(instruct_dir, data, tmp_path)), tmp_path / "mine")
    saved = (tmp_path / "mine" / "model" / "chat_template.jinja").read_text()
    assert saved == (TEMPLATES / "qwen25.jinja").read_text()
    report = json.loads((tmp_path / "mine" / "data_report.json").read_text())["train"]
    assert report["trained_turns"] == 2 * report["kept"] and report["turns_without_end_of_turn"] == 0

    # A template of the same format from a file, which is not the model's own: trained with, saved, warned about.
    mine = tmp_path / "mine.jinja"
    mine.write_text((TEMPLATES / "chatml.jinja").read_text())
    proc = run_cli(user_overrides(instruct_dir, data, tmp_path, f"data.chat_template={mine}", "name=file"),
                   cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "DIFFERS from the model's own" in proc.stdout + proc.stderr
    assert (tmp_path / "file" / "model" / "chat_template.jinja").read_text() == mine.read_text()


@pytest.mark.slow
def test_another_familys_template_is_refused_before_the_model_loads(instruct_dir, tmp_path):
    data = chats_file(tmp_path / "chats.jsonl", 4)
    # Gemma's turn markers are plain text to this tokenizer, and its own template never writes them.
    proc = run_cli(user_overrides(instruct_dir, data, tmp_path, f"data.chat_template={TEMPLATES / 'gemma.jinja'}"),
                   cwd=tmp_path)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "'<start_of_turn>' -> " in proc.stderr and "data.chat_template=tokenizer" in proc.stderr


def test_max_length_beyond_the_models_positions_is_refused(instruct_dir, tmp_path):
    from fttrain.run import run
    from fttrain.config.checks import ConfigCheckError

    data = chats_file(tmp_path / "chats.jsonl", 4)
    with pytest.raises(ConfigCheckError, match=r"data.max_length=4096 is longer than the model's 512 positions"):
        run(compose(user_overrides(instruct_dir, data, tmp_path, "data.max_length=4096", "preflight=true")),
                   tmp_path / "mine")


def test_your_data_on_a_demo_experiment_says_what_it_inherits(tmp_path, caplog):
    from fttrain.run import warn_inherited_data_settings
    from conftest import config_error

    data = chats_file(tmp_path / "chats.jsonl", 4)
    # The demo's generated eval set with your training file: refused, with the fix.
    message = config_error(["+exp=tiny_sft", f"data.train={data}"])
    assert "data.eval=builtin:reverse_chat/eval" in message and "data.eval=null" in message
    overrides = ["+exp=tiny_sft", f"data.train={data}", "data.eval=null"]
    with caplog.at_level("WARNING", logger="fttrain"):
        warn_inherited_data_settings(compose(overrides), overrides)
    assert "data.max_samples=64" in caplog.text and "data.max_length=128" in caplog.text
    caplog.clear()
    overrides += ["data.max_samples=null", "data.max_length=256"]
    with caplog.at_level("WARNING", logger="fttrain"):
        warn_inherited_data_settings(compose(overrides), overrides)
    assert caplog.text == ""  # set on the command line: nothing inherited
