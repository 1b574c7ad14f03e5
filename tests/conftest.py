import pytest
import torch

DEFAULT_THREADS = torch.get_num_threads()


@pytest.fixture(autouse=True)
def _threads(request):
    """Tiny models run thousands of small ops, where a thread pool only adds sync cost (and
    stalls badly when other processes share the cores); the real model gets every core."""
    torch.set_num_threads(DEFAULT_THREADS if request.node.get_closest_marker("slow") else 1)
    yield
