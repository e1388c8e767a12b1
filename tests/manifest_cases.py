"""Valid and invalid ModelDeployment manifests shared by the Python, schema and API-server tests.

Each invalid case names the field its error must name. `server` says whether the API server
itself refuses it (schema or CEL); the few that only Python catches are YAML-level or
apiVersion/kind problems, which kubectl reports before the schema is consulted.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))


def base(name: str = "tiny") -> dict[str, Any]:
    """A minimal valid manifest."""
    return {
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {"model": {"uri": "builtin://tiny-llama"}},
    }


_DELETE = object()


def with_(changes: dict[str, Any], doc: dict[str, Any] | None = None) -> dict[str, Any]:
    """A copy of `doc` (default: base()) with dotted paths set, or removed with _DELETE."""
    out = copy.deepcopy(doc if doc is not None else base())
    for path, value in changes.items():
        node = out
        parts = path.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        if value is _DELETE:
            node.pop(parts[-1], None)
        else:
            node[parts[-1]] = value
    return out


@dataclass(frozen=True)
class ValidCase:
    name: str
    manifest: dict[str, Any]


@dataclass(frozen=True)
class InvalidCase:
    name: str
    manifest: dict[str, Any]
    field: str  # the field path the error must name
    server: bool = True  # the API server refuses it too


VALID_CASES: list[ValidCase] = [
    *(ValidCase(f"example-{p.stem}", yaml.safe_load(p.read_text())) for p in EXAMPLES),
    ValidCase("minimal", base()),
    ValidCase(
        "hf-with-revision", with_({"spec.model": {"uri": "hf://Qwen/Qwen2.5-0.5B", "revision": "main"}})
    ),
    ValidCase("hf-at-revision", with_({"spec.model.uri": "hf://Qwen/Qwen2.5-0.5B@a1b2c3"})),
    ValidCase("file-uri", with_({"spec.model.uri": "file:///models/llama"})),
    ValidCase("pvc-uri", with_({"spec.model.uri": "pvc://models/llama-3"})),
    ValidCase("absolute-path", with_({"spec.model.uri": "/models/llama"})),
    ValidCase(
        "scale-to-zero",
        with_(
            {"spec.replicas": 0, "spec.autoscaling": {"enabled": True, "minReplicas": 0, "maxReplicas": 3}}
        ),
    ),
    ValidCase("cpu-tp2", with_({"spec.engine.tensorParallelSize": 2, "spec.resources.accelerator": "cpu"})),
    ValidCase("integer-quantities", with_({"spec.resources.cpu": 8, "spec.resources.memory": 68719476736})),
    ValidCase("milli-cpu", with_({"spec.resources.cpu": "500m", "spec.resources.memory": "1.5Gi"})),
    ValidCase("fraction-one", with_({"spec.engine.kvCacheMemoryFraction": 1})),
    ValidCase(
        "exists-toleration",
        with_({"spec.placement.tolerations": [{"key": "gpu", "operator": "Exists", "effect": "NoSchedule"}]}),
    ),
    ValidCase(
        "min-above-replicas-when-disabled",
        with_({"spec.replicas": 9, "spec.autoscaling.maxReplicas": 2, "spec.autoscaling.minReplicas": 1}),
    ),
    ValidCase("api-key", with_({"spec.service.apiKeySecretRef": {"name": "tiny-key"}})),
    ValidCase(
        "pod-template",
        with_(
            {
                "spec.podTemplate": {
                    "metadata": {"annotations": {"a": "b"}},
                    "spec": {"containers": [{"name": "model", "env": [{"name": "X", "value": "1"}]}]},
                }
            }
        ),
    ),
]

INVALID_CASES: list[InvalidCase] = [
    # --- the document
    InvalidCase("wrong-api-version", with_({"apiVersion": "modelfleet.dev/v1"}), "apiVersion", server=False),
    InvalidCase("wrong-kind", with_({"kind": "ModelDeploy"}), "kind", server=False),
    InvalidCase("missing-spec", with_({"spec": _DELETE}), "spec"),
    InvalidCase("unknown-top-level", with_({"specs": {}}), "specs"),
    InvalidCase("name-uppercase", base("Tiny"), "metadata.name"),
    InvalidCase("name-too-long", base("a" * 41), "metadata.name"),
    InvalidCase("name-starts-with-digit", base("1tiny"), "metadata.name"),
    # --- spec.model
    InvalidCase("missing-model", with_({"spec.model": _DELETE, "spec.replicas": 1}), "spec.model"),
    InvalidCase("missing-uri", with_({"spec.model": {"dtype": "auto"}}), "spec.model.uri"),
    InvalidCase("uri-scheme", with_({"spec.model.uri": "s3://bucket/model"}), "spec.model.uri"),
    InvalidCase("uri-hf-no-org", with_({"spec.model.uri": "hf://llama"}), "spec.model.uri"),
    InvalidCase("uri-relative-path", with_({"spec.model.uri": "models/llama"}), "spec.model.uri"),
    InvalidCase("uri-pvc-uppercase", with_({"spec.model.uri": "pvc://Models/x"}), "spec.model.uri"),
    InvalidCase("uri-not-string", with_({"spec.model.uri": 42}), "spec.model.uri"),
    InvalidCase("dtype-enum", with_({"spec.model.dtype": "fp8"}), "spec.model.dtype"),
    InvalidCase("max-model-len-small", with_({"spec.model.maxModelLen": 8}), "spec.model.maxModelLen"),
    InvalidCase("max-model-len-string", with_({"spec.model.maxModelLen": "8k"}), "spec.model.maxModelLen"),
    InvalidCase("served-name-space", with_({"spec.model.servedName": "my model"}), "spec.model.servedName"),
    InvalidCase("revision-without-hf", with_({"spec.model.revision": "main"}), "spec.model.revision"),
    InvalidCase(
        "revision-twice",
        with_({"spec.model": {"uri": "hf://Qwen/Qwen2.5-0.5B@v1", "revision": "v2"}}),
        "spec.model.revision",
    ),
    InvalidCase("unknown-model-field", with_({"spec.model.dtyp": "auto"}), "spec.model.dtyp"),
    # --- spec.engine
    InvalidCase("tp-zero", with_({"spec.engine.tensorParallelSize": 0}), "spec.engine.tensorParallelSize"),
    InvalidCase("tp-huge", with_({"spec.engine.tensorParallelSize": 128}), "spec.engine.tensorParallelSize"),
    InvalidCase("tp-float", with_({"spec.engine.tensorParallelSize": 1.5}), "spec.engine.tensorParallelSize"),
    InvalidCase(
        "tp-string", with_({"spec.engine.tensorParallelSize": "2"}), "spec.engine.tensorParallelSize"
    ),
    InvalidCase("max-num-seqs-zero", with_({"spec.engine.maxNumSeqs": 0}), "spec.engine.maxNumSeqs"),
    InvalidCase(
        "kv-fraction-zero",
        with_({"spec.engine.kvCacheMemoryFraction": 0}),
        "spec.engine.kvCacheMemoryFraction",
    ),
    InvalidCase(
        "kv-fraction-above-one",
        with_({"spec.engine.kvCacheMemoryFraction": 1.2}),
        "spec.engine.kvCacheMemoryFraction",
    ),
    InvalidCase("block-size-enum", with_({"spec.engine.blockSize": 17}), "spec.engine.blockSize"),
    InvalidCase(
        "queue-depth-negative", with_({"spec.engine.maxQueueDepth": -1}), "spec.engine.maxQueueDepth"
    ),
    InvalidCase(
        "unknown-engine-field",
        with_({"spec.engine.tensorParallelism": 2}),
        "spec.engine.tensorParallelism",
    ),
    # --- spec.replicas and spec.autoscaling
    InvalidCase("replicas-negative", with_({"spec.replicas": -1}), "spec.replicas"),
    InvalidCase("replicas-string", with_({"spec.replicas": "3"}), "spec.replicas"),
    InvalidCase(
        "min-above-max",
        with_(
            {"spec.autoscaling": {"enabled": True, "minReplicas": 5, "maxReplicas": 2}, "spec.replicas": 2}
        ),
        "spec.autoscaling.minReplicas",
    ),
    InvalidCase("max-zero", with_({"spec.autoscaling.maxReplicas": 0}), "spec.autoscaling.maxReplicas"),
    InvalidCase(
        "replicas-above-max",
        with_({"spec.replicas": 9, "spec.autoscaling": {"enabled": True, "maxReplicas": 4}}),
        "spec.replicas",
    ),
    InvalidCase(
        "replicas-below-min",
        with_(
            {"spec.replicas": 1, "spec.autoscaling": {"enabled": True, "minReplicas": 2, "maxReplicas": 4}}
        ),
        "spec.replicas",
    ),
    InvalidCase("enabled-string", with_({"spec.autoscaling.enabled": "yes"}), "spec.autoscaling.enabled"),
    InvalidCase(
        "target-queue-zero",
        with_({"spec.autoscaling.targetQueueDepth": 0}),
        "spec.autoscaling.targetQueueDepth",
    ),
    InvalidCase(
        "stabilization-negative",
        with_({"spec.autoscaling.scaleDownStabilizationSeconds": -5}),
        "spec.autoscaling.scaleDownStabilizationSeconds",
    ),
    InvalidCase(
        "prometheus-url-scheme",
        with_({"spec.autoscaling.prometheusUrl": "prometheus:9090"}),
        "spec.autoscaling.prometheusUrl",
    ),
    InvalidCase(
        "unknown-autoscaling-field", with_({"spec.autoscaling.target": 4}), "spec.autoscaling.target"
    ),
    # --- spec.resources
    InvalidCase("cpu-negative", with_({"spec.resources.cpu": "-1"}), "spec.resources.cpu"),
    InvalidCase("memory-bad-suffix", with_({"spec.resources.memory": "64GB"}), "spec.resources.memory"),
    InvalidCase("memory-words", with_({"spec.resources.memory": "lots"}), "spec.resources.memory"),
    InvalidCase(
        "accelerator-enum", with_({"spec.resources.accelerator": "tpu"}), "spec.resources.accelerator"
    ),
    InvalidCase(
        "gpu-resource-name",
        with_({"spec.resources.gpu.resourceName": "gpu"}),
        "spec.resources.gpu.resourceName",
    ),
    InvalidCase(
        "gpu-product-on-cpu",
        with_({"spec.resources": {"accelerator": "cpu", "gpu": {"product": "NVIDIA-H100-80GB-HBM3"}}}),
        "spec.resources.gpu.product",
    ),
    # --- spec.placement
    InvalidCase(
        "node-selector-int",
        with_({"spec.placement.nodeSelector": {"pool": 1}}),
        "spec.placement.nodeSelector",
    ),
    InvalidCase(
        "toleration-operator",
        with_({"spec.placement.tolerations": [{"key": "a", "operator": "In"}]}),
        "spec.placement.tolerations[0].operator",
    ),
    InvalidCase(
        "toleration-exists-value",
        with_({"spec.placement.tolerations": [{"key": "a", "operator": "Exists", "value": "b"}]}),
        "spec.placement.tolerations[0].value",
    ),
    InvalidCase(
        "tolerations-not-list",
        with_({"spec.placement.tolerations": {"key": "a"}}),
        "spec.placement.tolerations",
    ),
    # --- spec.service and the rest
    InvalidCase("service-type", with_({"spec.service.type": "Ingress"}), "spec.service.type"),
    InvalidCase("service-port", with_({"spec.service.port": 70000}), "spec.service.port"),
    InvalidCase(
        "api-key-no-name",
        with_({"spec.service.apiKeySecretRef": {"key": "k"}}),
        "spec.service.apiKeySecretRef.name",
    ),
    InvalidCase("image-space", with_({"spec.image": "my image"}), "spec.image"),
    InvalidCase("unknown-spec-field", with_({"spec.replica": 2}), "spec.replica"),
]
