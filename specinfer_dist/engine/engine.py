"""LLMEngine: draft -> verify -> commit, for a continuously batched set of requests.

Incremental decoding, sequence speculation and tree speculation are the same loop:
incremental drafts nothing (the tree is just the root), sequence drafts a chain.

Failure isolation: an error in one request's own work (drafting it, verifying or committing
its tree, detokenising, stop strings) ends that request alone with ``FinishReason.ERROR``; the
others' outputs are what they would have been without it. Only a failure of the LLM forward,
which every request in the step shares, raises out of ``step``.

Chunked prefill: with a per-step token budget, a long prompt goes through the LLM over several
steps (chunks cached, no logits needed), interleaved with the other requests' steps.

Prefix caching: a request admitted to the running batch starts its LLM cache on the cached
blocks of its longest computed prefix (runtime/block_pool.py), all but its newest token at most,
so ``num_cached`` starts there and only the rest runs through the LLM. A feature drafter needs
the LLM's hidden states for every row it has not cached itself, so the reuse stops where its own
cache of the same prefix does. SSM drafters reuse their own caches' prefixes when they first
see the request.

Structured outputs: a constrained request's grammar (runtime/grammar.py) masks its drafters'
distributions while they draft, drops the drafted nodes it forbids, drafts the tokens it forces
below the tree's leaves (the grammar drafter: no forward, verified like any draft; a token that
is the only one allowed is appended at once, ``_jump_forward``), and masks
the LLM's logits at every node before verification, so greedy takes the best allowed token and
sampling draws from the LLM's distribution renormalised over the allowed ones. A request whose
grammar is complete ends with ``stop``.
"""

from __future__ import annotations

import itertools
import logging
import time
from typing import Any, Iterable
from typing import Sequence as Seq

import numpy as np
import torch
from tqdm import tqdm

from specinfer_dist.config import MODES, VERIFY_METHODS, EngineConfig
from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.drafters.feature import FeatureDrafter
from specinfer_dist.engine.builder import Drafting, Target, build_parts, load_target, races_tree
from specinfer_dist.engine.outputs import RequestOutput
from specinfer_dist.engine.scheduler import Scheduler
from specinfer_dist.engine.sequence import FinishReason, Sequence, TokenLogprob
from specinfer_dist.errors import EngineOverloadedError, InvalidConfigError, InvalidRequestError
from specinfer_dist.runtime.model_runner import chain_parents
from specinfer_dist.runtime.grammar import GrammarCompiler, mask_logits
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import KVBlocks, Verifier, VerifyItem
from specinfer_dist.tree.merge import merge_trees
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.device_verify import NonFiniteProbabilities
from specinfer_dist.tree.token_tree import TokenTree
from specinfer_dist.tree.verify import verify_batch, verify_tree
from specinfer_dist.tuning.race import raced_setup

Prompt = str | list[int]
logger = logging.getLogger(__name__)


class LLMEngine:
    """Generate with tree-based speculative inference; the output is the LLM's own.

    The engine runs parts it is given: a verifier (the LLM and its KV caches, here or on Ray
    actors), drafters, the tree shape and the mode. ``LLMEngine.from_config`` / ``load`` build
    them from ``EngineConfig`` options (engine/builder.py). With more than
    ``speculation_max_batch`` requests running, a step decodes without drafting. Requests that
    leave temperature/top_p/top_k unset get ``sampling_defaults`` (the model's
    generation_config.json), else OpenAI's. A feature drafter among the drafters (drafters/feature.py)
    gets the hidden states the verifier's forward captures for the tokens it commits (a local
    verifier, or rank 0 of the Ray runtime's shards: ``logits_hidden``).
    """

    def __init__(
        self,
        *,
        tokenizer: Any,
        model_config: Any,
        eos_ids: set[int],
        verifier: Verifier,
        drafters: list[Drafter],
        spec: TreeSpec,
        mode: str,
        verify: str = "mss",
        max_num_seqs: int = 16,
        speculation_max_batch: int | None = None,
        sampling_defaults: dict[str, Any] | None = None,
        max_num_batched_tokens: int | None = None,
        max_queued_seqs: int | None = None,
        max_seqs_per_request: int | None = None,
        grammar_draft_tokens: int = 0,
    ) -> None:
        if verify not in VERIFY_METHODS:
            raise InvalidConfigError(f"verify must be one of {', '.join(VERIFY_METHODS)}, got {verify!r}")
        # Verifying trees for a big batch costs more than it saves where the LLM is no longer
        # memory-bound (vLLM's speculative_disable_by_batch_size): above this, decode plainly.
        self.speculation_max_batch = speculation_max_batch
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_positions = model_config.max_position_embeddings
        self.eos_ids = eos_ids
        self.sampling_defaults = dict(sampling_defaults or {})
        self.verifier = verifier
        self.verify = verify
        self.scheduler = Scheduler(max_num_seqs, _LLMKV(self))
        self.prefix_cache_queries = self.prefix_cache_hits = 0  # prompt tokens looked up / found cached
        self.grammar_draft_tokens = grammar_draft_tokens  # forced tokens drafted per constrained request and step
        self._grammars: GrammarCompiler | None = None  # built at the first constrained request
        self._set_drafting(Drafting(mode, spec, drafters))
        self.max_num_batched_tokens = max_num_batched_tokens  # LLM rows per step (None: no budget)
        self.max_queued_seqs = max_queued_seqs
        self.max_seqs_per_request = max_seqs_per_request
        self._ids = itertools.count()
        self.timing = {"draft_s": 0.0, "verify_s": 0.0}

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = False, target: Target | None = None) -> "LLMEngine":
        """An engine built here from ``config`` (the LLM and drafters in this process); with
        ``target``, on that already loaded LLM. ``tree: auto`` with model drafters races the
        setups the cost model cannot rank (tuning/race.py) and builds the fastest."""
        target = target or load_target(config, progress)
        return cls(**vars(build_parts(cls.raced(config, target, progress), progress, target)))

    @classmethod
    def raced(cls, config: EngineConfig, target: Target, progress: bool = False) -> EngineConfig:
        """``config`` with ``tree: auto`` resolved by the race where it races (else itself): the
        winner cached for this machine, or raced now on engines built on ``target``."""
        if not races_tree(config):
            return config
        return raced_setup(config, lambda setup: cls(**vars(build_parts(setup, progress, target))),
                           progress)

    @classmethod
    def load(cls, llm: str = "default", *, progress: bool = False, **options: Any) -> "LLMEngine":
        """The Python API's entry point: ``LLMEngine.load("default", tree="auto", dtype="bfloat16")``;
        ``options`` are ``EngineConfig`` fields, validated as in YAML and on the command line."""
        return cls.from_config(EngineConfig(llm=llm, **options), progress=progress)

    # ---- requests -------------------------------------------------------------------------

    def encode(self, prompt: Prompt, chat: bool = False) -> list[int]:
        """Token ids for a prompt; ``chat`` wraps a string in the tokenizer's chat template."""
        if isinstance(prompt, str):
            if not prompt:
                raise InvalidRequestError("prompt is empty")
            if chat:
                if not self.tokenizer.chat_template:
                    raise InvalidRequestError("this model's tokenizer has no chat template")
                text = self.tokenizer.apply_chat_template(
                    [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
                )
                return self.tokenizer(text, add_special_tokens=False).input_ids
            return self.tokenizer(prompt).input_ids
        ids = list(prompt)
        if not ids:
            raise InvalidRequestError("prompt is empty")
        vocab = self.vocab_size
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise InvalidRequestError(f"prompt token ids must be integers in [0, {vocab})")
        return ids

    def add_request(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Sequence:
        seq = self.new_sequence(prompt, params, chat)
        self.add(seq)
        return seq

    def new_sequence(self, prompt: Prompt, params: SamplingParams | None = None, chat: bool = False) -> Sequence:
        """A validated request, not yet queued (``add`` queues it): bad input raises here."""
        params = (params or SamplingParams()).with_defaults(self.sampling_defaults)
        ids = self.encode(prompt, chat)
        if len(ids) + params.max_tokens > self.max_positions:
            raise InvalidRequestError(
                f"prompt ({len(ids)} tokens) + max_tokens ({params.max_tokens}) exceeds the model's "
                f"context of {self.max_positions} tokens"
            )
        self.scheduler.check(len(ids), params.max_tokens)
        seq = Sequence(next(self._ids), ids, params)
        if params.structured_outputs is not None:
            seq.grammar = self.grammar_compiler().grammar(params.structured_outputs)
        return seq

    def grammar_compiler(self) -> GrammarCompiler:
        """Compiles structured-output constraints for this LLM's tokenizer (built once)."""
        if self._grammars is None:
            if self.tokenizer is None:
                raise InvalidRequestError("structured outputs need the model's tokenizer")
            self._grammars = GrammarCompiler(self.tokenizer, self.vocab_size, self.eos_ids)
        return self._grammars

    def generate(
        self,
        prompts: Prompt | Seq[Prompt],
        params: SamplingParams | Seq[SamplingParams] | None = None,
        chat: bool = False,
        use_tqdm: bool = False,
    ) -> list[RequestOutput]:
        """Run prompts (strings or token-id lists) to completion; outputs keep the prompts' order."""
        if isinstance(prompts, str) or (prompts and isinstance(prompts[0], int)):
            prompts = [prompts]
        if params is None or isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise InvalidRequestError(f"got {len(params)} SamplingParams for {len(prompts)} prompts")
        # Validate every prompt before queueing any, so a bad one leaves nothing behind. Offline,
        # every prompt is queued (no max_queued_seqs: nobody else is waiting).
        seqs = [self.new_sequence(p, sp, chat) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self.scheduler.add(seq)
        with tqdm(total=len(seqs), disable=not use_tqdm, desc="generating") as bar:
            while self.scheduler.has_unfinished():
                bar.update(sum(seq.finished for seq in self.step()))
        return [self.output(seq) for seq in seqs]

    def add(self, seq: Sequence) -> None:
        """Queue a request (serving); raises EngineOverloadedError if the queue is full."""
        self.check_capacity(1, queued=len(self.scheduler.waiting))
        self.scheduler.add(seq)

    def check_capacity(self, num_seqs: int, queued: int) -> None:
        """Whether one serving request may start ``num_seqs`` sequences (prompts x n) with
        ``queued`` already waiting: InvalidRequestError if it never may, EngineOverloadedError
        if not now."""
        if self.max_seqs_per_request is not None and num_seqs > self.max_seqs_per_request:
            raise InvalidRequestError(
                f"a request may start at most {self.max_seqs_per_request} sequences (prompts x n), got {num_seqs}"
            )
        if self.max_queued_seqs is not None and queued + num_seqs > self.max_queued_seqs:
            raise EngineOverloadedError(
                f"the engine is overloaded: {queued} sequences are waiting (limit {self.max_queued_seqs}); retry later"
            )

    def has_unfinished(self) -> bool:
        return self.scheduler.has_unfinished()

    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    def num_running(self) -> int:
        return len(self.scheduler.running)

    def running(self) -> list[Sequence]:
        return list(self.scheduler.running)

    def kv_usage(self) -> float | None:
        """Fraction of the LLM's KV block pool in use (None without a bounded pool)."""
        usage = getattr(self.verifier, "kv_usage", None)  # remote verifiers may not report it
        return usage() if usage else None

    def reset_prefix_cache(self) -> int:
        """Forget every cached prefix (the LLM's and the drafters'; running requests keep their
        blocks); returns how many LLM blocks were published."""
        for drafter in self.drafters:
            reset = getattr(drafter, "reset_prefix_cache", None)
            if reset:
                reset()
        return self.verifier.reset_prefix_cache()

    def _reusable_tokens(self, seq: Sequence) -> list[int]:
        """The tokens whose KV ``seq`` may take from the prefix cache when admitted: all but the
        newest (its logits are needed), and no more than each feature drafter continues from."""
        tokens = seq.tokens[:-1]
        for drafter in self.feature_drafters:
            tokens = tokens[: drafter.reusable_rows(seq.request_id, seq.tokens)]
        return tokens

    def _admit(self, seq: Sequence) -> None:
        """Start an admitted request's caches: the LLM's on its cached prefix."""
        for drafter in self.feature_drafters:  # its cache must exist before the LLM's rows reach it
            drafter.start(seq.request_id, seq.tokens, seq.params)
        if seq.cached_tokens is None:  # first admission (not a preempted request coming back)
            seq.cached_tokens = 0
            self.prefix_cache_queries += len(seq.prompt_ids)
        self._reuse_prefix(seq)

    def _reuse_prefix(self, seq: Sequence) -> None:
        """Take cached blocks for ``seq``'s next uncached tokens: when admitted, and before each
        step while it is prefilling (requests admitted together share a prefix that only the
        first of them computes)."""
        before, seq.num_cached = seq.num_cached, self.verifier.attach(seq.request_id, self._reusable_tokens(seq))
        # Prompt tokens found cached (a preempted request finding its own prefix again counts once).
        found = max(0, min(seq.num_cached, len(seq.prompt_ids)) - max(before, seq.cached_tokens))
        self.prefix_cache_hits += found
        seq.cached_tokens += found

    def abort(self, request_id: int) -> bool:
        """Drop a request (e.g. its client went away) and free everything it holds."""
        seq = self.scheduler.remove(request_id)
        if seq is not None:
            self._release(seq)
        return seq is not None

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(
            seq.request_id, seq.prompt_ids, seq.text or "", list(seq.output_ids), seq.finish_reason.value, seq.stats,
            None if seq.logprobs is None else list(seq.logprobs), seq.error, seq.cached_tokens or 0,
        )

    # ---- one iteration --------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """One step for the running requests: draft, verify and commit for those that run whole,
        a prompt chunk for one prefilled in parts (``max_num_batched_tokens``). Returns the
        requests that emitted tokens or ended (ended ones have ``finished`` set and have left the
        engine; one that failed on its own has ``FinishReason.ERROR`` and ``error``)."""
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        for seq in seqs:
            if seq.prefilling and seq.num_cached % self.scheduler.block_size == 0:
                self._reuse_prefix(seq)
        whole, chunks = self.scheduler.split(seqs, self.max_num_batched_tokens, self._drafting())
        start = time.perf_counter()
        whole, trees, failed = self._drop_failed(whole, self.draft(whole))
        drafted = time.perf_counter()
        items = self.verify_items(whole, trees) + self.chunk_items(chunks)  # chunks have no logit rows
        hidden: list[torch.Tensor] | None = None
        if items:
            try:
                if self.feature_drafters:  # they read the hidden states this forward computes anyway
                    logits, hidden = self.verifier.logits_hidden(items, self.aux_layers)
                else:
                    logits = self.verifier.logits(items)
            except Exception as err:
                self._fail_step([*whole, *(seq for seq, _ in chunks)], err)
                raise
            self.apply(whole, trees, items, logits, hidden)
        self.commit_chunks(chunks, None if hidden is None else hidden[len(whole):])
        self.timing["draft_s"] += drafted - start
        self.timing["verify_s"] += time.perf_counter() - drafted
        return failed + whole + [seq for seq, _ in chunks if seq.finished]

    def verify_items(self, seqs: list[Sequence], trees: list[TokenTree]) -> list[VerifyItem]:
        """The LLM's input per request: tokens committed but not yet cached (the prompt, or its
        last chunk, at first), then the tree hanging below the last of them."""
        items = []
        for seq, tree in zip(seqs, trees):
            chain = seq.tokens[seq.num_cached : -1]
            parents = chain_parents(len(chain)) + [p + len(chain) if p >= 0 else len(chain) - 1 for p in tree.parents]
            rows = list(range(len(chain), len(chain) + len(tree)))
            items.append(VerifyItem(seq.request_id, chain + tree.tokens, parents, rows))
        return items

    def chunk_items(self, chunks: list[tuple[Sequence, int]]) -> list[VerifyItem]:
        """The next ``n`` uncached prompt tokens of each request, as a chain needing no logits."""
        return [
            VerifyItem(seq.request_id, seq.tokens[seq.num_cached : seq.num_cached + n], chain_parents(n), [])
            for seq, n in chunks
        ]

    def commit_chunks(self, chunks: list[tuple[Sequence, int]], hidden: list[torch.Tensor] | None = None) -> None:
        """Cache the prompt chunks the forward ran (feature drafters get their ``hidden`` states)."""
        for i, (seq, n) in enumerate(chunks):
            try:
                self.verifier.commit(seq.request_id, list(range(n)))
                for drafter in self.feature_drafters:
                    drafter.observe(seq.request_id, seq.num_cached, hidden[i])
                seq.num_cached += n
            except Exception as err:  # noqa: BLE001 - one request's failure is its own
                self._fail(seq, "caching a prompt chunk", err)

    def apply(
        self,
        seqs: list[Sequence],
        trees: list[TokenTree],
        items: list[VerifyItem],
        logits: torch.Tensor,
        hidden: list[torch.Tensor] | None = None,
    ) -> None:
        """Verify the trees against the LLM's logits (all trees' rows, one tree after another, where
        the LLM ran) as one batch, commit the accepted paths, end finished requests. A request whose
        own verification or commit raises ends alone, with its error: if the batch raises, each
        request it did not verify is verified again on its own on the host (a sampled one with
        fresh draws: exact in distribution). Feature drafters get the committed rows' ``hidden`` states."""
        if not seqs:
            return
        sizes = [len(item.logit_rows) for item in items[: len(seqs)]]
        raw = self._mask_constrained(seqs, sizes, logits)  # logprobs report the LLM's own rows
        per_request = logits.split(sizes)
        settings = [(seq.params.temperature, seq.params.top_k, seq.params.top_p) for seq in seqs]
        results: list[tuple[list[int], int] | None]
        try:
            results = verify_batch(trees, logits, settings, [seq.generator for seq in seqs], self.verify)
        except NonFiniteProbabilities as err:  # the others' results stand; the bad ones fail below
            results = err.results
        except Exception:  # noqa: BLE001 - find which request it was: verify each alone below
            results = [None] * len(seqs)
        for i, (seq, tree, item, node_logits, result) in enumerate(zip(seqs, trees, items, per_request, results)):
            try:
                self._apply_one(seq, tree, item, node_logits, result, None if hidden is None else hidden[i], raw[i])
            except Exception as err:  # noqa: BLE001 - one request's failure is its own
                self._fail(seq, "verifying its step", err)

    @staticmethod
    def _mask_constrained(seqs: list[Sequence], sizes: list[int], logits: torch.Tensor) -> list[torch.Tensor]:
        """Mask, in place, each constrained request's rows of ``logits`` (``sizes[i]`` rows each,
        one tree after another) by its grammar: its nodes' masks are computed here, after the
        forward was started, so on a GPU they overlap it. Returns each request's rows as the LLM
        gave them (a copy only where they are masked and logprobs are asked for)."""
        rows = logits.split(sizes)
        raw = [r.clone() if seq.tree_paths is not None and seq.logprobs is not None else r for seq, r in zip(seqs, rows)]
        starts = np.cumsum([0, *sizes]).tolist()
        constrained = [i for i, seq in enumerate(seqs) if seq.tree_paths is not None]
        if constrained:
            bits = np.concatenate([seqs[i].grammar.node_masks(seqs[i].tree_paths) for i in constrained])
            mask_logits(logits, [(starts[i], starts[i + 1]) for i in constrained], bits)
        return raw

    def _apply_one(
        self, seq: Sequence, tree: TokenTree, item: VerifyItem, node_logits: torch.Tensor,
        result: tuple[list[int], int] | None, hidden: torch.Tensor | None, raw_logits: torch.Tensor,
    ) -> None:
        """Commit one request's verified step; ``result`` None: verify it here, on the host.
        ``node_logits`` are masked by the request's grammar, ``raw_logits`` are the LLM's."""
        params = seq.params
        accepted, bonus = result or verify_tree(
            tree, node_logits.float().cpu(), seq.generator, temperature=params.temperature, top_k=params.top_k,
            top_p=params.top_p, method=self.verify,
        )
        chain_len = len(item.tokens) - len(tree)
        keep = [*range(chain_len), *(chain_len + n for n in [0, *accepted])]
        self.verifier.commit(seq.request_id, keep)
        for drafter in self.feature_drafters:
            drafter.observe(seq.request_id, seq.num_cached, hidden[keep])
        seq.num_cached += len(keep)
        tokens = [tree.tokens[n] for n in accepted] + [bonus]
        appended = self._append(seq, tokens)
        if seq.logprobs is not None:  # row n of node_logits is the LLM's prediction after node n
            rows = [0, *accepted][:appended]
            seq.logprobs.extend(token_logprobs(raw_logits[rows], tokens[:appended], params.logprobs))
        elif seq.grammar is not None and self.grammar_draft_tokens:
            self._jump_forward(seq)
        # Drafted tokens cut by EOS, a stop string or max_tokens were not accepted.
        seq.stats.record(tree.num_drafted, min(len(accepted), appended), len(seq.output_ids))
        if seq.finished:
            self._finish(seq)

    # ---- how requests are drafted --------------------------------------------------------

    def _set_drafting(self, drafting: Drafting) -> None:
        mode, spec, drafters = drafting.mode, drafting.spec, drafting.drafters
        if mode not in MODES:
            raise InvalidConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "incremental" and not drafters:
            raise InvalidConfigError(f"mode {mode!r} needs at least one SSM or drafter")
        drafters = drafters if mode != "incremental" else []
        # Feature drafters read the hidden states the verifier captures in its forward.
        feature_drafters = [d for d in drafters if isinstance(d, FeatureDrafter)]
        if len(feature_drafters) > 1:
            raise InvalidConfigError("at most one feature drafter")
        if feature_drafters and not hasattr(self.verifier, "logits_hidden"):
            raise InvalidConfigError("feature drafters need a verifier that returns hidden states (logits_hidden)")
        self.mode, self.spec, self.drafters, self.feature_drafters = mode, spec, drafters, feature_drafters
        self.aux_layers = feature_drafters[0].aux_layers if feature_drafters else []
        self.scheduler.max_drafted = max_drafted(drafting)

    def switch_drafting(self, drafting: Drafting) -> bool:
        """Draft with ``drafting`` from the next step on (call between steps); False, and nothing
        changes, while a request in the engine would not fit the KV pool with the new tree's
        reservation (try again after a step). The LLM, its caches and every request stay:
        outputs are the LLM's either way. Requests already running start the new drafters from
        their tokens (a feature drafter, which needs hidden states from their start, leaves them
        undrafted), and the old drafters' state goes with them."""
        old_reserve, self.scheduler.max_drafted = self.scheduler.max_drafted, max_drafted(drafting)
        try:
            for seq in [*self.scheduler.waiting, *self.scheduler.running]:
                self.scheduler.check(len(seq.prompt_ids), seq.params.max_tokens)
        except InvalidRequestError:
            self.scheduler.max_drafted = old_reserve
            return False
        old = self.drafters
        self._set_drafting(drafting)
        for drafter in old:
            for seq in [*self.scheduler.waiting, *self.scheduler.running]:
                drafter.release(seq.request_id)
        return True

    def _drafting(self) -> bool:
        # Verifying trees for a big batch costs more than it saves (see speculation_max_batch).
        busy = self.speculation_max_batch is not None and len(self.scheduler.running) > self.speculation_max_batch
        return bool(self.drafters) and not busy

    def draft(self, seqs: list[Sequence]) -> list[TokenTree | Exception]:
        """One merged, DFS-ordered tree per request from every drafter (just the root without),
        or the error that drafting this request raised. A constrained request's tree is pruned
        and extended by its grammar, which also gives its nodes' paths (``tree_paths``), whose masks
        verification computes."""
        drafting = self._drafting()
        trees = self._draft(seqs) if drafting else [TokenTree.from_root(seq.tokens[-1]) for seq in seqs]
        for i, (seq, tree) in enumerate(zip(seqs, trees)):
            seq.tree_paths = None
            if seq.grammar is not None and not isinstance(tree, Exception):
                try:
                    # Within the rows the scheduler reserved for the tree: no request reserves more for them.
                    forced = min(self.grammar_draft_tokens, self.scheduler.max_drafted - tree.num_drafted) if drafting else 0
                    trees[i], seq.tree_paths = seq.grammar.constrain(tree, forced, max_depth=seq.remaining - 1)
                except Exception as err:  # noqa: BLE001 - one request's failure is its own
                    trees[i] = err
        return trees

    def _draft(self, seqs: list[Sequence]) -> list[TokenTree | Exception]:
        # SSM caches catch up on the skipped tokens when drafting resumes.
        # A step yields at most depth + 1 tokens: never draft past max_tokens.
        max_depths = [seq.remaining - 1 for seq in seqs]
        requests = [DraftRequest(seq.request_id, seq.tokens, seq.params, seq.grammar, len(seq.prompt_ids))
                    for seq in seqs]
        proposals = [self._propose(d, requests, max_depths) for d in self.drafters]
        trees: list[TokenTree | Exception] = []
        for seq, own in zip(seqs, zip(*proposals)):
            error = next((t for t in own if isinstance(t, Exception)), None)
            try:
                trees.append(error or merge_trees(list(own), seq.params.greedy, self.spec.token_budget).dfs())
            except Exception as err:  # noqa: BLE001 - one request's failure is its own
                trees.append(err)
        return trees

    def _propose(self, drafter: Drafter, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree | Exception]:
        """``drafter``'s trees for a batch. If it raises, each request is drafted alone after
        dropping the drafter's state for it (a failed batch may have left it half-updated; the
        drafter rebuilds it from the request's tokens), so only requests whose own drafting
        raises get an error. Greedy trees are the same either way; a seeded sampled request
        restarts its drafter's random stream (its output stays exact in distribution)."""
        try:
            return drafter.propose(requests, max_depths)
        except Exception as err:  # noqa: BLE001 - find out whose failure it is
            if len(requests) == 1:
                return [err]
            logger.warning("drafter %s failed on a batch of %d requests (%s); drafting each alone",
                           drafter.name, len(requests), err)
        trees: list[TokenTree | Exception] = []
        for request, max_depth in zip(requests, max_depths):
            drafter.release(request.request_id)
            try:
                trees.extend(drafter.propose([request], [max_depth]))
            except Exception as err:  # noqa: BLE001 - this request's own failure
                trees.append(err)
        return trees

    def _drop_failed(
        self, seqs: list[Sequence], trees: list[TokenTree | Exception]
    ) -> tuple[list[Sequence], list[TokenTree], list[Sequence]]:
        """(requests with a tree, their trees, requests whose drafting failed, now ended)."""
        ok, ok_trees, failed = [], [], []
        for seq, tree in zip(seqs, trees):
            if isinstance(tree, Exception):
                self._fail(seq, "drafting", tree)
                failed.append(seq)
            else:
                ok.append(seq)
                ok_trees.append(tree)
        return ok, ok_trees, failed

    def _append(self, seq: Sequence, tokens: Iterable[int]) -> int:
        """Add verified tokens, ending the request at EOS, a stop string or max_tokens; returns
        how many were added."""
        added = 0
        for token in tokens:
            added += 1
            seq.output_ids.append(token)
            if seq.grammar is not None:
                seq.grammar.advance(token)
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = FinishReason.STOP
            elif seq.params.stop and self._cut_at_stop(seq):
                seq.finish_reason = FinishReason.STOP
            elif seq.grammar is not None and seq.grammar.stopped:  # complete: nothing but EOS may follow
                seq.finish_reason = FinishReason.STOP
            elif seq.remaining == 0:
                seq.finish_reason = FinishReason.LENGTH
            if seq.finished:
                break
        return added

    def _jump_forward(self, seq: Sequence) -> None:
        """The grammar drafter's certain part (SGLang's jump-forward), in every mode: append the
        tokens the grammar alone decides. While it allows exactly one token (not EOS), the masked
        distribution is a point mass on it, so the LLM's choice is known without a forward
        (greedy or sampled). Their KV is computed with the next step's tree, as the chain before
        its root. Not for requests reporting logprobs, which need the LLM's logits."""
        while not seq.finished and (token := seq.grammar.only_token()) is not None and token not in self.eos_ids:
            self._append(seq, [token])
            seq.stats.forced_tokens += 1

    def _cut_at_stop(self, seq: Sequence) -> bool:
        text = self.decode(seq.output_ids)
        hits = [i for i in (text.find(s) for s in seq.params.stop) if i >= 0]
        if hits:
            seq.text = text[: min(hits)]
        return bool(hits)

    def decode(self, token_ids: list[int]) -> str:
        """Text of generated tokens (none without a tokenizer, as in synthetic benchmarks)."""
        return self.tokenizer.decode(token_ids, skip_special_tokens=True) if self.tokenizer else ""

    def _finish(self, seq: Sequence) -> None:
        if seq.text is None:  # not already cut at a stop string
            seq.text = self.decode(seq.output_ids)
        self.scheduler.finish(seq)
        self._release(seq)

    def _fail(self, seq: Sequence, stage: str, err: BaseException, log: bool = True) -> None:
        """End one request with its own error, logged with its id; the others never see it."""
        seq.finish_reason = FinishReason.ERROR
        seq.error = f"request {seq.request_id} failed while {stage}: {type(err).__name__}: {err}"
        if log:
            logger.error("%s", seq.error, exc_info=err)
        if seq in self.scheduler.running:
            self.scheduler.finish(seq)
        self._release(seq)

    def _fail_step(self, seqs: list[Sequence], err: BaseException) -> None:
        """The LLM forward failed: end every request it held (their caches may hold rows of a
        forward that never finished), so the engine stays usable for the rest."""
        logger.error("LLM forward failed; ending requests %s", [seq.request_id for seq in seqs], exc_info=err)
        for seq in seqs:
            self._fail(seq, "running the LLM forward of its step", err, log=False)

    def _release(self, seq: Sequence) -> None:
        self.verifier.release(seq.request_id)
        for drafter in self.drafters:
            drafter.release(seq.request_id)



class _LLMKV:
    """The scheduler's view of the LLM's KV (engine/scheduler.py: SchedulerKV): the verifier's
    blocks, with the engine's prefix reuse."""

    def __init__(self, engine: LLMEngine) -> None:
        self.engine = engine
        self.capacity = engine.verifier.kv_capacity

    @property
    def blocks(self) -> KVBlocks:  # a verifier may replace its blocks (a rebuilt shard group starts empty)
        return self.engine.verifier.blocks

    def free_blocks(self) -> int:
        return self.blocks.free_blocks()

    def held_blocks(self, request_id: int) -> int:
        return self.blocks.held_blocks(request_id)

    def reusable(self, seq: Sequence) -> tuple[int, int]:
        return self.blocks.reusable(self.engine._reusable_tokens(seq))

    def admit(self, seq: Sequence) -> None:
        self.engine._admit(seq)

    def release(self, request_id: int) -> None:
        self.engine.verifier.release(request_id)


def max_drafted(drafting: Drafting) -> int:
    """The most tree tokens a step drafts for one request: the merge of every drafter's tree,
    capped by the token budget (what the scheduler reserves KV for; forced tokens a grammar drafts
    use what the merged tree leaves of it)."""
    if drafting.mode == "incremental":
        return 0
    return min(drafting.spec.token_budget, sum(d.spec.num_tokens for d in drafting.drafters))


def token_logprobs(logits: torch.Tensor, tokens: list[int], k: int) -> list[TokenLogprob]:
    """Each token's log-probability under the raw distribution of its row of ``logits`` (the
    log-softmax, before any temperature/top-k/top-p), with the ``k`` most likely tokens there."""
    logp = logits.double().log_softmax(dim=-1)
    top_values, top_ids = logp.topk(k, dim=-1)
    return [
        TokenLogprob(token, logp[i, token].item(), list(zip(top_ids[i].tolist(), top_values[i].tolist())))
        for i, token in enumerate(tokens)
    ]
