"""Drafting on Ray: workers hosting the drafters, and the engine's stand-ins for them.

A ``DraftWorker`` builds its drafters with the same builder as a single-process LLMEngine
(engine/builder.py), on its own GPU share (``gpus_per_draft_worker``) or CPU, and no verifier:
its LLM reads no weights except the tensors its SSMs share (embedding, head), and the tree
arrives resolved (``tree: auto`` is measured on the verifier, verifier_shard.py). Several
workers give data parallelism: ``DraftPool`` spreads a step's requests over them, each request
sticking to one worker (which keeps that request's SSM KV cache), and gets every drafter's
trees in one round trip per worker. The engine sees one ``RemoteDrafter`` per hosted drafter
and merges their trees as usual.

With ``cluster.colocate_drafters`` the same ``Drafting`` is built inside the coordinator
instead (no Ray hop per step; see coordinator.py). A feature drafter (EAGLE-3 head) is built only
there: it reads the hidden states that verifier rank 0 returns with the logits, which reach the
coordinator and no worker; the coordinator refuses one without co-location.

Ray restarts a worker that dies. Until it answers again its requests move to the other
workers (whose caches then start from the prompt), or get no draft at all: the root-only
tree, which verification turns into one ordinary decoding step. Output stays exact.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Any

import ray
import torch
from ray.exceptions import RayActorError

from specinfer_dist.config import EngineConfig
from specinfer_dist.drafters.base import Drafter, DraftRequest
from specinfer_dist.engine.builder import load_drafting, load_target, make_drafters
from specinfer_dist.errors import SpecInferError
from specinfer_dist.runtime.grammar import RequestGrammars
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tree.token_tree import TokenTree

MAX_RESTARTS = 3  # a worker that keeps dying only costs speed, never correctness


@dataclass
class Drafting:
    """Drafters built in this process, the engine parts that come with them, and the LLM they
    were built against (on the meta device but for the tensors its SSMs and feature head share)."""

    drafters: list[Drafter]
    parts: dict[str, Any]  # LLMEngine arguments: tokenizer, model_config, eos_ids, sampling_defaults, spec, mode
    llm: Any

    @classmethod
    def build(cls, engine: EngineConfig) -> "Drafting":
        # The LLM never runs here: it reads only the tensors SSMs and a feature head share (and its
        # vocabulary checks them); tree: auto must arrive resolved (plan_drafting refuses to measure a meta LLM).
        target = load_target(engine, weights=False)
        plan, head = load_drafting(engine, target)
        parts = {"tokenizer": target.tokenizer, "model_config": target.model.config, "eos_ids": target.eos_ids,
                 "sampling_defaults": target.sampling_defaults, "spec": plan.spec, "mode": plan.mode}
        return cls(make_drafters(engine, plan, head), parts, target.model)

    def llm_tensors(self) -> dict[str, str]:
        """The LLM parameters this process holds in memory (name -> device)."""
        return {name: str(p.device) for name, p in self.llm.named_parameters() if not p.is_meta}


@ray.remote(max_restarts=MAX_RESTARTS, max_task_retries=0)
class DraftWorker:
    def __init__(self, engine: EngineConfig, threads: int) -> None:
        torch.set_num_threads(threads)
        try:
            built = Drafting.build(engine)
        except SpecInferError as err:  # e.g. a bad SSM path: describe() reports it as it is
            self.error: SpecInferError | None = err
            return
        self.error = None
        self.built, self.drafters, self.parts = built, built.drafters, built.parts
        # Constrained requests arrive without their grammar: rebuilt here, so drafts are masked as in the engine.
        self.grammars = RequestGrammars(self.parts["tokenizer"], self.parts["model_config"].vocab_size,
                                        self.parts["eos_ids"])

    def describe(self) -> dict[str, Any]:
        """LLMEngine arguments, and each hosted drafter's (name, spec)."""
        if self.error:
            raise self.error
        return {**self.parts, "drafters": [(d.name, d.spec) for d in self.drafters]}

    def ready(self) -> int:
        return os.getpid()

    def llm_tensors(self) -> dict[str, str]:
        """The LLM parameters this worker holds in memory (name -> device), for tests and operators."""
        return self.built.llm_tensors()

    def propose(self, requests: list[DraftRequest], max_depths: list[int], released: list[int]) -> list[list[TokenTree]]:
        """Forget ``released`` requests, then every drafter's trees for ``requests``."""
        for request_id in released:
            self.grammars.release(request_id)
            for drafter in self.drafters:
                drafter.release(request_id)
        requests = [self._with_grammar(request) for request in requests]
        return [[_compact(tree) for tree in drafter.propose(requests, max_depths)] for drafter in self.drafters]

    def _with_grammar(self, request: DraftRequest) -> DraftRequest:
        constraint = request.params.structured_outputs
        if constraint is None:
            return request
        grammar = self.grammars.grammar(request.request_id, constraint, request.tokens[request.prompt_len :])
        return replace(request, grammar=grammar)


def _compact(tree: TokenTree) -> TokenTree:
    """The tree with each node's q in its own storage: a sampled node's q is a row of its depth's
    [frontier, vocab] matrix, and pickling a view ships the whole matrix."""
    return TokenTree(tree.tokens, tree.parents, [None if q is None else q.clone() for q in tree.probs])


class DraftPool:
    """Requests spread over draft workers (see module docstring)."""

    def __init__(self, workers: list[ray.actor.ActorHandle], num_drafters: int) -> None:
        self.workers = workers
        self.num_drafters = num_drafters
        self.owner: dict[int, int] = {}  # request id -> worker index
        self.released: list[list[int]] = [[] for _ in workers]  # sent with the worker's next call
        self.probes: dict[int, ray.ObjectRef] = {}  # down worker -> its pending ready() call
        self._key: list[tuple[int, int]] | None = None
        self._trees: list[list[TokenTree]] = []

    def drafters(self, specs: list[tuple[str, TreeSpec]]) -> list[Drafter]:
        return [RemoteDrafter(self, index, name, spec) for index, (name, spec) in enumerate(specs)]

    def trees(self, index: int, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        """Drafter ``index``'s trees. The engine asks drafter 0 first: that call fetches every
        drafter's trees, and the others' calls for the same requests reuse them."""
        key = [(r.request_id, len(r.tokens)) for r in requests]
        if index == 0 or key != self._key:
            self._trees, self._key = self._propose(requests, max_depths), key
        return self._trees[index]

    def release(self, request_id: int) -> None:
        worker = self.owner.pop(request_id, None)
        if worker is not None:
            self.released[worker].append(request_id)

    def _propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[list[TokenTree]]:
        live = self._live()
        batches: dict[int, list[int]] = {}
        for i, request in enumerate(requests):
            worker = self.owner.get(request.request_id)
            if worker not in live:
                if not live:
                    continue  # nobody can draft: root-only tree
                worker = self.owner[request.request_id] = min(live, key=lambda w: len(batches.get(w, ())))
            batches.setdefault(worker, []).append(i)
        calls = {}
        for worker, rows in batches.items():
            released, self.released[worker] = self.released[worker], []
            calls[worker] = self.workers[worker].propose.remote(  # the worker rebuilds grammars (RequestGrammars)
                [requests[i].shippable() for i in rows], [max_depths[i] for i in rows], released
            )
        trees = [[TokenTree.from_root(r.tokens[-1]) for r in requests] for _ in range(self.num_drafters)]
        for worker, call in calls.items():
            try:
                result = ray.get(call)
            except RayActorError:  # died (Ray restarts it) or is restarting: no draft from it this step
                self.probes[worker] = self.workers[worker].ready.remote()
                continue
            for per_drafter, drafted in zip(trees, result):
                for i, tree in zip(batches[worker], drafted):
                    per_drafter[i] = tree
        return trees

    def _live(self) -> list[int]:
        """Workers to draft on: a down worker is back once its probe answers."""
        for worker, probe in list(self.probes.items()):
            if ray.wait([probe], timeout=0)[0]:
                try:
                    ray.get(probe)
                    del self.probes[worker]
                except RayActorError:  # still restarting (or gone for good): ask again next step
                    self.probes[worker] = self.workers[worker].ready.remote()
        return [w for w in range(len(self.workers)) if w not in self.probes]


class RemoteDrafter(Drafter):
    """The engine's handle on one drafter that the workers host (same name and tree spec)."""

    def __init__(self, pool: DraftPool, index: int, name: str, spec: TreeSpec) -> None:
        super().__init__(name, spec)
        self.pool, self.index = pool, index

    def propose(self, requests: list[DraftRequest], max_depths: list[int]) -> list[TokenTree]:
        return self.pool.trees(self.index, requests, max_depths)

    def release(self, request_id: int) -> None:
        self.pool.release(request_id)
