"""Cross-field rules, each written once as CEL (for the API server) and once as Python.

Both forms live side by side so they cannot drift apart unnoticed; a test runs every rule's
CEL and Python on the same manifests and requires the same verdict and message.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel

from modelfleet.api.spec import (
    NAME_MAX_LENGTH,
    NAME_PATTERN,
    AutoscalingSpec,
    ModelDeploymentSpec,
    ModelSource,
    ResourcesSpec,
    Toleration,
)


@dataclass(frozen=True)
class Rule:
    """One cross-field rule: where it sits, the field it blames, its CEL and its Python twin."""

    scope: str  # dotted path of the object the rule sees as `self`; "[*]" marks list items
    field: str  # the field the error names, relative to scope
    cel: str  # the rule, over `self`
    # The message as a CEL string expression. Values go in through format(): the API server's cost
    # estimate treats `'...' + string(int)` as unbounded and refuses the CRD.
    message_cel: str
    model: type[BaseModel] | None  # validates the raw object at scope before `check` runs
    check: Callable[[Any], str | None]  # the rule in Python: the message when broken, else None


RULES: list[Rule] = [
    Rule(
        scope="spec.autoscaling",
        field="minReplicas",
        cel="self.minReplicas <= self.maxReplicas",
        message_cel="'spec.autoscaling.minReplicas (%d) must be <= spec.autoscaling.maxReplicas (%d)'"
        ".format([self.minReplicas, self.maxReplicas])",
        model=AutoscalingSpec,
        check=lambda a: (
            None
            if a.min_replicas <= a.max_replicas
            else f"spec.autoscaling.minReplicas ({a.min_replicas}) must be <= "
            f"spec.autoscaling.maxReplicas ({a.max_replicas})"
        ),
    ),
    Rule(
        scope="spec",
        field="replicas",
        cel="!self.autoscaling.enabled || (self.replicas >= self.autoscaling.minReplicas"
        " && self.replicas <= self.autoscaling.maxReplicas)",
        message_cel="'spec.replicas (%d) must be within spec.autoscaling.minReplicas..maxReplicas (%d..%d) "
        "while autoscaling is enabled'.format([self.replicas, self.autoscaling.minReplicas, "
        "self.autoscaling.maxReplicas])",
        model=ModelDeploymentSpec,
        check=lambda s: (
            None
            if not s.autoscaling.enabled
            or s.autoscaling.min_replicas <= s.replicas <= s.autoscaling.max_replicas
            else f"spec.replicas ({s.replicas}) must be within spec.autoscaling.minReplicas..maxReplicas"
            f" ({s.autoscaling.min_replicas}..{s.autoscaling.max_replicas}) while autoscaling is enabled"
        ),
    ),
    Rule(
        scope="spec.model",
        field="revision",
        cel="!has(self.revision) || (self.uri.startsWith('hf://') && !self.uri.contains('@'))",
        message_cel="'spec.model.revision is only for hf:// URIs without an @revision; "
        "remove it or use uri hf://org/name with revision'",
        model=ModelSource,
        check=lambda m: (
            None
            if m.revision is None or (m.uri.startswith("hf://") and "@" not in m.uri)
            else "spec.model.revision is only for hf:// URIs without an @revision; "
            "remove it or use uri hf://org/name with revision"
        ),
    ),
    Rule(
        scope="spec.resources",
        field="gpu.product",
        cel="self.accelerator == 'gpu' || !has(self.gpu) || !has(self.gpu.product)",
        message_cel="'spec.resources.gpu.product needs spec.resources.accelerator gpu; "
        "remove the product or set accelerator: gpu'",
        model=ResourcesSpec,
        check=lambda r: (
            None
            if r.accelerator == "gpu" or r.gpu.product is None
            else "spec.resources.gpu.product needs spec.resources.accelerator gpu; "
            "remove the product or set accelerator: gpu"
        ),
    ),
    Rule(
        scope="spec.placement.tolerations[*]",
        field="value",
        cel="self.operator != 'Exists' || !has(self.value) || self.value == ''",
        message_cel="'a toleration with operator Exists matches any value; remove value or use "
        "operator Equal'",
        model=Toleration,
        check=lambda t: (
            None
            if t.operator != "Exists" or not t.value
            else "a toleration with operator Exists matches any value; remove value or use operator Equal"
        ),
    ),
]

# The root rule on metadata.name: CEL at the top of the CRD schema, a field pattern in Python.
NAME_RULE_CEL = (
    f"self.metadata.name.size() <= {NAME_MAX_LENGTH} && self.metadata.name.matches('{NAME_PATTERN}')"
)
NAME_RULE_MESSAGE = (
    f"metadata.name must be at most {NAME_MAX_LENGTH} characters of lowercase letters, digits "
    "and '-', starting with a letter (it names the Services and pods)"
)


def objects_at(doc: Any, scope: str) -> list[tuple[str, Any]]:
    """The raw objects under a dotted scope, with their concrete paths ("[*]" expands lists)."""
    found: list[tuple[str, Any]] = [("", doc)]
    for part in scope.split("."):
        many = part.endswith("[*]")
        key = part.removesuffix("[*]")
        nxt: list[tuple[str, Any]] = []
        for path, obj in found:
            if not isinstance(obj, dict):
                continue
            # An absent object takes its defaults, as the API server's defaulting does.
            value = obj.get(key, [] if many else {})
            here = f"{path}.{key}" if path else key
            if many:
                if isinstance(value, list):
                    nxt.extend((f"{here}[{i}]", item) for i, item in enumerate(value))
            else:
                nxt.append((here, value))
        found = nxt
    return found
