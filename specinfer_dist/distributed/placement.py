"""Where things run: joining or starting Ray, and reserving each stage's resources.

Verifier shards go in one STRICT_PACK placement group (tensor parallelism all-reduces twice
per layer, so its ranks share a node: on Kubernetes, one pod with ``tp`` GPUs); draft workers
in a SPREAD group (anywhere, preferably apart). A shard takes ``gpus_per_shard`` and a draft
worker ``gpus_per_draft_worker`` (fractions share a GPU) of ``gpu_resource``: "GPU" on real
clusters, a custom resource on CPU-only machines, so CI exercises the same placement without
GPUs (Ray does not allow declaring "GPU" where there are none). A stage computes on CUDA
exactly when its bundle holds real GPUs (``stage_device``); otherwise on CPU (gloo for TP).
"""

from __future__ import annotations

import math
import os
from dataclasses import replace
from typing import Any

import ray
from ray.util.placement_group import (
    PlacementGroup,
    placement_group,
    remove_placement_group,
)
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from specinfer_dist.config import ClusterConfig
from specinfer_dist.errors import InvalidConfigError

COORDINATOR_CPUS = 1  # the coordinator merges trees and verifies tokens against the logits
RESERVE_TIMEOUT_S = 60


def connect(cluster: ClusterConfig) -> None:
    """Join ``cluster.address``, or start a Ray instance private to this process.

    Ray 2.60 turns token authentication on for a Ray it starts itself (token in
    ~/.ray/auth_token). Joining an address needs RAY_AUTH_MODE=token and the cluster's
    token in the environment or that file: see deploy/ray-cluster.md.
    """
    if ray.is_initialized():  # e.g. inside a Ray Serve replica
        return
    if cluster.address:
        ray.init(address=cluster.address)
        return
    # Logical CPUs only gate scheduling: on a small machine oversubscribe instead of refusing to start.
    needed = cluster.tp * cluster.cpus_per_shard + cluster.draft_workers * cluster.cpus_per_draft_worker + COORDINATOR_CPUS
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False)


def resolve_gpus(cluster: ClusterConfig) -> ClusterConfig:
    """``gpus_per_shard`` None: one per shard if the cluster has any, else CPU shards."""
    if cluster.gpus_per_shard is not None:
        return cluster
    return replace(cluster, gpus_per_shard=1.0 if ray.cluster_resources().get(cluster.gpu_resource) else 0.0)


def bundles(cluster: ClusterConfig) -> tuple[list[dict[str, float]], list[dict[str, float]]]:
    """The verifier shards' bundles (one per rank, packed on one node) and the draft workers'."""
    shard = {"CPU": cluster.cpus_per_shard, cluster.gpu_resource: cluster.gpus_per_shard}
    draft = {"CPU": cluster.cpus_per_draft_worker, cluster.gpu_resource: cluster.gpus_per_draft_worker}
    return (
        [{k: v for k, v in shard.items() if v}] * cluster.tp,
        [] if cluster.colocate_drafters else [{k: v for k, v in draft.items() if v}] * cluster.draft_workers,
    )


def coordinator_options(cluster: ClusterConfig) -> dict[str, Any]:
    """``.options()`` for the Coordinator: it holds the drafters' GPU share when it hosts them.
    On one GPU, ``gpus_per_shard + gpus_per_draft_worker <= 1`` puts them beside verifier rank 0."""
    gpus = cluster.gpus_per_draft_worker if cluster.colocate_drafters else 0
    options: dict[str, Any] = {"num_cpus": COORDINATOR_CPUS}
    if gpus and cluster.gpu_resource == "GPU":
        options["num_gpus"] = gpus
    elif gpus:
        options["resources"] = {cluster.gpu_resource: gpus}
    return options


def stage_device(cluster: ClusterConfig, gpus: float | None) -> str:
    """Where a stage holding ``gpus`` of ``gpu_resource`` computes: CUDA only for real GPUs."""
    return "cuda" if gpus and cluster.gpu_resource == "GPU" else "cpu"


def reserve(cluster: ClusterConfig) -> list[PlacementGroup]:
    """Placement groups for the verifier shards and (unless co-located) the draft workers, or a
    clear error."""
    shard, draft = bundles(cluster)
    groups = [placement_group(shard, strategy="STRICT_PACK")]
    if draft:
        groups.append(placement_group(draft, strategy="SPREAD"))
    ready, _ = ray.wait([g.ready() for g in groups], num_returns=len(groups), timeout=RESERVE_TIMEOUT_S)
    if len(ready) < len(groups):
        for group in groups:
            remove_placement_group(group)
        raise InvalidConfigError(
            f"the Ray cluster cannot place {cluster.tp} verifier shard(s) of {shard[0]} on one node and "
            f"{len(draft)} draft worker(s) of {draft[0] if draft else {}} "
            f"(it has {_resources(cluster)} in all, some perhaps in use)"
        )
    return groups


def _resources(cluster: ClusterConfig) -> dict[str, float]:
    total = ray.cluster_resources()
    return {name: total.get(name, 0) for name in ("CPU", cluster.gpu_resource)}


def actor_options(cluster: ClusterConfig, pg: PlacementGroup, bundle: int, cpus: float, gpus: float) -> dict[str, Any]:
    """``.options()`` for an actor in bundle ``bundle`` of ``pg``."""
    options: dict[str, Any] = {
        "num_cpus": cpus,
        "scheduling_strategy": PlacementGroupSchedulingStrategy(pg, placement_group_bundle_index=bundle),
    }
    if gpus and cluster.gpu_resource == "GPU":
        options["num_gpus"] = gpus  # Ray then sets CUDA_VISIBLE_DEVICES for the actor
    elif gpus:
        options["resources"] = {cluster.gpu_resource: gpus}
    return options
