"""Ray Serve application: OpenAI-compatible HTTP, gRPC (specinfer.v1), metrics and API-key auth.

``specinfer_dist.serve:build_app`` is the import path for ``serve run`` / Serve config files.
"""

from typing import Any

__all__ = ["build_app", "make_app"]


def __getattr__(name: str) -> Any:
    # Lazy: the CLI imports this package for its parser, and Ray Serve is slow to import.
    if name in __all__:
        from specinfer_dist.serve import app

        return getattr(app, name)
    raise AttributeError(name)
