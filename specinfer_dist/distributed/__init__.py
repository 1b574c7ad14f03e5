"""The Ray runtime: tensor-parallel verifier shards, draft workers and a pipelining coordinator."""

from specinfer_dist.distributed.coordinator import Coordinator, CoordinatorClient

__all__ = ["Coordinator", "CoordinatorClient"]
