"""Small generated data sets, seeded and written to disk, for the demo and tests.

``builtin:<name>`` in ``data.train`` resolves to ``<cache>/data/<name>/train.jsonl``
and ``builtin:<name>/eval`` to its ``eval.jsonl``; the files are then read by
the same loader as any user file, so the demo exercises the real data path.

Each set is a ``Builtin``: a seeded ``draw`` of one item (a letter sequence,
a template and its fillers, ...) and a ``row`` built from that item. The eval
items are drawn first and excluded from train, so no train row equals an eval
row and a score on eval measures generalisation, not recall.

The demo task is *reversing a short sequence of letters*:

    reverse_text       pretraining documents: "Reverse: k q m t\\nt m q k"
    reverse_chat       chat SFT: user "Reverse: k q m t"  assistant "t m q k"
    preference_pairs   DPO-style: {prompt, chosen (the reversal), rejected (a near miss)}
    preference_chat    messages; chosen the reversal, rejected the same in CAPITALS (a style
                       preference a model learns from scratch: the tests use it)
    arithmetic         RL with a checkable answer: {prompt: "What is 3 + 4? ...", answer: "7"}

A model that has not learnt the task scores about zero. Encoder tasks:

    sentiment          {text, label: positive|negative}, negation flips the polarity
    sentiment_pairs    {text, text_pair, label: same|different}
    topics_multilabel  {text, labels: [1 to 3 of food, music, sports, weather]}
    entities           {tokens, tags} IOB2 with PER, LOC, ORG (multi-word names too)
    qa_facts           SQuAD rows about 1 to 4 people; long contexts need several windows
    qa_facts_v2        the same with about 10% unanswerable questions (empty answers)

A set's cache folder is named by its sizes and seed only: change the seed
when changing a builder, or an old cache keeps serving the old rows.
"""

from __future__ import annotations

import json
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Hashable, Iterator, List, Tuple

from fttrain.paths import cache_dir

ALPHABET = list("abcdefghijklmnop")
MIN_LEN, MAX_LEN = 3, 6
SYSTEM_PROMPT = "You reverse sequences of letters."


@dataclass(frozen=True)
class Builtin:
    draw: Callable[[random.Random], Hashable]  # one random item; an equal item is a duplicate
    row: Callable[[Hashable], Dict]  # the jsonl row of an item
    n_train: int
    n_eval: int
    seed: int
    # Builtin sets whose eval items this set must not hold, so that training on
    # it after them never shows their eval rows.
    avoid: Tuple[str, ...] = ()


def _unique(draw: Callable[[random.Random], Hashable], seed: int, n: int, exclude: set) -> List:
    rng = random.Random(seed)
    out, seen = [], set(exclude)
    for _ in range(100 * n + 10_000):  # a too small item space fails here instead of hanging
        if len(out) == n:
            break
        item = draw(rng)
        if item in seen:
            continue
        seen.add(item)
        out.append(item)
    if len(out) < n:
        raise RuntimeError(f"drew only {len(out)} distinct items of {n}: the builder's item space is too small")
    return out


def _avoided(spec: Builtin) -> set:
    return {item for name in spec.avoid for item in _split(BUILTIN[name])[1]}


def _split(spec: Builtin):
    avoided = _avoided(spec)
    eval_items = _unique(spec.draw, spec.seed + 1, spec.n_eval, avoided)
    train_items = _unique(spec.draw, spec.seed, spec.n_train, avoided | set(eval_items))
    return train_items, eval_items


# ------------------------------------------------------------------ reversal
def _letters(rng: random.Random) -> Tuple[str, ...]:
    return tuple(rng.choice(ALPHABET) for _ in range(rng.randint(MIN_LEN, MAX_LEN)))


# Pretraining layouts vary the text between question and answer, so the model
# learns to reverse by content rather than by a fixed offset; that is what
# lets the SFT stage carry the skill into a chat template it never saw.
TEXT_LAYOUTS = [
    "Reverse: {s}\n{r}",
    "Reverse: {s}\n\n{r}",
    "Reverse: {s}\nReversed:\n\n{r}",
    "Reverse: {s}\nThe answer is\n{r}",
    "Reverse: {s}\nuser: thanks\nassistant:\n\n{r}",
]


def reverse_text_rows(seq: Tuple[str, ...]) -> Dict:
    layout = random.Random(" ".join(seq)).choice(TEXT_LAYOUTS)
    return {"text": layout.format(s=" ".join(seq), r=" ".join(reversed(seq)))}


def reverse_chat_rows(seq: Tuple[str, ...]) -> Dict:
    return {
        "messages": [
            {"role": "system", "content": SYSTEM_PROMPT},
            {"role": "user", "content": f"Reverse: {' '.join(seq)}"},
            {"role": "assistant", "content": " ".join(reversed(seq))},
        ]
    }


def _wrong_reversal(seq: Tuple[str, ...]) -> str:
    """A plausible mistake: the sequence unreversed, shuffled, with two
    neighbours swapped, or with a letter dropped; never the right answer."""
    rng = random.Random("rejected " + " ".join(seq))
    right = list(reversed(seq))
    shuffled = list(seq)
    rng.shuffle(shuffled)
    k = rng.randrange(len(right) - 1)
    swapped = right[:k] + [right[k + 1], right[k]] + right[k + 2 :]
    dropped = right[:k] + right[k + 1 :]  # shorter, so always wrong
    mistakes = [m for m in (list(seq), shuffled, swapped, dropped) if m != right]
    return " ".join(rng.choice(mistakes))


def preference_rows(seq: Tuple[str, ...]) -> Dict:
    """Learn to prefer the reversal over a near miss. The prompt ends in a
    newline, as reverse_text's first layout, so the completion follows it as
    in pretraining."""
    return {
        "prompt": f"Reverse: {' '.join(seq)}\n",
        "chosen": " ".join(reversed(seq)),
        "rejected": _wrong_reversal(seq),
    }


def preference_chat_rows(seq: Tuple[str, ...]) -> Dict:
    """A style preference a model learns from scratch in a few dozen steps:
    the reversal in lower case (chosen) over the same reversal shouted in
    capitals (rejected); one user turn, one assistant turn each. The tests'
    DPO/KTO/ORPO/RM learning thresholds use it; preference_pairs' near misses
    need a model that can already reverse (demo_pretrain)."""
    right = " ".join(reversed(seq))
    return {
        "prompt": [{"role": "user", "content": f"Reverse: {' '.join(seq)}"}],
        "chosen": [{"role": "assistant", "content": right}],
        "rejected": [{"role": "assistant", "content": right.upper()}],
    }


# ------------------------------------------------------------------ arithmetic
ARITHMETIC_MAX = 30


def _sum_or_difference(rng: random.Random) -> Tuple[int, str, int]:
    op = rng.choice("+-")
    a = rng.randint(0, ARITHMETIC_MAX)
    return a, op, rng.randint(0, ARITHMETIC_MAX if op == "+" else a)  # differences stay >= 0


def arithmetic_rows(item: Tuple[int, str, int]) -> Dict:
    """Learn to add and subtract numbers up to 30 and to answer with the
    number alone; a reward checks ``answer`` against the completion."""
    a, op, b = item
    return {"prompt": f"What is {a} {op} {b}? Answer with a number.", "answer": str(a + b if op == "+" else a - b)}


# ------------------------------------------------------------------ sentiment
POSITIVE = ["great", "wonderful", "excellent", "delightful", "superb", "lovely", "fantastic", "pleasant",
            "brilliant", "charming"]
NEGATIVE = ["terrible", "awful", "dreadful", "boring", "disappointing", "horrible", "bland", "painful",
            "mediocre", "annoying"]
SUBJECTS = ["movie", "meal", "concert", "hotel", "book", "game", "service", "trip", "album", "show", "class", "coffee"]
# (template, negated): a negated template flips the word's polarity.
SENTIMENT_TEMPLATES = [
    ("The {subject} was {word}.", False),
    ("What a {word} {subject}!", False),
    ("I thought the {subject} was {word}.", False),
    ("Honestly, this {subject} is {word}.", False),
    ("Our {subject} last night was {word}.", False),
    ("Everyone agreed the {subject} felt {word}.", False),
    ("The {subject} was not {word}.", True),
    ("I would not call the {subject} {word}.", True),
    ("Honestly, this {subject} is not {word} at all.", True),
]


def _sentiment_item(rng: random.Random) -> Tuple[int, str, str]:
    return rng.randrange(len(SENTIMENT_TEMPLATES)), rng.choice(SUBJECTS), rng.choice(POSITIVE + NEGATIVE)


def _sentiment_pair(rng: random.Random) -> Tuple[Tuple[int, str, str], Tuple[int, str, str]]:
    return _sentiment_item(rng), _sentiment_item(rng)


def _sentiment(item: Tuple[int, str, str]) -> Tuple[str, str]:
    template, negated = SENTIMENT_TEMPLATES[item[0]]
    positive = (item[2] in POSITIVE) != negated
    return template.format(subject=item[1], word=item[2]), "positive" if positive else "negative"


def sentiment_rows(item: Tuple[int, str, str]) -> Dict:
    """Learn each word's polarity, and that "not" flips it."""
    text, label = _sentiment(item)
    return {"text": text, "label": label}


def sentiment_pairs_rows(item: Tuple[Tuple[int, str, str], Tuple[int, str, str]]) -> Dict:
    """Learn whether two sentences share a polarity: both sentences' sentiment, then compare."""
    (text, label), (pair, pair_label) = _sentiment(item[0]), _sentiment(item[1])
    return {"text": text, "text_pair": pair, "label": "same" if label == pair_label else "different"}


# ------------------------------------------------------------------ topics
TOPIC_CLAUSES = {
    "food": ["we cooked a spicy noodle soup", "the bakery sold out of bread", "she ordered grilled fish",
             "dinner was rice and beans", "he baked a cherry pie", "the cafe served fresh dumplings"],
    "music": ["the band played until midnight", "she practised the violin", "a new album came out",
              "we sang along to the chorus", "the drummer missed a beat", "the choir rehearsed a hymn"],
    "sports": ["the team won the final", "he ran a marathon", "the striker scored twice",
               "we watched the tennis match", "the swimmer broke a record", "the coach benched the goalie"],
    "weather": ["it rained all afternoon", "a cold wind blew from the north", "the sun came out at noon",
                "snow covered the roads", "a storm knocked out the power", "thick fog hid the hills"],
}
TOPICS = sorted(TOPIC_CLAUSES)
TIMES = ["Yesterday", "On Sunday", "Last week", "This morning", "Tonight", "In spring", "After work", "At the weekend"]


def _topics_item(rng: random.Random) -> Tuple:
    topics = rng.sample(TOPICS, rng.randint(1, 3))
    return (rng.randrange(len(TIMES)),) + tuple((t, rng.randrange(len(TOPIC_CLAUSES[t]))) for t in topics)


def topics_rows(item: Tuple) -> Dict:
    """Learn which of food, music, sports and weather a sentence mentions,
    each on its own, wherever in the sentence it appears."""
    time, *mentions = item
    clauses = [TOPIC_CLAUSES[t][k] for t, k in mentions]
    body = clauses[0] if len(clauses) == 1 else ", ".join(clauses[:-1]) + " and " + clauses[-1]
    return {"text": f"{TIMES[time]} {body}.", "labels": sorted(t for t, _ in mentions)}


# ------------------------------------------------------------------ entities
ENTITY_NAMES = {
    "PER": ["Mina Park", "John Smith", "Aiko", "Carlos Diaz", "Li Wei", "Sara", "Omar Haddad", "Elena Rossi",
            "Kwame", "Priya Nair", "Jonas", "Maria de la Cruz"],
    "LOC": ["Busan", "New York", "Lake Como", "Cape Town", "Oslo", "Rio de Janeiro", "Nairobi", "Kyoto",
            "Buenos Aires", "Lima"],
    "ORG": ["Acme", "Blue River Bank", "Northwind Traders", "Open Health Institute", "Globex", "City Library",
            "Red Cross", "Initech", "Sunrise Bakery", "United Rail"],
}
# Slots are whole tokens: {PER}, {PER2} (a second, different person), {LOC}, {LOC2}, {ORG}.
ENTITY_TEMPLATES = [
    "{PER} moved to {LOC} last year .",
    "{PER} works for {ORG} in {LOC} .",
    "{ORG} opened a new office in {LOC} .",
    "Yesterday {PER} met {PER2} at the {ORG} headquarters .",
    "The weather in {LOC} was mild , said {PER} .",
    "{PER} and {PER2} founded {ORG} .",
    "Flights from {LOC} to {LOC2} were cancelled .",
    "According to {ORG} , prices in {LOC} rose .",
    "{PER} visited {LOC} .",
    "Shares of {ORG} fell after {PER} resigned .",
]


def _entities_item(rng: random.Random) -> Tuple:
    template = rng.randrange(len(ENTITY_TEMPLATES))
    people, places = rng.sample(ENTITY_NAMES["PER"], 2), rng.sample(ENTITY_NAMES["LOC"], 2)
    slots = {"PER": people[0], "PER2": people[1], "LOC": places[0], "LOC2": places[1],
             "ORG": rng.choice(ENTITY_NAMES["ORG"])}
    used = [w[1:-1] for w in ENTITY_TEMPLATES[template].split() if w.startswith("{")]
    return (template,) + tuple((slot, slots[slot]) for slot in used)


def entities_rows(item: Tuple) -> Dict:
    """Learn to find person, place and organisation names (one to four words)
    from the names themselves and from the words around them."""
    template, *fills = item
    fills = dict(fills)
    tokens, tags = [], []
    for word in ENTITY_TEMPLATES[template].split():
        if not word.startswith("{"):
            tokens.append(word)
            tags.append("O")
            continue
        slot = word[1:-1]
        entity_type = slot.rstrip("2")
        for j, part in enumerate(fills[slot].split()):
            tokens.append(part)
            tags.append(("B-" if j == 0 else "I-") + entity_type)
    return {"tokens": tokens, "tags": tags}


# ------------------------------------------------------------------ QA
QA_PEOPLE = [("Mina", "she"), ("Jonas", "he"), ("Aiko", "she"), ("Carlos", "he"), ("Priya", "she"), ("Omar", "he"),
             ("Elena", "she"), ("Kwame", "he"), ("Sara", "she"), ("Li", "he"), ("Noor", "she"), ("Tomas", "he")]
QA_FACTS = {
    "city": ["Busan", "Oslo", "Lima", "Kyoto", "Nairobi", "Lisbon", "Denver", "Hanoi", "Tunis", "Perth"],
    "company": ["Acme", "Globex", "Initech", "Northwind", "Umbrella Foods", "Blue River Bank", "Sunrise Bakery"],
    "job": ["baker", "nurse", "pilot", "teacher", "welder", "chemist", "librarian", "carpenter"],
    "pet": ["cat", "dog", "parrot", "rabbit", "turtle"],
    "pet_name": ["Biscuit", "Pepper", "Mochi", "Rex", "Luna", "Ziggy", "Olive", "Tango"],
    "hobby": ["painting", "chess", "hiking", "knitting", "fishing", "gardening", "rowing"],
}
QA_QUESTIONS = {
    "city": "Where does {name} live?",
    "company": "Where does {name} work?",
    "job": "What is {name}'s job?",
    "pet_name": "What is the name of {name}'s {pet}?",
    "hobby": "What does {name} enjoy on weekends?",
}
UNANSWERABLE_FRACTION = 0.1


def _qa_item(rng: random.Random) -> Tuple:
    """1 to 4 different people, each with one value per fact."""
    people = rng.sample(range(len(QA_PEOPLE)), rng.randint(1, 4))
    return tuple((p,) + tuple(rng.choice(values) for values in QA_FACTS.values()) for p in people)


def _qa_context(item: Tuple) -> Tuple[str, List[Dict]]:
    """The context and, per person, name, pet kind and each fact's (text, character offset)."""
    context, people = "", []
    for person in item:
        name, pronoun = QA_PEOPLE[person[0]]
        facts = dict(zip(QA_FACTS, person[1:]))
        she = pronoun.capitalize()
        parts = [
            (f"{name} lives in ", "city"), (f". {she} works at ", "company"), (" as a ", "job"),
            (f". {she} has a {facts['pet']} named ", "pet_name"), (f". On weekends {pronoun} enjoys ", "hobby"),
            (". ", None),
        ]
        spans = {}
        for text, fact in parts:
            context += text
            if fact:
                spans[fact] = (facts[fact], len(context))
                context += facts[fact]
        people.append({"name": name, "pet": facts["pet"], "spans": spans})
    return context.rstrip(), people


def _qa_row(item: Tuple, unanswerable_fraction: float) -> Dict:
    context, people = _qa_context(item)
    rng = random.Random("question " + context)
    fact = rng.choice(sorted(QA_QUESTIONS))
    if rng.random() < unanswerable_fraction:  # ask about someone the context does not mention
        absent = [name for name, _ in QA_PEOPLE if name not in {p["name"] for p in people}]
        question = QA_QUESTIONS[fact].format(name=rng.choice(absent), pet=rng.choice(QA_FACTS["pet"]))
        return {"context": context, "question": question, "answers": {"text": [], "answer_start": []}}
    person = rng.choice(people)
    question = QA_QUESTIONS[fact].format(name=person["name"], pet=person["pet"])
    text, start = person["spans"][fact]
    return {"context": context, "question": question, "answers": {"text": [text], "answer_start": [start]}}


def qa_facts_rows(item: Tuple) -> Dict:
    """Learn to find the asked fact of the asked person among up to four
    people: the name selects the sentences, the question word the fact."""
    return _qa_row(item, 0.0)


def qa_facts_v2_rows(item: Tuple) -> Dict:
    """qa_facts, plus learning to answer nothing when the asked person is not
    in the context (about 10% of rows)."""
    return _qa_row(item, UNANSWERABLE_FRACTION)


BUILTIN: Dict[str, Builtin] = {
    "reverse_text": Builtin(_letters, reverse_text_rows, 12000, 200, 7),
    "reverse_chat": Builtin(_letters, reverse_chat_rows, 2000, 100, 11),
    "preference_pairs": Builtin(_letters, preference_rows, 500, 100, 13, avoid=("reverse_text", "reverse_chat")),
    "preference_chat": Builtin(_letters, preference_chat_rows, 500, 100, 18, avoid=("reverse_text", "reverse_chat")),
    "arithmetic": Builtin(_sum_or_difference, arithmetic_rows, 400, 100, 19),
    "sentiment": Builtin(_sentiment_item, sentiment_rows, 400, 100, 23),
    "sentiment_pairs": Builtin(_sentiment_pair, sentiment_pairs_rows, 400, 100, 29),
    "topics_multilabel": Builtin(_topics_item, topics_rows, 400, 100, 31),
    "entities": Builtin(_entities_item, entities_rows, 400, 100, 37),
    "qa_facts": Builtin(_qa_item, qa_facts_rows, 300, 80, 41),
    "qa_facts_v2": Builtin(_qa_item, qa_facts_v2_rows, 300, 80, 43),
}


def tokenizer_corpus() -> Iterator[str]:
    """Text the tiny model's tokenizer is trained on: the demo's vocabulary,
    chat words, and some general and non-Latin text so that any input
    tokenizes sensibly (the tokenizer is byte-level, so nothing is unknown)."""
    for seq in _unique(_letters, 0, 2000, set()):
        yield reverse_text_rows(seq)["text"]
    yield SYSTEM_PROMPT
    general = (
        "The quick brown fox jumps over the lazy dog. What is the answer? "
        "Instruction input output question context answer system user assistant. "
        "0 1 2 3 4 5 6 7 8 9 + - = , . ! ? : ; ( ) [ ] { } \" ' "
        "안녕하세요 반갑습니다 한국어 문장입니다. "
    )
    for _ in range(50):
        yield general


def materialize(name: str) -> Path:
    """Write the named data set to the cache (once) and return its folder."""
    if name not in BUILTIN:
        raise ValueError(f"data: unknown builtin data set {name!r}; known: {sorted(BUILTIN)}")
    spec = BUILTIN[name]
    folder = cache_dir() / "data" / f"{name}-{spec.n_train}-{spec.n_eval}-{spec.seed}"
    if (folder / "eval.jsonl").exists():
        return folder
    train_items, eval_items = _split(spec)
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    for split, items in (("train", train_items), ("eval", eval_items)):
        with open(tmp / f"{split}.jsonl", "w", encoding="utf-8") as f:
            for item in items:
                f.write(json.dumps(spec.row(item), ensure_ascii=False) + "\n")
    try:
        os.rename(tmp, folder)
    except OSError:  # another rank won the race; its files are identical
        for p in tmp.iterdir():
            p.unlink()
        tmp.rmdir()
    return folder


def resolve_builtin(source: str) -> str:
    """``builtin:name`` -> train file, ``builtin:name/eval`` -> eval file."""
    spec = source[len("builtin:"):]
    name, _, split = spec.partition("/")
    return str(materialize(name) / f"{split or 'train'}.jsonl")
