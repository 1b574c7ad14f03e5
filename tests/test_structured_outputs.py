"""Structured outputs under tree speculation: exact under the constraint.

The reference is Hugging Face ``generate()`` with the grammar applied as a logits processor
written here on llguidance directly (not through runtime/grammar.py): greedy outputs must be
equal token for token. Sampling is checked by a G-test against the LLM's distribution masked
and renormalised over the allowed tokens, with a negative control that records the drafter's
unmasked q. ``Grammar.constrain`` is property-tested on random trees and grammars.
"""

from __future__ import annotations

import json
import random
from collections import Counter

import jsonschema
import llguidance
import llguidance.hf
import numpy as np
import pytest
import torch
import transformers
from helpers import make_tiny_checkpoint
from test_mss import ALPHA, g_test, noisy_copy

from specinfer_dist import InvalidRequestError, LLMEngine, SamplingParams
from specinfer_dist.drafters.ssm import SSMDrafter
from specinfer_dist.runtime.grammar import (
    JSON_DEFAULTS, GrammarCompiler, StructuredOutputsParams, _has, _shifts, unpack,
)
from specinfer_dist.tree import TokenTree, sampling_probs

SCHEMA = {
    "type": "object",
    "properties": {
        "kind": {"enum": ["cat", "dog", "bird"]},
        "age": {"type": "integer", "minimum": 0, "maximum": 30},
        "ok": {"type": "boolean"},
        "name": {"type": "string", "maxLength": 6},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 3}, "maxItems": 2},
    },
    "required": ["kind", "age", "ok", "name", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["A pet record: ", "JSON please:", "{", "name"]


class GrammarProcessor(transformers.LogitsProcessor):
    """HF's side of the comparison: masks each step's scores with a fresh llguidance matcher fed
    the tokens generated so far (batch of one)."""

    def __init__(self, tokenizer, vocab_size: int, eos: int, grammar: str, prompt_len: int) -> None:
        lltok = llguidance.hf.from_tokenizer(tokenizer, n_vocab=vocab_size, eos_token=eos)
        self.matcher = llguidance.LLMatcher(lltok, grammar, log_level=0)
        self.prompt_len, self.fed = prompt_len, 0

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        new = input_ids[0, self.prompt_len :].tolist()
        assert self.matcher.consume_tokens(new[self.fed :]), self.matcher.get_error()
        self.fed = len(new)
        bits = np.empty((scores.shape[1] + 31) // 32, dtype=np.int32)
        self.matcher.unsafe_compute_mask_ptr(bits.ctypes.data, bits.nbytes)
        allowed = np.unpackbits(bits.view(np.uint8), bitorder="little")[: scores.shape[1]].astype(bool)
        return scores.masked_fill(~torch.from_numpy(allowed), float("-inf"))


def hf_constrained_greedy(hf, tokenizer, prompt: list[int], grammar: str, max_new: int) -> list[int]:
    processor = GrammarProcessor(tokenizer, hf.config.vocab_size, hf.config.eos_token_id, grammar, len(prompt))
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), attention_mask=torch.ones(1, len(prompt), dtype=torch.long),
                          max_new_tokens=max_new, do_sample=False, logits_processor=[processor],
                          pad_token_id=hf.config.eos_token_id)
    return out[0, len(prompt) :].tolist()


def assert_same_as_hf(ours: list[int], ref: list[int], eos: int, finish_reason: str) -> None:
    """Ours stops where the grammar completes; HF emits the EOS the grammar then forces."""
    if finish_reason == "stop":
        assert ref == ours + [eos] or ref == ours, f"\nours={ours}\nref ={ref}"
    else:
        assert ours == ref, f"\nours={ours}\nref ={ref}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("structured")
    llm = make_tiny_checkpoint(tmp, "llama", seed=1, initializer_range=0.3)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm)
    return {"llm": str(llm), "ssm": noisy_copy(llm, tmp / "near", 0.3, 3), "hf": hf, "tokenizer": tokenizer}


SETUPS = {
    "incremental": dict(mode="incremental", ssms=["none"]),
    "tree": dict(ssms=["ssm"], drafters=["ngram"], tree="2,2,1,1"),
    "dynamic": dict(ssms=["ssm"], tree="dynamic:4,5"),
    "tree-no-grammar-drafter": dict(ssms=["ssm"], tree="1,1,1", grammar_draft_tokens=0),
    "confident-tree": dict(ssms=["ssm"], drafters=["ngram"], tree="2,2,1,1", draft_confidence=0.6),
}


def load(tiny, setup: str, **extra) -> LLMEngine:
    options = dict(SETUPS[setup], **extra)
    options["ssms"] = [tiny["ssm"] if s == "ssm" else s for s in options["ssms"]]
    return LLMEngine.load(tiny["llm"], enable_prefix_caching=False, **options)


@pytest.mark.parametrize("setup", list(SETUPS))
def test_greedy_under_a_schema_equals_transformers_with_the_grammar(tiny, setup):
    engine = load(tiny, setup)
    prompts = [engine.encode(p) for p in PROMPTS]
    params = SamplingParams(max_tokens=200, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    outs = engine.generate(prompts, params)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(SCHEMA, defaults=JSON_DEFAULTS)
    for prompt, out in zip(prompts, outs):
        ref = hf_constrained_greedy(tiny["hf"], tiny["tokenizer"], prompt, grammar, 200)
        assert_same_as_hf(out.token_ids, ref, 2, out.finish_reason)
        assert out.finish_reason == "stop"
        jsonschema.validate(json.loads(out.text), SCHEMA)
    if setup != "incremental":
        assert sum(o.stats.accepted_tokens for o in outs) > 0  # drafts under the grammar were verified


def test_constrained_and_free_requests_in_one_batch_are_as_alone(tiny):
    engine = load(tiny, "tree")
    constrained = SamplingParams(max_tokens=40, temperature=0, structured_outputs=StructuredOutputsParams(json=SCHEMA))
    free = SamplingParams(max_tokens=40, temperature=0, ignore_eos=True)
    sampled = SamplingParams(max_tokens=20, temperature=1.0, seed=7,
                             structured_outputs=StructuredOutputsParams(regex=r"[a-z]{3,12}\d\d"))
    params = [constrained, free, sampled, free]
    prompts = PROMPTS
    together = [o.token_ids for o in engine.generate(prompts, params)]
    alone = [load(tiny, "tree").generate([p], [sp])[0].token_ids for p, sp in zip(prompts, params)]
    assert together == alone


def test_stop_string_max_tokens_and_forced_keys(tiny):
    engine = load(tiny, "tree")
    key = "the_quick_brown_fox_jumps_over_the_lazy_dog_" * 3
    schema = {"type": "object", "properties": {key: {"type": "boolean"}}, "required": [key],
              "additionalProperties": False}
    out = engine.generate(["x"], SamplingParams(max_tokens=200, temperature=0,
                                                structured_outputs=StructuredOutputsParams(json=schema)))[0]
    # ~140 forced bytes: the grammar supplies them without a forward per token.
    assert out.finish_reason == "stop" and out.text.startswith('{"' + key + '": ')
    assert out.stats.steps <= 3 and out.stats.forced_tokens + out.stats.accepted_tokens >= 100
    cut = engine.generate(["x"], SamplingParams(max_tokens=5, temperature=0,
                                                structured_outputs=StructuredOutputsParams(json=schema)))[0]
    assert cut.finish_reason == "length" and len(cut.token_ids) == 5
    stopped = engine.generate(["x"], SamplingParams(max_tokens=200, temperature=0, stop=["brown"],
                                                    structured_outputs=StructuredOutputsParams(json=schema)))[0]
    assert stopped.finish_reason == "stop" and stopped.text == '{"the_quick_'
    choice = engine.generate(["x"], SamplingParams(max_tokens=30, temperature=0, structured_outputs=StructuredOutputsParams(
        choice=["alpha", "beta", "gamma ray"])))[0]
    assert choice.text in ("alpha", "beta", "gamma ray") and choice.finish_reason == "stop"


def test_logprobs_are_the_llms_raw_ones_under_a_constraint(tiny):
    engine = load(tiny, "incremental")
    out = engine.generate(["x"], SamplingParams(max_tokens=10, temperature=0, logprobs=2,
                                                structured_outputs=StructuredOutputsParams(regex="[0-9]{10}")))[0]
    assert out.text.isdigit() and len(out.logprobs) == len(out.token_ids) == 10
    prompt = engine.encode("x")
    with torch.no_grad():
        logits = tiny["hf"](torch.tensor([prompt + out.token_ids])).logits[0, len(prompt) - 1 : -1]
    want = logits.double().log_softmax(-1)[torch.arange(10), out.token_ids]
    torch.testing.assert_close(torch.tensor([lp.logprob for lp in out.logprobs], dtype=torch.float64), want,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("constraint,reason", [
    (dict(json={"type": "strin"}), "Invalid type"),
    (dict(json={"$ref": "#/definitions/nope"}), "nope"),
    (dict(regex="a(b"), "unclosed group"),
    (dict(grammar="start: nope"), "nope"),
])
def test_bad_constraints_are_refused_before_queueing(tiny, constraint, reason):
    engine = load(tiny, "incremental")
    with pytest.raises(InvalidRequestError, match=reason):
        engine.add_request("x", SamplingParams(structured_outputs=StructuredOutputsParams(**constraint)))
    assert not engine.has_unfinished()
    with pytest.raises(InvalidRequestError, match="exactly one"):
        StructuredOutputsParams(regex="a", choice=["b"])
    with pytest.raises(InvalidRequestError, match="choice"):
        StructuredOutputsParams(choice=[])


# ---- sampling: the masked, renormalised distribution, exactly -----------------------------

REGEX = "[a-d][a-d][a-d]"  # 64 outcomes over the byte tokenizer's 260 tokens
TRIALS = 6000


def masked_distribution(hf, tokenizer, prompt: list[int], temperature: float) -> dict[tuple, float]:
    """The LLM's distribution of 3 tokens under REGEX: masked logits, then temperature."""
    allowed = [tokenizer.convert_tokens_to_ids(c) for c in "abcd"]
    dist = {(): 1.0}
    for _ in range(3):
        prefixes = list(dist)
        with torch.no_grad():
            logits = hf(torch.tensor([prompt + list(p) for p in prefixes])).logits[:, -1].double()
        masked = torch.full_like(logits, float("-inf"))
        masked[:, allowed] = logits[:, allowed]
        probs = sampling_probs(masked, temperature)
        dist = {p + (t,): dist[p] * probs[i, t].item() for i, p in enumerate(prefixes) for t in allowed}
    return dist


def sample_constrained(engine: LLMEngine, temperature: float) -> tuple[Counter, float]:
    params = [SamplingParams(max_tokens=3, temperature=temperature, seed=i,
                             structured_outputs=StructuredOutputsParams(regex=REGEX)) for i in range(TRIALS)]
    outs = engine.generate(["ab"] * TRIALS, params)
    assert all(o.finish_reason == "stop" for o in outs)
    return Counter(tuple(o.token_ids) for o in outs), 3 * TRIALS / sum(o.stats.steps for o in outs)


@pytest.mark.slow
@pytest.mark.parametrize("setup,temperature", [("tree", 1.0), ("dynamic", 0.8)])
def test_mss_under_a_constraint_keeps_the_masked_distribution(tiny, setup, temperature):
    engine = load(tiny, setup, max_num_seqs=2048, grammar_draft_tokens=0)
    counts, tokens_per_step = sample_constrained(engine, temperature)
    p_value = g_test(counts, masked_distribution(tiny["hf"], tiny["tokenizer"], engine.encode("ab"), temperature))
    print(f"G-test p={p_value:.3g}, tokens/step={tokens_per_step:.3f}")
    assert p_value > ALPHA and tokens_per_step > 1.2


class RecordsUnmaskedQ(SSMDrafter):
    """Wrong on purpose: draws from the grammar-masked q but records the drafter's unmasked q."""

    def _children(self, request, logits, k):
        masked = sampling_probs(logits, request.params.temperature)
        unmasked = sampling_probs(self._raw, request.params.temperature)
        draws = torch.multinomial(masked, k, replacement=True, generator=self.generators[request.request_id])
        return [[(t, unmasked[row]) for t in tokens] for row, tokens in enumerate(draws.tolist())]

    @staticmethod
    def _constrained(state, logits):
        RecordsUnmaskedQ._raw = logits
        return SSMDrafter._constrained(state, logits)


@pytest.mark.slow
def test_negative_control_unmasked_q_is_rejected(tiny):
    engine = load(tiny, "tree", max_num_seqs=2048, grammar_draft_tokens=0, drafters=[])
    engine.drafters = [RecordsUnmaskedQ(d.runner.model, d.spec) for d in engine.drafters]
    counts, _ = sample_constrained(engine, 1.0)
    p_value = g_test(counts, masked_distribution(tiny["hf"], tiny["tokenizer"], engine.encode("ab"), 1.0))
    print(f"negative control: G-test p={p_value:.3g}")
    assert p_value < ALPHA


# ---- pruning: never drops an allowed token --------------------------------------------------

@pytest.fixture(scope="module")
def compiler(tiny):
    return GrammarCompiler(tiny["tokenizer"], 260, {2})


def random_tree(rng: random.Random, tokens: list[int], sampled: bool) -> TokenTree:
    tree = TokenTree.from_root(rng.choice(tokens))
    for _ in range(rng.randint(0, 14)):
        q = torch.full((260,), 1 / 260) if sampled and rng.random() < 0.5 else None
        tree.add(rng.randrange(len(tree)), rng.choice(tokens), q)
    return tree.dfs()


@pytest.mark.parametrize("seed", range(40))
def test_constrain_keeps_every_allowed_node_and_masks_as_a_fresh_matcher(tiny, compiler, seed):
    rng = random.Random(seed)
    tok = tiny["tokenizer"]
    pattern = rng.choice(["(ab|ba|c)*d?", "a[bc]{0,4}(dd|e)", "[a-e]{2,6}", "(abc|abd|b)+"])
    constraint = StructuredOutputsParams(regex=pattern)
    grammar = compiler.grammar(constraint)
    fresh = compiler.grammar(constraint)
    prefixes = [[], tok.convert_tokens_to_ids(["a"]), tok.convert_tokens_to_ids(["b", "a"])]
    prefix = rng.choice([p for p in prefixes if fresh.mask(tuple(p)) is not None])  # committed: in the language
    for token in prefix:
        grammar.advance(token)
    letters = tok.convert_tokens_to_ids(list("abcde"))
    tree = random_tree(rng, letters, sampled=seed % 2 == 0)
    out, paths = grammar.constrain(tree, max_forced=rng.choice([0, 4]))
    rows = grammar.node_masks(paths)

    def allowed(path: list[int]) -> bool:
        return fresh.mask(tuple(prefix + path[:-1])) is not None and fresh.mask(tuple(prefix + path)) is not None

    kept = {tuple(out.path(n)) for n in range(len(out))}
    for node in range(len(tree)):
        path = tree.path(node)
        if allowed(path):
            assert tuple(path) in kept, f"allowed path {path} was dropped"
    for node in range(1, len(out)):
        path = out.path(node)
        if not allowed(path):  # only a forbidden *draw* stays, as a leaf, with its row unmasked
            assert out.probs[node] is not None and node not in out.parents and (rows[node] == -1).all()
        else:
            want = fresh.mask(tuple(prefix + path))
            assert want is not None and (rows[node] == want).all()
    assert (rows[0] == fresh.mask(tuple(prefix))).all()
    # Host unpacking (numpy) and device unpacking (tensor shifts, run here on the CPU) agree bit for bit.
    want = torch.tensor([[_has(row, t) for t in range(260)] for row in rows])
    assert torch.equal(unpack(rows, 260), want)
    words = torch.from_numpy(rows)
    assert torch.equal(((words.unsqueeze(-1) >> _shifts(words.device)) & 1).bool().flatten(-2)[:, :260], want)


# ---- the default LLM --------------------------------------------------------------------------

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 40},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "city": {"type": "string", "maxLength": 40},
        "hobbies": {"type": "array", "items": {"type": "string", "maxLength": 30}, "maxItems": 3},
    },
    "required": ["name", "age", "city", "hobbies"],
    "additionalProperties": False,
}


PERSON_PROMPTS = [
    "Describe a fictional person as JSON with name, age, city and hobbies.",
    "Maria Lopez, 34, lives in Seville and enjoys flamenco, chess and cycling. Give her record as JSON.",
]


@pytest.fixture(scope="module")
def default_refs():
    """The default LLM's prompts and HF's constrained greedy outputs for them (computed once)."""
    from specinfer_dist.models.default import default_llm_dir

    llm_dir = default_llm_dir(progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(llm_dir, dtype=torch.float32).eval()
    tokenizer = transformers.AutoTokenizer.from_pretrained(llm_dir)
    grammar = llguidance.LLMatcher.grammar_from_json_schema(PERSON, defaults=JSON_DEFAULTS)
    prompts = [tokenizer.apply_chat_template([{"role": "user", "content": p}], add_generation_prompt=True,
                                             tokenize=False) for p in PERSON_PROMPTS]
    prompts = [tokenizer(p, add_special_tokens=False).input_ids for p in prompts]
    return str(llm_dir), prompts, [hf_constrained_greedy(hf, tokenizer, p, grammar, 100) for p in prompts], \
        hf.config.eos_token_id


@pytest.mark.slow
@pytest.mark.parametrize("setup", [
    dict(mode="incremental", ssms=["none"]),
    dict(tree="1,1,1,1", drafters=["ngram"]),  # the shipped SSMs and prompt lookup (dynamic: tiny model above)
])
def test_default_llm_under_a_schema_equals_transformers(default_refs, setup):
    llm_dir, prompts, refs, eos = default_refs
    engine = LLMEngine.load(llm_dir, enable_prefix_caching=False, **setup)
    outs = engine.generate(prompts, SamplingParams(max_tokens=100, temperature=0,
                                                   structured_outputs=StructuredOutputsParams(json=PERSON)))
    for ref, out in zip(refs, outs):
        assert_same_as_hf(out.token_ids, ref, eos, out.finish_reason)
        jsonschema.validate(json.loads(out.text), PERSON)
