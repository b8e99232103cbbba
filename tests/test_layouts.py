"""The README's table of data layouts is true: each example file trains, with
exactly the overrides the table gives, on the tiny model through the real recipe.

The files (tests/data/layouts/) are written in the layouts people already have:
LLaMA-Factory's alpaca, sharegpt, Glaive tool calls, sharegpt and alpaca
preference, its unpaired KTO layout; OpenAI messages with tools; Anthropic HH.
"""

import json
import re
import shlex
from pathlib import Path

import pytest

from conftest import REPO, compose

EXPERIMENT = {"sft": "tiny_sft", "dpo": "tiny_dpo", "kto": "tiny_dpo"}


def readme_layouts():
    """(example file, task, overrides) per row of the README's layout table."""
    text = (REPO / "README.md").read_text()
    table = text[text.index("| your data (LLaMA-Factory's name) |"):]
    table = table[:table.index("\n\n")]
    rows = []
    for line in table.splitlines()[2:]:
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        example = re.search(r"`([^`]+)`", cells[1]).group(1)
        overrides = shlex.split(re.search(r"`([^`]+)`", cells[3]).group(1))
        rows.append(pytest.param(example, cells[2], overrides, id=Path(example).stem))
    return rows


LAYOUTS = readme_layouts()
ANSWERING = ("gpt", "assistant", "function_call", "agent")  # the speakers whose turns train, in these files


def answers(row) -> int:
    if "instruction" in row:
        return 1 + len(row.get("history", []))
    turns = row.get("conversations") or row.get("messages") or row.get("dialog")
    return sum(1 for t in turns if (t.get("from") or t.get("role") or t.get("speaker")) in ANSWERING)


def test_the_readme_lists_every_example_file():
    listed = {p.values[0] for p in LAYOUTS}
    shipped = {str(p.relative_to(REPO)) for p in (REPO / "tests" / "data" / "layouts").glob("*.jsonl")}
    assert listed == shipped


@pytest.mark.parametrize("example,task,overrides", LAYOUTS)
def test_each_layout_reads_every_row(example, task, overrides, tokenizer):
    """Fast: every row of the file converts (no row dropped, none refused)."""
    cfg = compose([f"+exp={EXPERIMENT[task]}", "data=jsonl", f"data.train={REPO / example}", "data.eval=null",
                   "data.eval_fraction=0", "data.max_samples=null", *overrides])
    rows = [json.loads(line) for line in (REPO / example).read_text().splitlines()]
    if task == "sft":
        from fttrain.data.pipeline import mask_policy, prepare_data

        data = prepare_data(cfg.data, tokenizer, tokenizer.chat_template, True, policy=mask_policy(cfg.task))
        report = data.train.report
        assert report["kept"] == len(rows) and report["dropped"] == {} and report["turns_without_end_of_turn"] == 0
        assistant_turns = sum(answers(r) for r in rows)
        assert report["trained_turns"] == assistant_turns
    else:
        from fttrain.data.preference import PreferenceRows, UnpairedRows

        fields = UnpairedRows(cfg.data.columns, cfg.data.role_map) if task == "kto" else \
            PreferenceRows(cfg.data.columns, cfg.data.role_map)
        out = [fields(r) for r in rows]
        assert all(isinstance(o["prompt"], (str, list)) and o["prompt"] for o in out)


@pytest.mark.slow
@pytest.mark.parametrize("example,task,overrides", LAYOUTS)
def test_each_layout_trains(example, task, overrides, tmp_path):
    from fttrain.run import run

    cfg = compose([f"+exp={EXPERIMENT[task]}", "data=jsonl", f"data.train={REPO / example}", "data.eval=null",
                   "data.eval_fraction=0.25", "data.max_samples=null", "data.max_length=512", "trainer.max_steps=2",
                   "trainer.micro_batch_size=2", f"output_root={tmp_path}", "name=layout", "dist=single",
                   *overrides])
    metrics = run(cfg, tmp_path / "layout")
    assert metrics["steps"] == 2 and metrics["train_loss"] > 0
    report = json.loads((tmp_path / "layout" / "data_report.json").read_text())
    assert report["train"]["dropped"] == {}
    if task == "sft":  # the trained template travels with the model
        saved = (tmp_path / "layout" / "model" / "chat_template.jinja").read_text()
        assert "generation" in saved and "tools" in saved
