"""Build an engine's parts from an ``EngineConfig``: load the LLM and the SSMs, restrict draft
vocabularies, resolve ``tree="auto"``, make the drafters.

This is the one place that turns options into objects. ``LLMEngine.from_config`` and the Ray
runtime both build through it; the engine itself only runs the parts it is given. Each step
is its own function, so a process that needs only some parts (a draft worker needs drafters,
not a verifier) builds only those.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from transformers import GenerationConfig

from specinfer_dist.config import EngineConfig
from specinfer_dist.drafters.base import Drafter
from specinfer_dist.drafters.feature import FeatureDrafter
from specinfer_dist.drafters.ngram import NgramDrafter
from specinfer_dist.drafters.ssm import SSMDrafter
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.models.default import feature_drafter_source, ssm_sources
from specinfer_dist.models.draft_vocab import read_draft_vocab, restrict_head
from specinfer_dist.models.eagle3 import Eagle3Head, load_eagle3
from specinfer_dist.models.loader import check_same_vocabulary, load_model
from specinfer_dist.models.transformer import Transformer
from specinfer_dist.progress import say
from specinfer_dist.runtime.device import default_dtype, default_max_batched_tokens, resolve_device
from specinfer_dist.runtime.sampling_params import SAMPLING_DEFAULT_FIELDS
from specinfer_dist.runtime.verifier import LocalVerifier, Verifier
from specinfer_dist.tree.spec import TreeSpec
from specinfer_dist.tuning.budget import TUNE_SHARE, budget_seconds
from specinfer_dist.tuning.tune import auto_tree


@dataclass
class Target:
    """The loaded LLM and what requests need from its checkpoint."""

    model: Transformer
    tokenizer: Any
    model_dir: Path
    eos_ids: set[int]
    sampling_defaults: dict[str, Any]  # from generation_config.json (empty with generation_config "none")


@dataclass
class DraftPlan:
    """What to draft with: the mode, the tree shape, and the SSMs that draft it."""

    mode: str
    spec: TreeSpec
    ssms: list[Transformer] = field(default_factory=list)


@dataclass
class EngineParts:
    """Keyword arguments of ``LLMEngine``."""

    tokenizer: Any
    model_config: Any
    eos_ids: set[int]
    sampling_defaults: dict[str, Any]
    verifier: Verifier
    drafters: list[Drafter]
    spec: TreeSpec
    mode: str
    verify: str
    max_num_seqs: int
    speculation_max_batch: int | None
    max_num_batched_tokens: int | None
    max_queued_seqs: int | None
    max_seqs_per_request: int | None
    grammar_draft_tokens: int


def load_target(config: EngineConfig, progress: bool = False, weights: bool = True) -> Target:
    """The LLM on ``config.device`` in ``config.dtype`` (defaults: runtime/device.py). Without
    ``weights`` it stays on the meta device (a process that only drafts: SSMs read the tensors
    they share from its checkpoint)."""
    device = resolve_device(config.device)
    dtype = config.dtype or default_dtype(device)
    start = time.perf_counter()
    say(f"loading the LLM ({config.llm}) on {device.type}, {str(dtype).removeprefix('torch.')}", "loading the LLM", progress)
    model, tokenizer, model_dir = load_model(config.llm, dtype=dtype, device=device, progress=progress, weights=weights)
    say(f"loaded the LLM in {time.perf_counter() - start:.1f} s", "loading the LLM", progress)
    defaults = sampling_defaults(model_dir) if config.generation_config == "auto" else {}
    return Target(model, tokenizer, model_dir, eos_ids(model_dir, model.config, tokenizer), defaults)


def load_ssms(config: EngineConfig, target: Target, progress: bool = False) -> list[Transformer]:
    """The configured SSMs, checked against the LLM's vocabulary. SSMs trained by boost-tuning
    take their embedding and head from the LLM (the same tensors, no copy)."""
    ssms = []
    param = target.model.model.norm.weight  # never shared, so it shows the LLM's dtype and device even on meta
    device = resolve_device(config.device)
    for source in ssm_sources(config.llm, config.ssms):
        model, tokenizer, model_dir = load_model(
            source, dtype=param.dtype, device=device, progress=progress, shared_from=target.model
        )
        check_same_vocabulary(target.tokenizer, tokenizer, target.model.config, model.config, source)
        token_ids = read_draft_vocab(model_dir, model.config.vocab_size) if config.draft_vocab else None
        if token_ids is not None:  # score only the tokens the LLM emits often (models/draft_vocab.py)
            restrict_head(model, token_ids)
        ssms.append(model)
    return ssms


def load_feature_head(config: EngineConfig, target: Target) -> Eagle3Head | None:
    """The configured EAGLE-3 head on ``config.device`` in the LLM's dtype, sharing what it omits
    from the LLM (read from its checkpoint if ``target`` was loaded without weights)."""
    if config.feature_drafter is None:
        return None
    source = feature_drafter_source(config.llm, config.feature_drafter)
    dtype = target.model.model.norm.weight.dtype  # never shared, so the LLM's dtype even on meta
    return load_eagle3(source, target.model, dtype, resolve_device(config.device))


def plan_drafting(config: EngineConfig, target: Target, ssms: list[Transformer], progress: bool = False) -> DraftPlan:
    """Mode and tree for these drafters. ``tree="auto"`` runs the cost model here (tuning/tune.py,
    cached), which may keep only some SSMs, or none (then decoding is incremental); a feature
    drafter drafts with the chosen shape. Whether a dynamic tree or the feature drafter pays is
    raced end to end before (``races_tree``, tuning/race.py, from ``LLMEngine.from_config``)."""
    has_drafters = bool(ssms or config.drafters or config.feature_drafter)
    mode = config.mode or ("tree" if has_drafters else "incremental")
    if mode != "incremental" and not has_drafters:
        raise InvalidConfigError(f"mode {mode!r} needs at least one SSM or drafter")
    if mode == "incremental":  # the shape is unused: any that fits the budget
        return DraftPlan("incremental", config.tree_spec or TreeSpec((1,), config.tree_budget))
    spec = config.tree_spec
    if spec is None and ssms:
        if target.model.model.norm.weight.is_meta:
            raise InvalidConfigError("tree 'auto' is measured where the LLM runs: resolve it there (the verifier) first")
        key = [config.llm, *ssm_sources(config.llm, config.ssms), f"draft_vocab={config.draft_vocab}"]
        # The cost model's share of tuning_budget_s; the race (which builds this) spends the rest.
        seconds = TUNE_SHARE * budget_seconds(config.tuning_budget_s, resolve_device(config.device))
        spec, chosen = auto_tree(target.model, target.tokenizer, ssms, key, config.tree_budget, progress,
                                 seconds=seconds)
        ssms = [ssms[i] for i in chosen]
        if spec is None:  # speculation would not pay on this machine
            return DraftPlan("incremental", TreeSpec((1,), config.tree_budget))
    # Without SSMs there is nothing to measure: model-free drafters use the default shape.
    spec = spec or TreeSpec(token_budget=config.tree_budget)
    return DraftPlan(mode, spec.as_sequence() if mode == "sequence" else spec, ssms)


def load_drafting(config: EngineConfig, target: Target, progress: bool = False) -> tuple[DraftPlan, Eagle3Head | None]:
    """What the drafters are made from (``make_drafters``): the plan with its SSMs, and the
    feature head; neither loads anything when decoding is incremental."""
    drafting = config.mode != "incremental"
    ssms = load_ssms(config, target, progress) if drafting else []
    head = load_feature_head(config, target) if drafting else None
    return plan_drafting(config, target, ssms, progress), head


def races_tree(config: EngineConfig) -> bool:
    """Whether ``tree: auto`` races setups end to end (tuning/race.py): when a model drafts
    (SSMs or a feature drafter), whose dynamic trees the cost model cannot rank."""
    return (config.tree == "auto" and config.mode != "incremental"
            and bool(ssm_sources(config.llm, config.ssms) or config.feature_drafter))


def make_drafters(config: EngineConfig, plan: DraftPlan, feature_head: Eagle3Head | None = None) -> list[Drafter]:
    """The drafters; a feature drafter needs its loaded head. It reads the hidden states of the
    verifier's forward, so it runs where they arrive: beside a local verifier, or in the Ray
    runtime's coordinator (fed by verifier rank 0), never in a separate draft worker."""
    if plan.mode == "incremental":
        return []
    caching = config.enable_prefix_caching
    drafters: list[Drafter] = [
        SSMDrafter(model, plan.spec, f"ssm{i}", config.draft_temperature, caching, config.draft_confidence)
        for i, model in enumerate(plan.ssms)
    ]
    drafters.extend(model_free_drafter(name, plan.spec) for name in config.drafters)
    if config.feature_drafter is not None:
        if feature_head is None:
            raise InvalidConfigError("a feature drafter needs its head loaded (load_feature_head)")
        drafters.append(FeatureDrafter(feature_head, plan.spec, "feature", config.draft_temperature, caching,
                                       config.draft_confidence))
    return drafters


def model_free_drafter(name: str, spec: TreeSpec) -> Drafter:
    """``ngram`` or ``ngram:<widths>``; without widths, a chain as deep as the SSMs' tree."""
    kind, _, widths = name.partition(":")
    if kind != "ngram":
        raise InvalidConfigError(f"unknown drafter {name!r}; model-free drafters: ngram[:widths]")
    own = TreeSpec.parse(widths, spec.token_budget) if widths else TreeSpec((1,) * spec.depth, spec.token_budget)
    return NgramDrafter(own)


@dataclass
class Drafting:
    """How an engine drafts: its mode, tree shape and drafters (``LLMEngine.switch_drafting``;
    ``tuning.race.describe`` names it)."""

    mode: str
    spec: TreeSpec
    drafters: list[Drafter]


def build_drafting(config: EngineConfig, target: Target, progress: bool = False) -> Drafting:
    """The drafters ``config`` asks for, beside ``target`` (loaded here, in this process)."""
    plan, head = load_drafting(config, target, progress)
    return Drafting(plan.mode, plan.spec, make_drafters(config, plan, head))


def build_parts(config: EngineConfig, progress: bool = False, target: Target | None = None) -> EngineParts:
    """Everything a single-process engine needs: the LLM verifies here, the drafters draft here.
    Engines built from one ``target`` share its weights (each has its own KV caches)."""
    target = target or load_target(config, progress)
    drafting = build_drafting(config, target, progress)
    return EngineParts(
        tokenizer=target.tokenizer,
        model_config=target.model.config,
        eos_ids=target.eos_ids,
        sampling_defaults=target.sampling_defaults,
        verifier=LocalVerifier(
            target.model, config.kv_blocks, config.kv_block_size, config.max_num_seqs, config.gpu_memory_utilization,
            enforce_eager=config.enforce_eager, prefix_caching=config.enable_prefix_caching,
        ),
        drafters=drafting.drafters,
        spec=drafting.spec,
        mode=drafting.mode,
        **scheduling_options(config),
    )


def scheduling_options(config: EngineConfig) -> dict[str, Any]:
    """The ``LLMEngine`` arguments taken from the config, wherever its parts run (``config.device``:
    where the LLM runs, which sets the ``auto`` step budget)."""
    budget = config.max_num_batched_tokens
    if budget == "auto":
        budget = default_max_batched_tokens(resolve_device(config.device))
    return {
        "verify": config.verify,
        "max_num_seqs": config.max_num_seqs,
        "speculation_max_batch": config.speculation_max_batch,
        "max_num_batched_tokens": budget,
        "max_queued_seqs": config.max_queued_seqs,
        "max_seqs_per_request": config.max_seqs_per_request,
        "grammar_draft_tokens": config.grammar_draft_tokens,
    }


def eos_ids(model_dir: Path, config: Any, tokenizer: Any) -> set[int]:
    """EOS as Hugging Face generate() sees it (generation_config.json, else config), plus the tokenizer's."""
    generation = _generation_config(model_dir)
    ids = set()
    for value in (generation and generation.eos_token_id, config.eos_token_id, tokenizer.eos_token_id):
        if value is not None:
            ids.update(value if isinstance(value, list) else [value])
    return ids


def sampling_defaults(model_dir: Path) -> dict[str, Any]:
    """The sampling fields the model's authors set in generation_config.json (vLLM's
    ``--generation-config auto``): values HF's own defaults would not give."""
    generation = _generation_config(model_dir)
    if generation is None:
        return {}
    diff = generation.to_diff_dict()
    return {name: diff[name] for name in SAMPLING_DEFAULT_FIELDS if diff.get(name) is not None}


def _generation_config(model_dir: Path) -> GenerationConfig | None:
    try:
        return GenerationConfig.from_pretrained(model_dir)
    except OSError:  # no generation_config.json
        return None
