"""Deployment files are valid for what reads them: k8s/ against the KubeRay CRD schemas (unknown
fields refused) and Kubernetes' own schemas; every Serve config against Ray's ServeDeploySchema
and our build_app."""

from __future__ import annotations

import copy
import functools
import os
from pathlib import Path

import jsonschema
import kubernetes_validate
import pytest
import yaml
from ray.serve.schema import ServeDeploySchema

from specinfer_dist.config import ClusterConfig
from specinfer_dist.serve import build_app

ROOT = Path(__file__).resolve().parents[1]
# Beside the checkout, as in CI; $K8S_CRDS elsewhere (e.g. a git worktree).
CRDS = Path(os.environ.get("K8S_CRDS") or ROOT.parent / "shared" / "k8s-crds")
DOCS = [(path.name, doc) for path in sorted((ROOT / "k8s").glob("*.yaml")) for doc in yaml.safe_load_all(path.read_text())]
KUBERAY_KINDS = {"RayCluster": "ray.io_rayclusters.yaml", "RayService": "ray.io_rayservices.yaml"}


def _strict(schema):
    """OpenAPI v3 as JSON Schema that refuses unknown fields, except where Kubernetes keeps them
    (x-kubernetes-preserve-unknown-fields) or the schema lists none (free-form maps)."""
    if isinstance(schema, list):
        return [_strict(s) for s in schema]
    if not isinstance(schema, dict):
        return schema
    schema = {k: _strict(v) for k, v in schema.items()}
    if "properties" in schema and "additionalProperties" not in schema and not schema.get("x-kubernetes-preserve-unknown-fields"):
        schema["additionalProperties"] = False
    return schema


@functools.cache  # the CRDs are big: read each once
def crd_validator(kind: str, api_version: str) -> jsonschema.Draft7Validator:
    if not CRDS.is_dir():
        pytest.skip(f"KubeRay CRDs not found at {CRDS}")
    crd = yaml.safe_load((CRDS / KUBERAY_KINDS[kind]).read_text())
    group, version = api_version.split("/")
    assert crd["spec"]["group"] == group
    [served] = [v for v in crd["spec"]["versions"] if v["name"] == version and v["served"]]
    return jsonschema.Draft7Validator(_strict(served["schema"]["openAPIV3Schema"]))


def _errors(validator: jsonschema.Draft7Validator, doc: dict) -> list[str]:
    return [f"{'/'.join(map(str, e.absolute_path))}: {e.message}" for e in validator.iter_errors(doc)]


KUBERAY_DOCS = [(name, doc) for name, doc in DOCS if doc["kind"] in KUBERAY_KINDS]
BUILTIN_DOCS = [(name, doc) for name, doc in DOCS if doc["kind"] not in KUBERAY_KINDS]


def test_k8s_folder_has_the_expected_resources():
    assert {(name, doc["kind"]) for name, doc in DOCS} >= {
        ("rayservice.yaml", "RayService"), ("raycluster.yaml", "RayCluster"), ("raycluster.yaml", "Service"),
    }


@pytest.mark.parametrize("name,doc", KUBERAY_DOCS, ids=[f"{n}:{d['kind']}" for n, d in KUBERAY_DOCS])
def test_kuberay_resources_validate_against_the_crds(name, doc):
    assert _errors(crd_validator(doc["kind"], doc["apiVersion"]), doc) == []


def test_crd_validation_catches_mistakes():
    """Negative control: the schema check above can fail."""
    [(_, cluster)] = [(n, d) for n, d in KUBERAY_DOCS if d["kind"] == "RayCluster"]
    validator = crd_validator("RayCluster", cluster["apiVersion"])
    typo = copy.deepcopy(cluster)
    typo["spec"]["workerGroupSpecs"][0]["maxReplica"] = 3
    wrong_type = copy.deepcopy(cluster)
    wrong_type["spec"]["enableInTreeAutoscaling"] = "yes"
    bad_enum = copy.deepcopy(cluster)
    bad_enum["spec"]["authOptions"]["mode"] = "password"
    deep_typo = copy.deepcopy(cluster)  # inside the pod template, which the CRD spells out too
    deep_typo["spec"]["workerGroupSpecs"][0]["template"]["spec"]["containers"][0]["imagePullPolicyy"] = "Always"
    for doc in (typo, wrong_type, bad_enum, deep_typo):
        assert _errors(validator, doc)


@pytest.mark.parametrize("name,doc", BUILTIN_DOCS, ids=[f"{n}:{d['kind']}" for n, d in BUILTIN_DOCS])
def test_builtin_resources_validate(name, doc):
    kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)


def test_rayservice_service_validates_as_a_service():
    [service] = [d for _, d in KUBERAY_DOCS if d["kind"] == "RayService"]
    serve_service = {"apiVersion": "v1", "kind": "Service", **service["spec"]["serveService"]}
    kubernetes_validate.validate(serve_service, kubernetes_validate.latest_version(), strict=True)
    assert {p["port"] for p in serve_service["spec"]["ports"]} == {8000, 9000}


def test_rayservice_runs_the_same_cluster_as_raycluster():
    [service] = [d for _, d in KUBERAY_DOCS if d["kind"] == "RayService"]
    [cluster] = [d for _, d in KUBERAY_DOCS if d["kind"] == "RayCluster"]
    assert service["spec"]["rayClusterConfig"] == cluster["spec"]


def _gpus(group: dict) -> set[str]:
    [container] = group["template"]["spec"]["containers"]
    return {container["resources"][kind].get("nvidia.com/gpu", "0") for kind in ("requests", "limits")}


def test_verifier_pods_hold_a_replicas_tensor_parallel_gpus():
    # Verifier shards are STRICT_PACKed on one node: a pod needs exactly tp GPUs, or TP >= 2 never places.
    [service] = [d for _, d in KUBERAY_DOCS if d["kind"] == "RayService"]
    groups = {g["groupName"]: g for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]}
    for app in yaml.safe_load(service["spec"]["serveConfigV2"])["applications"]:
        cluster = ClusterConfig.from_dict(app["args"]["cluster"])
        assert _gpus(groups["verifier"]) == {str(cluster.tp)}
        if cluster.gpus_per_draft_worker:
            assert _gpus(groups["drafter"]) == {"1"}
    broken = copy.deepcopy(service)
    broken["spec"]["serveConfigV2"] = service["spec"]["serveConfigV2"].replace("tp: 3", "tp: 2")
    app = yaml.safe_load(broken["spec"]["serveConfigV2"])["applications"][0]
    assert _gpus(groups["verifier"]) != {str(ClusterConfig.from_dict(app["args"]["cluster"]).tp)}


SERVE_CONFIGS = [("deploy/serve_config.yaml", yaml.safe_load((ROOT / "deploy" / "serve_config.yaml").read_text()))] + [
    (f"k8s/{name}:serveConfigV2", yaml.safe_load(doc["spec"]["serveConfigV2"])) for name, doc in KUBERAY_DOCS
    if doc["kind"] == "RayService"
]


@pytest.mark.parametrize("name,config", SERVE_CONFIGS, ids=[n for n, _ in SERVE_CONFIGS])
def test_serve_configs_validate_and_build(name, config):
    schema = ServeDeploySchema.model_validate(config)
    assert set(config["grpc_options"]["grpc_servicer_functions"]) == {
        "specinfer_dist.serve.proto.add_SpecInferServicer_to_server",
        "grpc_health.v1.health_pb2_grpc.add_HealthServicer_to_server",
    }
    assert config["grpc_options"]["enable_reflection"] is False  # only when asked for
    for app in schema.applications:
        assert app.import_path == "specinfer_dist.serve:build_app"
        build_app(app.args)  # our own sections parse (no Ray, no models)


def test_configs_serve_yaml_builds():
    build_app({"config": str(ROOT / "configs" / "serve.yaml")})
