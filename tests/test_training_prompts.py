"""The training prompt set (training/prompts.py): stable prefix, source mix, held-out rule,
multi-turn parents, variety, and disjointness from every benchmark prompt. No network, no models."""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from importlib import resources

import pytest
from helpers import make_tiny_tokenizer
from serve_helpers import CHAT_TEMPLATE

from specinfer_dist.errors import ModelLoadError
from specinfer_dist.models.cache import cache_root
from specinfer_dist.training import prompts as P

# A made-up corpus in the shape of a play (speeches of a few lines, blank lines between), about
# 300 lines, so that tests need no download.
_WHO = ["MARGERY", "OSWIN", "THE STEWARD", "ELSPETH", "CORWEN", "A FERRYMAN"]
_LINES = [
    "The {x} is cold tonight, and all the {y} sleep.", "Go fetch the {x} before the {y} wakes.",
    "I swear by every {x} that I will keep the {y}.", "What news of the {x}? They say the {y} has fallen.",
    "Bring me a lantern and the oldest {x} in the house.", "My lord, the {y} waits at the gate with a {x}.",
    "Hush, for the {x} has ears and the {y} has a tongue.", "Why should a {x} weep for a {y} that never loved it?",
]
_X = ["river", "orchard", "tower", "ledger", "harvest", "bell", "mill", "lantern", "garden", "bridge", "candle"]
_Y = ["miller", "shepherd", "captain", "widow", "tailor", "falconer", "pilgrim", "weaver", "jester", "bishop"]
CORPUS = "\n\n".join(
    "\n".join([_WHO[i % len(_WHO)] + "."]
              + [_LINES[(i + j) % len(_LINES)].format(x=_X[(i * 3 + j) % len(_X)], y=_Y[(i * 7 + j) % len(_Y)])
                 for j in range(2 + i % 4)])
    for i in range(80)
)

N_CHAT, N_RAW = 20_000, 2_000


@pytest.fixture(scope="module")
def chat_set() -> list[P.PromptSpec]:
    return P.prompt_set(N_CHAT, CORPUS)


@pytest.fixture(scope="module")
def raw_set() -> list[P.PromptSpec]:
    return P.prompt_set(N_RAW, CORPUS, chat=False)


def _bench_prompts() -> list[str]:
    files = [resources.files("specinfer_dist.bench").joinpath(name)
             for name in ("prompts.jsonl", "structured_prompts.jsonl")]
    files += [f for f in resources.files("specinfer_dist.tuning").iterdir() if f.name.endswith(".jsonl")]
    rows = [json.loads(line) for f in files for line in f.read_text().splitlines() if line.strip()]
    assert len(rows) >= 30 and all(isinstance(r["prompt"], str) for r in rows)
    return [r["prompt"] for r in rows]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _shingles(text: str, k: int = 6) -> set[tuple[str, ...]]:
    words = re.findall(r"\w+", text.lower())
    return {tuple(words[i:i + k]) for i in range(max(1, len(words) - k + 1))}


def test_prefix_is_stable_and_calls_are_deterministic():
    long = P.prompt_set(300, CORPUS)
    assert long[:100] == P.prompt_set(100, CORPUS)
    assert long == P.prompt_set(300, CORPUS)
    assert P.prompt_set(120, CORPUS, chat=False) == P.prompt_set(300, CORPUS, chat=False)[:120]
    other = P.prompt_set(100, CORPUS, seed=1)
    assert [s.id for s in other] == [s.id for s in long[:100]]
    assert sum(a.turns != b.turns for a, b in zip(other, long)) > 90
    assert P.prompt_set(0, CORPUS) == []
    with pytest.raises(ValueError):
        P.prompt_set(-1, CORPUS)


def test_ids_are_unique_and_sources_follow_the_pattern(chat_set, raw_set):
    for specs, pattern in ((chat_set, P.CHAT_PATTERN), (raw_set, P.RAW_PATTERN)):
        assert len({s.id for s in specs}) == len(specs)
        assert [s.source for s in specs] == [pattern[i % len(pattern)] for i in range(len(specs))]
        for s in specs:
            source, k = s.id.rsplit("-", 1)
            assert source == s.source and len(k) == 6
        want = Counter(pattern)
        for n in (100, 137, 1001, len(specs)):  # any prefix of >= 100 has the pattern's mix, to one slot
            got = Counter(s.source for s in specs[:n])
            for source, slots in want.items():
                assert abs(got[source] - n * slots / len(pattern)) <= 1, (n, source)
    assert set(P.CHAT_PATTERN) | set(P.RAW_PATTERN) == set(P.SOURCES)


def test_held_out_share_per_source_and_held_out_depends_on_the_id_only(chat_set, raw_set):
    by_source: dict[str, list[bool]] = {}
    for s in chat_set + P.prompt_set(10_000, CORPUS, chat=False)[len(raw_set):]:
        by_source.setdefault(s.source, []).append(s.heldout)
    assert set(by_source) == set(P.SOURCES)
    for source, flags in by_source.items():
        assert 0.03 <= sum(flags) / len(flags) <= 0.08, (source, sum(flags) / len(flags))
    for s in chat_set[:500]:
        assert s.heldout == P.is_heldout(s.id) == P.PromptSpec(s.id, "chat", ("something else",)).heldout
    # The same id means the same prompt in both modes (a completion spec is mode-independent).
    completions = {s.id: s for s in chat_set if s.source == "completion"}
    assert all(completions[s.id] == s for s in raw_set if s.id in completions)


def test_multi_turn_parents_come_first_and_match(chat_set):
    position = {s.id: i for i, s in enumerate(chat_set)}
    children = [s for s in chat_set if s.parent is not None]
    assert len(children) == N_CHAT * P.CHAT_PATTERN.count("multi-turn") // len(P.CHAT_PATTERN)
    assert all(s.source == "multi-turn" for s in children)
    assert all(s.parent is None and len(s.turns) == 1 for s in chat_set if s.source != "multi-turn")
    assert len({s.parent for s in children}) == len(children)  # no parent is used twice
    for child in children:
        parent = chat_set[position[child.parent]]
        assert position[parent.id] < position[child.id]
        assert parent.source in P.PARENT_SOURCES and parent.chat and parent.parent is None
        assert parent.turns == (child.turns[0],) and len(child.turns) == 2 and child.chat
    assert sum(chat_set[position[c.parent]].heldout for c in children) == 0  # parents are training prompts


def test_twenty_thousand_distinct_varied_prompts(chat_set, raw_set):
    for specs in (chat_set, raw_set):
        assert len({tuple(_norm(t) for t in s.turns) for s in specs}) == len(specs)
    singles = [s.turns[0] for s in chat_set if s.parent is None]
    lengths = sorted(len(t) for t in singles)
    assert lengths[0] < 30 and lengths[-1] > 400 and 40 < lengths[len(lengths) // 2] < 200
    code = " ".join(s.turns[0] for s in chat_set if s.source == "code")
    for word in ("Python", "JavaScript", "Rust", "Go", "SQL", "Java", "test", "bug", "Convert", "What does"):
        assert word in code, word
    maths = [s.turns[0] for s in chat_set if s.source == "maths"]
    assert sum(bool(re.search(r"\d", t)) for t in maths) / len(maths) > 0.95
    assert any("x" in t and "Solve" in t for t in maths) and any("%" in t for t in maths)
    summaries = [s.turns[0] for s in chat_set if s.source == "summarise"]
    assert any(line in t for t in summaries for line in CORPUS.splitlines()[1:3])  # corpus passages are used
    follow_ups = Counter(s.turns[1] for s in chat_set if s.parent is not None)
    assert "Can you make it shorter?" in follow_ups and len(follow_ups) > 60
    assert {s.chat for s in chat_set if s.source in P.RAW_SOURCES} == {False}
    assert all(not s.chat and len(s.turns) == 1 and s.source in P.RAW_SOURCES for s in raw_set)


def test_no_user_turn_is_or_overlaps_a_benchmark_prompt(chat_set, raw_set):
    bench = _bench_prompts()
    exact = {_norm(b) for b in bench}
    shingles = set().union(*(_shingles(b) for b in bench))
    clashes = []
    for spec in chat_set + raw_set:
        for turn in spec.turns:
            if _norm(turn) in exact or _shingles(turn) & shingles:
                clashes.append((spec.id, sorted(_shingles(turn) & shingles)[:3], turn[:120]))
    assert not clashes, clashes[:10]


def test_prompt_set_is_fast():
    start = time.perf_counter()
    P.prompt_set(N_CHAT, CORPUS, seed=3)
    assert time.perf_counter() - start < 2.0


def test_corpus_needs_passages_and_tiny_corpora_still_work():
    for chat in (True, False):
        with pytest.raises(ModelLoadError, match="passages"):
            P.prompt_set(1, "too short", chat=chat)
    tiny = "\n\n".join(f"Line {i} of a very small corpus, with room for one or two passages only." for i in range(6))
    specs = P.prompt_set(400, tiny, chat=False)  # repeats are allowed once a source runs out of new text
    assert len(specs) == 400 and {s.source for s in specs} == P.RAW_SOURCES


def test_messages_shapes_and_missing_parent_answer(chat_set):
    single = chat_set[0]
    assert P.messages(single) == [{"role": "user", "content": single.turns[0]}]
    with pytest.raises(ValueError, match="single-turn"):
        P.messages(single, "an answer")
    child = next(s for s in chat_set if s.parent is not None)
    assert P.messages(child, "The answer.") == [
        {"role": "user", "content": child.turns[0]}, {"role": "assistant", "content": "The answer."},
        {"role": "user", "content": child.turns[1]}]
    with pytest.raises(ValueError, match=child.parent):
        P.messages(child)


def test_encode_messages_with_a_chat_template_and_raw():
    tok = make_tiny_tokenizer()
    tok.chat_template = CHAT_TEMPLATE
    msgs = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
            {"role": "user", "content": "Shorter?"}]
    text = "<s>user\nHi</s>\n<s>assistant\nHello!</s>\n<s>user\nShorter?</s>\n<s>assistant\n"
    assert P.encode_messages(tok, msgs, chat=True) == tok(text, add_special_tokens=False).input_ids
    raw = P.prompt_set(N_RAW, CORPUS, chat=False)[1]
    ids = P.encode_messages(tok, P.messages(raw), chat=False)
    assert ids == tok(raw.turns[0]).input_ids and tok.decode(ids, skip_special_tokens=True) == raw.turns[0]
    with pytest.raises(ValueError, match="one user message"):
        P.encode_messages(tok, msgs, chat=False)


@pytest.mark.skipif(not (cache_root() / "corpora" / "shakespeare.txt").is_file(), reason="corpus not cached")
def test_real_corpus_prompts_are_distinct_and_disjoint_from_the_benchmarks():
    corpus = P.fetch_corpus(progress=False)
    shingles = set().union(*(_shingles(b) for b in _bench_prompts()))
    specs = P.prompt_set(4000, corpus) + P.prompt_set(4000, corpus, chat=False)
    corpus_specs = [s for s in specs if s.source in ("summarise", "passage")]
    assert not [s.id for s in corpus_specs if _shingles(s.turns[0]) & shingles]
    assert len({s.turns for s in corpus_specs}) == len(corpus_specs)
