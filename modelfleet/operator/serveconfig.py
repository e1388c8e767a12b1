"""The Serve config the operator deploys into each Ray cluster (the dashboard's REST API format).

Only what the replicas need travels in the application args, so a change of `spec.replicas`
or of metadata restarts nothing. The replica count itself goes through Serve's external-scaler
API (`POST /api/v1/applications/<app>/deployments/Model/scale`), which also takes 0; a Serve
config cannot say 0, so its `num_replicas` is only the count a fresh deploy starts with.
"""

from __future__ import annotations

from typing import Any

from modelfleet.api import API_VERSION, KIND, ModelDeployment
from modelfleet.operator.naming import SERVE_PORT
from modelfleet.serving.settings import API_KEY_ENV

IMPORT_PATH = "modelfleet.serving.app:build_app"
MODEL_DEPLOYMENT = "Model"
SCALE_PATH = "/api/v1/applications/{app}/deployments/" + MODEL_DEPLOYMENT + "/scale"


def app_args(md: ModelDeployment) -> dict[str, Any]:
    spec = md.spec.model_dump(
        by_alias=True, exclude_none=True, mode="json", include={"model", "engine", "service"}
    )
    spec["service"].pop("annotations", None)
    return {
        "manifest": {
            "apiVersion": API_VERSION,
            "kind": KIND,
            "metadata": {"name": md.name, "namespace": md.namespace},
            "spec": spec,
        },
        "overrides": {
            "api_key_env": API_KEY_ENV,
            "cold_start_timeout_s": float(md.spec.autoscaling.cold_start_timeout_seconds),
        },
    }


def serve_config(md: ModelDeployment) -> dict[str, Any]:
    """The whole Serve config for one ModelDeployment's Ray cluster."""
    return {
        "proxy_location": "EveryNode",
        "http_options": {"host": "0.0.0.0", "port": SERVE_PORT},
        "applications": [
            {
                "name": md.name,
                "route_prefix": "/",
                "import_path": IMPORT_PATH,
                "args": app_args(md),
                "external_scaler_enabled": True,
                "deployments": [{"name": MODEL_DEPLOYMENT, "num_replicas": max(1, md.spec.replicas)}],
            }
        ],
    }


def target_replicas(config: dict[str, Any]) -> int | None:
    """The Model deployment's num_replicas in a Serve config, if set."""
    for app in config.get("applications", []):
        for dep in app.get("deployments", []):
            if dep.get("name") == MODEL_DEPLOYMENT:
                return dep.get("num_replicas")
    return None
