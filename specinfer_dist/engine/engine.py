"""LLMEngine: draft -> verify -> commit, for a continuously batched set of requests.

Incremental decoding, sequence speculation and tree speculation are the same loop:
incremental drafts nothing (the tree is just the root), sequence drafts a chain.
"""

from __future__ import annotations

import itertools
import time
from concurrent.futures import ThreadPoolExecutor, wait
from dataclasses import asdict
from pathlib import Path
from typing import Any, Iterable
from typing import Sequence as Seq

import torch
from tqdm import tqdm
from transformers import GenerationConfig

from specinfer_dist.config import DEFAULT_BLOCK_SIZE, EngineConfig
from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.drafters.ngram import NgramDrafter
from specinfer_dist.drafters.ssm import SSMDrafter
from specinfer_dist.engine.outputs import RequestOutput
from specinfer_dist.engine.scheduler import Scheduler
from specinfer_dist.engine.sequence import FinishReason, Sequence
from specinfer_dist.errors import InvalidConfigError, InvalidRequestError
from specinfer_dist.models.default import ssm_sources
from specinfer_dist.models.draft_vocab import read_draft_vocab, restrict_head
from specinfer_dist.models.loader import check_same_vocabulary, load_model
from specinfer_dist.runtime.block_pool import DEFAULT_GPU_MEMORY_UTILIZATION
from specinfer_dist.runtime.model_runner import chain_parents
from specinfer_dist.runtime.sampling_params import SamplingParams
from specinfer_dist.runtime.verifier import LocalVerifier, Verifier, VerifyItem
from specinfer_dist.tree.merge import merge_trees
from specinfer_dist.tree.sampling import sampling_probs
from specinfer_dist.tree.spec import DEFAULT_TOKEN_BUDGET, TreeSpec
from specinfer_dist.tree.token_tree import TokenTree
from specinfer_dist.tree.verify import verify_greedy, verify_mss, verify_naive
from specinfer_dist.tuning.tune import auto_tree

MODES = ("incremental", "sequence", "tree")
VERIFIERS = {"mss": verify_mss, "naive": verify_naive}
Prompt = str | list[int]


class LLMEngine:
    """Generate with tree-based speculative inference; the output is the LLM's own.

    ``llm`` / ``ssms`` are model sources: "default", a HF checkpoint dir, a .gguf file or a hub
    id. Without ``ssms`` the default LLM gets its shipped SSMs ("default") and any other LLM
    none. ``mode`` defaults to "tree" when there is a drafter, else "incremental". Sampled
    requests are verified by multi-step speculative sampling (``verify="mss"``) or the naive
    baseline. SSMs shipped with a ``draft_vocab.json`` score only those tokens unless
    ``draft_vocab`` is False (models/draft_vocab.py). With more than ``speculation_max_batch``
    requests running, a step decodes without drafting. The LLM's KV memory is a pool of
    ``kv_blocks`` blocks of ``kv_block_size`` tokens (requests wait or are preempted when it is
    full); None sizes it from memory (``gpu_memory_utilization`` of a GPU; runtime/block_pool.py).
    """

    def __init__(
        self,
        llm: str | None = None,
        ssms: Seq[str] | None = None,
        drafters: Seq[str] = (),
        tree: str | Seq[int] | TreeSpec | None = None,
        tree_budget: int = DEFAULT_TOKEN_BUDGET,
        mode: str | None = None,
        verify: str = "mss",
        draft_temperature: float | None = None,
        draft_vocab: bool = True,
        dtype: str | torch.dtype = "float32",
        max_num_seqs: int = 16,
        speculation_max_batch: int | None = None,
        kv_blocks: int | None = None,
        kv_block_size: int = DEFAULT_BLOCK_SIZE,
        gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION,
        progress: bool = False,
    ) -> None:
        self.model, self.tokenizer, model_dir = load_model(llm, dtype=dtype, progress=progress)
        sources = ssm_sources(llm, ssms)
        mode = mode or ("tree" if sources or drafters else "incremental")
        if draft_temperature is not None and not draft_temperature > 0:
            raise InvalidConfigError(f"draft_temperature must be positive, got {draft_temperature!r}")
        ssm_models = []
        if mode != "incremental":
            ssm_models = [self._load_ssm(source, dtype, draft_vocab, progress) for source in sources]
        if tree == "auto" and ssm_models:
            # Measured on this machine (tuning/tune.py); None means speculation would not pay.
            key = [llm, *sources, f"draft_vocab={draft_vocab}"]
            spec, chosen = auto_tree(self.model, self.tokenizer, ssm_models, key, tree_budget, progress)
            ssm_models = [ssm_models[i] for i in chosen]
            mode = mode if spec else "incremental"
            spec = spec or TreeSpec(token_budget=tree_budget)
        else:  # without SSMs there is nothing to measure: model-free drafters use the default shape
            spec = _tree_spec(None if tree == "auto" else tree, tree_budget)
        if mode == "sequence":
            spec = spec.as_sequence()
        all_drafters: list[Drafter] = []
        if mode != "incremental":
            all_drafters = [SSMDrafter(m, spec, f"ssm{i}", draft_temperature) for i, m in enumerate(ssm_models)]
            all_drafters.extend(model_free_drafter(name, spec) for name in drafters)
        self._init_parts(
            tokenizer=self.tokenizer,
            model_config=self.model.config,
            eos_ids=eos_ids(model_dir, self.model.config, self.tokenizer),
            verifier=LocalVerifier(self.model, kv_blocks, kv_block_size, max_num_seqs, gpu_memory_utilization),
            drafters=all_drafters,
            spec=spec,
            mode=mode,
            verify=verify,
            max_num_seqs=max_num_seqs,
            speculation_max_batch=speculation_max_batch,
        )

    @classmethod
    def from_parts(cls, **parts: Any) -> "LLMEngine":
        """An engine whose LLM and drafters run elsewhere (e.g. Ray actors): see ``_init_parts``."""
        engine = cls.__new__(cls)
        engine._init_parts(**parts)
        return engine

    def _init_parts(
        self,
        *,
        tokenizer: Any,
        model_config: Any,
        eos_ids: set[int],
        verifier: Verifier,
        drafters: list[Drafter],
        spec: TreeSpec,
        mode: str,
        verify: str,
        max_num_seqs: int,
        speculation_max_batch: int | None = None,
        pipeline: bool = False,
    ) -> None:
        if mode not in MODES:
            raise InvalidConfigError(f"mode must be one of {', '.join(MODES)}, got {mode!r}")
        if mode != "incremental" and not drafters:
            raise InvalidConfigError(f"mode {mode!r} needs at least one SSM or drafter")
        if verify not in VERIFIERS:
            raise InvalidConfigError(f"verify must be one of {', '.join(VERIFIERS)}, got {verify!r}")
        if max_num_seqs < 1:
            raise InvalidConfigError(f"max_num_seqs must be positive, got {max_num_seqs}")
        if speculation_max_batch is not None and speculation_max_batch < 1:
            raise InvalidConfigError(f"speculation_max_batch must be positive, got {speculation_max_batch}")
        # Verifying trees for a big batch costs more than it saves where the LLM is no longer
        # memory-bound (vLLM's speculative_disable_by_batch_size): above this, decode plainly.
        self.speculation_max_batch = speculation_max_batch
        self.tokenizer = tokenizer
        self.vocab_size = model_config.vocab_size
        self.max_positions = model_config.max_position_embeddings
        self.eos_ids = eos_ids
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
    def from_config(cls, config: EngineConfig, progress: bool = False) -> "LLMEngine":
        return cls(**asdict(config), progress=progress)

    def _load_ssm(self, source: str, dtype, draft_vocab: bool, progress: bool):
        # SSMs trained by boost-tuning take their embedding and head from this LLM (no copy).
        model, tokenizer, model_dir = load_model(source, dtype=dtype, progress=progress, shared_from=self.model)
        check_same_vocabulary(self.tokenizer, tokenizer, self.model.config, model.config, source)
        token_ids = read_draft_vocab(model_dir, model.config.vocab_size) if draft_vocab else None
        if token_ids is not None:  # score only the tokens the LLM emits often (models/draft_vocab.py)
            restrict_head(model, token_ids)
        return model

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
        seq = self._new_sequence(prompt, params, chat)
        self.scheduler.add(seq)
        return seq

    def _new_sequence(self, prompt: Prompt, params: SamplingParams | None, chat: bool) -> Sequence:
        params = params or SamplingParams()
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
        seqs = [self._new_sequence(p, sp, chat) for p, sp in zip(prompts, params)]
        for seq in seqs:
            self.scheduler.add(seq)
        with tqdm(total=len(seqs), disable=not use_tqdm, desc="generating") as bar:
            while self.scheduler.has_unfinished():
                bar.update(sum(seq.finished for seq in self.step()))
        return [self.output(seq) for seq in seqs]

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
        self.apply(seqs, trees, items, self.verifier.forward(items))
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
        logits = self._forwards.submit(self.verifier.forward, items)
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
        self, seqs: list[Sequence], trees: list[TokenTree], items: list[VerifyItem], logits: list[torch.Tensor]
    ) -> None:
        """Verify each tree against the LLM's logits, commit the accepted path, end finished requests."""
        for seq, tree, item, node_logits in zip(seqs, trees, items, logits):
            accepted, bonus = self._verify(seq, tree, node_logits)
            chain_len = len(item.tokens) - len(tree)
            keep = [*range(chain_len), *(chain_len + n for n in [0, *accepted])]
            self.verifier.commit(seq.request_id, keep)
            seq.num_cached += len(keep)
            seq.stats.steps += 1
            seq.stats.drafted_tokens += tree.num_drafted
            seq.stats.accepted_tokens += len(accepted)
            depths = seq.stats.accepted_at_depth
            depths.extend([0] * (len(accepted) - len(depths)))
            for d in range(len(accepted)):
                depths[d] += 1
            self._append(seq, [tree.tokens[n] for n in accepted] + [bonus])
            if seq.finished:
                self._finish(seq)

    def _verify(self, seq: Sequence, tree: TokenTree, logits: torch.Tensor) -> tuple[list[int], int]:
        params = seq.params
        if params.greedy:
            return verify_greedy(tree, logits)
        target = sampling_probs(logits, params.temperature, params.top_k, params.top_p)
        return VERIFIERS[self.verify](tree, target, seq.generator)

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

    def _append(self, seq: Sequence, tokens: Iterable[int]) -> None:
        """Add verified tokens, ending the request at EOS, a stop string or max_tokens."""
        for token in tokens:
            seq.output_ids.append(token)
            if token in self.eos_ids and not seq.params.ignore_eos:
                seq.finish_reason = FinishReason.STOP
            elif seq.params.stop and self._cut_at_stop(seq):
                seq.finish_reason = FinishReason.STOP
            elif seq.remaining == 0:
                seq.finish_reason = FinishReason.LENGTH
            if seq.finished:
                break
        seq.stats.generated_tokens = len(seq.output_ids)

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


def model_free_drafter(name: str, spec: TreeSpec) -> Drafter:
    """``ngram`` or ``ngram:<widths>``; without widths, a chain as deep as the SSMs' tree."""
    kind, _, widths = name.partition(":")
    if kind != "ngram":
        raise InvalidConfigError(f"unknown drafter {name!r}; model-free drafters: ngram[:widths]")
    own = TreeSpec.parse(widths, spec.token_budget) if widths else TreeSpec((1,) * spec.depth, spec.token_budget)
    return NgramDrafter(own)


def _tree_spec(tree: str | Seq[int] | TreeSpec | None, budget: int) -> TreeSpec:
    if isinstance(tree, TreeSpec):
        return tree
    if tree is None:
        return TreeSpec(token_budget=budget)
    if isinstance(tree, str):
        return TreeSpec.parse(tree, budget)
    return TreeSpec(tuple(tree), budget)


def eos_ids(model_dir: Path, config, tokenizer) -> set[int]:
    """EOS as Hugging Face generate() sees it (generation_config.json, else config), plus the tokenizer's."""
    try:
        generation_eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:  # no generation_config.json
        generation_eos = None
    ids = set()
    for value in (generation_eos, config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return ids
