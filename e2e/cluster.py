"""A real Kubernetes control plane on 127.0.0.1, with a kwok-simulated GPU fleet and/or a real node.

    python -m e2e.cluster up --dir DIR [--gpu-nodes N] [--gpu-per-node 8]
                             [--gpu-product NVIDIA-H100-80GB-HBM3] [--cpu-nodes 1]
                             [--node [--node-gpus 8]]
    python -m e2e.cluster status --dir DIR
    python -m e2e.cluster down --dir DIR
    python -m e2e.cluster bin-dir

`up` starts etcd, kube-apiserver (TLS, RBAC, service-account keys), kube-controller-manager
and kube-scheduler, plus kwok and its fake nodes when nodes are asked for, writes
DIR/kubeconfig and returns once all are ready. Every component listens on 127.0.0.1 on
a free port, so clusters in different folders run side by side. Logs stay in DIR/logs.

`--node` adds one real node (containerd, runc, kubelet, kube-proxy, CoreDNS) in a network
namespace, described in e2e/node.py; kube-apiserver then listens on the host end of that
namespace's veth instead of 127.0.0.1. One cluster with a node runs per machine at a time
(`up --node` says which folder holds it); clusters without a node still run side by side.
`Cluster.load_image(archive)` imports a Docker archive into the node's containerd.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import shutil
import signal
import ssl
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from e2e import build, node, nodes, oci, pki
from e2e.waiting import eventually
from modelfleet.ports import free_port

STATE_FILE = "cluster.json"
# Stop order: the reverse of start order.
COMPONENTS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kwok")


# What `up` runs, without and with fake nodes.
RUNS = ("etcd", "kube-apiserver", "kube-controller-manager", "kube-scheduler", "kubectl")
FLEET_RUNS = ("kwok", "kwok-stages.yaml")
NODE_RUNS = ("kubelet", "kube-proxy", "coredns")


class ClusterError(RuntimeError):
    """The cluster could not start; the message includes the failing component's log tail."""


class KubectlError(subprocess.CalledProcessError):
    """A failed kubectl call; its message carries kubectl's stderr."""

    def __str__(self) -> str:
        return f"{' '.join(self.cmd[3:])} failed ({self.returncode}): {self.stderr.strip()}"


def process_alive(pid: int) -> bool:
    """True for a live process; a zombie (exited, not yet reaped) counts as dead."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def process_cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
    except OSError:
        return ""


def https_ok(port: int, path: str = "/healthz") -> bool:
    """Probe a component's own self-signed health endpoint on loopback."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with urllib.request.urlopen(f"https://127.0.0.1:{port}{path}", context=context, timeout=2) as r:
        return r.status == 200 and r.read().strip() == b"ok"


def http_ok(url: str) -> bool:
    with urllib.request.urlopen(url, timeout=2) as r:
        return r.status == 200 and b"true" in r.read()


@dataclass
class Cluster:
    """One control plane living in `dir`; its state file lets another process stop it."""

    dir: Path
    bin_dir: Path = field(default_factory=build.bin_dir)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict, repr=False)
    t0: float = field(default=0.0, repr=False)
    ready_after: dict[str, float] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        self.dir = Path(self.dir).resolve()
        self.bin_dir = Path(self.bin_dir)

    @classmethod
    def attach(cls, dir: Path) -> Cluster:
        """The cluster a previous `up` started in `dir`, with the binaries it used."""
        state_file = Path(dir) / STATE_FILE
        if state_file.exists():
            return cls(dir, Path(json.loads(state_file.read_text())["bin_dir"]))
        return cls(dir)

    @property
    def kubeconfig(self) -> Path:
        return self.dir / "kubeconfig"

    @property
    def state_path(self) -> Path:
        return self.dir / STATE_FILE

    def read_state(self) -> dict:
        if not self.state_path.exists():
            return {"pids": {}, "ports": {}}
        return json.loads(self.state_path.read_text())

    def write_state(self, state: dict) -> None:
        tmp = self.state_path.with_suffix(".tmp")
        tmp.write_text(json.dumps(state, indent=2))
        tmp.replace(self.state_path)

    def kubectl(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run the built kubectl against this cluster as admin."""
        cmd = [str(self.bin_dir / "kubectl"), f"--kubeconfig={self.kubeconfig}",
               f"--cache-dir={self.dir / 'kube-cache'}", *args]
        done = subprocess.run(cmd, input=input, capture_output=True, text=True, timeout=timeout)
        if check and done.returncode != 0:
            raise KubectlError(done.returncode, cmd, done.stdout, done.stderr)
        return done

    def get_json(self, *args: str) -> dict:
        """`kubectl get ... -o json`, parsed."""
        return json.loads(self.kubectl("get", *args, "-o", "json").stdout)

    # -- starting ---------------------------------------------------------------------------

    def start(self, name: str, args: list[str], state: dict, argv: list[str] | None = None) -> None:
        """Start `name` from the toolset (or `argv` instead), logging to DIR/logs/<name>.log."""
        log = (self.dir / "logs" / f"{name}.log").open("ab")
        log.write(f"=== {time.strftime('%Y-%m-%dT%H:%M:%S')} starting {name}\n".encode())
        log.flush()
        env = dict(os.environ)
        env["PATH"] = env.get("PATH", "/usr/bin:/bin") + ":/usr/sbin:/sbin"
        proc = subprocess.Popen(
            argv or [str(self.bin_dir / name), *args], cwd=self.dir, stdin=subprocess.DEVNULL,
            stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
        )
        log.close()
        self.procs[name] = proc
        state["pids"][name] = proc.pid
        self.write_state(state)

    def wait_ready(self, name: str, probe, timeout: float = 60) -> None:
        """Wait for `probe`; fail at once with the log tail if the process died."""
        def ready() -> bool:
            proc = self.procs[name]
            if proc.poll() is not None:
                raise ClusterError(f"{name} exited with {proc.returncode}\n{self.log_tail(name)}")
            return probe()

        try:
            eventually(ready, timeout=timeout, interval=0.3)
        except AssertionError as err:
            raise ClusterError(f"{name} not ready: {err}\n{self.log_tail(name)}") from None
        self.ready_after[name] = round(time.monotonic() - self.t0, 1)

    def log_tail(self, name: str, lines: int = 30) -> str:
        path = self.dir / "logs" / f"{name}.log"
        if not path.exists():
            return f"(no log at {path})"
        text = path.read_text(errors="replace").splitlines()[-lines:]
        return f"--- last lines of {path} ---\n" + "\n".join(text)

    def up(
        self,
        gpu_nodes: int = 0,
        gpu_per_node: int = 8,
        gpu_product: str = "NVIDIA-H100-80GB-HBM3",
        cpu_nodes: int | None = None,
        real_node: bool = False,
        node_gpus: int = 8,
    ) -> float:
        """Start everything and wait until it is ready; return the seconds it took.

        `real_node` adds the real node of e2e/node.py, advertising `node_gpus` nvidia.com/gpu.
        """
        start = self.t0 = time.monotonic()
        if cpu_nodes is None:
            cpu_nodes = 1 if gpu_nodes else 0
        needed = [*RUNS, *(FLEET_RUNS if gpu_nodes or cpu_nodes else ()), *(NODE_RUNS if real_node else ())]
        missing = [b for b in build.missing_binaries(self.bin_dir) if b in needed]
        if missing:
            raise ClusterError(
                f"binaries missing in {self.bin_dir}: {', '.join(missing)}; "
                "build them with `python -m e2e.build`"
            )
        if any(process_alive(pid) for pid in self.read_state()["pids"].values()):
            raise ClusterError(f"a cluster is already running in {self.dir}; run `down` first")
        net = None
        if real_node:
            try:
                node.ensure_packages()
                node.acquire_lock(self.dir)
                net = node.plan_network(self.dir)
            except node.NodeError as err:
                raise ClusterError(str(err)) from None
        # A fresh cluster each time: only the logs of earlier runs are kept (appended to).
        for sub in ("etcd", "pki", "certs", "kube-cache", "node"):
            shutil.rmtree(self.dir / sub, ignore_errors=True)
        for sub in ("logs", "etcd", "pki", "certs"):
            (self.dir / sub).mkdir(parents=True, exist_ok=True, mode=0o700)
        ports = {name: free_port() for name in
                 ("etcd", "etcd-peer", "kube-apiserver", "kube-controller-manager",
                  "kube-scheduler", "kwok")}
        state: dict = {"pids": {}, "ports": ports, "bin_dir": str(self.bin_dir)}
        if net is not None:
            state["node"] = {"name": node.node_name(self.dir), **net.as_dict()}
            node.record_host(state["node"])
        self.write_state(state)
        try:
            if net is not None:
                node.create_netns(net)
                self.ready_after["netns"] = round(time.monotonic() - self.t0, 1)
            self.start_control_plane(ports, state, net)
            if net is not None:
                self.start_node(state, net, node_gpus)
            if gpu_nodes or cpu_nodes:
                self.start_fleet(ports, state, gpu_nodes, gpu_per_node, gpu_product, cpu_nodes)
        except node.NodeError as err:
            self.down()
            raise ClusterError(str(err)) from None
        except BaseException:
            self.down()
            raise
        state["started_seconds"] = round(time.monotonic() - start, 1)
        state["ready_after_seconds"] = self.ready_after
        self.write_state(state)
        return state["started_seconds"]

    def start_control_plane(
        self, ports: dict[str, int], state: dict, net: node.NodeNetwork | None = None
    ) -> None:
        """etcd, kube-apiserver, controller-manager, scheduler.

        With a real node (`net`), the API server listens on the host end of the node's veth,
        advertises that address in the `kubernetes` Service, and has a kubelet client cert.
        """
        d, p = self.dir, self.dir / "pki"
        host = net.host_ip if net else "127.0.0.1"
        server = f"https://{host}:{ports['kube-apiserver']}"
        configs = pki.make_pki(p, server)
        apiserver_node_args = ["--endpoint-reconciler-type=none"]
        if net is not None:
            extra = node.node_pki(p, server, net, node.node_name(self.dir))
            apiserver_node_args = [
                f"--kubelet-client-certificate={extra['kubelet-client.crt']}",
                f"--kubelet-client-key={extra['kubelet-client.key']}",
                "--kubelet-preferred-address-types=InternalIP",
            ]
        self.kubeconfig.write_text(configs["admin"].read_text())
        self.kubeconfig.chmod(0o600)

        etcd_url = f"http://127.0.0.1:{ports['etcd']}"
        peer_url = f"http://127.0.0.1:{ports['etcd-peer']}"
        self.start("etcd", [
            "--name=e2e", f"--data-dir={d / 'etcd'}",
            f"--listen-client-urls={etcd_url}", f"--advertise-client-urls={etcd_url}",
            f"--listen-peer-urls={peer_url}", f"--initial-advertise-peer-urls={peer_url}",
            f"--initial-cluster=e2e={peer_url}", "--unsafe-no-fsync", "--log-level=warn",
        ], state)
        self.wait_ready("etcd", lambda: http_ok(f"{etcd_url}/health"))

        self.start("kube-apiserver", [
            f"--etcd-servers={etcd_url}",
            f"--bind-address={host}", f"--advertise-address={host}",
            f"--secure-port={ports['kube-apiserver']}", f"--cert-dir={d / 'certs'}",
            f"--tls-cert-file={p / 'apiserver.crt'}", f"--tls-private-key-file={p / 'apiserver.key'}",
            f"--client-ca-file={p / 'ca.crt'}",
            f"--service-cluster-ip-range={pki.SERVICE_CIDR}",
            "--authorization-mode=Node,RBAC",
            "--service-account-issuer=https://kubernetes.default.svc.cluster.local",
            f"--service-account-key-file={p / 'sa.pub'}",
            f"--service-account-signing-key-file={p / 'sa.key'}",
            "--allow-privileged=true",
            # Without a node: loopback may not appear in Endpoints and nothing in-cluster dials
            # the API server. With one: the lease reconciler publishes HOST_IP for pods.
            *apiserver_node_args,
            "--profiling=false",
        ], state)
        self.wait_ready("kube-apiserver", self.apiserver_ready, timeout=120)

        common = ["--leader-elect=false", "--bind-address=127.0.0.1", "--profiling=false"]
        cm = p / "controller-manager.kubeconfig"
        self.start("kube-controller-manager", [
            *common, f"--kubeconfig={cm}", f"--authentication-kubeconfig={cm}",
            f"--authorization-kubeconfig={cm}",
            f"--secure-port={ports['kube-controller-manager']}", f"--cert-dir={d / 'certs'}",
            f"--service-account-private-key-file={p / 'sa.key'}", f"--root-ca-file={p / 'ca.crt'}",
            "--use-service-account-credentials=true",
            f"--cluster-signing-cert-file={p / 'ca.crt'}", f"--cluster-signing-key-file={p / 'ca.key'}",
        ], state)
        sched = p / "scheduler.kubeconfig"
        self.start("kube-scheduler", [
            *common, f"--kubeconfig={sched}", f"--authentication-kubeconfig={sched}",
            f"--authorization-kubeconfig={sched}", f"--secure-port={ports['kube-scheduler']}",
        ], state)
        self.wait_ready("kube-controller-manager", lambda: https_ok(ports["kube-controller-manager"]))
        self.wait_ready("kube-scheduler", lambda: https_ok(ports["kube-scheduler"]))
        # Pods need the namespace's default ServiceAccount, made by the controller-manager.
        self.wait_ready(
            "kube-controller-manager",
            lambda: self.kubectl("get", "serviceaccount", "default", "-n", "default", check=False)
            .returncode == 0,
        )

    def apiserver_ready(self) -> bool:
        return self.kubectl("get", "--raw", "/readyz", check=False, timeout=10).stdout.strip() == "ok"

    def start_node(self, state: dict, net: node.NodeNetwork, gpus: int) -> None:
        """containerd, the kubelet, kube-proxy and CoreDNS in the node's network namespace."""
        paths = node.NodePaths(self.dir / "node")
        name = state["node"]["name"]
        pki_dir = self.dir / "pki"
        node.write_configs(paths, net, name, pki_dir, self.kubeconfig)
        pause = node.pause_image(paths.root / "images")

        self.start("containerd", [], state, argv=node.nsenter(
            "containerd", f"--config={paths.containerd_config}", "--log-level=warn"))
        self.wait_ready("containerd", lambda: node.ctr(paths.containerd_sock, "version", timeout=5))
        node.import_image(paths.containerd_sock, pause)

        self.start("kubelet", [], state, argv=node.nsenter(
            str(self.bin_dir / "kubelet"), *node.kubelet_args(paths, net, name, pki_dir, gpus)))

        def node_ready() -> bool:
            got = self.get_json("node", name)
            return any(c["type"] == "Ready" and c["status"] == "True" for c in got["status"]["conditions"])

        self.wait_ready("kubelet", node_ready, timeout=120)
        self.kubectl("patch", "node", name, "--subresource=status", "--type=json",
                     "-p", node.gpu_capacity_patch(gpus))
        self.wait_ready("kubelet", lambda: self.get_json("node", name)["status"]["allocatable"]
                        .get(nodes.GPU_RESOURCE) == str(gpus))

        self.start("kube-proxy", [], state, argv=node.nsenter(
            str(self.bin_dir / "kube-proxy"), f"--config={paths.kube_proxy_config}", "--v=1"))
        self.wait_ready("kube-proxy", lambda: "default/kubernetes:https" in node.run(
            *node.nsenter("iptables", "-w", "-t", "nat", "-S", "KUBE-SERVICES"), check=False))

        self.start("coredns", [], state, argv=node.nsenter(
            str(self.bin_dir / "coredns"), "-conf", str(paths.corefile)))
        self.wait_ready("coredns", lambda: node.dns_query(
            net.node_ip, f"kubernetes.default.svc.{node.CLUSTER_DOMAIN}")[1] == [pki.KUBERNETES_SERVICE_IP])

    def load_image(self, archive: Path | oci.DockerArchive) -> str:
        """Import a Docker archive (a file, or streamed) into the node's containerd (k8s.io
        namespace); return its tag.

        Nothing is ever pulled: pods must name the tag with imagePullPolicy IfNotPresent or
        Never (a `:latest` tag defaults to Always, and its pull fails at once).
        """
        if "node" not in self.read_state():
            raise ClusterError(f"the cluster in {self.dir} has no real node (start it with --node)")
        try:
            return node.import_image(node.NodePaths(self.dir / "node").containerd_sock,
                                     archive if isinstance(archive, oci.DockerArchive) else Path(archive))
        except node.NodeError as err:
            raise ClusterError(str(err)) from None

    def start_fleet(
        self, ports: dict[str, int], state: dict,
        gpu_nodes: int, gpu_per_node: int, gpu_product: str, cpu_nodes: int,
    ) -> None:
        self.start("kwok", [
            f"--kubeconfig={self.kubeconfig}",
            f"--config={self.bin_dir / 'kwok-stages.yaml'}",
            "--node-lease-duration-seconds=40",
            "--manage-all-nodes=false",
            f"--manage-nodes-with-annotation-selector={nodes.KWOK_SELECTOR}",
            f"--server-address=127.0.0.1:{ports['kwok']}",
            "--node-ip=10.250.0.1", "--cidr=10.244.0.1/16",
        ], state)
        fleet = nodes.fleet(gpu_nodes, gpu_per_node, gpu_product, cpu_nodes)
        manifest = json.dumps({"apiVersion": "v1", "kind": "List", "items": fleet})
        self.kubectl("apply", "-f", "-", input=manifest)
        names = {n["metadata"]["name"] for n in fleet}

        def all_ready() -> bool:
            out = self.kubectl("get", "nodes", "-o", "json").stdout
            ready = {
                n["metadata"]["name"] for n in json.loads(out)["items"]
                if any(c["type"] == "Ready" and c["status"] == "True"
                       for c in n.get("status", {}).get("conditions", []))
            }
            return names <= ready

        self.wait_ready("kwok", all_ready, timeout=60)

    # -- stopping and reporting -------------------------------------------------------------

    def down(self, timeout: float = 15) -> list[str]:
        """Stop every component this folder started; return the names stopped.

        A real node goes first: its daemons, then every container (while containerd still
        runs), containerd; then the control plane; last whatever node.cleanup finds left
        (mounts, cgroups, the namespace and veth: kube-apiserver listens on that veth and
        deletes its lease through it as it exits).
        """
        state = self.read_state()
        stopped = []
        if "node" in state:
            for name in ("coredns", "kube-proxy", "kubelet"):
                if self.stop_component(name, state, timeout):
                    stopped.append(name)
            removed = node.remove_containers(node.NodePaths(self.dir / "node").containerd_sock)
            if removed:
                stopped.append(f"{removed} containers")
            if self.stop_component("containerd", state, timeout):
                stopped.append("containerd")
        for name in reversed(COMPONENTS):
            if self.stop_component(name, state, timeout):
                stopped.append(name)
        if "node" in state:
            stopped += node.cleanup(self.dir, state["node"])
            del state["node"]
            self.write_state(state)
        return stopped

    def stop_component(self, name: str, state: dict, timeout: float) -> bool:
        """SIGTERM (then SIGKILL) one component; True when it was running."""
        pid = state["pids"].get(name)
        if pid is None:
            return False
        running = False
        # Only signal a pid that is still ours: its command line names this folder.
        if process_alive(pid) and str(self.dir) in process_cmdline(pid):
            running = True
            self.signal_group(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while process_alive(pid) and time.monotonic() < deadline:
                self.reap(name)
                time.sleep(0.1)
            if process_alive(pid):
                self.signal_group(pid, signal.SIGKILL)
                while process_alive(pid):
                    self.reap(name)
                    time.sleep(0.05)
        self.reap(name)
        del state["pids"][name]
        self.write_state(state)
        return running

    def signal_group(self, pid: int, sig: signal.Signals) -> None:
        # Each component leads its own session (start_new_session), so its group is its pid.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, sig)

    def reap(self, name: str) -> None:
        proc = self.procs.get(name)
        if proc is not None:
            proc.poll()

    def status(self) -> dict:
        state = self.read_state()
        report = {
            "dir": str(self.dir),
            "kubeconfig": str(self.kubeconfig),
            "components": {
                name: {"pid": pid, "running": process_alive(pid), "port": state["ports"].get(name)}
                for name, pid in state["pids"].items()
            },
        }
        running = report["components"].get("kube-apiserver", {}).get("running")
        report["apiserver_ready"] = bool(running) and self.apiserver_ready()
        if report["apiserver_ready"]:
            report["version"] = json.loads(self.kubectl("get", "--raw", "/version").stdout)["gitVersion"]
            out = self.kubectl("get", "nodes", "-o", "json").stdout
            report["nodes"] = {
                n["metadata"]["name"]: n["status"].get("allocatable", {}).get(nodes.GPU_RESOURCE, "0")
                + " gpu" for n in json.loads(out)["items"]
            }
        if "node" in state:
            info = {k: state["node"][k] for k in ("name", "host_ip", "node_ip", "pod_cidr")}
            info["netns"] = node.NETNS
            if report["apiserver_ready"]:
                got = json.loads(self.kubectl("get", "node", info["name"], "-o", "json", check=False)
                                 .stdout or "{}")
                info["ready"] = any(c["type"] == "Ready" and c["status"] == "True"
                                    for c in got.get("status", {}).get("conditions", []))
            report["real_node"] = info
        return report


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m e2e.cluster", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="start a cluster in DIR and wait until it is ready")
    up.add_argument("--dir", required=True, type=Path)
    up.add_argument("--gpu-nodes", type=int, default=0)
    up.add_argument("--gpu-per-node", type=int, default=8)
    up.add_argument("--gpu-product", default="NVIDIA-H100-80GB-HBM3")
    up.add_argument("--cpu-nodes", type=int, default=None,
                    help="fake CPU-only nodes (default: 1 when any fake node is asked for)")
    up.add_argument("--node", action="store_true",
                    help="add one real node (containerd + kubelet + kube-proxy + CoreDNS), see e2e/node.py")
    up.add_argument("--node-gpus", type=int, default=8,
                    help="nvidia.com/gpu the real node advertises (run on the CPU)")
    for name, text in (("down", "stop the cluster in DIR"), ("status", "report on the cluster in DIR")):
        sub.add_parser(name, help=text).add_argument("--dir", required=True, type=Path)
    sub.add_parser("bin-dir", help="print the folder holding the built binaries")
    args = parser.parse_args(argv)

    if args.command == "bin-dir":
        print(build.bin_dir())
        return 0 if not build.missing_binaries() else 1
    cluster = Cluster(args.dir) if args.command == "up" else Cluster.attach(args.dir)
    if args.command == "up":
        try:
            seconds = cluster.up(args.gpu_nodes, args.gpu_per_node, args.gpu_product, args.cpu_nodes,
                                 real_node=args.node, node_gpus=args.node_gpus)
        except ClusterError as err:
            print(f"cluster up failed: {err}", file=sys.stderr)
            return 1
        print(f"cluster ready in {seconds:.1f}s; export KUBECONFIG={cluster.kubeconfig}")
    elif args.command == "down":
        start = time.monotonic()
        stopped = cluster.down()
        print(f"stopped in {time.monotonic() - start:.1f}s: {', '.join(stopped) or 'nothing was running'}")
    else:
        print(json.dumps(cluster.status(), indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
