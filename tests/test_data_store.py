"""The prepared-data store: workers, memory-mapped rows, lazy sources, the cache folder.

What it must keep: the rows, masks and packed layout that encoding the samples
one by one in this process and packing them in memory gives (``packing.pack``,
``as_rows``, ``concat_blocks``), exact counts, errors that name the row, and a
cache entry that is whole or absent.
"""

import json
import os
import re

import pytest

import fttrain.data.pipeline as pipeline
from fttrain.data.formats import Formatter
from fttrain.data.packing import as_rows, concat_blocks, pack
from fttrain.data.sources import DataError, JsonlSource, open_rows
from fttrain.data.streaming import PASS_STRIDE, open_stream
from fttrain.data.tokenize import Tokenizer, apply_overlength
from conftest import compose, step_losses


def write_jsonl(path, rows, blank_every=0):
    lines = []
    for i, r in enumerate(rows):
        lines.append(json.dumps(r, ensure_ascii=False))
        if blank_every and i % blank_every == 0:
            lines.append("   ")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return str(path)


def chats(n):
    out = []
    for i in range(n):
        msgs = [{"role": "system", "content": "be brief"}] if i % 3 == 0 else []
        for t in range(1 + i % 3):
            msgs += [{"role": "user", "content": f"question {i} {t} " + "word " * (i % 17)},
                     {"role": "assistant", "content": f"answer {i} {t} " + "reply " * (i % 11)}]
        out.append({"messages": msgs})
    return out


def cfg_for(path, fmt="messages", exp="tiny_sft", **kw):
    overrides = [f"+exp={exp}", f"data.train={path}", f"data.format={fmt}", "data.eval=null", "data.max_samples=null"]
    overrides += [f"data.{k}={v}" for k, v in kw.items()]
    return compose(overrides).data


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 7 rows, so that a few dozen rows go through forked workers."""
    monkeypatch.setattr(pipeline, "MIN_CHUNK_ROWS", 7)
    monkeypatch.setattr(pipeline, "CHUNK_ROWS", 7)


def reference_rows(cfg, tokenizer, blocks=False):
    """Today's computation by hand: every row encoded here, one by one, then packed in memory."""
    formatter = Formatter(str(cfg.format.value), dict(cfg.columns), dict(cfg.role_map), cfg.system_prompt)
    tok = Tokenizer(tokenizer, tokenizer.chat_template, True)
    samples = []
    for i, row in enumerate(open_rows(cfg.train)):
        for ids, labels in tok.encode(formatter(row)).samples:
            sample, _ = apply_overlength(ids, labels, cfg.max_length if not blocks else len(ids), str(cfg.overlength))
            if sample is not None:
                samples.append(dict(sample, sample_id=i))
    if blocks:
        return concat_blocks(samples, cfg.max_length)
    return pack(samples, cfg.max_length) if cfg.packing is not False else as_rows(samples)


@pytest.mark.parametrize("packing", [None, False])
def test_workers_give_the_rows_of_one_process_and_of_packing_in_memory(tmp_path, tokenizer, small_chunks, packing):
    path = write_jsonl(tmp_path / "c.jsonl", chats(60), blank_every=9)
    kw = {"eval_fraction": 0, "max_length": 256} | ({"packing": "false"} if packing is False else {})
    cfg = cfg_for(path, **kw)
    cfg.num_proc = 1
    one = pipeline.prepare_data(cfg, tokenizer, tokenizer.chat_template, True)
    cfg.num_proc = 2
    two = pipeline.prepare_data(cfg, tokenizer, tokenizer.chat_template, True)
    assert one.train.rows.meta["chunks"] == 9  # 60 rows in chunks of 7
    expected = reference_rows(cfg, tokenizer)
    assert list(one.train.rows) == expected
    assert list(two.train.rows) == expected
    assert one.report == two.report
    assert one.train.report["trained_turns"] == sum(1 + i % 3 for i in range(60))
    if packing is None:
        assert all(len(r["input_ids"]) <= 256 and "position_ids" in r for r in two.train.rows)


def test_block_layout_equals_concatenated_documents(tmp_path, tokenizer, small_chunks):
    docs = [{"text": " ".join(f"w{i}" for _ in range(3 + (i * 7) % 40))} for i in range(30)]
    path = write_jsonl(tmp_path / "d.jsonl", docs)
    cfg = cfg_for(path, fmt="text", exp="tiny_pretrain", eval_fraction=0, max_length=32, num_proc=2)
    data = pipeline.prepare_data(cfg, tokenizer, None, False, blocks=True)
    formatter = Formatter("text", dict(cfg.columns), {}, None)
    tok = Tokenizer(tokenizer, None, False)
    samples = [dict(input_ids=ids, labels=labels, sample_id=i) for i, row in enumerate(docs)
               for ids, labels in tok.encode(formatter(row)).samples]
    assert list(data.train.rows) == concat_blocks(samples, 32)
    assert data.train.rows[-1] == concat_blocks(samples, 32)[-1]
    assert list(data.train.rows.lengths()) == [len(r["input_ids"]) for r in data.train.rows]


def test_a_bad_row_in_a_worker_names_its_file_and_row(tmp_path, tokenizer, small_chunks):
    rows = chats(40)
    rows[33] = {"messages": [{"role": "user", "content": 5}, {"role": "assistant", "content": "x"}]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    with pytest.raises(DataError, match=r"bad.jsonl row 33: .*content"):
        pipeline.prepare_data(cfg_for(path, eval_fraction=0, num_proc=2), tokenizer, tokenizer.chat_template, True)
    # Lenient: dropped with a count, the same whether one process or two did the work.
    reports = []
    for n in (1, 2):
        rows[5] = {"messages": [{"role": "user", "content": "q"}]}
        write_jsonl(tmp_path / "bad.jsonl", rows)
        data = pipeline.prepare_data(cfg_for(path, eval_fraction=0, num_proc=n, strict="false"), tokenizer,
                                     tokenizer.chat_template, True)
        reports.append(data.train.report)
    assert reports[0] == reports[1]
    assert reports[0]["kept"] == 38 and sum(reports[0]["dropped"].values()) == 2


def test_invalid_json_found_by_a_worker_names_the_line(tmp_path, tokenizer, small_chunks):
    path = tmp_path / "broken.jsonl"
    lines = [json.dumps(r) for r in chats(30)]
    lines.insert(20, "")  # blank lines count as lines, not as rows
    lines[25] = '{"messages": oops}'
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(DataError, match=r"broken.jsonl row 24 \(line 26\): not valid JSON"):
        pipeline.prepare_data(cfg_for(str(path), eval_fraction=0, num_proc=2), tokenizer, tokenizer.chat_template,
                              True)


def test_held_out_split_and_examples_survive_the_store(tmp_path, tokenizer, small_chunks):
    path = write_jsonl(tmp_path / "c.jsonl", chats(50))
    data = pipeline.prepare_data(cfg_for(path, eval_fraction=0.2, num_proc=2), tokenizer, tokenizer.chat_template,
                                 True)
    train_ids = {i for r in data.train.rows for i in r["sample_ids"]}
    eval_ids = {i for r in data.eval.rows for i in r["sample_ids"]}
    assert not train_ids & eval_ids and len(train_ids | eval_ids) == 50
    assert sorted(data.eval.examples) == sorted(eval_ids)
    assert data.eval.examples[min(eval_ids)].messages == chats(50)[min(eval_ids)]["messages"]


def test_jsonl_source_reads_rows_lazily_by_offset(tmp_path):
    rows = [{"text": f"row {i} ünïcode"} for i in range(100)]
    path = write_jsonl(tmp_path / "r.jsonl", rows, blank_every=10)
    src = open_rows(path)
    assert isinstance(src, JsonlSource) and len(src) == 100
    assert src[57] == rows[57] and src[-1] == rows[-1]
    assert src.read([3, 4, 5]) == rows[3:6] and src.read([9, 2]) == [rows[9], rows[2]]
    assert list(src) == rows
    # A file without a final newline still has its last row.
    (tmp_path / "n.jsonl").write_text('{"a": 1}\n\n{"a": 2}')
    assert list(open_rows(str(tmp_path / "n.jsonl"))) == [{"a": 1}, {"a": 2}]
    # A forked child reads with its own descriptor (pread: no shared position).
    pid = os.fork()
    if pid == 0:
        os._exit(0 if src[42] == rows[42] and src[0] == rows[0] else 1)
    assert os.waitpid(pid, 0)[1] == 0
    assert src[43] == rows[43]


def test_parquet_source_reads_row_groups(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = [{"text": f"doc {i}", "n": i} for i in range(25)]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "p.parquet", row_group_size=4)
    src = open_rows(str(tmp_path / "p.parquet"))
    assert len(src) == 25 and src[13] == rows[13] and list(src) == rows


def test_an_unfinished_cache_folder_is_never_used(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chats(12))
    cfg = cfg_for(path, eval_fraction=0)
    key = pipeline.cache_key(cfg, tokenizer, tokenizer.chat_template, True)
    half = tmp_path / "cache" / "prepared" / key
    (half / "train").mkdir(parents=True)
    (half / "train" / "meta.json").write_text("{}")  # a preparation killed before COMPLETE
    data = pipeline.prepare_data_cached(cfg, tokenizer, tokenizer.chat_template, True, tmp_path / "cache")
    assert (half / pipeline.COMPLETE).exists() and data.train.report["kept"] == 12
    assert not [p for p in (tmp_path / "cache" / "prepared").iterdir() if ".tmp" in p.name]
    # A failed preparation leaves nothing behind.
    (tmp_path / "c.jsonl").write_text('{"messages": 3}\n')
    with pytest.raises(DataError):
        pipeline.prepare_data_cached(cfg, tokenizer, tokenizer.chat_template, True, tmp_path / "cache")
    assert sorted(p.name for p in (tmp_path / "cache" / "prepared").iterdir()) == [key]


def test_unshared_preparation_is_one_per_launch(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chats(12))
    cfg = cfg_for(path, eval_fraction=0, cache="false")
    a = pipeline.prepare_data_cached(cfg, tokenizer, tokenizer.chat_template, True, tmp_path / "cache", fresh_tag="a")
    b = pipeline.prepare_data_cached(cfg, tokenizer, tokenizer.chat_template, True, tmp_path / "cache", fresh_tag="b")
    assert a.folder != b.folder and list(a.train.rows) == list(b.train.rows)
    again = pipeline.prepare_data_cached(cfg, tokenizer, tokenizer.chat_template, True, tmp_path / "cache",
                                         fresh_tag="a")
    assert again.folder == a.folder  # the launch's other ranks map what its local main wrote


def test_num_proc_is_not_part_of_the_cache_key(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chats(4))
    keys = {pipeline.cache_key(cfg_for(path, num_proc=n), tokenizer, None, True) for n in (1, 4)}
    assert len(keys) == 1


# ------------------------------------------------------- two ranks, one preparation
SLOW_PREPARATION = '''
import os, sys, time, runpy
import fttrain.data.pipeline as pipeline

written = pipeline.write_prepared


def slow(*args, **kwargs):  # a preparation that outlasts the collective timeout
    time.sleep(float(os.environ["PREPARE_DELAY_S"]))
    return written(*args, **kwargs)


pipeline.write_prepared = slow
sys.argv = ["fttrain"] + sys.argv[1:]
runpy.run_module("fttrain", run_name="__main__")
'''


@pytest.mark.slow
def test_a_preparation_longer_than_the_process_group_timeout_does_not_kill_the_run(tmp_path):
    """Local rank 0 prepares for 15 s; the collective timeout is 6 s. Rank 1 waits
    (polling the rendezvous store), then maps the same files."""
    import subprocess
    import sys

    from conftest import REPO

    script = tmp_path / "slow_prepare.py"
    script.write_text(SLOW_PREPARATION)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", "29533", str(script), "+exp=tiny_sft", "trainer.max_steps=2",
           "task.generation_eval.num_samples=0", "dist.timeout_minutes=0.1", "data.cache=false",
           "hydra.run.dir=run"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PREPARE_DELAY_S": "15"}
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stderr[-5000:]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["world_size"] == 2
    logs = [(tmp_path / "run" / f"train_rank{r}.log").read_text() for r in range(2)]
    folders = [line.split(" from ")[1].split(" in ")[0] for log in logs for line in log.splitlines()
               if "training rows" in line and "ready from" in line]
    assert len(folders) == 2 and folders[0] == folders[1]  # one preparation, mapped by both ranks
    assert not os.path.exists(folders[0])  # data.cache=false: removed when the run ends


# ------------------------------------------------------------------ streaming
def test_a_stream_with_one_window_gives_the_prepared_rows(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chats(40))
    cfg = cfg_for(path, eval_fraction=0, max_length=256, stream_window=1000)
    prepared = pipeline.prepare_data(cfg, tokenizer, tokenizer.chat_template, True)
    stream = open_stream(cfg, tokenizer, tokenizer.chat_template, True)
    streamed = list(stream)
    # Each row carries its place in the stream (pass 0: its index), for an exact resume.
    assert [r.pop("stream_pos") for r in streamed] == list(range(len(streamed)))
    assert streamed == list(prepared.train.rows)
    assert stream.report()["trained_turns"] == prepared.train.report["trained_turns"]
    assert stream.epoch_rows == len(prepared.train.rows)
    assert [r["stream_pos"] for r in stream][:2] == [PASS_STRIDE, PASS_STRIDE + 1]  # the next pass


def test_a_stream_packs_window_by_window_and_resumes_mid_window(tmp_path, tokenizer):
    path = write_jsonl(tmp_path / "c.jsonl", chats(45))
    cfg = cfg_for(path, eval_fraction=0.2, max_length=256, stream_window=8)
    stream = open_stream(cfg, tokenizer, tokenizer.chat_template, True)
    rows = list(stream)
    held_out = set(pipeline.load_splits(cfg)[1].ids)
    assert sorted(i for r in rows for i in r["sample_ids"]) == [i for i in range(45) if i not in held_out]
    assert stream.num_windows == 5 and len(stream.rows_per_window) == 5 and stream.epoch_rows == len(rows)
    assert all(len(r["input_ids"]) <= 256 for r in rows)
    state = stream.state()
    for consumed in (0, 1, stream.rows_per_window[0], len(rows) - 1, len(rows) + 2):
        again = open_stream(cfg, tokenizer, tokenizer.chat_template, True)
        window, offset = again.resume(state, consumed)
        assert list(again)[:3] == rows[consumed % len(rows):][:3], consumed  # a pass ends at the end of the file
        assert window < again.num_windows and offset >= 0
    # A different window size cannot continue this stream's position.
    other = open_stream(cfg_for(path, eval_fraction=0.2, max_length=256, stream_window=9), tokenizer,
                                 tokenizer.chat_template, True)
    with pytest.raises(DataError, match="data.stream_window"):
        other.resume(state, 3)


def test_streaming_config_problems():
    from conftest import config_error

    assert "trainer.max_steps > 0" in config_error(["+exp=tiny_sft", "data.streaming=true", "trainer.max_steps=-1",
                                                    "trainer.num_epochs=1"])
    assert "dataloader_num_workers=0" in config_error(["+exp=tiny_sft", "data.streaming=true",
                                                       "trainer.dataloader_num_workers=2"])
    assert "streaming serves" in config_error(["+exp=tiny_dpo", "data.streaming=true"])


@pytest.mark.slow
def test_a_resumed_stream_continues_the_uninterrupted_run(tmp_path):
    """Stopped at step 4 (its checkpoint) and resumed: steps 5-8 see the same rows and
    give the same losses as the run that went on; the stream restarts mid-file."""
    from conftest import run_cli

    path = write_jsonl(tmp_path / "c.jsonl", chats(60))
    common = ["+exp=tiny_sft", f"data.train={path}", "data.eval=null", "data.eval_fraction=0", "data.max_samples=null",
              "data.max_length=128", "data.streaming=true", "data.stream_window=6", "trainer.max_steps=8",
              "trainer.save_steps=4", "trainer.logging_steps=1", "task.generation_eval.num_samples=0"]
    full = run_cli(common + ["hydra.run.dir=full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-4"
    assert json.loads((checkpoint / "stream_state.json").read_text())["rows_per_window"]
    resumed = run_cli(common + ["hydra.run.dir=resumed", f"resume_from={checkpoint}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = (tmp_path / "resumed" / "train_rank0.log").read_text()
    window = int(log.split("stream resumes after")[1].split("window ")[1].split(",")[0])
    assert window > 0  # 4 steps x 2 rows went past the first window of 6 rows

    def losses(run):
        return dict(step_losses(tmp_path / run))

    a, b = losses("full"), losses("resumed")
    assert sorted(b) == [5, 6, 7, 8]
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-6)


@pytest.mark.slow
def test_a_stream_resumed_in_its_second_pass_continues_the_uninterrupted_run(tmp_path):
    """13 rows a pass, 2 a step: the pass ends with a 1-row step (step 7), so steps x rows
    a step (18 after step 9) is one row past where the stream really is (13 + 4). The
    resumed run must start at row 4 of the second pass and repeat steps 10-12 exactly."""
    from conftest import run_cli

    path = write_jsonl(tmp_path / "c.jsonl", chats(13))
    common = ["+exp=tiny_sft", f"data.train={path}", "data.eval=null", "data.eval_fraction=0", "data.max_samples=null",
              "data.max_length=128", "data.packing=false", "data.streaming=true", "data.stream_window=5",
              "trainer.max_steps=12", "trainer.save_steps=3", "trainer.logging_steps=1",
              "task.generation_eval.num_samples=0"]
    full = run_cli(common + ["hydra.run.dir=full"], cwd=tmp_path)
    assert full.returncode == 0, full.stderr[-3000:]
    checkpoint = tmp_path / "full" / "checkpoints" / "checkpoint-9"
    state = json.loads((checkpoint / "stream_state.json").read_text())
    assert state["epoch_rows"] == 13 and state["consumed"] == PASS_STRIDE + 3  # row 3 of pass 1 was the last
    resumed = run_cli(common + ["hydra.run.dir=resumed", f"resume_from={checkpoint}"], cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "pass 1, window 0, row 4 in it" in (tmp_path / "resumed" / "train_rank0.log").read_text()
    a, b = dict(step_losses(tmp_path / "full")), dict(step_losses(tmp_path / "resumed"))
    assert sorted(b) == [10, 11, 12]
    assert [b[s] for s in b] == pytest.approx([a[s] for s in b], rel=1e-6)


@pytest.mark.slow
def test_a_bad_row_found_by_local_rank_0_stops_the_waiting_rank_with_its_message(tmp_path):
    import subprocess
    import sys

    from conftest import REPO

    rows = chats(20)
    rows[7] = {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": None}]}
    path = write_jsonl(tmp_path / "bad.jsonl", rows)
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(REPO / "launch" / "cpu_2proc.yaml"),
           "--main_process_port", "29534", "-m", "fttrain", "+exp=tiny_sft", f"data.train={path}", "data.eval=null",
           "data.eval_fraction=0", "hydra.run.dir=run"]
    proc = subprocess.run(cmd, cwd=tmp_path, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"})
    assert proc.returncode == 1  # rank 0 exits 2; the launcher reports its failed child as 1
    assert "bad.jsonl row 7" in proc.stderr  # rank 0's own message
    assert "rank 0 failed during data preparation: " in proc.stderr  # rank 1 stopped with it, not by a timeout
    # The launcher prints its own traceback for a child that failed; none comes from fttrain's code.
    assert not re.search(r'File "[^"]*fttrain/', proc.stderr), proc.stderr[-3000:]


def test_a_worker_killed_midway_stops_the_preparation_instead_of_hanging(tmp_path, tokenizer, small_chunks,
                                                                         monkeypatch):
    import signal

    encode = pipeline._encode_chunk

    def killed_on_chunk_2(task):  # the kernel's out-of-memory killer, in effect
        if task[0] == 2:
            os.kill(os.getpid(), signal.SIGKILL)
        return encode(task)

    killed_on_chunk_2.__module__, killed_on_chunk_2.__qualname__ = pipeline.__name__, "_encode_chunk"
    monkeypatch.setattr(pipeline, "_encode_chunk", killed_on_chunk_2)
    path = write_jsonl(tmp_path / "c.jsonl", chats(40))
    with pytest.raises(RuntimeError, match="a data worker died .* lower data.num_proc"):
        pipeline.prepare_data(cfg_for(path, eval_fraction=0, num_proc=2), tokenizer, tokenizer.chat_template, True)


def test_tokenizer_json_truncation_does_not_cut_chats(tmp_path, tokenizer):
    import copy

    tok = copy.deepcopy(tokenizer)
    tok._tokenizer.enable_truncation(max_length=8)  # as some tokenizer.json files ship
    path = write_jsonl(tmp_path / "c.jsonl", chats(6))
    cfg = cfg_for(path, eval_fraction=0, max_length=512)
    assert list(pipeline.prepare_data(cfg, tok, tok.chat_template, True).train.rows) == \
        list(pipeline.prepare_data(cfg, tokenizer, tokenizer.chat_template, True).train.rows)


def test_trained_tokens_follow_the_overlap_rule_for_any_offsets(tokenizer):
    """The bisection shortcut gives what the rule gives token by token: a token trains when it
    has width and overlaps a span; nested, zero-width and unordered offsets included."""
    import random

    import fttrain.data.chat as chat
    from fttrain.data.templates import TemplateInfo

    encoder = chat.ChatEncoder(tokenizer, TemplateInfo.probe(tokenizer, tokenizer.chat_template))
    rng = random.Random(0)
    for _ in range(3000):
        n, offsets, pos = rng.randint(1, 12), [], 0
        for _ in range(n):
            a = max(0, pos + rng.randint(-2, 2))
            b = a + rng.choice([0, 1, 1, 2, 3])
            offsets.append((a, b))
            pos = b
        ids = list(range(100, 100 + n))
        spans, at = [], 0
        for _ in range(rng.randint(1, 3)):
            s = at + rng.randint(0, 4)
            e = s + rng.randint(1, 5)
            spans.append((s, e))
            at = e
        _, labels = encoder._labelled(chat.Labelling("x", spans), lambda text: (ids, offsets))
        expected = [t if b > a and any(a < e and b > s for s, e in spans) else chat.IGNORE
                    for t, (a, b) in zip(ids, offsets)]
        assert labels == expected, (offsets, spans)


def test_a_unicode_whitespace_line_is_blank(tmp_path):
    path = tmp_path / "u.jsonl"
    path.write_text('{"a": 1}\n\u00a0\u2003\n{"a": 2}\r\n', encoding="utf-8")
    assert list(open_rows(str(path))) == [{"a": 1}, {"a": 2}]


def test_a_csv_file_stays_columnar_until_rows_are_read(tmp_path):
    import pyarrow as pa
    import pyarrow.csv as pacsv

    from fttrain.data.sources import ArrowTableSource

    rows = [{"instruction": f"say {i}", "output": f"word{i}", "n": i} for i in range(500)]
    pacsv.write_csv(pa.Table.from_pylist(rows), tmp_path / "d.csv")
    source = open_rows(str(tmp_path / "d.csv"))
    assert isinstance(source, ArrowTableSource) and len(source) == 500
    assert source.read(range(10, 13)) == rows[10:13]  # a contiguous run: one slice
    assert source.read([7, 3, 499]) == [rows[7], rows[3], rows[499]]
    assert source[-1] == rows[-1] and list(source) == rows


def test_a_resume_after_the_last_row_of_a_pass_starts_the_next_pass(tmp_path, tokenizer):
    """Also when the first window produced no rows (all dropped): the next pass, its first row."""
    path = write_jsonl(tmp_path / "c.jsonl", chats(15))
    stream = open_stream(cfg_for(path, eval_fraction=0, max_length=256, stream_window=5), tokenizer,
                         tokenizer.chat_template, True)
    state = {"window": 5, "rows": 15, "rows_per_window": [0, 5, 3], "epoch_rows": 8}
    assert stream.resume_after({**state, "consumed": 7}) == (1, 1, 0)  # row 7 was the last of pass 0
    assert stream.resume_after({**state, "consumed": PASS_STRIDE + 5}) == (1, 2, 1)  # pass 1, row 6: window 2
    assert stream.resume_after({**state, "consumed": 2 * PASS_STRIDE + 7}) == (3, 1, 0)
