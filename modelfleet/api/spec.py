"""The ModelDeployment spec as typed Python: the single source of truth for fields, defaults and limits.

The CRD (`modelfleet crd`), the manifest reference and every component read these classes.
Manifest keys are camelCase (the Kubernetes convention); Python attributes are snake_case.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

from modelfleet.api.quantity import Quantity

GROUP = "modelfleet.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "ModelDeployment"
PLURAL = "modeldeployments"
SINGULAR = "modeldeployment"
SHORT_NAMES = ["md"]
CATEGORIES = ["modelfleet"]

# Model URIs: builtin://name, hf://org/name[@revision], file:///abs/path, pvc://claim/path, /abs/path.
MODEL_URI_PATTERN = (
    r"^(builtin://[a-z0-9][a-z0-9-]*"
    r"|hf://[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*(@[A-Za-z0-9._/-]+)?"
    r"|file:///.*[^/].*"
    r"|pvc://[a-z0-9]([-a-z0-9]*[a-z0-9])?(/.*)?"
    r"|/.*)$"
)
SERVED_NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9._:/-]*$"
DNS_SUBDOMAIN_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"
LABEL_VALUE_PATTERN = r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$"
# Children are named <name>-head, <name>-worker-<hash>...; a DNS-1035 label of at most 40 leaves room.
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
NAME_MAX_LENGTH = 40


class _Spec(BaseModel):
    """Base of every spec object: camelCase keys, unknown keys are errors, values re-validated."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        strict=True,
        validate_assignment=True,
        validate_default=False,
    )


class ModelSource(_Spec):
    """Which weights to serve and how."""

    uri: str = Field(
        pattern=MODEL_URI_PATTERN,
        max_length=1024,
        description="Where the weights are: builtin://tiny-llama, hf://org/name[@revision], "
        "file:///path, pvc://claim/path or an absolute path inside the image.",
    )
    revision: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Branch, tag or commit of an hf:// model (default: main). Only for hf:// URIs.",
    )
    served_name: str | None = Field(
        default=None,
        pattern=SERVED_NAME_PATTERN,
        max_length=256,
        description="The model name clients send and /v1/models lists (default: metadata.name).",
    )
    dtype: Literal["auto", "bfloat16", "float16", "float32"] = Field(
        default="auto",
        description="Weight and activation dtype; auto follows the checkpoint (float32 on a CPU).",
    )
    max_model_len: int | None = Field(
        default=None,
        ge=16,
        le=1048576,
        description="Longest prompt plus completion in tokens (default: the model's own limit).",
    )


class EngineSpec(_Spec):
    """How each replica runs the model."""

    tensor_parallel_size: int = Field(
        default=1,
        ge=1,
        le=64,
        description="GPUs per replica, all on one node; the model's heads must divide by it.",
    )
    max_num_seqs: int = Field(
        default=256, ge=1, le=4096, description="Most sequences a replica decodes at once."
    )
    kv_cache_memory_fraction: float = Field(
        default=0.9,
        gt=0,
        le=1,
        description="Share of accelerator memory the weights and KV cache may use (0 < x <= 1).",
    )
    block_size: Literal[8, 16, 32, 64, 128] = Field(default=16, description="Tokens per KV cache block.")
    max_queue_depth: int = Field(
        default=128,
        ge=1,
        le=100000,
        description="Waiting requests per ready replica the deployment holds before it answers 429 "
        "with Retry-After.",
    )


class AutoscalingSpec(_Spec):
    """Replicas that follow the queue depth Prometheus sees."""

    enabled: bool = Field(default=False, description="Let the operator set spec.replicas.")
    min_replicas: int = Field(
        default=1, ge=0, le=1024, description="Fewest replicas; 0 allows scale to zero."
    )
    max_replicas: int = Field(default=4, ge=1, le=1024, description="Most replicas.")
    target_queue_depth: float = Field(
        default=4,
        gt=0,
        le=100000,
        description="Waiting requests per ready replica above which the deployment scales up.",
    )
    scale_up_stabilization_seconds: int = Field(
        default=0, ge=0, le=3600, description="How long the queue must stay high before scaling up."
    )
    scale_down_stabilization_seconds: int = Field(
        default=300,
        ge=0,
        le=86400,
        description="How long the queue must stay low before scaling down one step.",
    )
    scale_to_zero_idle_seconds: int = Field(
        default=600,
        ge=30,
        le=604800,
        description="With minReplicas 0: how long without any request before scaling to zero.",
    )
    cold_start_timeout_seconds: int = Field(
        default=600,
        ge=1,
        le=7200,
        description="While no replica is ready (scaled to zero, or all loading): how long the endpoint "
        "holds a request before answering 503. Its held requests are the signal to scale from zero.",
    )
    prometheus_url: str | None = Field(
        default=None,
        pattern=r"^https?://[^\s]+$",
        max_length=2048,
        description="Prometheus to ask (default: the operator's configured URL).",
    )
    queue_depth_query: str | None = Field(
        default=None,
        min_length=1,
        max_length=4096,
        description="PromQL for the deployment's total waiting requests (default: "
        "sum(modelfleet_queue_depth{namespace=..., deployment=...})).",
    )


class GPUSpec(_Spec):
    """The accelerator each tensor-parallel rank gets."""

    resource_name: str = Field(
        default="nvidia.com/gpu",
        pattern=r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?/[a-z0-9]([-a-z0-9_.]*[a-z0-9])?$",
        max_length=253,
        description="Extended resource name a rank requests, e.g. nvidia.com/gpu or amd.com/gpu.",
    )
    product: str | None = Field(
        default=None,
        pattern=LABEL_VALUE_PATTERN,
        max_length=63,
        description="Required value of the node label nvidia.com/gpu.product, e.g. NVIDIA-H100-80GB-HBM3.",
    )


class ResourcesSpec(_Spec):
    """What each replica (one worker pod) requests."""

    accelerator: Literal["gpu", "cpu"] = Field(
        default="gpu",
        description="gpu: each replica requests tensorParallelSize GPUs; cpu: no GPUs, "
        "the ranks run on CPU cores (small models, tests).",
    )
    gpu: GPUSpec = Field(default_factory=GPUSpec, description="The GPU resource and product.")
    cpu: Quantity = Field(default="4", description="CPU request of each worker pod.")
    memory: Quantity = Field(default="16Gi", description="Memory request of each worker pod.")


class Toleration(_Spec):
    """A Kubernetes toleration (core/v1 Toleration)."""

    key: str | None = Field(default=None, max_length=316, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] = Field(default="Equal", description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value (Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; empty means all."
    )
    toleration_seconds: int | None = Field(
        default=None, ge=0, description="How long a NoExecute taint is tolerated."
    )


class PlacementSpec(_Spec):
    """Where worker pods may run, on top of the GPU product and taint rules the operator adds."""

    node_selector: dict[str, str] = Field(
        default_factory=dict, description="Node labels the worker pods require."
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=64, description="Extra tolerations of the worker pods."
    )
    affinity: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A core/v1 Affinity merged into the worker pods.",
    )
    priority_class_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN_PATTERN,
        max_length=253,
        description="PriorityClass of the worker pods.",
    )


class SecretKeyRef(_Spec):
    """A key of a Secret in the ModelDeployment's namespace."""

    name: str = Field(pattern=DNS_SUBDOMAIN_PATTERN, max_length=253, description="Secret name.")
    key: str = Field(
        default="key",
        pattern=r"^[-._a-zA-Z0-9]+$",
        max_length=253,
        description="Key in the Secret.",
    )


class ServiceSpec(_Spec):
    """The endpoint Service in front of the OpenAI-compatible API."""

    type: Literal["ClusterIP", "NodePort", "LoadBalancer"] = Field(
        default="ClusterIP", description="Service type."
    )
    port: int = Field(default=8000, ge=1, le=65535, description="Service port of the API.")
    api_key_secret_ref: SecretKeyRef | None = Field(
        default=None,
        description="When set, requests need 'Authorization: Bearer <key>' with this key.",
    )
    annotations: dict[str, str] = Field(
        default_factory=dict, description="Annotations of the Service (load balancer settings)."
    )


class PodTemplateMetadata(_Spec):
    """Labels and annotations added to the worker pods."""

    labels: dict[str, str] = Field(default_factory=dict, description="Extra pod labels.")
    annotations: dict[str, str] = Field(default_factory=dict, description="Extra pod annotations.")


class PodTemplateOverlay(_Spec):
    """A strategic-merge overlay on the worker pods: extra env, volumes, sidecars, annotations."""

    metadata: PodTemplateMetadata = Field(
        default_factory=PodTemplateMetadata, description="Extra labels and annotations."
    )
    spec: dict[str, Any] = Field(
        default_factory=dict,
        json_schema_extra={"x-kubernetes-preserve-unknown-fields": True},
        description="A partial core/v1 PodSpec merged into the worker pods "
        "(containers are matched by name; the serving container is named 'model').",
    )


class ModelDeploymentSpec(_Spec):
    """The desired state of one served model."""

    model: ModelSource = Field(description="Which weights to serve.")
    engine: EngineSpec = Field(default_factory=EngineSpec, description="Engine settings.")
    replicas: int = Field(
        default=1,
        ge=0,
        le=1024,
        description="Serve replicas (worker pods); the /scale subresource and the autoscaler write it.",
    )
    autoscaling: AutoscalingSpec = Field(
        default_factory=AutoscalingSpec, description="Queue-depth autoscaling."
    )
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="What each replica requests.")
    placement: PlacementSpec = Field(default_factory=PlacementSpec, description="Where replicas may run.")
    service: ServiceSpec = Field(default_factory=ServiceSpec, description="The endpoint Service.")
    image: str = Field(
        default="",
        max_length=1024,
        pattern=r"^[^\s]*$",
        description="Serving image (default: the operator's configured serving image).",
    )
    pod_template: PodTemplateOverlay = Field(
        default_factory=PodTemplateOverlay, description="Overlay on the worker pods."
    )

    @property
    def gpus_per_replica(self) -> int:
        """GPUs one replica requests on one node (0 in CPU mode)."""
        return self.engine.tensor_parallel_size if self.resources.accelerator == "gpu" else 0
