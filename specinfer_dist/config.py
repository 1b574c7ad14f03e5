"""One configuration system: dataclasses, loadable from YAML (see configs/), overridable by flags."""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import yaml

from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.tree.spec import DEFAULT_TOKEN_BUDGET

DEFAULT_BLOCK_SIZE = 16  # token rows per KV block
DEFAULT_GPU_MEMORY_UTILIZATION = 0.9  # fraction of a GPU's memory the process may fill (weights + KV pool)


class _Section:
    """A YAML section as a dataclass: unknown keys are errors, not silently ignored."""

    SECTION = ""

    @classmethod
    def from_dict(cls, data: dict[str, Any]):
        unknown = set(data) - {f.name for f in fields(cls)}
        if unknown:
            raise InvalidConfigError(f"unknown {cls.SECTION} option(s): {', '.join(sorted(unknown))}")
        return cls(**data)


@dataclass
class EngineConfig(_Section):
    SECTION = "engine"

    llm: str = "default"  # "default", a HF checkpoint dir, a .gguf file or a hub id
    ssms: list[str] | None = None  # None: the default SSM for the default LLM, none otherwise
    drafters: list[str] = field(default_factory=list)  # model-free drafters, e.g. "ngram" or "ngram:2,1,1,1"
    tree: str = "auto"  # measured on this machine once (tuning/tune.py), or widths like "1,1,3,1,1,1,1,1"
    tree_budget: int = DEFAULT_TOKEN_BUDGET
    mode: str | None = None  # incremental | sequence | tree; None: tree when there is an SSM
    verify: str = "mss"  # how sampled requests are verified: mss | naive
    draft_temperature: float | None = None  # None: SSMs sample with each request's own transforms
    draft_vocab: bool = True  # SSM heads score only their draft_vocab.json tokens (False: all)
    dtype: str = "float32"
    max_num_seqs: int = 16
    speculation_max_batch: int | None = None  # more requests running: no drafting (None: always draft)
    kv_blocks: int | None = None  # LLM KV pool size in blocks; None: from memory (1 GiB on CPU, see gpu_memory_utilization)
    kv_block_size: int = DEFAULT_BLOCK_SIZE  # tokens per KV block
    gpu_memory_utilization: float = DEFAULT_GPU_MEMORY_UTILIZATION  # CUDA: the KV pool fills this fraction of device memory after the weights


@dataclass
class ServeConfig(_Section):
    """How ``specinfer-dist serve`` and ``specinfer_dist.serve:build_app`` expose the engine."""

    SECTION = "serve"

    runtime: str = "local"  # local: the engine runs in each replica; ray: a Coordinator + actors per replica
    model_name: str | None = None  # the id clients pass as "model"; None: the LLM source's name
    host: str = "127.0.0.1"  # HTTP bind address (`specinfer-dist serve`; Serve config files set their own)
    port: int = 8000  # HTTP (OpenAI API)
    grpc_port: int = 9000  # gRPC (specinfer.v1 + grpc.health.v1); Serve binds it on all interfaces
    api_key: str | None = None  # None: $SPECINFER_API_KEY, else api_key_file; neither: no auth
    api_key_file: str | None = None  # None: $SPECINFER_API_KEY_FILE (e.g. a mounted Kubernetes Secret)
    max_request_bytes: int = 1 << 20  # larger HTTP bodies get 413
    default_max_tokens: int = 256  # chat requests without max_tokens (completions default to 16, as OpenAI)
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
    pipeline: bool = True  # overlap drafting half of the batch with verifying the other half
    gpus_per_shard: float | None = None  # None: 1 if the cluster has any `gpu_resource`, else 0 (CPU + gloo)
    gpu_resource: str = "GPU"  # resource a shard's GPU is counted in; CPU-only CI simulates GPUs with a custom one
    cpus_per_shard: float = 1  # also the shard's torch threads
    cpus_per_draft_worker: float = 1  # draft workers run their SSMs on CPU
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
