"""LLMEngine: draft -> verify -> commit, for a continuously batched set of requests.

Incremental decoding, sequence speculation and tree speculation are the same loop:
incremental drafts nothing (the tree is just the root), sequence drafts a chain.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor, wait
from typing import Any, Iterable
from typing import Sequence as Seq

import torch
from tqdm import tqdm

from specinfer_dist.config import MODES, VERIFY_METHODS, EngineConfig
from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.engine.builder import Target, build_parts
from specinfer_dist.engine.outputs import RequestOutput
from specinfer_dist.engine.scheduler import Scheduler
from specinfer_dist.engine.sequence import FinishReason, Sequence
from specinfer_dist.errors import InvalidConfigError, InvalidRequestError
from specinfer_dist.runtime.model_runner import chain_parents
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import Verifier, VerifyItem
from specinfer_dist.tree.merge import merge_trees
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree
from specinfer_dist.tree.verify import verify_batch

Prompt = str | list[int]


class LLMEngine:
    """Generate with tree-based speculative inference; the output is the LLM's own.

    The engine runs parts it is given: a verifier (the LLM and its KV caches, here or on Ray
    actors), drafters, the tree shape and the mode. ``LLMEngine.from_config`` / ``load`` build
    them from ``EngineConfig`` options (engine/builder.py). With more than
    ``speculation_max_batch`` requests running, a step decodes without drafting. Requests that
    leave temperature/top_p/top_k unset get ``sampling_defaults`` (the model's
    generation_config.json), else OpenAI's.
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
        pipeline: bool = False,
    ) -> None:
        if mode not in MODES:
            raise InvalidConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "incremental" and not drafters:
            raise InvalidConfigError(f"mode {mode!r} needs at least one SSM or drafter")
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
        self.drafters = drafters if mode != "incremental" else []
        self.spec = spec
        self.mode = mode
        self.verify = verify
        # A step's tree is the merge of every drafter's, capped by the token budget.
        max_drafted = min(spec.token_budget, sum(d.spec.num_tokens for d in self.drafters))
        self.scheduler = Scheduler(max_num_seqs, verifier.release, verifier.kv_capacity, max_drafted)
        self._ids = itertools.count()
        self.timing = {"draft_s": 0.0, "verify_s": 0.0}
        # Pipelining (remote stages): trees drafted in one step are verified in the next.
        self.pipeline = pipeline
        self._drafted: dict[int, TokenTree] = {}
        self._forwards = ThreadPoolExecutor(1, thread_name_prefix="verify")  # no thread until used

    @classmethod
    def from_config(cls, config: EngineConfig, progress: bool = False, target: Target | None = None) -> "LLMEngine":
        """An engine built here from ``config`` (the LLM and drafters in this process); with
        ``target``, on that already loaded LLM."""
        return cls(**vars(build_parts(config, progress, target)))

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
        return Sequence(next(self._ids), ids, params)

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
        # Validate every prompt before queueing any, so a bad one leaves nothing behind.
        seqs = [self.new_sequence(p, sp, chat) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self.add(seq)
        with tqdm(total=len(seqs), disable=not use_tqdm, desc="generating") as bar:
            while self.scheduler.has_unfinished():
                bar.update(sum(seq.finished for seq in self.step()))
        return [self.output(seq) for seq in seqs]

    def add(self, seq: Sequence) -> None:
        self.scheduler.add(seq)

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

    def abort(self, request_id: int) -> bool:
        """Drop a request (e.g. its client went away) and free everything it holds."""
        seq = self.scheduler.remove(request_id)
        if seq is not None:
            self._release(seq)
        return seq is not None

    def output(self, seq: Sequence) -> RequestOutput:
        return RequestOutput(seq.request_id, seq.prompt_ids, seq.text, list(seq.output_ids), seq.finish_reason.value, seq.stats)

    # ---- one iteration --------------------------------------------------------------------

    def step(self) -> list[Sequence]:
        """Draft, verify and commit once for every running request; returns them all
        (the ones that ended have ``finished`` set and have left the engine)."""
        seqs = self.scheduler.schedule()
        if not seqs:
            return []
        if self.pipeline and self.drafters:
            return self._pipelined_step(seqs)
        start = time.perf_counter()
        trees = self.draft(seqs)
        drafted = time.perf_counter()
        items = self.verify_items(seqs, trees)
        self.apply(seqs, trees, items, self.verifier.logits(items))
        self.timing["draft_s"] += drafted - start
        self.timing["verify_s"] += time.perf_counter() - drafted
        return seqs

    def _pipelined_step(self, seqs: list[Sequence]) -> list[Sequence]:
        """Verify the requests drafted last step while drafting the others; returns the verified.

        The two halves of the batch alternate, so the drafters and the LLM (remote actors) work
        at the same time. A tree is drafted from the same tokens as without pipelining, so
        outputs are the same; each request just advances every other step.
        """
        start = time.perf_counter()
        now = [seq for seq in seqs if seq.request_id in self._drafted]
        if not now:  # nothing drafted ahead (start-up): draft half the batch first
            now = seqs[: (len(seqs) + 1) // 2]
            self._drafted.update(zip((seq.request_id for seq in now), self.draft(now)))
        later = [seq for seq in seqs if seq.request_id not in self._drafted]
        trees = [self._drafted.pop(seq.request_id) for seq in now]
        items = self.verify_items(now, trees)
        logits = self._forwards.submit(self.verifier.logits, items)
        try:
            self._drafted.update(zip((seq.request_id for seq in later), self.draft(later) if later else []))
            drafted = time.perf_counter()
        finally:
            wait([logits])  # between steps, only one thread ever uses the verifier
        self.apply(now, trees, items, logits.result())
        self.timing["draft_s"] += drafted - start
        self.timing["verify_s"] += time.perf_counter() - drafted  # verification time not hidden behind drafting
        return now

    def verify_items(self, seqs: list[Sequence], trees: list[TokenTree]) -> list[VerifyItem]:
        """The LLM's input per request: tokens committed but not yet cached (the prompt, at
        first), then the tree hanging below the last of them."""
        items = []
        for seq, tree in zip(seqs, trees):
            chain = seq.tokens[seq.num_cached : -1]
            parents = chain_parents(len(chain)) + [p + len(chain) if p >= 0 else len(chain) - 1 for p in tree.parents]
            rows = list(range(len(chain), len(chain) + len(tree)))
            items.append(VerifyItem(seq.request_id, chain + tree.tokens, parents, rows))
        return items

    def apply(
        self, seqs: list[Sequence], trees: list[TokenTree], items: list[VerifyItem], logits: torch.Tensor
    ) -> None:
        """Verify the trees against the LLM's logits (all trees' rows, where the LLM ran), commit
        the accepted paths, end finished requests."""
        settings = [(seq.params.temperature, seq.params.top_k, seq.params.top_p) for seq in seqs]
        results = verify_batch(trees, logits, settings, [seq.generator for seq in seqs], self.verify)
        for seq, tree, item, (accepted, bonus) in zip(seqs, trees, items, results):
            chain_len = len(item.tokens) - len(tree)
            keep = [*range(chain_len), *(chain_len + n for n in [0, *accepted])]
            self.verifier.commit(seq.request_id, keep)
            seq.num_cached += len(keep)
            appended = self._append(seq, [tree.tokens[n] for n in accepted] + [bonus])
            # Drafted tokens cut by EOS, a stop string or max_tokens were not accepted.
            seq.stats.record(tree.num_drafted, min(len(accepted), appended), len(seq.output_ids))
            if seq.finished:
                self._finish(seq)

    def draft(self, seqs: list[Sequence]) -> list[TokenTree]:
        """One merged, DFS-ordered tree per request from every drafter (just the root without)."""
        roots = [TokenTree.from_root(seq.tokens[-1]) for seq in seqs]
        busy = self.speculation_max_batch is not None and len(self.scheduler.running) > self.speculation_max_batch
        if not self.drafters or busy:  # SSM caches catch up on the skipped tokens when drafting resumes
            return roots
        # A step yields at most depth + 1 tokens: never draft past max_tokens.
        max_depths = [seq.remaining - 1 for seq in seqs]
        requests = [DraftRequest(seq.request_id, seq.tokens, seq.params) for seq in seqs]
        proposals = [d.propose(requests, max_depths) for d in self.drafters]
        return [
            merge_trees(list(trees), seq.params.greedy, self.spec.token_budget).dfs()
            for seq, trees in zip(seqs, zip(*proposals))
        ]

    def _append(self, seq: Sequence, tokens: Iterable[int]) -> int:
        """Add verified tokens, ending the request at EOS, a stop string or max_tokens; returns
        how many were added."""
        added = 0
        for token in tokens:
            added += 1
            seq.output_ids.append(token)
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = FinishReason.STOP
            elif seq.params.stop and self._cut_at_stop(seq):
                seq.finish_reason = FinishReason.STOP
            elif seq.remaining == 0:
                seq.finish_reason = FinishReason.LENGTH
            if seq.finished:
                break
        return added

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

    def _release(self, seq: Sequence) -> None:
        self._drafted.pop(seq.request_id, None)
        self.verifier.release(seq.request_id)
        for drafter in self.drafters:
            drafter.release(seq.request_id)

