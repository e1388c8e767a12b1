"""Every child the operator builds, from manifests alone (no cluster)."""

from __future__ import annotations

import json

import pytest
from manifest_cases import base, with_

from modelfleet.api import load_manifest, parse_manifest
from modelfleet.operator import naming
from modelfleet.operator.children import SERVE_CONFIG_KEY, build_children
from modelfleet.operator.pods import GPU_PRODUCT_LABEL, READY_FILE, spec_hash
from modelfleet.operator.serveconfig import target_replicas
from modelfleet.operator.settings import OperatorSettings

SETTINGS = OperatorSettings(serving_image="registry.example/modelfleet:1.0")


def md_of(doc):
    md = parse_manifest(doc)
    md.metadata.uid = "uid-1"
    return md


def by_kind(children):
    out = {}
    for c in children:
        out.setdefault(c["kind"], []).append(c)
    return out


def worker_of(md, **kw):
    return next(
        c
        for c in build_children(md, SETTINGS, **kw)
        if c["metadata"]["name"].endswith("-workers") and c["kind"] == "Deployment"
    )


def test_every_child_is_owned_and_labelled():
    md = md_of(base())
    children = build_children(md, SETTINGS)
    kinds = sorted(c["kind"] for c in children)
    assert kinds == ["ConfigMap", "Deployment", "Deployment", "PodDisruptionBudget", "Service", "Service"]
    for child in children:
        meta = child["metadata"]
        assert meta["namespace"] == "default"
        (owner,) = meta["ownerReferences"]
        assert owner == {
            "apiVersion": "modelfleet.dev/v1alpha1",
            "kind": "ModelDeployment",
            "name": "tiny",
            "uid": "uid-1",
            "controller": True,
            "blockOwnerDeletion": True,
        }
        for key in ("name", "instance", "component", "managed-by"):
            assert f"app.kubernetes.io/{key}" in meta["labels"]
        assert meta["labels"]["app.kubernetes.io/instance"] == "tiny"
    assert len({(c["kind"], c["metadata"]["name"]) for c in children}) == len(children)


def test_pod_monitor_only_when_asked():
    md = md_of(base())
    assert "PodMonitor" not in by_kind(build_children(md, SETTINGS))
    (pm,) = by_kind(build_children(md, SETTINGS, with_pod_monitor=True))["PodMonitor"]
    assert pm["spec"]["podMetricsEndpoints"][0]["path"] == "/metrics"


def test_head_has_no_gpu_and_exposes_ray_ports():
    md = md_of(base())
    kinds = by_kind(build_children(md, SETTINGS))
    head = next(d for d in kinds["Deployment"] if d["metadata"]["name"] == "tiny-head")
    assert head["spec"]["replicas"] == 1 and head["spec"]["strategy"]["type"] == "Recreate"
    (container,) = head["spec"]["template"]["spec"]["containers"]
    assert not any("gpu" in k for k in container["resources"]["requests"])
    assert "--head" in container["command"][-1] and "--num-gpus=0" in container["command"][-1]
    service = next(s for s in kinds["Service"] if s["metadata"]["name"] == "tiny-head")
    assert {p["port"] for p in service["spec"]["ports"]} == {6379, 8265, 10001, 8000}
    env = {e["name"]: e for e in container["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"]["name"] == "tiny-ray-token"
    assert env["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"]["value"] == "0"  # as `modelfleet serve`
    assert env["RAY_SERVE_USE_GRPC_BY_DEFAULT"]["value"] == "1"


def test_worker_requests_tp_gpus_on_one_pod_with_product_affinity():
    md = md_of(load_manifest("examples/qwen2.5-72b-tp4.yaml").to_manifest())
    worker = worker_of(md)
    assert worker["spec"]["replicas"] == 2
    pod = worker["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 4
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 4
    assert container["resources"]["requests"]["cpu"] == "32"
    assert container["image"] == SETTINGS.serving_image
    terms = pod["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"][
        "nodeSelectorTerms"
    ]
    assert terms == [
        {
            "matchExpressions": [
                {"key": GPU_PRODUCT_LABEL, "operator": "In", "values": ["NVIDIA-H100-80GB-HBM3"]}
            ]
        }
    ]
    assert pod["nodeSelector"] == {"node-pool": "llm-h100"}
    keys = [(t.get("key"), t.get("operator")) for t in pod["tolerations"]]
    assert ("nvidia.com/gpu", "Exists") in keys and ("dedicated", "Equal") in keys
    assert "--num-gpus=4" in container["command"][-1]
    shm = next(v for v in pod["volumes"] if v["name"] == "shm")
    assert shm["emptyDir"]["medium"] == "Memory" and shm["emptyDir"]["sizeLimit"] == "131072Mi"
    env = {e["name"]: e for e in container["env"]}
    assert env["MODELFLEET_API_KEY"]["valueFrom"]["secretKeyRef"] == {"name": "qwen-api-key", "key": "key"}


def test_worker_probes_never_kill_a_loading_model():
    md = md_of(base())
    container = worker_of(md)["spec"]["template"]["spec"]["containers"][0]
    startup = container["startupProbe"]
    assert startup["periodSeconds"] * startup["failureThreshold"] >= SETTINGS.startup_timeout_seconds
    assert READY_FILE in container["readinessProbe"]["exec"]["command"][-1]
    assert container["lifecycle"]["preStop"]["exec"]["command"][:3] == [
        "python",
        "-m",
        "modelfleet.operator.drain",
    ]
    grace = worker_of(md)["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace > SETTINGS.drain_timeout_seconds


def test_cpu_mode_requests_no_gpu_and_offers_tp_cpus():
    md = md_of(with_({"spec.resources.accelerator": "cpu", "spec.engine.tensorParallelSize": 2}))
    container = worker_of(md)["spec"]["template"]["spec"]["containers"][0]
    assert not any("gpu" in k for k in container["resources"]["requests"])
    assert "--num-gpus=0" in container["command"][-1] and "--num-cpus=2" in container["command"][-1]


@pytest.mark.parametrize(
    ("surge", "rolling"),
    [(True, {"maxSurge": 1, "maxUnavailable": 0}), (False, {"maxSurge": 0, "maxUnavailable": 1})],
)
def test_rolling_update_surges_only_with_room(surge, rolling):
    md = md_of(base())
    assert worker_of(md, surge=surge)["spec"]["strategy"]["rollingUpdate"] == rolling


def test_spec_hash_ignores_replicas_and_metadata_but_not_the_model():
    one = md_of(base())
    scaled = md_of(with_({"spec.replicas": 3, "metadata.labels": {"team": "a"}}))
    other_model = md_of(with_({"spec.model.uri": "hf://Qwen/Qwen2.5-0.5B"}))
    other_engine = md_of(with_({"spec.engine.maxNumSeqs": 8}))
    assert spec_hash(one, SETTINGS) == spec_hash(scaled, SETTINGS)
    assert spec_hash(one, SETTINGS) != spec_hash(other_model, SETTINGS)
    assert spec_hash(one, SETTINGS) != spec_hash(other_engine, SETTINGS)
    template = worker_of(one)["spec"]["template"]
    assert template["metadata"]["annotations"][naming.SPEC_HASH] == spec_hash(one, SETTINGS)
    assert worker_of(one)["spec"]["template"] == worker_of(scaled)["spec"]["template"]


def test_serve_config_carries_replicas_only_in_num_replicas():
    one, three = md_of(base()), md_of(with_({"spec.replicas": 3}))
    cm1, cm3 = (by_kind(build_children(m, SETTINGS))["ConfigMap"][0] for m in (one, three))
    c1, c3 = (json.loads(cm["data"][SERVE_CONFIG_KEY]) for cm in (cm1, cm3))
    assert (target_replicas(c1), target_replicas(c3)) == (1, 3)
    assert c1["applications"][0]["args"] == c3["applications"][0]["args"]
    assert c1["applications"][0]["import_path"] == "modelfleet.serving.app:build_app"


def test_serve_config_builds_the_serving_settings():
    """The args the operator sends are what the serving app reads."""
    from modelfleet.serving.app import settings_from_args

    md = md_of(load_manifest("examples/llama-3.1-8b.yaml").to_manifest())
    config = json.loads(by_kind(build_children(md, SETTINGS))["ConfigMap"][0]["data"][SERVE_CONFIG_KEY])
    settings = settings_from_args(config["applications"][0]["args"])
    assert settings.name == "llama-3-1-8b" and settings.served_name == "llama-3.1-8b"
    assert settings.model == "hf://meta-llama/Llama-3.1-8B-Instruct"
    assert settings.max_queue_depth == 256


def test_endpoint_service_fronts_ready_proxies():
    md = md_of(with_({"spec.service": {"type": "LoadBalancer", "port": 9000, "annotations": {"lb": "x"}}}))
    svc = next(s for s in by_kind(build_children(md, SETTINGS))["Service"] if s["metadata"]["name"] == "tiny")
    assert svc["spec"]["type"] == "LoadBalancer"
    assert svc["spec"]["ports"] == [{"name": "http", "port": 9000, "targetPort": 8000, "protocol": "TCP"}]
    assert svc["metadata"]["annotations"] == {"lb": "x"}
    worker_labels = worker_of(md)["spec"]["template"]["metadata"]["labels"]
    assert all(worker_labels.get(k) == v for k, v in svc["spec"]["selector"].items())


def test_pdb_keeps_all_but_one():
    md = md_of(base())
    (pdb,) = by_kind(build_children(md, SETTINGS))["PodDisruptionBudget"]
    assert pdb["spec"]["maxUnavailable"] == 1
    assert pdb["spec"]["selector"]["matchLabels"] == naming.selector(md, naming.COMPONENT_WORKER)


def test_pod_template_overlay_merges_env_volumes_and_annotations():
    md = md_of(
        with_(
            {
                "spec.podTemplate": {
                    "metadata": {"annotations": {"team": "ml"}, "labels": {"cost": "a"}},
                    "spec": {
                        "containers": [
                            {
                                "name": "model",
                                "env": [
                                    {"name": "HF_TOKEN", "value": "t"},
                                    {"name": "HF_HOME", "value": "/data/hf"},
                                ],
                                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                            }
                        ],
                        "volumes": [{"name": "data", "persistentVolumeClaim": {"claimName": "weights"}}],
                    },
                }
            }
        )
    )
    template = worker_of(md)["spec"]["template"]
    (container,) = template["spec"]["containers"]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["HF_TOKEN"] == "t" and env["HF_HOME"] == "/data/hf" and "RAY_AUTH_MODE" in env
    assert {"name": "data", "mountPath": "/data"} in container["volumeMounts"]
    assert any(v["name"] == "data" for v in template["spec"]["volumes"])
    assert any(v["name"] == "shm" for v in template["spec"]["volumes"])
    assert template["metadata"]["annotations"]["team"] == "ml"
    assert template["metadata"]["labels"]["cost"] == "a"
    assert template["metadata"]["labels"]["app.kubernetes.io/instance"] == "tiny"


def test_owner_reference_needs_a_uid():
    md = parse_manifest(base())
    with pytest.raises(ValueError, match="no uid"):
        build_children(md, SETTINGS)


def test_plan_prints_the_children_as_yaml():
    import subprocess
    import sys

    import yaml

    out = subprocess.run(
        [sys.executable, "-m", "modelfleet.cli", "plan", "-f", "examples/tiny.yaml"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    docs = [d for d in yaml.safe_load_all(out.stdout) if d]
    assert sorted(f"{d['kind']}/{d['metadata']['name']}" for d in docs) == [
        "ConfigMap/tiny-serve",
        "Deployment/tiny-head",
        "Deployment/tiny-workers",
        "PodDisruptionBudget/tiny-workers",
        "Service/tiny",
        "Service/tiny-head",
    ]
