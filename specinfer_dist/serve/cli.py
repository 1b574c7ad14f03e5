"""``specinfer-dist serve``: start (or join) Ray, deploy the app, stay in the foreground until
SIGINT/SIGTERM, then shut down what it started."""

from __future__ import annotations

import argparse
import signal
import sys
import threading
from typing import Any

from specinfer_dist.config import EngineConfig, add_options, apply_options
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
    import ray
    from ray import serve

    from specinfer_dist.serve.app import app_configs, make_app, proxy_options

    engine, config, cluster = app_configs({"config": args.config} if args.config else {})
    engine = apply_options(engine, args)
    for name in ("host", "port", "grpc_port", "grpc_reflection", "api_key", "api_key_file"):  # flags override the file
        if getattr(args, name) is not None:
            setattr(config, name, getattr(args, name))
    if args.api_key is not None:
        _say("warning: --api-key shows the key to every user of this machine (ps); "
             "prefer $SPECINFER_API_KEY or --api-key-file")
    config.api_key = resolve_api_key(config)  # resolved here, so it reaches replicas on any cluster
    app = make_app(engine, config, cluster)  # config mistakes fail here, before Ray starts
    # "local": a new cluster even if one runs here. A new local cluster has Ray's token
    # authentication on by default (Ray >= 2.59); joining one needs its token (deploy/README.md).
    address = args.address or cluster.address
    ray.init(address=address or "local", namespace="serve")
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):  # after ray.init, which installs its own
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(**proxy_options(config))
        serve.run(app, name=APP_NAME, route_prefix="/", blocking=False)
        grpc_where = (
            f"gRPC specinfer.v1.SpecInfer and grpc.health.v1 on port {config.grpc_port} (all interfaces)"
            if config.grpc_port else "no gRPC"
        )
        _say(
            f"serving {config.model_name or engine.llm}: OpenAI API at http://{config.host}:{config.port}/v1 "
            f"(also /health, /metrics); {grpc_where}; {'API key required' if config.api_key else 'no API key'}. "
            "Stop with Ctrl-C or SIGTERM."
        )
        if config.grpc_port and config.host not in ("0.0.0.0", "::"):
            _say(f"warning: Ray Serve cannot bind gRPC to --host {config.host}: port {config.grpc_port} is open on "
                 "every interface. Firewall it, or pass --grpc-port 0 for no gRPC.")
        stop.wait()
        _say("shutting down")
    finally:
        if address:  # a shared cluster: remove only our application
            serve.delete(APP_NAME)
        else:
            serve.shutdown()
        ray.shutdown()
    return 0


def _say(message: str) -> None:
    print(f"specinfer-dist: {message}", file=sys.stderr, flush=True)
