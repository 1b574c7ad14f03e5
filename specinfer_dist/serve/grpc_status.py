"""How a gRPC call ends with a status code of ours without a traceback in the logs.

Ray Serve 2.60 carries a status code to the client only alongside a message or an exception, so
a failing call sets its code and details on the context and raises ``StatusSet``. Serve's replica
and proxy would each log that with a traceback; ``quiet_serve_status_logs`` drops exactly those
records (the call's failure is logged once, in one line, by grpc_api). Both ``grpc_api`` (the
replica) and ``proto`` (the proxy's servicer hook) import this module, which imports neither.
"""

from __future__ import annotations

import logging

from ray.serve.exceptions import gRPCStatusError


class StatusSet(Exception):
    """Ends a call whose code and details are set on its context (Serve sends those). It must
    unpickle in the proxy, which imports this module through ``proto``'s servicer hook."""


class _DropStatusSet(logging.Filter):
    """Drops Serve's record of a ``StatusSet`` (replica: "Request failed."; proxy: "Request failed
    with user-set gRPC status code"): grpc_api has logged the call's failure already."""

    def filter(self, record: logging.LogRecord) -> bool:
        err = record.exc_info[1] if record.exc_info else None
        return not (isinstance(err, gRPCStatusError) and isinstance(err.original_exception, StatusSet))


def quiet_serve_status_logs() -> None:
    """Install ``_DropStatusSet`` on Serve's logger in this process (once)."""
    serve_logger = logging.getLogger("ray.serve")
    if not any(isinstance(f, _DropStatusSet) for f in serve_logger.filters):
        serve_logger.addFilter(_DropStatusSet())
