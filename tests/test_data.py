"""Data formats, their loss masks, validation errors and the over-length policy."""

import json

import pytest

from fttrain.data.packing import PaddingCollator, best_fit_decreasing, pack
from fttrain.data.pipeline import prepare_data
from fttrain.data.rows import split_train_eval
from fttrain.data.sources import DataError, load_rows
from fttrain.data.templates import TemplateError
from fttrain.data.tokenize import IGNORE, Tokenizer
from fttrain.data.templates import resolve_chat_template
from fttrain.models.load import ensure_pad_token
from conftest import compose


def write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    return str(path)


def data_cfg(train, fmt="messages", **kw):
    overrides = [f"data.train={train}", f"data.format={fmt}", "data.eval=null", "data.eval_fraction=0"]
    overrides += [f"data.{k}={v}" for k, v in kw.items()]
    return compose(["+exp=tiny_sft", "data.max_samples=null"] + overrides).data


def trained_text(tokenizer, sample):
    return tokenizer.decode([t for t in sample["labels"] if t != IGNORE])


def prepared(tokenizer, cfg, assistant_only=True):
    return prepare_data(cfg, tokenizer, tokenizer.chat_template, assistant_only)


# ------------------------------------------------------------------ formats
def test_messages_train_exactly_the_assistant_turns_and_their_eot(tmp_path, tokenizer):
    rows = [{"messages": [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": "first answer"},
        {"role": "user", "content": "second question"},
        {"role": "assistant", "content": "second answer"},
    ]}]
    cfg = data_cfg(write_jsonl(tmp_path / "d.jsonl", rows), packing=False)
    row = prepared(tokenizer, cfg).train.rows[0]
    # Exactly the assistant contents, each followed by its end-of-turn token.
    assert trained_text(tokenizer, row) == "first answer<|eot_id|>second answer<|eot_id|>"
    masked = tokenizer.decode([t for t, l in zip(row["input_ids"], row["labels"]) if l == IGNORE])
    assert "be brief" in masked and "first question" in masked and "second question" in masked
    assert "answer" not in masked
    assert row["labels"][0] == IGNORE


def test_without_assistant_only_loss_everything_but_the_first_token_trains(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}]
    cfg = data_cfg(write_jsonl(tmp_path / "d.jsonl", rows), packing=False)
    row = prepared(tokenizer, cfg, assistant_only=False).train.rows[0]
    assert row["labels"][1:] == row["input_ids"][1:]


def test_alpaca_becomes_a_chat_with_input_appended(tmp_path, tokenizer):
    rows = [{"instruction": "Translate", "input": "hello", "output": "bonjour"},
            {"instruction": "Say hi", "output": "hi"}]
    cfg = data_cfg(write_jsonl(tmp_path / "a.jsonl", rows), fmt="alpaca", packing=False)
    data = prepared(tokenizer, cfg)
    assert [trained_text(tokenizer, r) for r in data.train.rows] == ["bonjour<|eot_id|>", "hi<|eot_id|>"]
    assert "Translate\n\nhello" in tokenizer.decode(data.train.rows[0]["input_ids"])


def test_sharegpt_with_role_mapping(tmp_path, tokenizer):
    rows = [{"conversations": [{"from": "human", "value": "ping"}, {"from": "gpt", "value": "pong"}]},
            {"conversations": [{"from": "asker", "value": "ping"}, {"from": "gpt", "value": "pong2"}]}]
    path = write_jsonl(tmp_path / "s.jsonl", rows)
    with pytest.raises(DataError, match=r"row 1: .*conversations\[0\]\.from.*'asker'"):
        prepared(tokenizer, data_cfg(path, fmt="sharegpt"))
    cfg = compose(["+exp=tiny_sft", f"data.train={path}", "data.format=sharegpt", "data.eval=null",
                   "data.eval_fraction=0", "data.packing=false", "+data.role_map.asker=user"]).data
    data = prepared(tokenizer, cfg)
    assert [trained_text(tokenizer, r) for r in data.train.rows] == ["pong<|eot_id|>", "pong2<|eot_id|>"]


def test_prompt_completion_trains_completion_and_eos(tmp_path, tokenizer):
    rows = [{"prompt": "2+2=", "completion": " 4"}]
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "p.jsonl", rows), fmt="prompt_completion", packing=False))
    row = data.train.rows[0]
    assert trained_text(tokenizer, row) == " 4<|eot_id|>"
    assert row["input_ids"][-1] == tokenizer.eos_token_id


def test_conversational_prompt_completion(tmp_path, tokenizer):
    rows = [{"prompt": [{"role": "user", "content": "hi"}], "completion": [{"role": "assistant", "content": "hello"}]}]
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "p.jsonl", rows), fmt="prompt_completion", packing=False))
    assert trained_text(tokenizer, data.train.rows[0]) == "hello<|eot_id|>"


def test_text_trains_every_token_and_ends_with_eos(tmp_path, tokenizer):
    rows = [{"text": "한국어 문장입니다. 안녕하세요!"}]
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "t.jsonl", rows), fmt="text", packing=False),
                    assistant_only=False)
    row = data.train.rows[0]
    assert row["input_ids"][-1] == tokenizer.eos_token_id
    assert all(l == t for l, t in zip(row["labels"][1:], row["input_ids"][1:]))
    assert tokenizer.decode(row["input_ids"], skip_special_tokens=True) == rows[0]["text"]


def test_korean_chat_round_trips(tmp_path, tokenizer):
    rows = [{"messages": [{"role": "user", "content": "오늘 날씨 어때?"}, {"role": "assistant", "content": "맑고 따뜻해요."}]}]
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "k.jsonl", rows), packing=False))
    assert trained_text(tokenizer, data.train.rows[0]) == "맑고 따뜻해요.<|eot_id|>"


@pytest.mark.parametrize("suffix", ["json", "csv", "parquet"])
def test_other_file_types(tmp_path, tokenizer, suffix):
    rows = [{"instruction": "say", "input": "", "output": f"word{i}"} for i in range(3)]
    path = tmp_path / f"d.{suffix}"
    if suffix == "json":
        path.write_text(json.dumps(rows))
    else:
        import pyarrow as pa

        table = pa.Table.from_pylist(rows)
        if suffix == "csv":
            import pyarrow.csv as pacsv

            pacsv.write_csv(table, path)
        else:
            import pyarrow.parquet as pq

            pq.write_table(table, path)
    data = prepared(tokenizer, data_cfg(str(path), fmt="alpaca", packing=False))
    assert sorted(trained_text(tokenizer, r) for r in data.train.rows) == [f"word{i}<|eot_id|>" for i in range(3)]


def test_datasets_folder_source(tmp_path, tokenizer):
    import datasets

    rows = [{"text": f"document {i}"} for i in range(4)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "ds"))
    assert load_rows(str(tmp_path / "ds")) == rows


# --------------------------------------------------------------- bad rows
@pytest.mark.parametrize(
    "bad_row, needle",
    [
        ({"instruction": "x"}, "row 2: field 'output' is missing"),
        ({"instruction": "x", "output": "   "}, "row 2: field 'output' is an empty response"),
        ({"output": "y"}, "row 2: field 'instruction' is missing"),
    ],
)
def test_bad_alpaca_rows_name_row_and_field(tmp_path, tokenizer, bad_row, needle):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": "c", "output": "d"}, bad_row]
    with pytest.raises(DataError) as err:
        prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "a.jsonl", rows), fmt="alpaca"))
    assert needle in str(err.value) and "a.jsonl" in str(err.value)


def test_bad_chat_rows(tmp_path, tokenizer):
    ok = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}
    cases = [
        ({"messages": [{"role": "user", "content": "q"}, {"role": "robot", "content": "a"}]}, "messages[1].role"),
        ({"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]}, "empty assistant"),
        ({"messages": [{"role": "user", "content": "q"}]}, "no assistant turn"),
        ({"msgs": []}, "field 'messages' is missing"),
        ({"messages": [{"role": "user"}]}, "messages[0] needs keys"),
    ]
    for bad, needle in cases:
        with pytest.raises(DataError) as err:
            prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "c.jsonl", [ok, bad]), packing=False))
        assert "row 1" in str(err.value) and needle in str(err.value), str(err.value)


def test_lenient_mode_drops_bad_rows_with_a_count_per_reason(tmp_path, tokenizer):
    rows = [
        {"instruction": "a", "output": "b"},
        {"instruction": "x"},
        {"instruction": "x", "output": " "},
        {"output": "y"},
        {"instruction": "c", "output": "d"},
    ]
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "a.jsonl", rows), fmt="alpaca", strict=False))
    rep = data.train.report
    assert rep["kept"] == 2 and rep["rows"] == 5
    assert rep["dropped"] == {"missing_field": 2, "empty_response": 1}


def test_invalid_json_line_is_named(tmp_path, tokenizer):
    path = tmp_path / "broken.jsonl"
    path.write_text('{"text": "ok"}\n{"text": oops}\n')
    with pytest.raises(DataError, match=r"broken.jsonl row 1 \(line 2\): not valid JSON"):
        load_rows(str(path))


# ---------------------------------------------------------- over-length
def long_rows():
    return [
        {"messages": [{"role": "user", "content": "short"}, {"role": "assistant", "content": "fine"}]},
        {"messages": [{"role": "user", "content": "q " * 30}, {"role": "assistant", "content": "a " * 80}]},
        # the prompt alone is longer than max_length: truncation leaves nothing to train
        {"messages": [{"role": "user", "content": "p " * 200}, {"role": "assistant", "content": "late"}]},
    ]


def test_overlength_truncate_counts(tmp_path, tokenizer):
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "l.jsonl", long_rows()), max_length=96))
    rep = data.train.report
    assert rep["kept"] == 2 and rep["truncated"] == 1
    assert rep["dropped"] == {"no_trained_tokens": 1}
    assert all(len(r["input_ids"]) <= 96 for r in data.train.rows)


def test_overlength_drop_counts(tmp_path, tokenizer):
    data = prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "l.jsonl", long_rows()), max_length=96, overlength="drop"))
    assert data.train.report["kept"] == 1 and data.train.report["dropped"] == {"overlength": 2}


def test_overlength_raise_names_row(tmp_path, tokenizer):
    with pytest.raises(DataError, match=r"row 1: \d+ tokens is longer than data.max_length=96"):
        prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "l.jsonl", long_rows()), max_length=96, overlength="raise"))


# --------------------------------------------------------- splits, pads
def test_held_out_split_is_seeded_and_disjoint():
    rows = list(range(100))
    a = split_train_eval(rows, 0.1, seed=3)
    b = split_train_eval(rows, 0.1, seed=3)
    c = split_train_eval(rows, 0.1, seed=4)
    assert a == b and a != c
    train, held = a
    assert len(held) == 10 and not set(train) & set(held) and len(train) + len(held) == 100


def test_eval_fraction_split_in_pipeline(tmp_path, tokenizer):
    rows = [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(40)]
    cfg = compose(["+exp=tiny_sft", "data.max_samples=null", f"data.train={write_jsonl(tmp_path / 'p.jsonl', rows)}",
                   "data.format=prompt_completion", "data.eval=null", "data.eval_fraction=0.25"]).data
    data = prepared(tokenizer, cfg)
    assert data.train.report["kept"] == 30 and data.eval.report["kept"] == 10
    train_ids = {i for r in data.train.rows for i in r["sample_ids"]}
    assert len(train_ids) == 30 and not train_ids & set(data.eval.examples)


def test_pad_token_is_not_eos_when_avoidable(tokenizer):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tok.pad_token = None
    assert ensure_pad_token(tok).startswith("reserved") and tok.pad_token_id != tok.eos_token_id


def test_eos_padding_keeps_eos_trained(tokenizer):
    rows = [{"input_ids": [5, 6, tokenizer.eos_token_id], "labels": [IGNORE, 6, tokenizer.eos_token_id], "sample_ids": [0]},
            {"input_ids": [5, tokenizer.eos_token_id], "labels": [IGNORE, tokenizer.eos_token_id], "sample_ids": [1]}]
    batch = PaddingCollator(pad_token_id=tokenizer.eos_token_id)(rows)
    # The row-1 EOS is trained; the pad (same id) after it is not.
    assert batch["labels"][1].tolist() == [IGNORE, tokenizer.eos_token_id, IGNORE]
    assert batch["attention_mask"][1].tolist() == [1, 1, 0]


def test_template_without_generation_markers_trains_the_answer_and_its_end_of_turn(tmp_path, tokenizer):
    # No {% generation %} markers: the trained tokens come from rendering turn by turn.
    closing = "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}{{ eos_token }}\n{% endfor %}" \
              "{% if add_generation_prompt %}assistant:\n{% endif %}"
    rows = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a b"}]}]
    cfg = data_cfg(write_jsonl(tmp_path / "c.jsonl", rows), packing=False)
    assert trained_text(tokenizer, prepare_data(cfg, tokenizer, closing, True).train.rows[0]) == "a b<|eot_id|>"
    # A template that never closes a turn would train a model that never stops: refused.
    plain = "{% for m in messages %}{{ m['role'] }}:\n{{ m['content'] }}\n{% endfor %}" \
            "{% if add_generation_prompt %}assistant:\n{% endif %}"
    with pytest.raises(TemplateError, match="end-of-turn"):
        prepare_data(cfg, tokenizer, plain, True)


def test_shipped_templates_mark_assistant_tokens(tokenizer):
    for name in ("llama3", "chatml"):
        template = resolve_chat_template(name, tokenizer)
        tok = Tokenizer(tokenizer, template, assistant_only_loss=True)
        from fttrain.data.formats import Chat

        ids, labels = tok(Chat([{"role": "user", "content": "q"}, {"role": "assistant", "content": "answer"}]))
        assert "answer" in tokenizer.decode([t for t in labels if t != IGNORE]), name


# ---------------------------------------------------------------- packing
def test_best_fit_decreasing_packs_every_sample_once_within_capacity():
    import random

    rng = random.Random(0)
    lengths = [rng.randint(5, 120) for _ in range(500)]
    bins = best_fit_decreasing(lengths, 128)
    flat = sorted(i for b in bins for i in b)
    assert flat == list(range(500))
    assert all(sum(lengths[i] for i in b) <= 128 for b in bins)
    efficiency = sum(lengths) / (len(bins) * 128)
    assert efficiency > 0.95, efficiency


def test_pack_restarts_positions_and_keeps_sample_ids():
    samples = [{"input_ids": [1] * n, "labels": [IGNORE] + [2] * (n - 1), "sample_id": i} for i, n in enumerate([3, 2, 3])]
    rows = pack(samples, capacity=8)
    assert len(rows) == 1
    assert rows[0]["position_ids"] == [0, 1, 2, 0, 1, 0, 1, 2]
    assert sorted(rows[0]["sample_ids"]) == [0, 1, 2]


def test_prepared_data_cache_is_reused_and_invalidated(tmp_path, tokenizer):
    from fttrain.data.pipeline import prepare_data_cached

    path = tmp_path / "c.jsonl"
    write_jsonl(path, [{"prompt": f"q{i}", "completion": f" a{i}"} for i in range(5)])
    cfg = data_cfg(str(path), fmt="prompt_completion")
    first = prepare_data_cached(cfg, tokenizer, None, True, tmp_path / "cache")
    entries = lambda: sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir() if (p / "COMPLETE").exists())
    assert len(entries()) == 1
    again = prepare_data_cached(cfg, tokenizer, None, True, tmp_path / "cache")
    assert again.train.rows == first.train.rows
    # A changed knob or a changed file gets its own entry.
    prepare_data_cached(data_cfg(str(path), fmt="prompt_completion", max_length=64), tokenizer, None, True,
                        tmp_path / "cache")
    import os, time

    write_jsonl(path, [{"prompt": "new", "completion": " row"}])
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    changed = prepare_data_cached(cfg, tokenizer, None, True, tmp_path / "cache")
    assert changed.train.report["kept"] == 1
    assert len(entries()) == 3


def test_wrong_types_and_template_rejections_name_the_row(tmp_path, tokenizer):
    rows = [{"instruction": "a", "output": "b"}, {"instruction": 5, "output": "b"}]
    with pytest.raises(DataError, match=r"row 1: field 'instruction' must be a str"):
        prepared(tokenizer, data_cfg(write_jsonl(tmp_path / "a.jsonl", rows), fmt="alpaca"))
    strict_template = ("{% for m in messages %}{% if loop.index0 % 2 == 0 and m['role'] != 'user' %}"
                       "{{ raise_exception('roles must alternate user/assistant') }}{% endif %}"
                       "{% if m['role'] == 'assistant' %}{% generation %}{{ m['content'] + eos_token }}{% endgeneration %}"
                       "{% else %}{{ m['content'] }}{% endif %}{% endfor %}")
    chats = [{"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},
             {"messages": [{"role": "assistant", "content": "a"}, {"role": "user", "content": "q"},
                           {"role": "assistant", "content": "b"}]}]
    cfg = data_cfg(write_jsonl(tmp_path / "c.jsonl", chats))
    with pytest.raises(DataError, match="row 1: the chat template rejected it: roles must alternate"):
        prepare_data(cfg, tokenizer, strict_template, True)
    lenient = data_cfg(write_jsonl(tmp_path / "c.jsonl", chats), strict=False)
    assert prepare_data(lenient, tokenizer, strict_template, True).train.report["dropped"] == {"template_error": 1}


def test_generation_marker_spellings():
    from fttrain.data.templates import has_generation_markers

    for tag in ("{% generation %}", "{%- generation %}", "{% generation -%}", "{%- generation -%}"):
        assert has_generation_markers(f"x{tag}y{{% endgeneration %}}")
    assert not has_generation_markers("{% for m in messages %}{{ m.content }}{% endfor %}")
