"""The chart's files, without helm: CRDs identical to crds/, values documented and schema-valid."""

from __future__ import annotations

import json
from pathlib import Path

import jsonschema
import yaml

ROOT = Path(__file__).resolve().parent.parent
CHART = ROOT / "helm" / "modelfleet"


def test_chart_crd_is_the_generated_one():
    for crd in (ROOT / "crds").glob("*.yaml"):
        assert (CHART / "crds" / crd.name).read_text() == crd.read_text(), (
            f"helm/modelfleet/crds/{crd.name} differs from crds/{crd.name}: copy it again"
        )


def test_values_match_their_schema():
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    schema = json.loads((CHART / "values.schema.json").read_text())
    jsonschema.validate(values, schema)
    bad = {**values, "logFormat": "xml"}
    try:
        jsonschema.validate(bad, schema)
    except jsonschema.ValidationError as err:
        assert "xml" in str(err)
    else:
        raise AssertionError("the values schema accepts logFormat: xml")


def test_every_value_is_documented():
    """Each value carries a `# --` comment, or sits inside a documented map (helm-docs style)."""
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, bool]] = []  # (indent, documented) of the enclosing keys
    undocumented = []
    for i, line in enumerate(lines):
        stripped = line.strip()
        if not stripped or stripped.startswith(("#", "-")) or ":" not in stripped:
            continue
        indent = len(line) - len(line.lstrip())
        while stack and stack[-1][0] >= indent:
            stack.pop()
        block = []
        j = i - 1
        while j >= 0 and lines[j].strip().startswith("#"):
            block.append(lines[j].strip())
            j -= 1
        documented = any(c.startswith("# --") for c in block) or any(d for _, d in stack)
        key, _, rest = stripped.partition(":")
        is_section = rest.strip() == ""
        if not documented and not is_section:
            undocumented.append(key)
        stack.append((indent, documented))
    assert not undocumented, f"values without a `# --` comment: {undocumented}"


def test_dashboard_is_json_with_the_contract_metrics():
    dashboard = json.loads((CHART / "dashboards" / "modelfleet.json").read_text())
    exprs = " ".join(t["expr"] for p in dashboard["panels"] for t in p["targets"])
    for metric in (
        "modelfleet_queue_depth",
        "modelfleet_replicas_ready",
        "modelfleet_time_to_first_token_seconds",
        "modelfleet_generation_tokens_total",
    ):
        assert metric in exprs
