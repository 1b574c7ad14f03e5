"""One error type for both protocols: an HTTP status with OpenAI's error body, and a gRPC code."""

from __future__ import annotations

from typing import Any

import grpc

from specinfer_dist.engine.async_engine import EngineStepError
from specinfer_dist.errors import EngineOverloadedError, SpecInferError

_GRPC_CODES = {
    400: grpc.StatusCode.INVALID_ARGUMENT,
    401: grpc.StatusCode.UNAUTHENTICATED,
    404: grpc.StatusCode.NOT_FOUND,
    413: grpc.StatusCode.RESOURCE_EXHAUSTED,
    429: grpc.StatusCode.RESOURCE_EXHAUSTED,
    500: grpc.StatusCode.INTERNAL,
    503: grpc.StatusCode.UNAVAILABLE,  # the replica is still loading its model
}
RETRY_AFTER = {"Retry-After": "2"}  # sent with every 503: seconds to wait (the OpenAI SDKs honour it)


class ApiError(Exception):
    def __init__(
        self, status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    @property
    def grpc_code(self) -> grpc.StatusCode:
        return _GRPC_CODES.get(self.status, grpc.StatusCode.UNKNOWN)

    @property
    def headers(self) -> dict[str, str]:
        return RETRY_AFTER if self.status == 503 else {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    @classmethod
    def of(cls, err: Exception) -> "ApiError":
        """The client-facing form of anything a request can raise."""
        if isinstance(err, ApiError):
            return err
        if isinstance(err, EngineOverloadedError):  # the queue is full now: try again later
            return cls(429, str(err), type="rate_limit_error", code="engine_overloaded")
        if isinstance(err, SpecInferError):  # the engine's verdict on the request
            return cls(400, str(err))
        if isinstance(err, EngineStepError):
            return cls(500, str(err), type="server_error")
        return cls(500, f"internal error: {type(err).__name__}", type="server_error")
