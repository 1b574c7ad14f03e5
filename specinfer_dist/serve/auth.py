"""Optional API key: ``Authorization: Bearer <key>`` on HTTP, the same pair as gRPC metadata."""

from __future__ import annotations

import hmac
import os
from pathlib import Path

from specinfer_dist.config import ServeConfig
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.serve.api_errors import ApiError

API_KEY_ENV = "SPECINFER_API_KEY"
API_KEY_FILE_ENV = "SPECINFER_API_KEY_FILE"


def resolve_api_key(config: ServeConfig) -> str | None:
    """The key clients must present, looked up in the replica's own environment so it never
    travels in a Serve config: the config's value, else $SPECINFER_API_KEY, else the file
    named by ``api_key_file`` / $SPECINFER_API_KEY_FILE. None: no authentication."""
    key = config.api_key or os.environ.get(API_KEY_ENV)
    path = config.api_key_file or os.environ.get(API_KEY_FILE_ENV)
    if not key and path:
        try:
            key = Path(path).read_text().strip()
        except OSError as err:
            raise InvalidConfigError(f"cannot read the API key file {path}: {err}") from None
        if not key:
            raise InvalidConfigError(f"the API key file {path} is empty")
    return key or None


def check_api_key(expected: str | None, authorization: str | None) -> None:
    """Raise 401 unless ``authorization`` is ``Bearer <expected>`` (or no key is configured)."""
    if expected is None:
        return
    scheme, _, presented = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(presented.strip().encode(), expected.encode()):
        raise ApiError(
            401, "Missing or incorrect API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key"
        )
