"""The ModelDeployment spec in Python: defaults, every invalid case naming its field, all at once."""

from __future__ import annotations

import pytest
from manifest_cases import INVALID_CASES, VALID_CASES, base, with_

from modelfleet.api import ManifestError, ModelDeployment, parse_manifest, validation_problems
from modelfleet.api.quantity import parse_quantity


def names_field(problems, field: str) -> bool:
    return any(p.path == field or p.path.startswith((field + ".", field + "[")) for p in problems)


@pytest.mark.parametrize("case", VALID_CASES, ids=lambda c: c.name)
def test_valid_manifests_parse(case):
    md = parse_manifest(case.manifest)
    assert isinstance(md, ModelDeployment)
    assert md.name == case.manifest["metadata"]["name"]


@pytest.mark.parametrize("case", INVALID_CASES, ids=lambda c: c.name)
def test_invalid_manifest_names_its_field(case):
    obj, problems = validation_problems(case.manifest)
    assert obj is None
    assert problems, "an invalid manifest must report a problem"
    assert names_field(problems, case.field), [str(p) for p in problems]
    for p in problems:
        assert str(p).strip(), "every problem has words"


def test_enough_distinct_invalid_cases():
    assert len({c.name for c in INVALID_CASES}) == len(INVALID_CASES) >= 30
    assert len({c.field for c in INVALID_CASES}) >= 30


def test_defaults_are_filled():
    md = parse_manifest(base())
    spec = md.spec
    assert md.namespace == "default"
    assert md.served_name == "tiny"
    assert spec.replicas == 1
    assert spec.engine.tensor_parallel_size == 1
    assert spec.engine.max_num_seqs == 256
    assert spec.engine.max_queue_depth == 128
    assert spec.model.dtype == "auto"
    assert spec.autoscaling.enabled is False
    assert (spec.autoscaling.min_replicas, spec.autoscaling.max_replicas) == (1, 4)
    assert spec.autoscaling.scale_down_stabilization_seconds == 300
    assert spec.resources.gpu.resource_name == "nvidia.com/gpu"
    assert spec.service.port == 8000 and spec.service.type == "ClusterIP"
    assert spec.gpus_per_replica == 1


def test_served_name_overrides_metadata_name():
    md = parse_manifest(with_({"spec.model.servedName": "qwen"}))
    assert md.served_name == "qwen"


def test_cpu_mode_requests_no_gpus():
    md = parse_manifest(with_({"spec.resources.accelerator": "cpu", "spec.engine.tensorParallelSize": 2}))
    assert md.spec.gpus_per_replica == 0


def test_cross_field_message_shows_both_values():
    doc = with_({"spec.autoscaling": {"minReplicas": 5, "maxReplicas": 2}})
    with pytest.raises(ManifestError) as err:
        parse_manifest(doc)
    assert "spec.autoscaling.minReplicas (5) must be <= spec.autoscaling.maxReplicas (2)" in str(err.value)


def test_all_problems_are_reported_at_once():
    doc = with_(
        {
            "spec.replicas": -1,
            "spec.model.dtype": "fp8",
            "spec.engine.tensorParallelSize": 0,
            "spec.autoscaling": {"minReplicas": 5, "maxReplicas": 2},
            "spec.service.port": 0,
            "spec.resources.memory": "64GB",
            "spec.colour": "blue",
        }
    )
    _, problems = validation_problems(doc)
    paths = {p.path for p in problems}
    assert {
        "spec.replicas",
        "spec.model.dtype",
        "spec.engine.tensorParallelSize",
        "spec.autoscaling.minReplicas",
        "spec.service.port",
        "spec.resources.memory",
        "spec.colour",
    } <= paths


def test_unknown_field_suggests_the_close_one():
    _, problems = validation_problems(with_({"spec.replica": 2}))
    (problem,) = problems
    assert problem.path == "spec.replica"
    assert "did you mean 'replicas'" in problem.message


def test_wrong_api_version_says_the_right_one():
    _, problems = validation_problems(with_({"apiVersion": "modelfleet.dev/v1beta1"}))
    assert any("modelfleet.dev/v1alpha1" in str(p) for p in problems)


def test_bad_enum_lists_the_choices():
    _, problems = validation_problems(with_({"spec.model.dtype": "fp8"}))
    assert "bfloat16" in str(problems[0]) and "float32" in str(problems[0])


def test_non_mapping_document():
    _, problems = validation_problems(["not", "a", "mapping"])
    assert "expected a ModelDeployment mapping" in str(problems[0])


def test_metadata_is_kept_when_read_from_the_server():
    doc = with_(
        {
            "metadata": {
                "name": "tiny",
                "namespace": "ml",
                "uid": "u1",
                "generation": 3,
                "resourceVersion": "42",
                "managedFields": [],
            },
            "status": {"phase": "Ready", "someFutureField": 1},
        }
    )
    md = parse_manifest(doc)
    assert (md.namespace, md.metadata.generation, md.metadata.uid) == ("ml", 3, "u1")
    assert md.status is not None and md.status.phase == "Ready"


def test_to_manifest_round_trips():
    doc = VALID_CASES[0].manifest
    md = parse_manifest(doc)
    assert parse_manifest(md.to_manifest()) == md


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("8", 8),
        ("500m", 0.5),
        ("64Gi", 64 * 2**30),
        ("1.5Gi", 1.5 * 2**30),
        ("1e3", 1000),
        ("2k", 2000),
        (4, 4),
    ],
)
def test_quantities(text, value):
    assert float(parse_quantity(text)) == pytest.approx(value)


@pytest.mark.parametrize("text", ["-1", "64GB", "lots", "", "1.2.3", "Gi"])
def test_bad_quantities(text):
    with pytest.raises(ValueError):
        parse_quantity(text)
