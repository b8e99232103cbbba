"""Token offsets read from the tokens' bytes (fttrain.data.byte_offsets) are the tokenizer's own,
or are not used: compared text by text with the offsets the tokenizer tracks itself."""

import copy
import random

import pytest

from fttrain.data.byte_offsets import ByteTokens, CharOffsets, offsets_from_bytes

PIECES = ["abc", " xyz", "\n\n", "\t", "  ", ".", "!?", "é", "€", "😀", "中文字", "日本", "ß", "\u200b", "123456",
          "\r\n", "ﬁ", "e\u0301", "Å", "<|eot_id|>", "<|start_header_id|>", " <|eot_id|> ", "ÿ", "\x00"]


def texts(seed=0, n=400):
    rng = random.Random(seed)
    return [""] + ["".join(rng.choice(PIECES) for _ in range(rng.randint(1, 40))) for _ in range(n)]


def byte_level_bpe(normalizer=None, prefix_space=False, trim_offsets=False, lstrip_token=False):
    """A small byte-level BPE (Llama-3 / Qwen style) with two special tokens."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tk = Tokenizer(models.BPE())
    if normalizer is not None:
        tk.normalizer = normalizer
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=prefix_space)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=trim_offsets)
    trainer = trainers.BpeTrainer(vocab_size=400, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tk.train_from_iterator(texts(seed=1, n=200) * 3, trainer=trainer)
    tk.add_special_tokens([AddedToken("<|eot_id|>", special=True, lstrip=lstrip_token),
                           AddedToken("<|start_header_id|>", special=True)])
    return tk


def tokenizer_offsets(backend, batch):
    return [(enc.ids, enc.offsets) for enc in backend.encode_batch(batch, add_special_tokens=False)]


def check_same(backend, table, batch):
    """offsets_from_bytes equals the tokenizer's ids and offsets; returns how many were read from bytes."""
    got = offsets_from_bytes(table, backend, batch)
    assert [(ids, list(off)) for ids, off in got] == tokenizer_offsets(backend, batch)
    return sum(isinstance(off, CharOffsets) for _, off in got)


def test_offsets_read_from_bytes_are_the_tokenizers_for_multibyte_text(tokenizer):
    from tokenizers import normalizers

    batch = texts()
    for backend in (tokenizer._tokenizer, byte_level_bpe(), byte_level_bpe(normalizers.NFC())):
        table = ByteTokens.of(backend)
        assert table is not None
        read = check_same(backend, table, batch)
        # NFC rewrites "e\u0301" (as é), so those texts are the tokenizer's; the rest come from bytes.
        changed = sum(t != backend.normalizer.normalize_str(t) for t in batch) if backend.normalizer else 0
        assert read == len(batch) - changed
        assert table.checked == len(batch) and table.failed == changed


def test_offsets_read_from_bytes_for_a_real_128k_vocabulary(real_tokenizer):
    tok = copy.deepcopy(real_tokenizer)
    tok.add_special_tokens({"additional_special_tokens": ["<|eot_id|>", "<|start_header_id|>"]})
    backend = tok._tokenizer
    table = ByteTokens.of(backend)
    # Its three special tokens are also vocabulary entries, not written in the byte-level alphabet.
    assert table is not None and len(table.length) == backend.get_vocab_size(with_added_tokens=True)
    batch = texts(seed=2)
    assert check_same(backend, table, batch) == len(batch)
    one = offsets_from_bytes(table, backend, ["h€llo 😀 wörld"])[0][1]
    assert list(one.starts) == [a for a, _ in one] and one[1:3] == list(one)[1:3]


def test_texts_whose_bytes_differ_fall_back_and_a_mostly_failing_tokenizer_stops_reading_bytes():
    from tokenizers import normalizers

    nfkc = byte_level_bpe(normalizers.NFKC())
    table = ByteTokens.of(nfkc)
    # NFKC writes "½" as "1⁄2" (3 bytes more) and "ﬁ" as "fi" (1 byte less): as many bytes, not the same.
    same = [t for t in texts(seed=3, n=100) if t == nfkc.normalizer.normalize_str(t)]
    batch = same + ["½ﬁﬁﬁ", "a½ ﬁ<|eot_id|>ﬁﬁ"]
    assert all(len(t.encode()) == len(nfkc.normalizer.normalize_str(t).encode()) for t in batch[-2:])
    assert check_same(nfkc, table, batch) == len(same) > 20
    assert table.failed == 2 and table.worth_reading
    # Data the normalizer mostly changes: after a quarter of the texts failed, bytes are no longer read.
    table = ByteTokens.of(nfkc)
    composed = ["ﬁ" + t for t in texts(seed=5, n=80)]
    assert check_same(nfkc, table, composed) == 0
    assert not table.worth_reading and table.checked == len(composed)
    assert check_same(nfkc, table, batch) == 0 and table.checked == len(composed)  # not tried again


def test_tokenizers_whose_offsets_are_not_their_bytes_are_not_read_that_way():
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers

    # GPT-2 style: offsets trimmed of the leading space a token holds.
    assert ByteTokens.of(byte_level_bpe(trim_offsets=True)) is None
    # Each of these can leave the bytes equal and move the offsets: a stripped space given back as
    # a prefix space, or a multi-character rewrite that writes the same text.
    assert ByteTokens.of(byte_level_bpe(prefix_space=True)) is None
    assert ByteTokens.of(byte_level_bpe(lstrip_token=True)) is None
    assert ByteTokens.of(byte_level_bpe(normalizers.Strip())) is None
    assert ByteTokens.of(byte_level_bpe(normalizers.Replace("ab", "ab"))) is None
    assert ByteTokens.of(byte_level_bpe(normalizers.Sequence([normalizers.NFC(), normalizers.Prepend(" ")]))) is None
    assert ByteTokens.of(byte_level_bpe(normalizers.Sequence([normalizers.NFC(), normalizers.Lowercase()]))) \
        is not None
    # A custom (Python) decoder has no serialisation to read.
    custom = byte_level_bpe()

    class Joined:
        def decode_chain(self, tokens):
            return tokens

    custom.decoder = decoders.Decoder.custom(Joined())
    assert ByteTokens.of(custom) is None
    # SentencePiece style: "▁" pieces and byte-fallback tokens are not the text's bytes.
    sp = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    sp.pre_tokenizer = pre_tokenizers.Metaspace()
    sp.decoder = decoders.Metaspace()
    sp.train_from_iterator(texts(n=50), trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>"],
                                                            show_progress=False))
    assert ByteTokens.of(sp) is None
    assert ByteTokens.of(None) is None


@pytest.mark.parametrize("family", ["llama3", "chatml"])
def test_chat_labels_are_the_same_with_offsets_from_bytes_or_from_the_tokenizer(real_tokenizer, family):
    """The trained-token mask of chats with multi-byte text, end-of-turn tokens in the content and
    whitespace at turn ends, computed both ways."""
    from pathlib import Path

    from fttrain.data.formats import Chat
    from fttrain.data.tokenize import Tokenizer

    tok = copy.deepcopy(real_tokenizer)
    specials = {"llama3": ["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"],
                "chatml": ["<|im_start|>", "<|im_end|>"]}[family]
    tok.add_special_tokens({"additional_special_tokens": specials})
    tok.eos_token = specials[-1]
    template = (Path(__file__).parent.parent / "fttrain" / "data" / "templates" / f"{family}.jinja").read_text()
    rng = random.Random(4)
    chats = []
    for _ in range(60):
        msgs = [{"role": "system", "content": "".join(rng.choice(PIECES) for _ in range(5))}] if rng.random() < .5 \
            else []
        for _ in range(rng.randint(1, 3)):
            for role in ("user", "assistant"):
                msgs.append({"role": role, "content": "".join(rng.choice(PIECES[:-5]) for _ in range(20)) + "x "})
        chats.append(Chat(msgs))
    fast = Tokenizer(tok, template, assistant_only_loss=True)
    assert fast.chats.byte_tokens is not None
    plain = Tokenizer(tok, template, assistant_only_loss=True)
    plain.chats.byte_tokens = None  # the tokenizer's own offsets
    got, want = fast.encode_many(chats), plain.encode_many(chats)
    assert [o.samples for o in got] == [o.samples for o in want]
    assert fast.chats.byte_tokens.checked > 0 and fast.chats.byte_tokens.failed == 0
    trained = sum(lab != -100 for o in got for _, labels in o.samples for lab in labels)
    assert trained > 60 * 20
