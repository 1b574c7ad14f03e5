"""One configuration system: dataclasses, loadable from YAML (see configs/), overridable by flags."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.tree.spec import DEFAULT_TOKEN_BUDGET, TreeSpec

DEFAULT_BLOCK_SIZE = 16  # token rows per KV block
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # fraction of a GPU's memory the process may fill (weights + KV pool)


MODES = ("incremental", "sequence", "tree")
VERIFY_METHODS = ("mss", "naive")  # how sampled requests are verified (greedy ones always greedily)
DTYPES = ("float32", "bfloat16", "float16")
DEVICES = ("auto", "cpu", "cuda")
GENERATION_CONFIGS = ("auto", "none")


def option(default: Any, help: str, race: bool = False, **cli: Any) -> Any:
    """A config field with its command-line help; ``cli`` tweaks the derived flag (``flag``,
    ``choices``, ``const`` for a store-const flag, ``metavar``). ``race``: the outcome of
    ``tree: auto`` depends on it, so its tuning results are kept per value (tuning/cache.py;
    ``add_options`` reads only the keys above)."""
    factory = {"default_factory": lambda: list(default)} if isinstance(default, list) else {"default": default}
    return field(metadata={"help": help, "race": race, **cli}, **factory)


class _Section:
    """A YAML section as a dataclass: unknown keys are errors, not silently ignored."""

    SECTION = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidConfigError(f"unknown {cls.SECTION} option(s): {', '.join(sorted(unknown))}")
        return cls(**data)

    def replace(self, **changes: Any):
        """A copy with these fields changed, validated like the original."""
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise InvalidConfigError(f"unknown {self.SECTION} option(s): {', '.join(sorted(unknown))}")
        return dataclasses.replace(self, **changes)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise InvalidConfigError(message)


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


@dataclass
class EngineConfig(_Section):
    """Every engine option, its default and its validation: the Python API, YAML files and the
    CLI of ``generate``, ``bench``, ``serve`` and ``tune-tree`` all read this one declaration
    (flags are derived from it by ``add_options``). A bad value fails here, before any model
    or Ray actor starts, with the same message from every entry point."""

    SECTION = "engine"

    llm: str = option("default", "'default', a HF checkpoint dir, a .gguf file or a hub id", race=True)
    ssms: list[str] | None = option(
        None, "SSM source; repeat for several ('none': no SSM). Default: the shipped SSMs for the default LLM, "
        "none otherwise", race=True, flag="--ssm")
    drafters: list[str] = option([], "model-free drafter: ngram or ngram:<widths>; repeat for several", race=True,
                                 flag="--drafter")
    tree: str = option("auto", "auto (measured on this machine once, cached: the cost model's tree, raced "
                       "against incremental decoding and dynamic trees), children per node at each depth, "
                       "e.g. 1,1,3,1,1,1,1,1, or dynamic[:K,DEPTH] (EAGLE-2: the best tree-budget nodes)")
    tree_budget: int = option(DEFAULT_TOKEN_BUDGET, "most drafted tokens per request per step", race=True)
    mode: str | None = option(None, "incremental | sequence | tree (default: tree with a drafter)", race=True,
                              choices=MODES)
    verify: str = option("mss", "verifier for sampled requests", choices=VERIFY_METHODS)
    draft_temperature: float | None = option(None, "SSM sampling temperature (default: each request's own)",
                                             race=True)
    draft_confidence: float = option(
        0.0, "SSM and EAGLE-3 drafters propose a token only where they give it at least this probability "
        "(sampled requests: draw only where their most probable token has it; exact either way); 0: the whole tree. "
        "Where every verified row costs (a CPU) unlikely drafts cost more than they bring", race=True)
    draft_vocab: bool = option(True, "SSM heads score the whole vocabulary, not their draft_vocab.json",
                               race=True, flag="--full-draft-vocab", const=False)
    dtype: str | None = option(None, "model dtype (default: bfloat16 on CUDA, float32 on CPU)", race=True,
                               choices=DTYPES)
    device: str = option("auto", "where the LLM and SSMs run (auto: a GPU when torch sees one)", race=True,
                         choices=DEVICES)
    max_num_seqs: int = option(16, "requests decoded together per step")
    speculation_max_batch: int | None = option(
        None, "with more requests running, decode without drafting (default: always draft)")
    max_num_batched_tokens: int | str | None = option(
        "auto", "most LLM tokens per step: decode/verify rows of running requests first, then prompt chunks "
        "(chunked prefill: a long prompt is prefilled over several steps). auto: 2048 on CUDA, 128 on a CPU; "
        "None (YAML null): each prompt in one step")
    max_queued_seqs: int | None = option(
        256, "most sequences waiting for a place in the running batch; beyond it serving refuses new ones (429); "
        "None: no limit")
    max_seqs_per_request: int = option(64, "most sequences (prompts x n) one serving request may start")
    kv_blocks: int | None = option(
        None, "LLM KV pool size in blocks (default: from memory: 1 GiB on a CPU, gpu_memory_utilization on a GPU)")
    kv_block_size: int = option(DEFAULT_BLOCK_SIZE, "tokens per KV block")
    enable_prefix_caching: bool = option(
        True, "reuse the KV of prompt prefixes computed before (full blocks, shared by reference, least recently "
        "used evicted first), in the LLM and the drafters; outputs are the same either way")
    grammar_draft_tokens: int = option(
        16, "structured outputs, the grammar drafter: most tokens a request's grammar forces that are drafted per "
        "step below its tree's leaves, within the rows reserved for the tree (verified like any draft; incremental "
        "decoding drafts none); tokens that are the only ones allowed are appended without a forward, in every "
        "mode. 0: off")
    gpu_memory_utilization: float = option(
        DEFAULT_GPU_MEMORY_UTILIZATION, "CUDA: fraction of device memory for weights + KV pool (sizes the pool)")
    enforce_eager: bool = option(
        False, "run every step's forward eagerly: no CUDA graphs (they are captured per batch/token bucket on CUDA)",
        race=True)
    generation_config: str = option(
        "auto", "auto: requests that leave temperature/top_p/top_k unset get the model's generation_config.json "
        "values; none: the OpenAI defaults", choices=GENERATION_CONFIGS)
    # An EAGLE-3 head (models/eagle3.py) merged with the other drafters; it reads the LLM's hidden states.
    feature_drafter: str | None = option(
        None, "EAGLE-3 head directory (the format vLLM and SGLang load), or 'default': the head shipped "
        "for the default LLM", race=True)
    tuning_budget_s: float | str = option(
        "auto", "seconds tree auto may spend measuring on this machine, cost sweep and race together (once; the "
        "result is cached). auto: 20 on a CPU, 5 on CUDA; 0: the least that still compares every setup")

    def __post_init__(self) -> None:
        _check(isinstance(self.llm, str) and bool(self.llm), f"llm must be a model source, got {self.llm!r}")
        for name in ("ssms", "drafters"):
            value = getattr(self, name)
            _check(value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value)),
                   f"{name} must be a list of strings, got {value!r}")
        _check(self.mode is None or self.mode in MODES, f"mode must be one of {', '.join(MODES)}, got {self.mode!r}")
        _check(self.verify in VERIFY_METHODS,
               f"verify must be one of {', '.join(VERIFY_METHODS)}, got {self.verify!r}")
        _check(self.dtype is None or self.dtype in DTYPES, f"dtype must be one of {', '.join(DTYPES)}, got {self.dtype!r}")
        _check(self.device in DEVICES, f"device must be one of {', '.join(DEVICES)}, got {self.device!r}")
        _check(self.generation_config in GENERATION_CONFIGS,
               f"generation_config must be one of {', '.join(GENERATION_CONFIGS)}, got {self.generation_config!r}")
        for name in ("tree_budget", "max_num_seqs", "kv_block_size", "max_seqs_per_request"):
            _check(_positive_int(getattr(self, name)), f"{name} must be a positive integer, got {getattr(self, name)!r}")
        budget = self.max_num_batched_tokens
        _check(budget in (None, "auto") or _positive_int(budget),
               f"max_num_batched_tokens must be a positive integer, 'auto' or null, got {budget!r}")
        _check(type(self.grammar_draft_tokens) is int and self.grammar_draft_tokens >= 0,
               f"grammar_draft_tokens must be an integer >= 0, got {self.grammar_draft_tokens!r}")
        for name in ("speculation_max_batch", "kv_blocks", "max_queued_seqs"):
            value = getattr(self, name)
            _check(value is None or _positive_int(value), f"{name} must be a positive integer, got {value!r}")
        u = self.gpu_memory_utilization
        _check(isinstance(u, (int, float)) and 0 < u <= 1, f"gpu_memory_utilization must be in (0, 1], got {u!r}")
        t = self.draft_temperature
        _check(t is None or (isinstance(t, (int, float)) and 0 < t < float("inf")),
               f"draft_temperature must be positive, got {t!r}")
        c = self.draft_confidence
        _check(isinstance(c, (int, float)) and not isinstance(c, bool) and 0 <= c <= 1,
               f"draft_confidence must be a probability in [0, 1], got {c!r}")
        for name in ("enforce_eager", "enable_prefix_caching"):
            _check(isinstance(getattr(self, name), bool), f"{name} must be true or false, got {getattr(self, name)!r}")
        _check(isinstance(self.draft_vocab, bool), f"draft_vocab must be true or false, got {self.draft_vocab!r}")
        _check(self.feature_drafter is None or (isinstance(self.feature_drafter, str) and bool(self.feature_drafter)),
               f"feature_drafter must be a directory or 'default', got {self.feature_drafter!r}")
        seconds = self.tuning_budget_s
        _check(seconds == "auto" or (isinstance(seconds, (int, float)) and not isinstance(seconds, bool)
                                     and 0 <= seconds < float("inf")),
               f"tuning_budget_s must be a number of seconds (0 or more) or 'auto', got {seconds!r}")
        _check(isinstance(self.tree, str), f"tree must be 'auto' or widths like 1,1,3,1, got {self.tree!r}")
        if self.tree != "auto":
            TreeSpec.parse(self.tree, self.tree_budget)  # raises with the reason

    @property
    def tree_spec(self) -> TreeSpec | None:
        """The fixed tree shape, or None for ``auto``."""
        return None if self.tree == "auto" else TreeSpec.parse(self.tree, self.tree_budget)


def add_options(parser: argparse.ArgumentParser, section: type[_Section]) -> None:
    """One flag per field of ``section`` (``--tree-budget`` for ``tree_budget``), none with a
    default of its own: unset flags leave the config (file or dataclass default) alone."""
    group = parser.add_argument_group(f"{section.SECTION} options (also the '{section.SECTION}:' section of --config)")
    for f in fields(section):
        meta = f.metadata
        flag = meta.get("flag", "--" + f.name.replace("_", "-"))
        kwargs: dict[str, Any] = {"dest": f.name, "help": meta["help"], "default": None}
        kind = str(f.type)
        if "const" in meta:
            kwargs.update(action="store_const", const=meta["const"])
        elif kind.startswith("bool"):
            kwargs.update(action=argparse.BooleanOptionalAction)
        elif kind.startswith("list"):
            kwargs.update(action="append")
        else:
            kwargs.update(type=float if kind.startswith("float") else int if kind.startswith("int") else str)
            if "choices" in meta:
                kwargs["choices"] = meta["choices"]
        group.add_argument(flag, **kwargs)


def apply_options(config: _Section, args: argparse.Namespace):
    """``config`` with every flag the user gave (see ``add_options``) applied and validated."""
    return config.replace(**{
        f.name: getattr(args, f.name) for f in fields(config) if getattr(args, f.name, None) is not None
    })


@dataclass
class ServeConfig(_Section):
    """How ``specinfer-dist serve`` and ``specinfer_dist.serve:build_app`` expose the engine."""

    SECTION = "serve"

    runtime: str = "local"  # local: the engine runs in each replica; ray: a Coordinator + actors per replica
    model_name: str | None = None  # the id clients pass as "model"; None: the LLM source's name
    host: str = "127.0.0.1"  # HTTP bind address (`specinfer-dist serve`; Serve config files set their own)
    port: int = 8000  # HTTP (OpenAI API)
    grpc_port: int = 9000  # gRPC (specinfer.v1 + grpc.health.v1); 0: none. Serve 2.60 binds it on all interfaces
    grpc_reflection: bool = False  # gRPC server reflection (grpcurl list/describe without the .proto)
    api_key: str | None = None  # None: $SPECINFER_API_KEY, else api_key_file; neither: no auth
    api_key_file: str | None = None  # None: $SPECINFER_API_KEY_FILE (e.g. a mounted Kubernetes Secret)
    max_request_bytes: int = 1 << 20  # larger HTTP bodies get 413
    default_max_tokens: int | None = None  # caps chat requests without max_tokens (None: the context left, as vLLM; completions: 16, as OpenAI)
    num_replicas: int = 1  # ignored when autoscaling_config is set
    autoscaling_config: dict[str, Any] | None = None  # Ray Serve's, e.g. {min_replicas: 1, max_replicas: 4}
    max_ongoing_requests: int = 64  # per replica; the engine batches up to engine.max_num_seqs of them
    ray_actor_options: dict[str, Any] = field(default_factory=lambda: {"num_cpus": 1})


@dataclass
class ClusterConfig(_Section):
    """Where the Ray runtime runs each stage (``generate --ray``, ``configs/ray.yaml``)."""

    SECTION = "cluster"

    address: str | None = None  # None: start Ray on this machine; "auto": the one `ray start` runs here; or HOST:PORT
    tp: int = 1  # tensor-parallel verifier shards, one process (and GPU) each, all on one node
    draft_workers: int = 1  # data parallelism: requests are spread over this many draft workers
    pipeline: bool = True  # a forward always in flight: verify one half of the batch while drafting the other
    gpus_per_shard: float | None = None  # None: 1 if the cluster has any `gpu_resource`, else 0 (CPU + gloo)
    gpu_resource: str = "GPU"  # resource a shard's GPU is counted in; CPU-only CI simulates GPUs with a custom one
    cpus_per_shard: float = 1  # also the shard's torch threads
    cpus_per_draft_worker: float = 1
    gpus_per_draft_worker: float = 0  # >0 (fractions share a GPU): each worker's SSMs run on that GPU
    colocate_drafters: bool = False  # drafters inside the coordinator (no Ray hop per step; draft_workers unused);
    # a feature drafter needs it (it reads the hidden states verifier rank 0 returns with the logits). Off by
    # default: with pipelining a worker drafts while the shards verify (README: measured on the CPU)
    step_timeout_s: float = 300  # a verification step (or shard group start) slower than this fails the group

    def __post_init__(self) -> None:
        if self.tp < 1 or self.draft_workers < 1:
            raise InvalidConfigError(f"tp and draft_workers must be at least 1, got {self.tp} and {self.draft_workers}")


def _section(path: str | Path, name: str) -> dict[str, Any]:
    try:
        data = yaml.safe_load(Path(path).read_text()) or {}
    except (OSError, yaml.YAMLError) as err:
        raise InvalidConfigError(f"cannot read config {path}: {err}") from None
    if not isinstance(data, dict) or not isinstance(data.get(name, {}), dict):
        raise InvalidConfigError(f"config {path} must be a mapping whose '{name}' section is a mapping")
    return data.get(name) or {}


def load_config(path: str | Path) -> EngineConfig:
    """Read the ``engine:`` section of a YAML file."""
    return EngineConfig.from_dict(_section(path, "engine"))


def load_serve_config(path: str | Path) -> ServeConfig:
    """Read the ``serve:`` section of a YAML file."""
    return ServeConfig.from_dict(_section(path, "serve"))


def load_cluster_config(path: str | Path) -> ClusterConfig:
    """Read the ``cluster:`` section of a YAML file."""
    return ClusterConfig.from_dict(_section(path, "cluster"))
