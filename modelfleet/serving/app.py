"""Builds the Serve application of one ModelDeployment: the OpenAI ingress, the model
deployment (one engine per replica, placed by a STRICT_PACK placement group) and the
metrics hub. With `ingress: replica` the model deployment serves the API itself and is the
application's ingress (`direct.py`).

`build_app` is the import path a Serve config names, so the operator deploys the same
application with `import_path: modelfleet.serving.app:build_app` and plain-dict args:

    args:
      manifest: {apiVersion: modelfleet.dev/v1alpha1, kind: ModelDeployment, ...}
      overrides: {device: cuda}          # any ServeSettings field

or `args: {settings: {...}}` with every ServeSettings field spelled out. Changing only
`num_replicas` of the `Model` deployment in that config scales without reloading the
replicas that stay.
"""

from __future__ import annotations

from typing import Any

from ray import serve
from ray.serve import Application

from modelfleet.serving.direct import DirectModelReplica
from modelfleet.serving.hub import MetricsHub
from modelfleet.serving.ingress import OpenAIIngress
from modelfleet.serving.placement import placement_options
from modelfleet.serving.replica import ModelReplica
from modelfleet.serving.settings import ServeSettings, settings_from_deployment

MODEL_DEPLOYMENT = "Model"
INGRESS_DEPLOYMENT = "OpenAIIngress"
HUB_DEPLOYMENT = "MetricsHub"


def use_gpu(settings: ServeSettings) -> bool:
    """`auto` means GPUs when the Ray cluster has any."""
    if settings.device != "auto":
        return settings.device == "cuda"
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) > 0


# Requests a replica serving the API itself takes besides its sequence slots and queue: health
# checks, scrapes of /metrics, and requests on their way to a 429.
DIRECT_SPARE_REQUESTS = 64


def model_options(settings: ServeSettings, gpu: bool) -> dict[str, Any]:
    """Serve options of the model deployment; pure, so the operator and tests can read them."""
    if settings.ingress == "replica":
        # The replica bounds its own queue and answers 429 beyond it; Serve's bound must
        # never be the one that binds, or requests would wait unseen in Serve's router.
        ongoing = settings.max_num_seqs + settings.max_queue_depth + DIRECT_SPARE_REQUESTS
    else:
        # A replica takes its sequence slots and a few more; a backlog waits in Serve's
        # router, where the first replica with room (a new one included) takes the oldest
        # request. The ingress bounds that backlog (`max_queue_depth` per ready replica)
        # and answers 429 beyond it, so Serve's own bound is off.
        ongoing = settings.replica_capacity
    return {
        "name": MODEL_DEPLOYMENT,
        "num_replicas": settings.replicas,
        "max_ongoing_requests": ongoing,
        "max_queued_requests": -1,
        "health_check_period_s": settings.health_check_period_s,
        "health_check_timeout_s": 30.0,
        "graceful_shutdown_timeout_s": 10.0,
        **placement_options(settings.tensor_parallel_size, gpu),
    }


def constructor_args(settings: ServeSettings) -> dict[str, Any]:
    """What the replicas are built with. The replica count is left out: Serve changes
    `num_replicas` in place, but any change to constructor args restarts every replica."""
    args = settings.to_dict()
    del args["replicas"]
    return args


def build_application(settings: ServeSettings, model_overrides: dict[str, Any] | None = None) -> Application:
    """The application; `model_overrides` replaces Serve options of the Model deployment (for
    instance Ray Serve's own `autoscaling_config`, which the autoscaling benchmark compares)."""
    gpu = use_gpu(settings)
    # With GPU bundles and `auto`, each replica decides where it runs: on its GPUs when it sees
    # them, on the CPU when the node only advertises GPUs it does not have (a test node).
    if not gpu:
        settings = ServeSettings.from_dict({**settings.to_dict(), "device": "cpu"})
    args = constructor_args(settings)
    hub = (
        serve.deployment(MetricsHub)
        .options(name=HUB_DEPLOYMENT, num_replicas=1, ray_actor_options={"num_cpus": 0})
        .bind(settings.name, settings.namespace)
    )
    options = {**model_options(settings, gpu), **(model_overrides or {})}
    if "autoscaling_config" in options:
        options.pop("num_replicas", None)
    if settings.ingress == "replica":
        return serve.deployment(DirectModelReplica).options(**options).bind(args, hub)
    model = serve.deployment(ModelReplica).options(**options).bind(args, hub)
    return (
        serve.deployment(OpenAIIngress)
        .options(
            name=INGRESS_DEPLOYMENT,
            num_replicas=1,
            max_ongoing_requests=4096,
            ray_actor_options={"num_cpus": 0},
        )
        .bind(args, model, hub)
    )


def settings_from_args(args: dict[str, Any]) -> ServeSettings:
    if "settings" in args:
        return ServeSettings.from_dict(dict(args["settings"]))
    from modelfleet.api import ModelDeployment, load_manifest

    manifest = args.get("manifest")
    if manifest is None:
        raise ValueError("build_app needs `manifest` (a ModelDeployment or a path) or `settings`")
    md = load_manifest(manifest) if isinstance(manifest, str) else ModelDeployment.parse(manifest)
    return settings_from_deployment(md, **dict(args.get("overrides") or {}))


def build_app(args: dict[str, Any]) -> Application:
    """The Serve application builder named in Serve configs."""
    return build_application(settings_from_args(args))
