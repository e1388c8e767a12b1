"""The ModelDeployment status the operator writes: phase, conditions and replica counts."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field
from pydantic.alias_generators import to_camel

Phase = Literal["Pending", "Loading", "Ready", "Degraded", "Failed"]
ConditionType = Literal["Ready", "Progressing", "Degraded", "CapacityLimited", "AutoscalingActive"]


class _Status(BaseModel):
    # Status comes back from the API server; fields a newer operator added are ignored, not errors.
    model_config = ConfigDict(alias_generator=to_camel, populate_by_name=True, extra="ignore")


class Condition(_Status):
    """A metav1.Condition."""

    type: str = Field(max_length=316, description="Ready, Progressing, Degraded, CapacityLimited.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(default="", max_length=1024, description="A CamelCase word for the last transition.")
    message: str = Field(default="", max_length=32768, description="What happened, for humans.")
    last_transition_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When status last changed.",
    )
    observed_generation: int | None = Field(
        default=None, ge=0, description="The generation the condition was set for."
    )


class ModelDeploymentStatus(_Status):
    """What the operator observed."""

    phase: Phase | None = Field(default=None, description="Pending, Loading, Ready, Degraded or Failed.")
    conditions: list[Condition] = Field(
        default_factory=list,
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
        description="Ready, Progressing, Degraded, CapacityLimited, AutoscalingActive.",
    )
    observed_generation: int | None = Field(
        default=None, description="The spec generation the status describes."
    )
    replicas: int | None = Field(default=None, description="Worker pods that exist.")
    ready_replicas: int | None = Field(default=None, description="Replicas serving requests.")
    desired_replicas: int | None = Field(default=None, description="Replicas the autoscaler wants.")
    ready: str | None = Field(default=None, description="ready/desired, for kubectl get.")
    selector: str | None = Field(default=None, description="Label selector of the worker pods (for /scale).")
    endpoint: str | None = Field(default=None, description="In-cluster URL of the OpenAI API.")
    last_scale_time: str | None = Field(
        default=None,
        json_schema_extra={"format": "date-time"},
        description="When the autoscaler last changed spec.replicas.",
    )
    observed_queue_depth: float | None = Field(
        default=None, description="Waiting requests across replicas, as last seen."
    )
