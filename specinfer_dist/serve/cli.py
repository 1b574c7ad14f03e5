"""``specinfer-dist serve``: start (or join) Ray, deploy the app, say when it is ready (polling
its /health), stay in the foreground until SIGINT/SIGTERM, then shut down what it started: our
application first (its replicas stop their engines), then Ray."""

from __future__ import annotations

import argparse
import json
import signal
import threading
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from typing import Any, Iterator

from specinfer_dist.config import EngineConfig, add_options, apply_options
from specinfer_dist.progress import say
from specinfer_dist.serve.auth import resolve_api_key

APP_NAME = "specinfer"


def add_serve_parser(sub: Any) -> None:
    parser = sub.add_parser("serve", help="serve the OpenAI-compatible HTTP and gRPC API with Ray Serve")
    parser.add_argument("--config", help="YAML file with 'engine:', 'serve:' and (runtime ray) 'cluster:' sections; flags override it")
    parser.add_argument("--host", help="HTTP bind address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, help="HTTP port (default 8000)")
    parser.add_argument("--grpc-port", type=int,
                        help="gRPC port (default 9000; 0: no gRPC). Ray Serve binds it on all interfaces, whatever --host")
    parser.add_argument("--grpc-reflection", action="store_true", default=None,
                        help="serve gRPC server reflection (grpcurl list without the .proto); off by default")
    parser.add_argument("--api-key-file", help="require the key in this file (default: $SPECINFER_API_KEY_FILE)")
    parser.add_argument("--api-key", help="require 'Authorization: Bearer KEY'; visible to local users in ps, so prefer "
                                          "$SPECINFER_API_KEY or --api-key-file (default: those, else no key)")
    parser.add_argument("--address", help="join this Ray cluster instead of starting one (e.g. auto, HOST:6379)")
    add_options(parser, EngineConfig)
    parser.set_defaults(run=run_serve)


def run_serve(args: argparse.Namespace) -> int:
    started = time.monotonic()
    import ray
    from ray import serve

    from specinfer_dist.serve.app import app_configs, make_app, proxy_options

    engine, config, cluster = app_configs({"config": args.config} if args.config else {})
    engine = apply_options(engine, args)
    for name in ("host", "port", "grpc_port", "grpc_reflection", "api_key", "api_key_file"):  # flags override the file
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.api_key is not None:
        say("warning: --api-key shows the key to every user of this machine (ps); "
            "prefer $SPECINFER_API_KEY or --api-key-file")
    config.api_key = resolve_api_key(config)  # resolved here, so it reaches replicas on any cluster
    app = make_app(engine, config, cluster)  # config mistakes fail here, before Ray starts
    # "local": a new cluster even if one runs here. A new local cluster has Ray's token
    # authentication on by default (Ray >= 2.59); joining one needs its token (deploy/README.md).
    address = args.address or cluster.address
    with _own_session_for_ray_processes(enabled=not address):
        ray.init(address=address or "local", namespace="serve")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    status = 0
    try:
        serve.start(**proxy_options(config))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        failure = wait_ready(_health_url(config.host, config.port), stop)
        if failure is not None:
            say(f"the model failed to load: {failure}")
            status = 1
        elif not stop.is_set():
            grpc_where = (
                f"gRPC specinfer.v1.SpecInfer and grpc.health.v1 on port {config.grpc_port} (all interfaces)"
                if config.grpc_port else "no gRPC"
            )
            say(
                f"serving {config.model_name or engine.llm}: OpenAI API at http://{config.host}:{config.port}/v1 "
                f"(also /health, /metrics); {grpc_where}; {'API key required' if config.api_key else 'no API key'}. "
                f"Ready after {time.monotonic() - started:.1f} s. Stop with Ctrl-C or SIGTERM."
            )
            if config.grpc_port and config.host not in ("0.0.0.0", "::"):
                say(f"warning: Ray Serve cannot bind gRPC to --host {config.host}: port {config.grpc_port} is open on "
                    "every interface. Firewall it, or pass --grpc-port 0 for no gRPC.")
            stop.wait()
        say("shutting down")
    finally:
        _shut_down()
    return status


def wait_ready(url: str, stop: threading.Event, interval: float = 0.5) -> str | None:
    """Poll the app's /health until it answers 200 (None) or ``{"status": "failed"}`` (its error),
    or ``stop`` is set (None); say "still loading: <stage>" each time the stage changes."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never through $http_proxy
    stage = None
    while not stop.is_set():
        try:
            with opener.open(url, timeout=2):
                return None  # any 200: "ready" (or an older replica's "ok")
        except urllib.error.HTTPError as err:  # 503 while loading; the proxy's own 503/404 before the app routes
            answer = _json(err)
            if answer.get("status") == "failed":
                return str(answer.get("error", "unknown error"))
            if answer.get("status") == "loading" and answer.get("stage") != stage:
                stage = answer.get("stage")
                say(f"still loading: {stage}")
        except (OSError, ValueError):  # not listening yet, or a timeout
            pass
        stop.wait(interval)
    return None


def _json(err: urllib.error.HTTPError) -> dict[str, Any]:
    try:
        answer = json.loads(err.read())
    except ValueError:
        return {}
    return answer if isinstance(answer, dict) else {}


def _health_url(host: str, port: int) -> str:
    if host in ("0.0.0.0", "::", ""):  # every interface: loopback is one of them
        host = "127.0.0.1"
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/health"


@contextmanager
def _own_session_for_ray_processes(enabled: bool) -> Iterator[None]:
    """Start the local cluster's processes (GCS, raylet, dashboard, ...; workers are the raylet's
    children) in sessions of their own, as Ray already does on Windows: a signal to our process
    group (Ctrl-C, ``kill -TERM -PGID``) then reaches only us, and we stop them in order. Without
    this, SIGTERM killed them under our shutdown (Ray blocks only SIGINT in them): "Failed to push
    error to driver", "The cached controller has died". They still die with us: Ray ties each to
    its parent (kernel fate-sharing). ``ConsolePopen`` is Ray's private launcher: where a Ray
    version has none, this does nothing (tests/test_serve_cli.py would notice)."""
    from ray._private import services

    plain = getattr(services, "ConsolePopen", None)
    if not enabled or plain is None:
        yield
        return

    class OwnSession(plain):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            kwargs.setdefault("start_new_session", True)
            super().__init__(*args, **kwargs)

    services.ConsolePopen = OwnSession
    try:
        yield
    finally:
        services.ConsolePopen = plain


def _shut_down() -> None:
    """Delete our application and wait for it (its replicas stop their engines), then leave Ray;
    a cluster we started stops with it, Serve's controller and proxy included (``serve.shutdown``
    would kill its controller under its own pending call, which Ray reports to this console as a
    failed task "that will be retried"). On a shared cluster other applications keep Serve."""
    import ray
    from ray import serve

    serve.delete(APP_NAME)
    ray.shutdown()
