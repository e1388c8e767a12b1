"""The Ray head and worker pod templates: pure functions from a ModelDeployment to manifests."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

from modelfleet.api import ModelDeployment
from modelfleet.api.quantity import parse_quantity
from modelfleet.operator import naming
from modelfleet.operator.overlay import merge
from modelfleet.operator.settings import OperatorSettings
from modelfleet.serving.settings import API_KEY_ENV, SERVE_PROCESS_ENV

GPU_PRODUCT_LABEL = "nvidia.com/gpu.product"
READY_FILE = "/run/modelfleet/replica-ready"
CACHE_DIR = "/var/cache/modelfleet"
PROXY_LABEL = "modelfleet.dev/serve-proxy"


def spec_hash(md: ModelDeployment, settings: OperatorSettings) -> str:
    """A hash of everything that shapes a worker pod; replicas and autoscaling are left out."""
    spec = md.spec.model_dump(
        by_alias=True, mode="json", include={"model", "engine", "resources", "placement", "pod_template"}
    )
    key = md.spec.service.api_key_secret_ref
    doc = {"spec": spec, "image": md.spec.image or settings.serving_image, "apiKey": key and key.model_dump()}
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:16]


def _env(md: ModelDeployment) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "MODELFLEET_DEPLOYMENT", "value": md.name},
        {"name": "MODELFLEET_NAMESPACE", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
        {"name": "MODELFLEET_CACHE_DIR", "value": CACHE_DIR},
        {"name": "HF_HOME", "value": f"{CACHE_DIR}/huggingface"},
        {"name": "MODELFLEET_READY_FILE", "value": READY_FILE},
        {"name": "RAY_AUTH_MODE", "value": "token"},
        {
            "name": "RAY_AUTH_TOKEN",
            "valueFrom": {"secretKeyRef": {"name": naming.ray_token_name(md), "key": "token"}},
        },
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        *({"name": k, "value": v} for k, v in SERVE_PROCESS_ENV.items()),
    ]
    ref = md.spec.service.api_key_secret_ref
    if ref is not None:
        env.append({"name": API_KEY_ENV, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return env


def _security() -> dict[str, Any]:
    return {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}


def _image(md: ModelDeployment, settings: OperatorSettings) -> str:
    return md.spec.image or settings.serving_image


def head_pod_template(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    labels = {**naming.labels(md, naming.COMPONENT_HEAD), PROXY_LABEL: "true"}
    command = (
        f"ray start --head --port={naming.GCS_PORT} --dashboard-host=0.0.0.0 "
        f"--dashboard-port={naming.DASHBOARD_PORT} --ray-client-server-port={naming.CLIENT_PORT} "
        f"--metrics-export-port={naming.METRICS_PORT} --num-cpus=0 --num-gpus=0 --block"
    )
    return {
        "metadata": {"labels": labels},
        "spec": {
            "enableServiceLinks": False,
            "containers": [
                {
                    "name": "ray-head",
                    "image": _image(md, settings),
                    "imagePullPolicy": settings.image_pull_policy,
                    "command": ["/bin/sh", "-c", command],
                    "env": _env(md),
                    "ports": [
                        {"name": "gcs", "containerPort": naming.GCS_PORT},
                        {"name": "dashboard", "containerPort": naming.DASHBOARD_PORT},
                        {"name": "client", "containerPort": naming.CLIENT_PORT},
                        {"name": "serve", "containerPort": naming.SERVE_PORT},
                        {"name": "metrics", "containerPort": naming.METRICS_PORT},
                    ],
                    "resources": {
                        "requests": {"cpu": settings.head_cpu, "memory": settings.head_memory},
                        "limits": {"memory": settings.head_memory},
                    },
                    "readinessProbe": {
                        "httpGet": {"path": "/api/gcs_healthz", "port": naming.DASHBOARD_PORT},
                        "periodSeconds": 5,
                        "failureThreshold": 3,
                    },
                    "livenessProbe": {
                        "httpGet": {"path": "/api/gcs_healthz", "port": naming.DASHBOARD_PORT},
                        "initialDelaySeconds": 30,
                        "periodSeconds": 10,
                        "failureThreshold": 6,
                    },
                    "securityContext": _security(),
                    "volumeMounts": [
                        {"name": "shm", "mountPath": "/dev/shm"},
                        {"name": "tmp", "mountPath": "/tmp"},
                    ],
                }
            ],
            "volumes": [
                {"name": "shm", "emptyDir": {"medium": "Memory", "sizeLimit": "1Gi"}},
                {"name": "tmp", "emptyDir": {}},
            ],
        },
    }


def _shm_size(memory: str) -> str:
    """/dev/shm for NCCL: half the pod's memory request, at least 1Gi."""
    mib = max(1024, int(parse_quantity(memory) / 2**20 / 2))
    return f"{mib}Mi"


def _affinity(md: ModelDeployment) -> dict[str, Any]:
    affinity = dict(md.spec.placement.affinity)
    product = md.spec.resources.gpu.product
    if product is None or md.spec.resources.accelerator != "gpu":
        return affinity
    expression = {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": [product]}
    node = dict(affinity.get("nodeAffinity", {}))
    required = dict(node.get("requiredDuringSchedulingIgnoredDuringExecution", {}))
    terms = required.get("nodeSelectorTerms") or [{}]
    # Terms are ORed: the product requirement joins every one of them.
    required["nodeSelectorTerms"] = [
        {**t, "matchExpressions": [*t.get("matchExpressions", []), expression]} for t in terms
    ]
    node["requiredDuringSchedulingIgnoredDuringExecution"] = required
    return {**affinity, "nodeAffinity": node}


def worker_resources(md: ModelDeployment) -> dict[str, Any]:
    res = md.spec.resources
    requests: dict[str, Any] = {"cpu": str(res.cpu), "memory": str(res.memory)}
    limits: dict[str, Any] = {"memory": str(res.memory)}
    if md.spec.gpus_per_replica:
        requests[res.gpu.resource_name] = md.spec.gpus_per_replica
        limits[res.gpu.resource_name] = md.spec.gpus_per_replica
    return {"requests": requests, "limits": limits}


def ray_worker_cpus(md: ModelDeployment) -> int:
    """Logical CPUs the Ray worker offers: enough for one replica's ranks, never two replicas."""
    if md.spec.resources.accelerator == "cpu":
        return md.spec.engine.tensor_parallel_size
    return max(1, math.ceil(float(parse_quantity(md.spec.resources.cpu))))


def worker_tolerations(md: ModelDeployment) -> list[dict[str, Any]]:
    """The GPU taint every worker tolerates, then the spec's own tolerations."""
    gpu = {"key": md.spec.resources.gpu.resource_name, "operator": "Exists", "effect": "NoSchedule"}
    return [gpu, *(t.model_dump(by_alias=True, exclude_none=True) for t in md.spec.placement.tolerations)]


def worker_pod_template(md: ModelDeployment, settings: OperatorSettings) -> dict[str, Any]:
    gpus = md.spec.gpus_per_replica
    head = f"{naming.head_name(md)}.{md.namespace}.svc"
    command = (
        f"ray start --address={head}:{naming.GCS_PORT} --num-cpus={ray_worker_cpus(md)} "
        f"--num-gpus={gpus} --metrics-export-port={naming.METRICS_PORT} --block"
    )
    ready = ["/bin/sh", "-c", f"test -f {READY_FILE}"]
    period = 10
    annotations = {naming.SPEC_HASH: "", **md.spec.pod_template.metadata.annotations}
    spec: dict[str, Any] = {
        "enableServiceLinks": False,
        "terminationGracePeriodSeconds": settings.drain_timeout_seconds + 30,
        "tolerations": worker_tolerations(md),
        "containers": [
            {
                "name": "model",
                "image": _image(md, settings),
                "imagePullPolicy": settings.image_pull_policy,
                "command": ["/bin/sh", "-c", command],
                "env": _env(md),
                "ports": [
                    {"name": "serve", "containerPort": naming.SERVE_PORT},
                    {"name": "metrics", "containerPort": naming.METRICS_PORT},
                ],
                "resources": worker_resources(md),
                # Loading a 70B model takes minutes: the startup probe allows the configured hour
                # before liveness applies, so the kubelet never kills a pod mid-load.
                "startupProbe": {
                    "exec": {"command": ready},
                    "periodSeconds": period,
                    "failureThreshold": max(1, settings.startup_timeout_seconds // period),
                },
                # Ready means this pod's replica has loaded its model and serves.
                "readinessProbe": {"exec": {"command": ready}, "periodSeconds": 5, "failureThreshold": 2},
                "livenessProbe": {
                    "exec": {
                        "command": ["/bin/sh", "-c", "ray health-check --skip-version-check >/dev/null"]
                    },
                    "periodSeconds": 30,
                    "timeoutSeconds": 20,
                    "failureThreshold": 4,
                },
                "lifecycle": {
                    "preStop": {
                        "exec": {
                            "command": [
                                "python",
                                "-m",
                                "modelfleet.operator.drain",
                                "--timeout",
                                str(settings.drain_timeout_seconds),
                            ]
                        }
                    }
                },
                "securityContext": _security(),
                "volumeMounts": [
                    {"name": "shm", "mountPath": "/dev/shm"},
                    {"name": "tmp", "mountPath": "/tmp"},
                    {"name": "run", "mountPath": "/run/modelfleet"},
                    {"name": "cache", "mountPath": CACHE_DIR},
                ],
            }
        ],
        "volumes": [
            {
                "name": "shm",
                "emptyDir": {"medium": "Memory", "sizeLimit": _shm_size(str(md.spec.resources.memory))},
            },
            {"name": "tmp", "emptyDir": {}},
            {"name": "run", "emptyDir": {}},
            {"name": "cache", "emptyDir": {}},
        ],
    }
    if md.spec.placement.node_selector:
        spec["nodeSelector"] = dict(md.spec.placement.node_selector)
    affinity = _affinity(md)
    if affinity:
        spec["affinity"] = affinity
    if md.spec.placement.priority_class_name:
        spec["priorityClassName"] = md.spec.placement.priority_class_name
    template = {
        "metadata": {
            "labels": {
                **md.spec.pod_template.metadata.labels,
                **naming.labels(md, naming.COMPONENT_WORKER),
                PROXY_LABEL: "true",
            },
            "annotations": annotations,
        },
        "spec": merge(spec, md.spec.pod_template.spec),
    }
    template["metadata"]["annotations"][naming.SPEC_HASH] = spec_hash(md, settings)
    return template
