"""The README's Kubernetes quickstart, run as written, on a local cluster with a real node.

The commands come from README.md (between the `quickstart:begin` and `quickstart:end` marks),
so the two cannot drift apart. Nothing is simulated: a real kubelet runs containerd containers
of our image (built without Docker by `e2e.image`), the operator runs as a pod installed by
helm, Ray forms inside the head and worker pods, and the official `openai` client gets tokens
back through `kubectl port-forward`.

What the test changes in the commands, and why:
- the image placeholders become the locally built image (`localhost/modelfleet:<tag>`), which
  is imported into the node, so pull policies are `Never`;
- the Ray head asks for 250m CPU instead of 2: the node is this 2-core machine;
- port 8000 becomes a free loopback port.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from e2e import build
from e2e.cluster import Cluster, ClusterError
from e2e.load import stream_burst
from e2e.waiting import eventually
from modelfleet.ports import free_port

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
BEGIN, END = "<!-- quickstart:begin", "<!-- quickstart:end"
NAMESPACE = "modelfleet-system"
SMALL_NODE = (
    " --set serving.head.cpu=250m --set serving.head.memory=2Gi"
    " --set image.pullPolicy=Never --set serving.pullPolicy=Never"
)

pytestmark = [pytest.mark.e2e, pytest.mark.cluster, pytest.mark.slow]


def quickstart_commands(text: str | None = None) -> list[str]:
    """The shell lines of the README's quickstart, continuation lines joined, comments dropped."""
    text = README.read_text() if text is None else text
    try:
        block = text[text.index(BEGIN) : text.index(END)]
    except ValueError:
        raise AssertionError("README.md has no quickstart block between its marks") from None
    body = block.split("```bash", 1)[1].split("```", 1)[0]
    joined = re.sub(r"\\\n\s*", " ", body)
    commands = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            commands.append(line)
    return commands


def test_the_quickstart_block_parses_into_commands():
    commands = quickstart_commands()
    assert commands[0].startswith("helm install modelfleet ./helm/modelfleet")
    assert "--set image.tag=0.1.0" in commands[0]  # the continuation line was joined
    assert "kubectl apply -f examples/tiny.yaml" in commands
    assert any(c.startswith("kubectl port-forward svc/tiny") and c.endswith("&") for c in commands)
    assert commands[-1].startswith("helm uninstall modelfleet")
    assert not [c for c in commands if "#" in c and "{" not in c]


def log(message: str) -> None:
    print(f"[quickstart {time.strftime('%H:%M:%S')}] {message}", flush=True)


class Shell:
    """Runs README lines with helm and kubectl from the built toolset, against the cluster."""

    def __init__(self, cluster: Cluster, tag: str, port: int):
        self.cluster = cluster
        self.tag = tag
        self.port = port
        self.env = {
            **os.environ,
            "KUBECONFIG": str(cluster.kubeconfig),
            "PATH": f"{build.bin_dir()}:{os.environ['PATH']}",
        }
        self.background: list[subprocess.Popen] = []
        self.timings: list[tuple[str, float]] = []

    def adapt(self, command: str) -> str:
        repo, _, version = self.tag.rpartition(":")
        command = command.replace("<your-registry>/modelfleet", repo)
        command = command.replace("--set image.tag=0.1.0", f"--set image.tag={version}")
        if command.startswith("helm install"):
            command += SMALL_NODE
        return command.replace("8000:8000", f"{self.port}:8000").replace(
            "127.0.0.1:8000", f"127.0.0.1:{self.port}"
        )

    def run(self, line: str, timeout: float = 1200) -> str:
        command = self.adapt(line)
        log(f"$ {command}")
        started = time.monotonic()
        if command.endswith("&"):
            proc = subprocess.Popen(
                ["bash", "-c", f"exec {command[:-1]}"],
                env=self.env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
            )
            self.background.append(proc)
            return ""
        done = subprocess.run(
            ["bash", "-c", command], env=self.env, capture_output=True, text=True, timeout=timeout
        )
        took = time.monotonic() - started
        self.timings.append((line.split(" --", 1)[0][:60], took))
        output = (done.stdout + done.stderr).strip()
        log(f"  ({took:.1f} s) {output[-600:]}")
        assert done.returncode == 0, (
            f"`{command}` failed ({done.returncode}):\n{output[-3000:]}\n{self.diagnose()}"
        )
        return done.stdout

    def kubectl_json(self, *args: str) -> dict:
        return self.cluster.get_json(*args)

    def diagnose(self) -> str:
        """What a user would look at when a step hangs: pods, the md, the operator's log."""
        parts = []
        node_state = ("jsonpath={range .items[*]}{.metadata.name} taints={.spec.taints} "
                      "{range .status.conditions[*]}{.type}={.status} {end}{'\\n'}{end}")
        for args in (
            ["get", "nodes", "-o", node_state],
            ["get", "pods", "-A", "-o", "wide"],
            ["describe", "md", "-A"],
            ["logs", "-n", NAMESPACE, "deploy/modelfleet", "--tail", "40"],
            ["get", "events", "-A", "--sort-by", ".lastTimestamp"],
        ):
            try:
                out = self.cluster.kubectl(*args, check=False).stdout
            except Exception as err:  # diagnosis must not hide the failure
                out = f"{err}"
            parts.append(f"--- kubectl {' '.join(args)}\n{out[-2500:]}")
        return "\n".join(parts)

    def leave_clean(self) -> None:
        """Whatever a test left, the next one starts from no ModelDeployment and no release.

        Best effort and never raising, so that a test's own failure is the one reported (a
        release left behind made each later test fail on `helm install` instead).
        """
        for command in (
            "kubectl delete md --all -A --ignore-not-found --wait --timeout=3m",
            f"helm uninstall modelfleet --namespace {NAMESPACE} --ignore-not-found --wait --timeout 3m",
        ):
            try:
                done = subprocess.run(["bash", "-c", command], env=self.env, capture_output=True,
                                      text=True, timeout=240)
                if done.returncode != 0:
                    output = (done.stdout + done.stderr)[-400:]
                    log(f"cleanup: `{command}` exited {done.returncode}: {output}")
            except subprocess.TimeoutExpired:
                log(f"cleanup: `{command}` ran past 240 s")

    def close(self) -> None:
        """Stop the background commands (port-forwards)."""
        background, self.background = self.background, []
        for proc in background:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


@pytest.fixture(scope="module")
def quickstart_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Cluster, str]]:
    from e2e import image

    if os.geteuid() != 0:
        pytest.fail("the real node needs root (network namespaces, containerd, cgroups)", pytrace=False)
    missing = build.missing_binaries()
    if missing:
        pytest.fail(
            f"missing in {build.bin_dir()}: {', '.join(missing)}; run `python -m e2e.build`", pytrace=False
        )
    stages: list[tuple[str, float]] = []
    t = time.monotonic()
    built = image.ensure_image()
    stages.append(("image", time.monotonic() - t))
    cluster = Cluster(tmp_path_factory.mktemp("quickstart"))
    try:
        t = time.monotonic()
        cluster.up(real_node=True)
        stages.append(("cluster up with a real node", time.monotonic() - t))
        t = time.monotonic()
        cluster.load_image(built.archive)
        stages.append(("image import into containerd", time.monotonic() - t))
    except ClusterError as err:
        cluster.down()
        shutil.rmtree(cluster.dir / "node", ignore_errors=True)
        pytest.fail(f"the cluster did not start (logs in {cluster.dir}/logs):\n{err}", pytrace=False)
    for name, took in stages:
        log(f"stage {name}: {took:.1f} s")
    try:
        yield cluster, built.tag
    finally:
        t = time.monotonic()
        cluster.down()
        log(f"stage cluster down: {time.monotonic() - t:.1f} s")
        # The node's containerd store holds a copy of the image (GBs): pytest keeps old tmp dirs.
        shutil.rmtree(cluster.dir / "node", ignore_errors=True)


def children(shell: Shell, name: str) -> list[str]:
    selector = f"app.kubernetes.io/instance={name}"
    kinds = "deployments,services,configmaps,pods,poddisruptionbudgets,secrets"
    items = shell.kubectl_json(kinds, "-n", "default", "-l", selector)["items"]
    return sorted(f"{i['kind']}/{i['metadata']['name']}" for i in items)


@pytest.mark.timeout(3600)
def test_readme_quickstart_on_a_real_node(quickstart_cluster):
    from openai import OpenAI

    cluster, tag = quickstart_cluster
    port = free_port()
    shell = Shell(cluster, tag, port)
    base = f"http://127.0.0.1:{port}"
    try:
        for line in quickstart_commands():
            if line.startswith("curl "):
                # The README's curl, then the same endpoint through the official client.
                models = eventually(lambda: _get(f"{base}/v1/models"), timeout=60)
                assert models["data"][0]["id"] == "tiny"
                client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=120)
                assert [m.id for m in client.models.list()] == ["tiny"]
                completion = client.completions.create(
                    model="tiny", prompt="Hello", max_tokens=8, temperature=0
                )
                assert completion.usage.completion_tokens == 8 and completion.choices[0].text
                chunks = list(
                    client.chat.completions.create(
                        model="tiny",
                        messages=[{"role": "user", "content": "Hi"}],
                        max_tokens=6,
                        stream=True,
                    )
                )
                assert len(chunks) >= 2 and chunks[-1].choices[0].finish_reason in ("stop", "length")
                continue
            out = shell.run(line)
            if line.startswith("helm install"):
                shell.run(f"kubectl rollout status deploy/modelfleet -n {NAMESPACE} --timeout=10m")
            elif line.startswith("kubectl get md tiny"):
                header, row = out.splitlines()[:2]
                assert header.split() == ["NAME", "MODEL", "TP", "READY", "QUEUE", "PHASE", "AGE"]
                assert row.split()[:4] == ["tiny", "builtin://tiny-llama", "1", "1/1"] and "Ready" in row
            elif "--replicas 2" in line:
                pass
            elif "readyReplicas" in line:
                ready = eventually(lambda: _get(f"{base}/ready"), timeout=120)
                assert ready["ready_replicas"] == 2
                workers = shell.kubectl_json(
                    "pods",
                    "-n",
                    "default",
                    "-l",
                    "app.kubernetes.io/instance=tiny,app.kubernetes.io/component=worker",
                )["items"]
                assert len([p for p in workers if not p["metadata"].get("deletionTimestamp")]) == 2
                for i in range(4):
                    resp = httpx.post(
                        f"{base}/v1/completions",
                        json={"model": "tiny", "prompt": f"n{i}", "max_tokens": 4},
                        timeout=120,
                    )
                    assert resp.status_code == 200, resp.text
            elif line.startswith("kubectl delete md tiny"):
                eventually(lambda: children(shell, "tiny") == [], timeout=180)
            elif line.startswith("helm uninstall"):
                eventually(lambda: not shell.kubectl_json("all", "-n", NAMESPACE)["items"], timeout=180)
                roles = shell.kubectl_json(
                    "clusterroles,clusterrolebindings", "-l", "app.kubernetes.io/name=modelfleet"
                )["items"]
                assert roles == []
                crd = shell.kubectl_json("crd", "modeldeployments.modelfleet.dev")
                assert crd["metadata"]["name"] == "modeldeployments.modelfleet.dev"
        for name, took in shell.timings:
            log(f"step {name}: {took:.1f} s")
    finally:
        shell.close()
        shell.leave_clean()


def _get(url: str) -> dict | None:
    try:
        resp = httpx.get(url, timeout=10)
    except httpx.HTTPError:
        return None
    return resp.json() if resp.status_code == 200 else None


def test_the_node_is_a_real_kubelet_with_gpu_capacity(quickstart_cluster):
    """The node the quickstart ran on is a real kubelet with the fake GPU capacity."""
    cluster, _ = quickstart_cluster
    nodes = cluster.get_json("nodes")["items"]
    real = [n for n in nodes if n["metadata"].get("annotations", {}).get("kwok.x-k8s.io/node") != "fake"]
    assert real, json.dumps([n["metadata"]["name"] for n in nodes])
    assert int(real[0]["status"]["allocatable"]["nvidia.com/gpu"]) >= 1
    assert real[0]["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://")


class PhaseWatch:
    """Every phase a ModelDeployment's status shows, polled twice a second in the background."""

    def __init__(self, cluster: Cluster, name: str):
        self.cluster, self.name = cluster, name
        self.seen: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.wait(0.5):
            try:
                phase = self.cluster.get_json("md", self.name).get("status", {}).get("phase")
            except Exception:
                continue
            if phase and (not self.seen or self.seen[-1] != phase):
                self.seen.append(phase)

    def stop(self) -> list[str]:
        self._stop.set()
        self._thread.join(5)
        return self.seen


def worker_names(shell: Shell) -> list[str]:
    pods = shell.kubectl_json(
        "pods",
        "-n",
        "default",
        "-l",
        "app.kubernetes.io/instance=tiny,app.kubernetes.io/component=worker",
    )["items"]
    return sorted(p["metadata"]["name"] for p in pods if not p["metadata"].get("deletionTimestamp"))


def long_streams(
    base: str, count: int, outcome: list[str], first_chunk: threading.Event
) -> list[threading.Thread]:
    """`count` streamed completions as long as the context allows; each records how it ended."""
    from openai import OpenAI

    def one(i: int) -> None:
        client = OpenAI(base_url=f"{base}/v1", api_key="unused", timeout=300, max_retries=0)
        chunks = 0
        try:
            stream = client.completions.create(
                model="tiny",
                prompt=f"story {i}",
                max_tokens=2000,
                stream=True,
                extra_body={"ignore_eos": True},
            )
            for _ in stream:
                chunks += 1
                first_chunk.set()
            outcome.append(f"completed after {chunks} chunks")
        except Exception as err:
            outcome.append(f"cut after {chunks} chunks: {type(err).__name__}")

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(count)]
    for t in threads:
        t.start()
    return threads


@pytest.mark.timeout(3600)
def test_failures_a_bad_manifest_a_killed_worker_and_a_killed_operator(quickstart_cluster):
    cluster, tag = quickstart_cluster
    port = free_port()
    shell = Shell(cluster, tag, port)
    base = f"http://127.0.0.1:{port}"
    commands = quickstart_commands()
    try:
        shell.run(commands[0])  # helm install, as in the README
        shell.run(f"kubectl rollout status deploy/modelfleet -n {NAMESPACE} --timeout=10m")
        # A bad manifest is refused by the API server itself, with the field named.
        tiny = (ROOT / "examples/tiny.yaml").read_text()
        bad = tiny.replace("tensorParallelSize: 1", "tensorParallelSize: 0")
        assert bad != tiny
        refused = subprocess.run(
            [str(build.bin_dir() / "kubectl"), "apply", "-f", "-"],
            input=bad,
            env=shell.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert refused.returncode != 0 and "spec.engine.tensorParallelSize" in refused.stderr, refused.stderr
        assert shell.kubectl_json("md", "-n", "default")["items"] == []

        shell.run("kubectl apply -f examples/tiny.yaml")
        shell.run("kubectl wait md/tiny --for=condition=Ready --timeout=15m")
        shell.run("kubectl port-forward svc/tiny 8000:8000 &")
        eventually(lambda: _get(f"{base}/v1/models"), timeout=60)

        # A worker pod killed mid-stream: replaced, Degraded, then Ready; new requests succeed.
        (victim,) = worker_names(shell)
        watch = PhaseWatch(cluster, "tiny")
        outcome: list[str] = []
        first_chunk = threading.Event()
        streams = long_streams(base, 6, outcome, first_chunk)
        assert first_chunk.wait(120), "no stream produced a chunk"
        shell.run(f"kubectl delete pod {victim} --grace-period=1 --wait=false")
        for t in streams:
            t.join(300)
        assert not [t for t in streams if t.is_alive()], "a stream hung after its worker was killed"
        eventually(lambda: (names := worker_names(shell)) and victim not in names, timeout=120)
        eventually(lambda: "Degraded" in watch.seen, timeout=120)
        shell.run("kubectl wait md/tiny --for=condition=Ready --timeout=15m")
        eventually(lambda: watch.seen[-1] == "Ready", timeout=10)  # the poller catches up
        phases = watch.stop()
        log(f"phases while the worker was replaced: {phases}; streams: {outcome}")
        assert phases[-1] == "Ready", phases
        # kubectl port-forward holds on to one pod of the Service (every Serve proxy is one):
        # when that pod was the killed worker, forward again, as a user would.
        shell.close()
        shell.run("kubectl port-forward svc/tiny 8000:8000 &")
        eventually(lambda: _get(f"{base}/v1/models"), timeout=60)
        for i in range(3):
            resp = httpx.post(
                f"{base}/v1/completions",
                json={"model": "tiny", "prompt": f"again {i}", "max_tokens": 4},
                timeout=120,
            )
            assert resp.status_code == 200, resp.text

        # The operator killed: it restarts, converges, and duplicates nothing.
        before = children(shell, "tiny")
        operator = shell.kubectl_json("pods", "-n", NAMESPACE, "-l", "app.kubernetes.io/name=modelfleet")
        (op_pod,) = [p["metadata"]["name"] for p in operator["items"]]
        shell.run(f"kubectl delete pod {op_pod} -n {NAMESPACE} --grace-period=0 --force")
        shell.run(f"kubectl rollout status deploy/modelfleet -n {NAMESPACE} --timeout=10m")
        shell.run("kubectl scale md tiny --replicas 2")  # proves the new operator acts
        shell.run("kubectl wait md/tiny --for=jsonpath='{.status.readyReplicas}'=2 --timeout=15m")
        after = children(shell, "tiny")
        unchanged = [c for c in before if not c.startswith("Pod/")]
        assert [c for c in after if not c.startswith("Pod/")] == unchanged
        assert len(worker_names(shell)) == 2
    finally:
        shell.close()
        shell.leave_clean()


AUTOSCALED = """
apiVersion: modelfleet.dev/v1alpha1
kind: ModelDeployment
metadata:
  name: tiny
spec:
  model: {{uri: builtin://tiny-llama, dtype: float32}}
  engine: {{maxNumSeqs: 2}}
  replicas: 1
  resources: {{cpu: 500m, memory: 2Gi}}
  autoscaling:
    enabled: true
    minReplicas: 1
    maxReplicas: 2
    targetQueueDepth: 2
    scaleDownStabilizationSeconds: 20
    prometheusUrl: {prometheus}
"""


@pytest.mark.timeout(3600)
def test_autoscaling_on_prometheus_raises_replicas_for_a_burst_and_lowers_them_after(quickstart_cluster):
    """The operator pod reads a real Prometheus (scraping the tiny Service inside the node's
    network) and writes spec.replicas through /scale: up during a burst, down after the window,
    with no failed request."""
    import asyncio

    from e2e import node
    from e2e.prometheus import PrometheusServer

    cluster, tag = quickstart_cluster
    port = free_port()
    shell = Shell(cluster, tag, port)
    base = f"http://127.0.0.1:{port}"
    commands = quickstart_commands()
    node_ip = cluster.read_state()["node"]["node_ip"]
    prometheus: PrometheusServer | None = None
    try:
        shell.run(commands[0])
        shell.run(f"kubectl rollout status deploy/modelfleet -n {NAMESPACE} --timeout=10m")
        # Prometheus first: the manifest names its URL; its target (the Service) follows.
        prometheus = PrometheusServer(
            [], "1s", workdir=cluster.dir / "prometheus", listen_host=node_ip, prefix=node.nsenter()
        )
        manifest = AUTOSCALED.format(prometheus=prometheus.url)
        applied = subprocess.run(
            [str(build.bin_dir() / "kubectl"), "apply", "-f", "-"],
            input=manifest,
            env=shell.env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert applied.returncode == 0, applied.stderr
        service_ip = eventually(lambda: shell.kubectl_json("svc", "tiny")["spec"]["clusterIP"], 60)
        prometheus.targets = [f"{service_ip}:8000"]
        prometheus.start()
        shell.run("kubectl wait md/tiny --for=condition=Ready --timeout=15m")
        shell.run("kubectl port-forward svc/tiny 8000:8000 &")
        eventually(lambda: _get(f"{base}/v1/models"), timeout=60)
        query = 'modelfleet_queue_depth{model_deployment="tiny",namespace="default"}'
        eventually(lambda: prometheus.query(query), timeout=60)
        active = eventually(
            lambda: (s := shell.kubectl_json("md", "tiny")["status"]) and s.get("desiredReplicas") and s,
            timeout=60,
        )
        assert active["desiredReplicas"] == 1

        replicas_seen: list[int] = []
        stop = threading.Event()

        def record() -> None:
            while not stop.wait(1):
                with contextlib.suppress(Exception):
                    replicas_seen.append(shell.kubectl_json("md", "tiny")["spec"]["replicas"])

        recorder = threading.Thread(target=record, daemon=True)
        recorder.start()
        started = time.monotonic()
        failures = asyncio.run(stream_burst(base, "tiny", count=24, max_tokens=400))
        log(f"burst took {time.monotonic() - started:.0f} s; spec.replicas seen: {replicas_seen}")
        assert failures == [], failures[:3]
        assert 2 in replicas_seen, replicas_seen
        eventually(lambda: shell.kubectl_json("md", "tiny")["spec"]["replicas"] == 1, timeout=180)
        stop.set()
        recorder.join(5)
        describe = shell.run("kubectl describe md tiny")
        assert "ScaledUp" in describe and "ScaledDown" in describe, describe[-1500:]
    finally:
        if prometheus is not None:
            prometheus.stop()
        shell.close()
        shell.leave_clean()
