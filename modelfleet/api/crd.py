"""The CustomResourceDefinition, generated from the Python spec (never written by hand).

pydantic's JSON schema is turned into a Kubernetes structural schema: references inlined,
Optional unwrapped, defaults kept so the API server fills them, and the cross-field rules of
`modelfleet.api.rules` attached as CEL `x-kubernetes-validations` with the field they blame.
"""

from __future__ import annotations

import copy
from typing import Any

import yaml

from modelfleet.api.rules import NAME_RULE_CEL, NAME_RULE_MESSAGE, RULES
from modelfleet.api.spec import (
    CATEGORIES,
    GROUP,
    KIND,
    PLURAL,
    SHORT_NAMES,
    SINGULAR,
    VERSION,
    ModelDeploymentSpec,
)
from modelfleet.api.status import ModelDeploymentStatus

CRD_NAME = f"{PLURAL}.{GROUP}"
CRD_FILE = f"crds/{CRD_NAME}.yaml"

PRINTER_COLUMNS = [
    {"name": "Model", "type": "string", "jsonPath": ".spec.model.uri", "description": "Model URI"},
    {
        "name": "TP",
        "type": "integer",
        "jsonPath": ".spec.engine.tensorParallelSize",
        "description": "GPUs per replica",
    },
    {
        "name": "Ready",
        "type": "string",
        "jsonPath": ".status.ready",
        "description": "Ready replicas / desired replicas",
    },
    {
        "name": "Queue",
        "type": "number",
        "jsonPath": ".status.observedQueueDepth",
        "description": "Waiting requests across replicas",
    },
    {"name": "Phase", "type": "string", "jsonPath": ".status.phase"},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]

_DROP = {"title", "$defs"}


def _resolve(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Inline a $ref (keeping the referrer's description and default)."""
    if "$ref" in node:
        target = copy.deepcopy(defs[node["$ref"].split("/")[-1]])
        extra = {k: v for k, v in node.items() if k != "$ref"}
        target.update(extra)
        return _resolve(target, defs)
    if "allOf" in node and len(node["allOf"]) == 1:
        merged = {k: v for k, v in node.items() if k != "allOf"}
        inner = _resolve(node["allOf"][0], defs)
        return {**inner, **merged}
    return node


def _nullable(node: dict[str, Any]) -> bool:
    return any(o.get("type") == "null" for o in node.get("anyOf", []))


def structural(node: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """A Kubernetes structural schema for one pydantic JSON schema node."""
    node = _resolve(node, defs)
    if "anyOf" in node and not node.get("x-kubernetes-int-or-string"):
        options = [o for o in node["anyOf"] if o.get("type") != "null"]
        rest = {k: v for k, v in node.items() if k != "anyOf"}
        if len(options) == 1:
            node = {**_resolve(options[0], defs), **rest}
    out: dict[str, Any] = {}
    optional: set[str] = set()
    for key, value in node.items():
        if key in _DROP:
            continue
        if key == "default" and value is None:
            continue
        if key == "additionalProperties":
            if isinstance(value, dict):
                out[key] = structural(value, defs)
            continue  # false is implied by a structural schema; true by preserve-unknown-fields
        if key == "properties":
            out[key] = {k: structural(v, defs) for k, v in value.items()}
            optional = {k for k, v in value.items() if _nullable(v)}
        elif key == "items":
            out[key] = structural(value, defs)
        elif key == "exclusiveMinimum":
            out["minimum"], out["exclusiveMinimum"] = value, True
        elif key == "exclusiveMaximum":
            out["maximum"], out["exclusiveMaximum"] = value, True
        elif key == "const":
            out["enum"] = [value]
        else:
            out[key] = value
    if out.get("type") == "object" and "properties" in out:
        required = set(out.get("required", []))
        for name, prop in out["properties"].items():
            # A whole object left out gets its fields' defaults. The API server checks a default
            # against the schema and CEL rules as it stands, so it is spelled out, not `{}`.
            fillable = name not in required and name not in optional
            if prop.get("type") == "object" and "properties" in prop and fillable:
                prop.setdefault(
                    "default", {k: v["default"] for k, v in prop["properties"].items() if "default" in v}
                )
    return out


def _attach_rules(schema: dict[str, Any]) -> None:
    for rule in RULES:
        node = schema
        for part in rule.scope.split(".")[1:]:  # scopes start at "spec"
            key = part.removesuffix("[*]")
            node = node["properties"][key]
            if part.endswith("[*]"):
                node = node["items"]
        static = (
            rule.message_cel.startswith("'")
            and rule.message_cel.endswith("'")
            and ".format(" not in rule.message_cel
        )
        message = {"message": rule.message_cel[1:-1]} if static else {"messageExpression": rule.message_cel}
        node.setdefault("x-kubernetes-validations", []).append(
            {"rule": rule.cel, **message, "fieldPath": "." + rule.field, "reason": "FieldValueInvalid"}
        )


def spec_schema() -> dict[str, Any]:
    raw = ModelDeploymentSpec.model_json_schema(by_alias=True, mode="validation")
    schema = structural(raw, raw.get("$defs", {}))
    _attach_rules(schema)
    return schema


def status_schema() -> dict[str, Any]:
    raw = ModelDeploymentStatus.model_json_schema(by_alias=True, mode="serialization")
    return structural(raw, raw.get("$defs", {}))


def build_crd() -> dict[str, Any]:
    """The CRD object for modeldeployments.modelfleet.dev."""
    spec = spec_schema()
    spec["description"] = "The desired state of one served model."
    status = status_schema()
    status["description"] = "What the operator observed."
    root = {
        "type": "object",
        "description": "A ModelDeployment serves one open-weight model behind an "
        "OpenAI-compatible endpoint, as Ray Serve replicas of tensor-parallel workers.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string"},
            "kind": {"type": "string"},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
        "x-kubernetes-validations": [
            # No fieldPath: metadata has no schema here to point into; the message names the field.
            {"rule": NAME_RULE_CEL, "message": NAME_RULE_MESSAGE}
        ],
    }
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {
            "name": CRD_NAME,
            "labels": {"app.kubernetes.io/name": "modelfleet", "app.kubernetes.io/part-of": "modelfleet"},
        },
        "spec": {
            "group": GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": KIND,
                "listKind": f"{KIND}List",
                "plural": PLURAL,
                "singular": SINGULAR,
                "shortNames": SHORT_NAMES,
                "categories": CATEGORIES,
            },
            "versions": [
                {
                    "name": VERSION,
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": root},
                    "subresources": {
                        "status": {},
                        "scale": {
                            "specReplicasPath": ".spec.replicas",
                            "statusReplicasPath": ".status.replicas",
                            "labelSelectorPath": ".status.selector",
                        },
                    },
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                }
            ],
        },
    }


class _Dumper(yaml.SafeDumper):
    """Block-style YAML with long strings kept on one line."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.Node:
    return dumper.represent_scalar("tag:yaml.org,2002:str", value)


_Dumper.add_representer(str, _str)


def crd_yaml() -> str:
    header = "# Generated by `modelfleet crd` from modelfleet/api; do not edit by hand.\n"
    body = yaml.dump(build_crd(), Dumper=_Dumper, sort_keys=False, width=1 << 16)
    return header + body
