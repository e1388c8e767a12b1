"""The generated CRD: current, structural, and in agreement with the Python rules.

The API server's own verdict is checked in tests/cluster; here the same cases run through the
CRD's OpenAPI schema (jsonschema, with the server's defaulting and strict unknown-field
decoding emulated) and its CEL rules (cel-python), and must agree with Python.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import celpy
import jsonschema
import pytest
import yaml
from manifest_cases import INVALID_CASES, VALID_CASES, base

from modelfleet.api import validation_problems
from modelfleet.api.crd import CRD_FILE, build_crd, crd_yaml
from modelfleet.api.rules import RULES

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def crd() -> dict[str, Any]:
    return build_crd()


@pytest.fixture(scope="module")
def schema(crd) -> dict[str, Any]:
    return crd["spec"]["versions"][0]["schema"]["openAPIV3Schema"]


def test_crd_file_is_current():
    on_disk = (ROOT / CRD_FILE).read_text()
    assert on_disk == crd_yaml(), "crds/ is stale: run `modelfleet crd > " + CRD_FILE + "`"


def test_reference_is_current():
    from modelfleet.api.reference import reference_markdown

    assert (ROOT / "docs/manifest-reference.md").read_text() == reference_markdown(), (
        "docs/manifest-reference.md is stale: run `modelfleet reference > docs/manifest-reference.md`"
    )


def _walk(node: Any, path: str = ""):
    if isinstance(node, dict):
        yield path, node
        for key, value in node.items():
            yield from _walk(value, f"{path}/{key}")
    elif isinstance(node, list):
        for i, value in enumerate(node):
            yield from _walk(value, f"{path}[{i}]")


def test_schema_is_structural(schema):
    for path, node in _walk(schema):
        assert "$ref" not in node, path
        assert "allOf" not in node and "oneOf" not in node, path
        if path.endswith("/properties") or "x-kubernetes-validations" in path.rsplit("/", 1)[-1]:
            continue
        if path.endswith(("/default", "/enum")) or "/x-kubernetes-validations" in path:
            continue
        if "properties" in node or "items" in node or "pattern" in node or "enum" in node:
            assert (
                "type" in node
                or node.get("x-kubernetes-int-or-string")
                or node.get("x-kubernetes-preserve-unknown-fields")
            ), f"{path} has no type"
        assert node.get("additionalProperties") is not False, path


def test_crd_shape(crd):
    spec = crd["spec"]
    assert crd["metadata"]["name"] == "modeldeployments.modelfleet.dev"
    assert spec["names"]["shortNames"] == ["md"]
    assert spec["names"]["categories"]
    version = spec["versions"][0]
    assert version["name"] == "v1alpha1" and version["served"] and version["storage"]
    assert version["subresources"]["status"] == {}
    assert version["subresources"]["scale"] == {
        "specReplicasPath": ".spec.replicas",
        "statusReplicasPath": ".status.replicas",
        "labelSelectorPath": ".status.selector",
    }
    columns = [c["name"].upper() for c in version["additionalPrinterColumns"]]
    assert columns == ["MODEL", "TP", "READY", "QUEUE", "PHASE", "AGE"]


def test_schema_carries_limits_defaults_and_quantities(schema):
    spec = schema["properties"]["spec"]
    engine = spec["properties"]["engine"]["properties"]
    assert engine["tensorParallelSize"] == {
        **engine["tensorParallelSize"],
        "type": "integer",
        "minimum": 1,
        "maximum": 64,
        "default": 1,
    }
    assert engine["kvCacheMemoryFraction"]["exclusiveMinimum"] is True
    assert spec["properties"]["model"]["properties"]["dtype"]["enum"] == [
        "auto",
        "bfloat16",
        "float16",
        "float32",
    ]
    assert spec["required"] == ["model"]
    cpu = spec["properties"]["resources"]["properties"]["cpu"]
    assert cpu["x-kubernetes-int-or-string"] is True and "pattern" in cpu
    assert spec["properties"]["autoscaling"]["default"]["minReplicas"] == 1
    assert spec["properties"]["resources"]["default"]["gpu"] == {"resourceName": "nvidia.com/gpu"}
    # An optional object with a required field must not be defaulted into existence.
    assert "default" not in spec["properties"]["service"]["properties"]["apiKeySecretRef"]
    rules = [r["rule"] for _, n in _walk(schema) for r in n.get("x-kubernetes-validations", [])]
    assert len(rules) == len(RULES) + 1


# --- emulating the API server on the CRD schema -------------------------------------------------


def _strict(node: Any) -> Any:
    """The schema as the server applies it: unknown fields are errors (kubectl's strict validation)."""
    if isinstance(node, dict):
        out = {k: _strict(v) for k, v in node.items() if not k.startswith("x-kubernetes-validations")}
        if (
            out.get("type") == "object"
            and "properties" in out
            and not node.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(v) for v in node]
    return node


def _default(node: dict[str, Any], value: Any) -> Any:
    """Apply the schema's defaults the way the API server does."""
    if isinstance(value, dict) and "properties" in node:
        for key, prop in node["properties"].items():
            if key not in value and "default" in prop:
                value[key] = copy.deepcopy(prop["default"])
            if key in value:
                value[key] = _default(prop, value[key])
    elif isinstance(value, list) and "items" in node:
        return [_default(node["items"], v) for v in value]
    return value


def _format(template: Any, args: Any) -> celpy.celtypes.StringType:
    """Kubernetes' CEL `string.format(list)`, for the %d and %s the rules use."""
    return celpy.celtypes.StringType(
        str(template) % tuple(int(a) if isinstance(a, int) else str(a) for a in args)
    )


def _cel_errors(node: dict[str, Any], value: Any, path: str, env: celpy.Environment) -> list[str]:
    errors: list[str] = []
    for rule in node.get("x-kubernetes-validations", []):
        activation = celpy.json_to_cel({"self": value})
        ok = env.program(env.compile(rule["rule"])).evaluate(activation)
        if not ok:
            if "messageExpression" in rule:
                program = env.program(env.compile(rule["messageExpression"]), functions={"format": _format})
                msg = str(program.evaluate(activation))
            else:
                msg = rule["message"]
            where = f"{path}{rule.get('fieldPath', '')}".lstrip(".")
            errors.append(msg if not where or msg.startswith(where) else f"{where}: {msg}")
    if isinstance(value, dict):
        for key, prop in node.get("properties", {}).items():
            if key in value:
                errors += _cel_errors(prop, value[key], f"{path}.{key}".lstrip("."), env)
    if isinstance(value, list) and "items" in node:
        for i, item in enumerate(value):
            errors += _cel_errors(node["items"], item, f"{path}[{i}]", env)
    return errors


def server_errors(schema: dict[str, Any], manifest: dict[str, Any]) -> list[str]:
    doc = _default(schema, copy.deepcopy(manifest))
    validator = jsonschema.Draft4Validator(_strict(schema))
    errors = [
        ".".join(str(p) for p in e.absolute_path) + ": " + e.message for e in validator.iter_errors(doc)
    ]
    if errors:  # like the server, CEL runs only on a document that fits the schema
        return errors
    return _cel_errors(schema, doc, "", celpy.Environment())


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda c: c.name)
def test_crd_accepts_valid(schema, case):
    assert server_errors(schema, case.manifest) == []


@pytest.mark.parametrize("case", [c for c in INVALID_CASES if c.server], ids=lambda c: c.name)
def test_crd_refuses_invalid(schema, case):
    errors = server_errors(schema, case.manifest)
    assert errors, f"the CRD accepts {case.name}"
    leaf = case.field.split(".")[-1].split("[")[0]
    assert any(leaf in e for e in errors), errors


@pytest.mark.parametrize("case", [c for c in INVALID_CASES if c.server], ids=lambda c: c.name)
def test_cel_and_python_messages_agree(schema, case):
    """Where a cross-field rule fires, the CRD and Python say the same words."""
    doc = _default(schema, copy.deepcopy(case.manifest))
    if list(jsonschema.Draft4Validator(_strict(schema)).iter_errors(doc)):
        return  # a schema-level case; compared above
    cel = _cel_errors(schema, doc, "", celpy.Environment())
    _, problems = validation_problems(case.manifest)
    python = [str(p) for p in problems]
    assert sorted(cel) == sorted(python)


def test_defaulting_matches_python(schema):
    from modelfleet.api import parse_manifest

    def prune(value: Any) -> Any:  # empty maps and lists mean the same as absent ones
        if isinstance(value, dict):
            pruned = {k: prune(v) for k, v in value.items()}
            return {k: v for k, v in pruned.items() if v not in ({}, [])}
        return value

    defaulted = _default(schema, base())
    md = parse_manifest(base())
    python = md.model_dump(by_alias=True, exclude_none=True, mode="json")["spec"]
    assert prune(defaulted["spec"]) == prune(python)


def test_crd_yaml_parses_back_to_the_built_object():
    on_disk = yaml.safe_load((ROOT / CRD_FILE).read_text())
    assert on_disk == build_crd()
