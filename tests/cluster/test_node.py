"""The real node of `python -m e2e.cluster up --node` (see e2e/node.py), tried the way users use it.

Pods run from a busybox image built here and imported into the node's containerd; logs,
exec and port-forward go through kube-apiserver to the kubelet; a Service routes through
kube-proxy's iptables rules and its name resolves through CoreDNS. The last two tests stop the
cluster and check that nothing of the node is left on the machine, so they run last.
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from e2e import node, oci
from e2e.cluster import Cluster, ClusterError
from e2e.waiting import eventually

pytestmark = pytest.mark.cluster

IMAGE = node.BUSYBOX_IMAGE


def pod(name: str, command: str, *, gpus: int = 0, labels: dict | None = None,
        restart: str = "Never", image: str = IMAGE, pull: str = "Never") -> dict:
    container: dict = {
        "name": "main", "image": image, "imagePullPolicy": pull, "command": ["sh", "-c", command],
    }
    if gpus:
        container["resources"] = {"limits": {"nvidia.com/gpu": str(gpus)}}
    return {
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": {"restartPolicy": restart, "containers": [container],
                 "terminationGracePeriodSeconds": 1},
    }


def apply(cluster: Cluster, namespace: str, *objects: dict) -> None:
    manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": list(objects)})
    cluster.kubectl("apply", "-n", namespace, "-f", "-", input=manifest)


def wait_phase(cluster: Cluster, namespace: str, name: str, phase: str, timeout: float = 90) -> dict:
    def reached() -> dict | None:
        got = cluster.get_json("pod", name, "-n", namespace)
        return got if got["status"].get("phase") == phase else None

    try:
        return eventually(reached, timeout=timeout, interval=0.5)
    except AssertionError:
        described = cluster.kubectl("describe", "pod", name, "-n", namespace, check=False).stdout
        raise AssertionError(f"pod {name} never reached {phase}:\n{described[-3000:]}") from None


def node_namespace(cluster: Cluster, request: pytest.FixtureRequest) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:30].strip("-")
    name = f"n-{slug}"
    cluster.kubectl("create", "namespace", name)
    eventually(lambda: cluster.kubectl("get", "sa", "default", "-n", name, check=False).returncode == 0,
               timeout=30)
    return name


@pytest.fixture
def ns(node_cluster: Cluster, request: pytest.FixtureRequest):
    if node_cluster.read_state().get("node") is None:
        pytest.fail("the node cluster was already stopped (test_down_leaves_nothing runs last)",
                    pytrace=False)
    name = node_namespace(node_cluster, request)
    yield name
    node_cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)


def test_node_is_ready_untainted_and_advertises_gpus(node_cluster: Cluster) -> None:
    name = node_cluster.read_state()["node"]["name"]
    got = node_cluster.get_json("node", name)
    assert not got["spec"].get("taints"), got["spec"].get("taints")
    labels = got["metadata"]["labels"]
    assert labels["nvidia.com/gpu.product"] == node.GPU_PRODUCT
    assert labels["nvidia.com/gpu.present"] == "true"
    assert got["status"]["capacity"]["nvidia.com/gpu"] == "8"
    assert got["status"]["allocatable"]["nvidia.com/gpu"] == "8"
    assert got["status"]["nodeInfo"]["containerRuntimeVersion"].startswith("containerd://1.6")
    addresses = {a["type"]: a["address"] for a in got["status"]["addresses"]}
    assert addresses["InternalIP"] == node_cluster.read_state()["node"]["node_ip"]
    report = node_cluster.status()
    assert report["real_node"]["name"] == name and report["real_node"]["ready"] is True
    assert report["nodes"] == {name: "8 gpu"}


def test_a_streamed_image_is_the_one_its_archive_file_holds(node_cluster: Cluster, tmp_path: Path) -> None:
    """`ctr images import -` of a DockerArchive written into a pipe stores the image an archive
    file of it does, less the layer blobs once unpacked (every pod in this module runs from the
    streamed busybox); a layer that changed after it was hashed fails the import, by name."""
    sock = node.NodePaths(node_cluster.dir / "node").containerd_sock
    blobs = sock.parent / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    streamed = node.busybox_archive(tmp_path, "localhost/modelfleet/busybox-streamed:1")
    saved_tag = "localhost/modelfleet/busybox-saved:1"
    saved = oci.DockerArchive(saved_tag, streamed.layers, streamed.config).save(tmp_path / "saved.tar")
    assert node_cluster.load_image(streamed) == streamed.tag
    assert not (blobs / streamed.layers[0].sha256).exists(), "the unpacked layer's blob is dropped"
    assert node_cluster.load_image(saved) == saved_tag
    assert (blobs / streamed.layers[0].sha256).exists(), "a file import keeps its blobs"
    listed = {line.split()[0]: line.split()[2] for line in node.ctr(sock, "images", "ls").splitlines()[1:]}
    assert listed[streamed.tag] == listed[saved_tag], "the same manifest, whichever way it came"
    with streamed.layers[0].path.open("ab") as layer:
        layer.write(b"\0" * 512)
    changed = oci.DockerArchive("localhost/modelfleet/busybox-broken:1", streamed.layers, streamed.config)
    with pytest.raises(ClusterError, match="changed since it was hashed"):
        node_cluster.load_image(changed)


def test_pod_runs_and_its_logs_come_back(node_cluster: Cluster, ns: str) -> None:
    apply(node_cluster, ns, pod("hello", "echo hello from $(hostname); uname -s"))
    wait_phase(node_cluster, ns, "hello", "Succeeded")
    logs = node_cluster.kubectl("logs", "hello", "-n", ns).stdout
    assert logs.splitlines() == ["hello from hello", "Linux"]


def test_pod_asking_for_a_gpu_schedules_and_runs(node_cluster: Cluster, ns: str) -> None:
    apply(node_cluster, ns, pod("gpu", "echo running; sleep 3600", gpus=1))
    got = wait_phase(node_cluster, ns, "gpu", "Running")
    assert got["spec"]["nodeName"] == node_cluster.read_state()["node"]["name"]
    assert got["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
    described = node_cluster.kubectl("describe", "node", got["spec"]["nodeName"]).stdout
    assert re.search(r"nvidia\.com/gpu\s+1\s+1", described), described


def test_exec_runs_in_the_container(node_cluster: Cluster, ns: str) -> None:
    apply(node_cluster, ns, pod("shell", "sleep 3600"))
    wait_phase(node_cluster, ns, "shell", "Running")
    out = node_cluster.kubectl("exec", "shell", "-n", ns, "--", "sh", "-c", "cat /etc/hostname; id -u")
    assert out.stdout.split() == ["shell", "0"]
    done = node_cluster.kubectl("exec", "-i", "shell", "-n", ns, "--", "cat", input="through stdin\n")
    assert done.stdout == "through stdin\n"


WEB = "mkdir -p /www && echo served-by-$(hostname) > /www/index.html && exec httpd -f -p 8080 -h /www"


def web_service(ns: str) -> dict:
    return {
        "apiVersion": "v1", "kind": "Service", "metadata": {"name": "web"},
        "spec": {"selector": {"app": "web"}, "ports": [{"port": 80, "targetPort": 8080}]},
    }


def start_web(cluster: Cluster, ns: str) -> str:
    apply(cluster, ns, pod("web", WEB, labels={"app": "web"}, restart="Always"), web_service(ns))
    wait_phase(cluster, ns, "web", "Running")
    eventually(lambda: cluster.get_json("endpointslices", "-n", ns, "-l",
                                        "kubernetes.io/service-name=web")["items"][0]["endpoints"],
               timeout=30)
    return cluster.get_json("service", "web", "-n", ns)["spec"]["clusterIP"]


def test_service_routes_between_pods_and_its_name_resolves(node_cluster: Cluster, ns: str) -> None:
    cluster_ip = start_web(node_cluster, ns)
    apply(node_cluster, ns, pod("client", "sleep 3600"))
    wait_phase(node_cluster, ns, "client", "Running")

    def fetch(host: str) -> str:
        # HTTP/1.0 by hand: busybox-static's own wget crashes (see node.busybox_image).
        request = f"printf 'GET / HTTP/1.0\\r\\nHost: {host}\\r\\n\\r\\n' | nc -w 5 {host} 80"
        out = node_cluster.kubectl("exec", "client", "-n", ns, "--", "sh", "-c", request, timeout=30).stdout
        # kubectl's output is read as text: the CRLFs of the reply came back as newlines.
        return out.replace("\r\n", "\n").split("\n\n", 1)[-1].strip()

    # kube-proxy may take a sync period to program the new Service.
    assert eventually(lambda: fetch(cluster_ip) == "served-by-web", timeout=30)
    for name in (f"web.{ns}.svc", f"web.{ns}.svc.cluster.local", "web"):
        assert fetch(name) == "served-by-web", name
    looked_up = node_cluster.kubectl("exec", "client", "-n", ns, "--",
                                     "nslookup", f"web.{ns}.svc.cluster.local").stdout
    assert f"Address: {cluster_ip}" in looked_up, looked_up
    # The API server through the `kubernetes` Service, as the operator pod reaches it.
    reach = node_cluster.kubectl("exec", "client", "-n", ns, "--", "sh", "-c",
                                 "nc -w 5 kubernetes.default.svc 443 </dev/null && echo connected")
    assert reach.stdout.strip() == "connected", reach.stderr


def test_in_cluster_clients_reach_the_api_server_through_the_kubernetes_service(
    node_cluster: Cluster, tmp_path
) -> None:
    """What the operator's in-cluster config does: https://10.96.0.1, certificate checked.

    Run from the node's network namespace (as a hostNetwork pod would), names resolved by
    the cluster DNS, the admin certificate standing in for a service-account token.
    """
    pki_dir = node_cluster.dir / "pki"
    script = tmp_path / "client.py"
    script.write_text(
        "import ssl, urllib.request\n"
        f"ctx = ssl.create_default_context(cafile='{pki_dir / 'ca.crt'}')\n"
        f"ctx.load_cert_chain('{pki_dir / 'admin.crt'}', '{pki_dir / 'admin.key'}')\n"
        "for host in ('10.96.0.1', 'kubernetes.default.svc.cluster.local'):\n"
        "    reply = urllib.request.urlopen(f'https://{host}/readyz', context=ctx, timeout=10)\n"
        "    print(reply.read().decode())\n"
    )
    resolv = node_cluster.dir / "node" / "resolv.conf"
    inner = " ".join(shlex.quote(a) for a in node.nsenter(sys.executable, str(script)))
    bind = f"mount --bind {shlex.quote(str(resolv))} /etc/resolv.conf"
    done = subprocess.run(
        ["unshare", "--mount", "sh", "-c", f"{bind} && exec {inner}"],
        capture_output=True, text=True, timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["ok", "ok"]


def test_cluster_dns_answers_only_the_cluster(node_cluster: Cluster) -> None:
    server = node_cluster.read_state()["node"]["node_ip"]
    rcode, addresses = node.dns_query(server, "kubernetes.default.svc.cluster.local")
    assert (rcode, addresses) == (0, ["10.96.0.1"])
    rcode, addresses = node.dns_query(server, "example.com")
    assert (rcode, addresses) == (5, []), "names outside cluster.local must be REFUSED"


def test_port_forward_to_a_service_from_the_host(node_cluster: Cluster, ns: str) -> None:
    start_web(node_cluster, ns)
    cmd = [str(node_cluster.bin_dir / "kubectl"), f"--kubeconfig={node_cluster.kubeconfig}", "-n", ns,
           "port-forward", "--address=127.0.0.1", "svc/web", ":80"]
    forward = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        assert forward.stdout is not None
        line = forward.stdout.readline()
        found = re.search(r"Forwarding from 127\.0\.0\.1:(\d+) -> 8080", line)
        assert found, line
        url = f"http://127.0.0.1:{found.group(1)}/"
        with urllib.request.urlopen(url, timeout=10) as reply:
            assert reply.read().decode().strip() == "served-by-web"
    finally:
        forward.terminate()
        forward.wait(timeout=10)


def test_an_image_not_on_the_node_fails_fast(node_cluster: Cluster, ns: str) -> None:
    apply(node_cluster, ns, pod("remote", "true", image="registry.example.invalid/x:1", pull="IfNotPresent"))

    def pull_failed() -> bool:
        status = node_cluster.get_json("pod", "remote", "-n", ns)["status"]
        waiting = (status.get("containerStatuses") or [{}])[0].get("state", {}).get("waiting", {})
        return waiting.get("reason") in ("ErrImagePull", "ImagePullBackOff")

    eventually(pull_failed, timeout=30)


def test_a_second_node_is_refused_with_the_holder_named(node_cluster: Cluster, tmp_path) -> None:
    other = Cluster(tmp_path / "other")
    with pytest.raises(ClusterError, match=f"already running in {node_cluster.dir}"):
        other.up(real_node=True)
    assert node.lock_holder() == node_cluster.dir
    assert not (tmp_path / "other" / "cluster.json").exists()


def test_down_leaves_nothing(node_cluster: Cluster) -> None:
    """Runs after the other node tests: stops the session's node cluster and looks for anything
    left behind."""
    assert node.leftovers(node_cluster.dir)["processes"], "the node should be running before down"
    stopped = node_cluster.down()
    assert {"containerd", "kubelet", "kube-proxy", "coredns", "kube-apiserver"} <= set(stopped), stopped
    assert node.leftovers(node_cluster.dir) == {
        "processes": [], "mounts": [], "netns": [], "interfaces": [], "cgroups": [],
    }
    assert node.lock_holder() is None
    before = json.loads((node_cluster.dir / "machine-before.json").read_text())
    assert node.machine_snapshot() == before
    ip_netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    assert node.NETNS not in ip_netns


def test_what_a_killed_run_left_is_cleared_before_the_next_node(
        node_cluster: Cluster, tmp_path: Path) -> None:
    """Runs after `down`: a run killed mid-way (no `down`) leaves the lock naming dead processes,
    the node's namespace and veth, and mounts under its folder. The next node's start clears
    them before it takes the machine's snapshot or the lock."""
    before = node.machine_snapshot()
    killed = tmp_path / "killed"
    (killed / "node").mkdir(parents=True)
    exited = subprocess.Popen(["true"])
    exited.wait()
    host: dict = {}
    node.record_host(host)  # as its `up` did before it changed anything
    (killed / "cluster.json").write_text(
        json.dumps({"pids": {"containerd": exited.pid, "kubelet": exited.pid}, "node": host}))
    node.LOCK_FILE.write_text(json.dumps({"dir": str(killed), "pid": exited.pid}))
    try:
        node.create_netns(node.plan_network(killed))
        subprocess.run(["mount", "-t", "tmpfs", "modelfleet-test", str(killed / "node")], check=True)
        left = node.leftovers(killed)
        assert left["netns"] and left["interfaces"] and left["mounts"], left
        assert not node.holder_alive(killed)

        cleared = node.clear_stale(tmp_path / "next")

        assert node.leftovers(killed) == {
            "processes": [], "mounts": [], "netns": [], "interfaces": [], "cgroups": [],
        }
        assert any(c.startswith("netns") for c in cleared) and any("mounts" in c for c in cleared), cleared
        assert node.lock_holder() is None
        assert node.machine_snapshot() == before
        assert node.clear_stale(tmp_path / "next") == []
    finally:
        node.cleanup(killed)
