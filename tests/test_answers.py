"""The growable store of the LLM's answers (training/answers.py) on tiny random LLMs, no network."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
import torch
import transformers
from helpers import make_tiny_checkpoint
from test_training import CORPUS

from specinfer_dist import InvalidConfigError
from specinfer_dist.training import prompts as P
from specinfer_dist.training.answers import ANSWERS, MANIFEST, AnswerStore, GenerationSettings, is_sampled
from specinfer_dist.training.jobs import load_hf

# A minimal chat template, so that multi-turn prompts (and their parents' answers) are exercised.
CHAT_TEMPLATE = ("{% for m in messages %}<{{ m['role'] }}> {{ m['content'] }} {% endfor %}"
                 "{% if add_generation_prompt %}<assistant>{% endif %}")


@pytest.fixture(scope="module")
def chat_llm(tmp_path_factory) -> Path:
    d = make_tiny_checkpoint(tmp_path_factory.mktemp("llm"), initializer_range=0.1, max_position_embeddings=1024)
    tok = transformers.AutoTokenizer.from_pretrained(d)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(d)
    return d


def _store(root: Path, llm_dir: Path, **settings) -> AnswerStore:
    return AnswerStore(root, str(llm_dir), llm_dir, GenerationSettings(**{"max_new_tokens": 8, **settings}))


def _extend(store: AnswerStore, llm_dir: Path, n: int, deadline: float | None = None):
    tok = transformers.AutoTokenizer.from_pretrained(llm_dir)
    specs = P.prompt_set(n, CORPUS, 0, store.settings.chat)
    return store.extend(specs, load_hf(llm_dir), llm_dir, tok, {2}, 3, batch_size=8, deadline=deadline,
                        progress=False)


def test_more_prompts_keep_the_old_answers_and_generate_only_the_new(chat_llm, tmp_path):
    first = _extend(_store(tmp_path, chat_llm), chat_llm, 24)
    assert len(first) == 24 and {a.sampled for a in first} == {False, True}
    assert all(a.sampled == is_sampled(a.id) for a in first)
    before = (tmp_path / ANSWERS).read_text()
    grown = _extend(_store(tmp_path, chat_llm), chat_llm, 40)  # a new run, the same data dir
    assert (tmp_path / ANSWERS).read_text().startswith(before)  # appended, never rewritten
    assert grown[:24] == first
    manifest = json.loads((tmp_path / MANIFEST).read_text())
    assert [r["added"] for r in manifest["runs"]] == [24, 16]
    assert manifest["counts"]["prompts"] == 40
    assert manifest["counts"]["answer_tokens"] == sum(len(a.answer) for a in grown)
    assert manifest["llm"] == str(chat_llm) and manifest["generation"]["max_new_tokens"] == 8
    assert _extend(_store(tmp_path, chat_llm), chat_llm, 10) == first[:10]  # fewer: a prefix, nothing generated
    assert len(json.loads((tmp_path / MANIFEST).read_text())["runs"]) == 2


def test_multi_turn_prompts_carry_their_parents_answer(chat_llm, tmp_path):
    store = _store(tmp_path, chat_llm)
    answers = {a.id: a for a in _extend(store, chat_llm, 200)}
    specs = [s for s in P.prompt_set(200, CORPUS, 0, True) if s.parent is not None]
    assert specs, "the prompt set has multi-turn prompts"
    tok = transformers.AutoTokenizer.from_pretrained(chat_llm)
    for spec in specs[:5]:
        parent = tok.decode(answers[spec.parent].answer, skip_special_tokens=True).strip()
        assert answers[spec.id].prompt == P.encode_messages(tok, P.messages(spec, parent), True)


def test_data_of_another_llm_or_setting_is_refused(chat_llm, tmp_path):
    _extend(_store(tmp_path, chat_llm), chat_llm, 8)
    other = make_tiny_checkpoint(tmp_path, seed=7, initializer_range=0.1)
    with pytest.raises(InvalidConfigError, match="answers of another LLM.*weights differ"):
        _store(tmp_path, other)
    with pytest.raises(InvalidConfigError, match="other settings.*max_new_tokens=8"):
        _store(tmp_path, chat_llm, max_new_tokens=16)
    with pytest.raises(InvalidConfigError, match="other settings.*temperature"):
        _store(tmp_path, chat_llm, temperature=1.0)


def test_a_deadline_stops_generation_and_a_crash_loses_nothing_done(chat_llm, tmp_path):
    assert _extend(_store(tmp_path, chat_llm), chat_llm, 16, deadline=time.monotonic() - 1) == []
    # A batch written to pending/ by a run that died before appending it is merged on open.
    answers = _extend(_store(tmp_path / "a", chat_llm), chat_llm, 4)
    (tmp_path / "b").mkdir()
    (tmp_path / "a" / MANIFEST).rename(tmp_path / "b" / MANIFEST)
    (tmp_path / "b" / "pending").mkdir()
    torch.save([a.__dict__ for a in answers], tmp_path / "b" / "pending" / "x.pt")
    json_manifest = json.loads((tmp_path / "b" / MANIFEST).read_text())
    json_manifest["runs"] = []
    (tmp_path / "b" / MANIFEST).write_text(json.dumps(json_manifest))
    store = _store(tmp_path / "b", chat_llm)
    assert len(store) == 4 and not list((tmp_path / "b" / "pending").iterdir())
    assert _extend(store, chat_llm, 4) == answers
    # A line cut short by a crash is dropped and answered again.
    path = tmp_path / "b" / ANSWERS
    path.write_text(path.read_text()[:-10])
    assert len(_store(tmp_path / "b", chat_llm)) == 3
