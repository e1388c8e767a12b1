"""Changing a running application's model replica count in place.

Redeploying the application with a new `num_replicas` restarts nothing only when every
constructor arg is unchanged; Serve's external-scaler API changes the target outright. An
application takes it when deployed with `external_scaler_enabled` (RunTarget, or
`external_scaler_enabled: true` in a Serve config). From outside the cluster the same call is
`POST /api/v1/applications/<app>/deployments/Model/scale` with
`{"target_num_replicas": N}` on the Ray dashboard.
"""

from __future__ import annotations

from modelfleet.serving.app import MODEL_DEPLOYMENT


def set_model_replicas(app_name: str, replicas: int, timeout_s: float = 30.0) -> None:
    """Set the model deployment's replica target, from a driver connected to the cluster."""
    import ray
    from ray.serve._private.common import DeploymentID
    from ray.serve.context import _get_global_client

    if replicas < 0:
        raise ValueError(f"replicas must be >= 0, got {replicas}")
    controller = _get_global_client()._controller
    ref = controller.update_deployment_replicas.remote(DeploymentID(MODEL_DEPLOYMENT, app_name), replicas)
    ray.get(ref, timeout=timeout_s)
