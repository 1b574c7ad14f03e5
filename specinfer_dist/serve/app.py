"""The Ray Serve application: one deployment; each replica owns a ``Service`` (its engine) and
answers HTTP through FastAPI and gRPC through methods named after the RPCs."""

from __future__ import annotations

from contextlib import aclosing
from dataclasses import asdict
from typing import Any, AsyncIterator

from fastapi import FastAPI
from grpc_health.v1 import health_pb2
from ray import serve
from ray.serve import Application
from ray.serve.grpc_util import RayServegRPCContext

from specinfer_dist.config import (
    ClusterConfig,
    EngineConfig,
    ServeConfig,
    load_cluster_config,
    load_config,
    load_serve_config,
)
from specinfer_dist.errors import InvalidConfigError
from specinfer_dist.serve import grpc_api
from specinfer_dist.serve.backend import check_runtime
from specinfer_dist.serve.http_api import build_http_app
from specinfer_dist.serve.proto import specinfer_pb2 as pb
from specinfer_dist.serve.service import Service


@serve.deployment(name="SpecInfer")
@serve.ingress()  # the FastAPI app is built per replica, around its Service
class SpecInferDeployment:
    def __init__(self, engine: dict[str, Any], config: dict[str, Any], cluster: dict[str, Any]) -> None:
        self.service = Service(EngineConfig.from_dict(engine), ServeConfig.from_dict(config), ClusterConfig.from_dict(cluster))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_http_app(self.service)

    async def Generate(  # noqa: N802 - Serve's gRPC proxy calls the method named like the RPC
        self, request: pb.GenerateRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        # aclosing: when Serve closes this generator (the client cancelled), the inner one sees it at once.
        async with aclosing(grpc_api.generate(self.service, request, grpc_context)) as responses:
            async for response in responses:
                yield response

    async def Check(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> health_pb2.HealthCheckResponse:
        return grpc_api.check_health(request, grpc_context, self.service)

    async def Watch(  # noqa: N802
        self, request: health_pb2.HealthCheckRequest, grpc_context: RayServegRPCContext
    ) -> AsyncIterator[health_pb2.HealthCheckResponse]:
        async for response in grpc_api.watch_health(request, grpc_context):
            yield response

    def __del__(self) -> None:
        # Replica shutdown: stop the engine loop (the Ray runtime: its actors too).
        if hasattr(self, "service"):
            self.service.shutdown()


_SECTIONS = {"engine": (EngineConfig, load_config), "serve": (ServeConfig, load_serve_config),
             "cluster": (ClusterConfig, load_cluster_config)}


def build_app(args: dict[str, Any] | None = None) -> Application:
    """``serve run specinfer_dist.serve:build_app [config=FILE]``, or ``import_path`` of a Serve
    config file whose ``args`` are ``{config: FILE, engine: {...}, serve: {...}, cluster: {...}}``."""
    return make_app(*app_configs(args or {}))


def app_configs(args: dict[str, Any]) -> tuple[EngineConfig, ServeConfig, ClusterConfig]:
    """The sections of the YAML file ``args["config"]`` (if any), each overridden option by
    option by the inline section of the same name."""
    unknown = set(args) - {"config", *_SECTIONS}
    if unknown:
        raise InvalidConfigError(f"unknown build_app argument(s): {', '.join(sorted(unknown))}")
    path = args.get("config")
    engine, config, cluster = (
        cls.from_dict({**(asdict(load(path)) if path else {}), **args.get(name, {})}) for name, (cls, load) in _SECTIONS.items()
    )
    return engine, config, cluster


def proxy_options(config: ServeConfig) -> dict[str, Any]:
    """``serve.start``'s keyword arguments for ``config``: HTTP on host:port; gRPC on grpc_port
    (0: Serve starts no gRPC server), with server reflection only when ``grpc_reflection`` asks
    for it (Serve's default is on). Serve 2.60's gRPCOptions has no host: it binds every interface."""
    return {
        "http_options": {"host": config.host, "port": config.port},
        "grpc_options": {"port": config.grpc_port, "grpc_servicer_functions": grpc_api.GRPC_SERVICER_FUNCTIONS,
                         "enable_reflection": config.grpc_reflection},
    }


def make_app(engine: EngineConfig, config: ServeConfig, cluster: ClusterConfig | None = None) -> Application:
    check_runtime(config.runtime)  # fail before deploying, not in every replica
    options: dict[str, Any] = {"max_ongoing_requests": config.max_ongoing_requests, "ray_actor_options": config.ray_actor_options}
    if config.autoscaling_config:
        options["autoscaling_config"] = config.autoscaling_config
    else:
        options["num_replicas"] = config.num_replicas
    return SpecInferDeployment.options(**options).bind(asdict(engine), asdict(config), asdict(cluster or ClusterConfig()))
