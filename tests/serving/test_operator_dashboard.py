"""The operator's Serve side against a real Ray head: its dashboard REST API (token auth on, as in
the pods) takes the Serve config the operator builds from a ModelDeployment, and the replica
count follows spec.replicas through Serve's external-scaler API — down to zero, where the
endpoint holds a request until a replica is back.

The Ray head runs in its own process (its own local cluster, with the dashboard on loopback),
apart from the serving tier's in-process cluster."""

from __future__ import annotations

import os
import secrets
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator

import httpx
import pytest
from serving_support import eventually

from modelfleet.api import parse_manifest
from modelfleet.operator import reconcile as reconcile_module
from modelfleet.operator.reconcile import Reconciler
from modelfleet.operator.settings import OperatorSettings
from modelfleet.ports import free_port
from modelfleet.serving.settings import HAPROXY_ENV, SERVE_PROCESS_ENV

HEAD = textwrap.dedent(
    """
    import logging, sys, ray
    ray.init(num_cpus=4, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=int(sys.argv[1]), logging_level=logging.WARNING)
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
    """
)

MANIFEST = {
    "apiVersion": "modelfleet.dev/v1alpha1",
    "kind": "ModelDeployment",
    "metadata": {"name": "dash", "namespace": "tests", "uid": "0000-dash"},
    "spec": {
        "model": {"uri": "builtin://tiny-llama", "dtype": "float32"},
        "engine": {"maxNumSeqs": 8},
        "replicas": 1,
        "resources": {"accelerator": "cpu", "cpu": "1", "memory": "1Gi"},
    },
}


def md_with(replicas: int):
    manifest = {**MANIFEST, "spec": {**MANIFEST["spec"], "replicas": replicas}}
    return parse_manifest(manifest)


@pytest.fixture(scope="module")
def ray_head() -> Iterator[tuple[int, str]]:
    token = secrets.token_hex(16)
    port = free_port()
    # As in the pods: Serve's settings of SERVE_PROCESS_ENV and Ray Serve's own HTTP proxy, not
    # the HAProxy mode this test process may have set up for its local Serve instance.
    env = {k: v for k, v in os.environ.items() if "HAPROXY" not in k and k not in HAPROXY_ENV}
    env.update({**SERVE_PROCESS_ENV, "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"})
    proc = subprocess.Popen(
        [sys.executable, "-c", HEAD, str(port)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        env=env,
        text=True,
    )
    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready", (
            "the Ray head did not start"
        )
        eventually(
            lambda: httpx.get(f"http://127.0.0.1:{port}/api/version", timeout=5).status_code in (200, 401)
        )
        yield port, token
    finally:
        assert proc.stdin is not None
        proc.stdin.close()  # ray.shutdown() on exit stops that cluster's processes
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()


@pytest.fixture(scope="module")
def reconciler(ray_head, monkeypatch_module) -> Reconciler:
    port, token = ray_head
    serve_port = free_port()
    plain = reconcile_module.serve_config

    def on_loopback(md):
        # The pods' config listens on 0.0.0.0:8000; here the proxy stays on a loopback port.
        config = plain(md)
        config["http_options"] = {"host": "127.0.0.1", "port": serve_port}
        return config

    monkeypatch_module.setattr(reconcile_module, "serve_config", on_loopback)
    # The first deploy starts Serve's controller inside the dashboard's request; on a busy
    # 2-core machine that can outlast the operator's 5 s default (which the operator meets
    # by retrying on its next pass; this test wants the first call's answer).
    settings = OperatorSettings(dashboard_url=f"http://127.0.0.1:{port}", dashboard_timeout_seconds=60.0)
    rec = Reconciler(settings, kube=object())  # type: ignore[arg-type]
    md = md_with(1)
    rec._tokens[f"{md.namespace}/{md.name}/{md.metadata.uid}"] = token
    rec.serve_base = f"http://127.0.0.1:{serve_port}"  # type: ignore[attr-defined]
    return rec


@pytest.fixture(scope="module")
def monkeypatch_module() -> Iterator[pytest.MonkeyPatch]:
    with pytest.MonkeyPatch.context() as patch:
        yield patch


def test_the_dashboard_refuses_a_caller_without_the_token(ray_head):
    port, _ = ray_head
    resp = httpx.get(f"http://127.0.0.1:{port}/api/serve/applications/", timeout=10)
    assert resp.status_code in (401, 403)


def test_deploy_then_scale_to_zero_and_back_with_a_held_request_answered(reconciler):
    one, zero = md_with(1), md_with(0)
    assert reconciler.serve(one, head_ready=True) == "deploying (1 replicas)"
    eventually(lambda: reconciler.serve(one, head_ready=True) == "RUNNING, 1/1 replicas running", 180)
    base = reconciler.serve_base
    body = {"model": "dash", "prompt": "hello", "max_tokens": 6, "temperature": 0}
    assert httpx.post(f"{base}/v1/completions", json=body, timeout=60).status_code == 200

    # To zero: a Serve config cannot say 0, the scale API can; nothing is redeployed.
    assert reconciler.serve(zero, head_ready=True) == "scaling to 0 replicas"
    eventually(lambda: reconciler.serve(zero, head_ready=True) == "RUNNING, 0/0 replicas running", 120)
    eventually(lambda: httpx.get(f"{base}/ready", timeout=5).status_code == 503, 30)

    # A request now is held by the ingress, not refused...
    answer: list[httpx.Response] = []
    waiter = threading.Thread(
        target=lambda: answer.append(httpx.post(f"{base}/v1/completions", json=body, timeout=300))
    )
    waiter.start()
    waiter.join(3)
    assert waiter.is_alive() and not answer
    # ...and answered once the spec asks for a replica again.
    assert reconciler.serve(one, head_ready=True) == "scaling to 1 replicas"
    waiter.join(240)
    assert answer and answer[0].status_code == 200, answer and answer[0].text
    assert answer[0].json()["usage"]["completion_tokens"] == 6
    eventually(lambda: reconciler.serve(one, head_ready=True) == "RUNNING, 1/1 replicas running", 60)
