"""One real Kubernetes node for the local cluster: containerd, runc, the kubelet, kube-proxy, CoreDNS.

`python -m e2e.cluster up --dir DIR --node` adds it to the control plane of e2e/cluster.py.

Layout. Everything of the node lives in a network namespace the run creates, so nothing it
sets up is visible on the host's own network:

    host                                    netns NETNS (ip netns add)
    kube-apiserver on HOST_IP:port  <-veth->  NODE_IP   containerd, kubelet, kube-proxy, CoreDNS
    (HOST_IP/30, private, our own veth)                   bridge cni0 (POD_CIDR, host-local IPAM)
                                                            pods

- The processes are started with `nsenter --net=/run/netns/NETNS`: they share the host's
  mount namespace (so `down` sees and removes their mounts) but have their own interfaces,
  routes and iptables. The namespace has no default route: an image pull, or anything else
  aimed off this machine, fails at once with "network is unreachable".
- kube-apiserver listens on HOST_IP (the host end of the veth), not on 127.0.0.1, so pods
  reach it through the `kubernetes` Service; its serving certificate carries that IP and the
  admin kubeconfig uses it. It talks to the kubelet with a client certificate (system:masters)
  and does not verify the kubelet's self-signed serving certificate.
- Pod network: a bridge + host-local + portmap conflist on POD_CIDR (a private /24 picked
  per folder, checked against the host's routes) with ipMasq, so pod traffic to HOST_IP is
  masqueraded behind NODE_IP and needs no route on the host.
- kube-proxy runs in iptables mode (cluster CIDR = POD_CIDR); its chains live in the
  namespace. It is told to leave the global conntrack table size alone.
- CoreDNS runs as a process bound to NODE_IP:53 with the `kubernetes` plugin (admin
  kubeconfig) for cluster.local and the reverse zones; every other name is REFUSED, nothing is
  forwarded. The kubelet's clusterDNS points at NODE_IP.
- containerd's root, state, socket, runc root and pod network namespaces are under
  DIR/node; its CRI sandbox image is a pause image built here from Debian's static
  catatonit. Images only come in through `ctr images import` (`load_image`).
- The kubelet (cgroupfs driver, cgroup v1 allowed) registers the node untainted, with the
  GPU labels of e2e/nodes.py, and `nvidia.com/gpu` capacity is patched onto the node status
  (the documented way to advertise an extended resource); pods asking for GPUs run on CPU.

Pod sandboxes keep containerd's own OOM score (`restrict_oom_score_adj`): the kubelet asks
-998 for them, and lowering a score needs CAP_SYS_RESOURCE, which this project's machines
drop from the bounding set (runc then fails with "can't get final child's PID from pipe").

Differences from a production node: no device plugin (the GPU count is a number on the node
status, and pods see no device); the kubelet's serving certificate is self-signed and not
verified; CoreDNS runs outside the cluster with admin credentials and answers REFUSED (not
NXDOMAIN from an upstream) for names outside cluster.local; pods cannot reach anything off
this machine; the node's CPU and memory are the machine's (2 cores here), so pods must
request no more; OOM scores of sandboxes and Guaranteed pods are not lowered; the kubelet's
usual kernel tunables (vm.overcommit_memory=1, kernel.panic=10, kernel.panic_on_oops=1,
which are global) are set while the node runs and restored by `down`.

Public API (used by e2e/cluster.py and the tests):

    ensure_packages(packages=PACKAGES) -> list[str]   apt-get what is missing
    plan_network(dir) -> NodeNetwork, node_name(dir) -> str
    clear_stale(dir), acquire_lock(dir), release_lock(dir), lock_holder() -> Path | None
    create_netns(net), delete_netns(), nsenter(*cmd) -> argv
    node_pki(pki_dir, server, net, name) -> paths; write_configs(...); kubelet_args(...)
    pause_image(out_dir) -> archive; busybox_image(out_dir, tag=BUSYBOX_IMAGE) -> archive
    busybox_archive(out_dir, tag) -> DockerArchive (to stream)
    import_image(sock, archive | DockerArchive) -> tag; ctr(sock, *args) -> stdout
    discard_layer_blobs(sock, digests): a streamed import's blobs go once unpacked
    dns_query(server, name) -> (rcode, addresses)
    remove_containers(sock) -> int; cleanup(dir, state) -> list[str]
    leftovers(dir) -> dict; machine_snapshot() -> dict

One node at a time per machine: the kubelet's pod cgroups (/kubepods in each cgroup v1
hierarchy), the namespace name and the kernel tunables are machine-wide. A lock file
(LOCK_FILE) names the folder that holds the node; `up --node` refuses while another live
folder holds it. Clusters without a node are unaffected and still run side by side.
"""

from __future__ import annotations

import contextlib
import hashlib
import ipaddress
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import tarfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from e2e import oci, pki

# Debian packages the node needs, by the command that shows each is there.
PACKAGES = {
    "containerd": "containerd",
    "runc": "runc",
    "containernetworking-plugins": "/usr/lib/cni/bridge",
    "iptables": "iptables",
    "conntrack": "conntrack",
    "catatonit": "catatonit",
    "iproute2": "ip",
    "util-linux": "nsenter",
}
# The test image is made from this one (see busybox_image).
TEST_PACKAGES = {"busybox-static": "/bin/busybox"}

CNI_BIN_DIR = Path("/usr/lib/cni")
NETNS = "mf-node"
HOST_VETH, NODE_VETH = "mf-node-host", "mf-node-peer"
LOCK_FILE = Path("/run/modelfleet-e2e-node.json")
PAUSE_IMAGE = "localhost/modelfleet/pause:3.10"
BUSYBOX_IMAGE = "localhost/modelfleet/busybox:e2e"
CLUSTER_DOMAIN = "cluster.local"
CGROUP_ROOT = Path("/sys/fs/cgroup")
# The kubelet sets these (global) sysctls; `down` puts back what was there.
KUBELET_SYSCTLS = ("vm/overcommit_memory", "kernel/panic", "kernel/panic_on_oops")
# Labels a GPU node carries (as in e2e/nodes.py), on the real node.
GPU_PRODUCT = "NVIDIA-H100-80GB-HBM3"


class NodeError(RuntimeError):
    """The node could not be set up or torn down; the message says what failed."""


def log(message: str) -> None:
    print(f"[e2e.node {time.strftime('%H:%M:%S')}] {message}", flush=True)


def run(*cmd: str, check: bool = True, timeout: float = 120, input: str | None = None) -> str:
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, input=input)
    if check and done.returncode != 0:
        raise NodeError(f"{' '.join(cmd)} failed ({done.returncode}): {done.stderr.strip()}")
    return done.stdout


def _present(probe: str) -> bool:
    return Path(probe).exists() if probe.startswith("/") else shutil.which(probe) is not None


def ensure_packages(packages: dict[str, str] | None = None) -> list[str]:
    """Install the Debian packages that are missing (apt-get); return the ones installed."""
    packages = PACKAGES if packages is None else packages
    missing = [name for name, probe in packages.items() if not _present(probe)]
    if not missing:
        return []
    if os.geteuid() != 0:
        raise NodeError(f"packages missing and not root: apt-get install {' '.join(missing)}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    start = time.monotonic()
    log(f"installing {' '.join(missing)} (apt-get)")
    for cmd in (["apt-get", "update", "-qq"],
                ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise NodeError(f"{' '.join(cmd)} failed: {done.stderr.strip()[-2000:]}")
    # Debian starts containerd as a service on install; the node runs its own.
    if "containerd" in missing and shutil.which("systemctl"):
        subprocess.run(["systemctl", "disable", "--now", "containerd"], capture_output=True)
    still = [name for name, probe in packages.items() if not _present(probe)]
    if still:
        raise NodeError(f"installed but still missing: {', '.join(still)}")
    log(f"installed {len(missing)} packages in {time.monotonic() - start:.0f}s")
    return missing


# -- addresses, lock ----------------------------------------------------------------------------


@dataclass(frozen=True)
class NodeNetwork:
    """The private addresses of one node: a /30 veth pair and the pod /24."""

    host_ip: str
    node_ip: str
    pod_cidr: str

    @property
    def bridge_ip(self) -> str:
        return str(ipaddress.ip_network(self.pod_cidr).network_address + 1)

    def as_dict(self) -> dict[str, str]:
        return {"host_ip": self.host_ip, "node_ip": self.node_ip, "pod_cidr": self.pod_cidr}


def host_networks() -> list[ipaddress.IPv4Network]:
    """Every IPv4 network the host routes or holds an address in."""
    found = []
    for route in json.loads(run("ip", "-j", "-4", "route", "show", "table", "all") or "[]"):
        dst = route.get("dst", "")
        if dst and dst != "default" and route.get("type", "unicast") in ("unicast", "local"):
            found.append(ipaddress.ip_network(dst if "/" in dst else f"{dst}/32", strict=False))
    return found


def plan_network(dir: Path) -> NodeNetwork:
    """Private addresses for the node of `dir`: stable per folder, clear of the host's routes."""
    seed = int(hashlib.sha256(str(Path(dir).resolve()).encode()).hexdigest()[:8], 16)
    taken = host_networks()
    for step in range(256):
        third = (seed + step) % 256
        veth = ipaddress.ip_network(f"10.213.{third}.0/30")
        pods = ipaddress.ip_network(f"10.214.{third}.0/24")
        if not any(veth.overlaps(n) or pods.overlaps(n) for n in taken):
            return NodeNetwork(str(veth.network_address + 1), str(veth.network_address + 2), str(pods))
    raise NodeError("no free 10.213.x.0/30 + 10.214.x.0/24 pair: the host routes all of them")


def node_name(dir: Path) -> str:
    """The node's name: stable for a folder."""
    return "node-" + hashlib.sha256(str(Path(dir).resolve()).encode()).hexdigest()[:8]


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def lock_holder() -> Path | None:
    """The folder whose node is (or was last) running on this machine."""
    try:
        return Path(json.loads(LOCK_FILE.read_text())["dir"])
    except (OSError, ValueError, KeyError):
        return None


def _saved(dir: Path, key: str) -> dict:
    """`key` of the state file of the cluster in `dir`; empty when there is none (yet)."""
    try:
        value = json.loads((dir / "cluster.json").read_text()).get(key)
    except (OSError, ValueError, AttributeError):
        return {}
    return value if isinstance(value, dict) else {}


def recorded_host(dir: Path) -> dict:
    """What the `up` of `dir` recorded of the host (`record_host`); empty when it got no further."""
    return _saved(dir, "node")


def holder_alive(dir: Path) -> bool:
    pids = _saved(dir, "pids")
    return any(_alive(pids[n]) for n in ("containerd", "kubelet") if n in pids)


def clear_stale(dir: Path) -> list[str]:
    """Remove what a node that died (its run killed) left on the machine; `dir` is ours.

    Raises NodeError when another node is alive. Returns what had to be removed.
    """
    holder = lock_holder()
    if holder is not None and holder != dir and holder_alive(holder):
        raise NodeError(
            f"a cluster with a node is already running in {holder}: only one node runs per "
            f"machine (cgroups, the {NETNS} namespace); stop it with "
            f"`python -m e2e.cluster down --dir {holder}`"
        )
    if holder is not None:  # with what its `up` recorded of the host before it changed it
        return cleanup(holder, recorded_host(holder))
    if Path(f"/run/netns/{NETNS}").exists():
        return cleanup(dir)
    return []


def acquire_lock(dir: Path) -> None:
    """Take the machine's one node slot for `dir`; clean up after a holder that died."""
    clear_stale(dir)
    LOCK_FILE.write_text(json.dumps({"dir": str(dir), "pid": os.getpid()}))


def release_lock(dir: Path) -> None:
    if lock_holder() == dir:
        LOCK_FILE.unlink(missing_ok=True)


# -- network namespace ------------------------------------------------------------------------


def nsenter(*cmd: str) -> list[str]:
    """A command line that runs `cmd` in the node's network namespace (same mount namespace)."""
    return ["nsenter", f"--net=/run/netns/{NETNS}", "--", *cmd]


def create_netns(net: NodeNetwork) -> None:
    """The namespace, its veth to the host, and forwarding/bridge-netfilter inside it."""
    run("ip", "netns", "add", NETNS)
    run("ip", "link", "add", HOST_VETH, "type", "veth", "peer", "name", NODE_VETH, "netns", NETNS)
    run("ip", "addr", "add", f"{net.host_ip}/30", "dev", HOST_VETH)
    run("ip", "link", "set", HOST_VETH, "up")
    run("ip", "-n", NETNS, "addr", "add", f"{net.node_ip}/30", "dev", NODE_VETH)
    run("ip", "-n", NETNS, "link", "set", NODE_VETH, "up")
    run("ip", "-n", NETNS, "link", "set", "lo", "up")
    if not Path("/proc/sys/net/bridge").exists() and shutil.which("modprobe"):
        run("modprobe", "br_netfilter", check=False)
    if not Path("/proc/sys/net/bridge").exists():
        raise NodeError("the kernel has no bridge netfilter (br_netfilter): kube-proxy cannot "
                        "route Services between pods on one bridge without it")
    # Per-namespace settings (written from inside it): routing for pods, iptables seeing
    # bridged pod-to-pod traffic.
    for key in ("net/ipv4/ip_forward", "net/bridge/bridge-nf-call-iptables"):
        run(*nsenter("sh", "-c", f"echo 1 > /proc/sys/{key}"))
    # Service addresses from the namespace itself (CoreDNS, hostNetwork pods): kube-proxy's
    # OUTPUT rules rewrite them once a route exists. Unmatched ones die on the host, which
    # does not forward.
    run("ip", "-n", NETNS, "route", "add", pki.SERVICE_CIDR, "via", net.host_ip)


def delete_netns() -> None:
    run("ip", "link", "del", HOST_VETH, check=False)
    run("ip", "netns", "del", NETNS, check=False)


# -- certificates -----------------------------------------------------------------------------


def sign(
    pki_dir: Path, name: str, subject: str, *, server_sans: list[str] | None = None
) -> tuple[Path, Path]:
    """A key and certificate signed by the cluster CA (server certificate when SANs are given)."""
    if server_sans is None:
        return pki.make_cert(pki_dir, name, subject)
    pki.openssl(
        "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject, cwd=pki_dir,
    )
    ext = ["basicConstraints=CA:FALSE", "keyUsage=critical,digitalSignature,keyEncipherment",
           "extendedKeyUsage=serverAuth,clientAuth", "subjectAltName=" + ",".join(server_sans)]
    (pki_dir / f"{name}.ext").write_text("\n".join(ext) + "\n")
    pki.openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
        "-out", f"{name}.crt", "-days", "30", "-extfile", f"{name}.ext", cwd=pki_dir,
    )
    return pki_dir / f"{name}.crt", pki_dir / f"{name}.key"


def node_pki(pki_dir: Path, server: str, net: NodeNetwork, name: str) -> dict[str, Path]:
    """Re-sign the API server's certificate for HOST_IP; kubeconfigs for the node's components.

    Returns paths: kubelet / kube-proxy kubeconfigs and the API server's kubelet client pair.
    """
    sans = ["IP:127.0.0.1", f"IP:{net.host_ip}", "DNS:localhost", f"IP:{pki.KUBERNETES_SERVICE_IP}",
            "DNS:kubernetes", "DNS:kubernetes.default", "DNS:kubernetes.default.svc",
            f"DNS:kubernetes.default.svc.{CLUSTER_DOMAIN}"]
    sign(pki_dir, "apiserver", "/CN=kube-apiserver", server_sans=sans)
    ca = pki_dir / "ca.crt"
    out: dict[str, Path] = {}
    for key, subject in (("kubelet", f"/O=system:nodes/CN=system:node:{name}"),
                         ("kube-proxy", "/CN=system:kube-proxy")):
        cert, pkey = sign(pki_dir, key, subject)
        out[key] = pki.write_kubeconfig(pki_dir / f"{key}.kubeconfig", server, ca, cert, pkey, key)
    out["kubelet-client.crt"], out["kubelet-client.key"] = sign(
        pki_dir, "apiserver-kubelet-client", "/O=system:masters/CN=kube-apiserver-kubelet-client"
    )
    return out


# -- images -----------------------------------------------------------------------------------


def _layer(out: Path, files: dict[str, Path], links: dict[str, str], dirs: dict[str, int]) -> Path:
    """An uncompressed layer tar: regular files copied from the host, symlinks, directories."""
    with tarfile.open(out, "w", format=tarfile.PAX_FORMAT) as layer:
        for name, mode in dirs.items():
            info = tarfile.TarInfo(name)
            info.type, info.mode = tarfile.DIRTYPE, mode
            layer.addfile(info)
        for name, src in files.items():
            info = layer.gettarinfo(str(src), arcname=name)
            info.uid = info.gid = 0
            info.uname = info.gname = "root"
            with src.open("rb") as handle:
                layer.addfile(info, handle)
        for name, target in links.items():
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mode = tarfile.SYMTYPE, target, 0o777
            layer.addfile(info)
    return out


def pause_image(out_dir: Path) -> Path:
    """The pod sandbox image: Debian's static catatonit as PID 1 (`-P`: pause mode)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    layer = _layer(out_dir / "pause-layer.tar", {"catatonit": Path("/usr/bin/catatonit")}, {}, {})
    return oci.write_docker_archive(out_dir / "pause.tar", PAUSE_IMAGE, [layer],
                                    oci.ImageConfig(entrypoint=["/catatonit", "-P"]))


def busybox_image(out_dir: Path, tag: str = BUSYBOX_IMAGE) -> Path:
    """busybox_archive's image saved as a Docker archive file (`out_dir/busybox.tar`)."""
    return busybox_archive(out_dir, tag).save(out_dir / "busybox.tar")


def busybox_archive(out_dir: Path, tag: str = BUSYBOX_IMAGE) -> oci.DockerArchive:
    """A small test image: Debian's busybox-static with a link per applet in /bin.

    Its `wget` crashes (Debian's 1.35 build segfaults even on the host), so tests speak HTTP
    through `nc`; name lookups (`nc`, `nslookup`) work.
    """
    ensure_packages(TEST_PACKAGES)
    out_dir.mkdir(parents=True, exist_ok=True)
    applets = run("/bin/busybox", "--list").split()
    links = {f"bin/{a}": "busybox" for a in applets if a != "busybox"}
    files = {"bin/busybox": Path("/bin/busybox")}
    etc = out_dir / "busybox-etc"
    etc.mkdir(exist_ok=True)
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534::/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\nnogroup:x:65534:\n")
    (etc / "nsswitch.conf").write_text("passwd: files\ngroup: files\nhosts: files dns\n")
    files |= {f"etc/{n}": etc / n for n in ("passwd", "group", "nsswitch.conf")}
    dirs = {"bin": 0o755, "etc": 0o755, "tmp": 0o1777, "root": 0o700, "www": 0o755}
    layer = _layer(out_dir / "busybox-layer.tar", files, links, dirs)
    return oci.DockerArchive(tag, (oci.Layer.of(layer),), oci.ImageConfig(cmd=["sh"]))


def ctr(sock: Path, *args: str, timeout: float = 120) -> str:
    return run("ctr", f"--address={sock}", "--namespace=k8s.io", *args, timeout=timeout)


def _ingested(content_root: Path) -> int:
    """Bytes containerd has taken in so far: its content store's blobs and open ingests."""
    total = 0
    for folder in (content_root / "blobs", content_root / "ingest"):
        for path in folder.rglob("*") if folder.exists() else []:
            with contextlib.suppress(OSError):
                if path.is_file():
                    total += path.stat().st_size
    return total


def import_image(sock: Path, archive: Path | oci.DockerArchive, timeout: float = 3600) -> str:
    """`ctr images import` of a Docker archive into containerd's k8s.io namespace.

    `archive` is an archive file, or a `DockerArchive` streamed into `ctr images import -` (no
    second copy of the layers on disk). Prints a progress line every 15 s (bytes containerd has
    stored so far, out of the archive's size), since ctr itself is silent until the end. Returns
    the image's tag.
    """
    streamed = isinstance(archive, oci.DockerArchive)
    if streamed:
        tag, size, source = archive.tag, archive.layer_bytes, "a stream"
    else:
        tag, size, source = oci.archive_tag(archive), archive.stat().st_size, str(archive)
    content = sock.parent / "root" / "io.containerd.content.v1.content"
    before = _ingested(content)
    log(f"importing {tag} ({size / 2**20:,.0f} MiB) from {source}")
    start = time.monotonic()
    proc = subprocess.Popen(
        ["ctr", f"--address={sock}", "--namespace=k8s.io", "images", "import",
         "-" if streamed else str(archive)],
        stdin=subprocess.PIPE if streamed else subprocess.DEVNULL,
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    stop = threading.Event()
    write_error: list[BaseException] = []

    def progress() -> None:
        while not stop.wait(15):
            stored = max(_ingested(content) - before, 0)
            log(f"  {tag}: {time.monotonic() - start:.0f}s, {stored / 2**20:,.0f} of "
                f"{size / 2**20:,.0f} MiB stored, then unpacked")

    def feed() -> None:
        assert proc.stdin is not None and isinstance(archive, oci.DockerArchive)
        try:
            archive.write(proc.stdin.buffer)
        except (OSError, ValueError) as err:  # ctr went away (its output says why), or a bad layer
            write_error.append(err)
        finally:
            with contextlib.suppress(OSError):
                proc.stdin.close()

    feeder = threading.Thread(target=feed, daemon=True) if streamed else None
    for thread in (threading.Thread(target=progress, daemon=True), feeder):
        if thread is not None:
            thread.start()
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    deadline = threading.Timer(timeout, kill)
    deadline.start()
    try:
        assert proc.stdout is not None
        output = proc.stdout.read()
        proc.wait()
    finally:
        deadline.cancel()
        stop.set()
    if timed_out.is_set():
        raise NodeError(f"importing {tag} from {source} took more than {timeout:.0f}s")
    if feeder is not None:
        feeder.join(60)
    if proc.returncode != 0 or write_error:
        why = f" (writing the stream: {write_error[0]})" if write_error else ""
        raise NodeError(f"importing {tag} from {source} failed{why}: {output.strip()[-2000:]}")
    listed = ctr(sock, "images", "ls", "-q")
    if tag not in listed.split():
        raise NodeError(f"{tag} not among containerd's images after import:\n{listed}")
    log(f"imported {tag} in {time.monotonic() - start:.1f}s")
    if streamed:
        discard_layer_blobs(sock, [layer.sha256 for layer in archive.layers])
    return tag


def discard_layer_blobs(sock: Path, digests: list[str]) -> None:
    """Drop an unpacked image's layer blobs from containerd's content store, as the CRI plugin's
    `discard_unpacked_layers` does for pulled images: containers start from the unpacked
    snapshots, so the blobs only double the image on disk (6 GB for modelfleet's). The image
    then reads "incomplete" in `ctr images check`; a re-import brings the blobs back.
    """
    content = sock.parent / "root" / "io.containerd.content.v1.content" / "blobs" / "sha256"
    present = [d for d in digests if (content / d).exists()]
    if not present:
        return
    freed = sum((content / d).stat().st_size for d in present)
    try:
        ctr(sock, "content", "rm", *(f"sha256:{d}" for d in present))
        # The files go with a garbage collection; deleting a lease with --sync runs one now.
        lease = ctr(sock, "leases", "create").split()[0]
        ctr(sock, "leases", "delete", "--sync", lease, timeout=300)
    except (NodeError, subprocess.TimeoutExpired) as err:  # the image is imported and usable
        log(f"warning: the layer blobs stay in containerd's content store: {err}")
        return
    left = [d for d in present if (content / d).exists()]
    log(f"dropped {len(present) - len(left)} unpacked layer blob(s), {freed / 2**20:,.0f} MiB"
        + (f"; {len(left)} still there" if left else ""))


# -- configuration files ----------------------------------------------------------------------


@dataclass(frozen=True)
class NodePaths:
    """Where the node keeps its files: DIR/node/..."""

    root: Path

    @property
    def containerd_config(self) -> Path:
        return self.root / "containerd.toml"

    @property
    def containerd_sock(self) -> Path:
        return self.root / "containerd" / "containerd.sock"

    @property
    def cni_conf_dir(self) -> Path:
        return self.root / "cni"

    @property
    def kubelet_config(self) -> Path:
        return self.root / "kubelet.yaml"

    @property
    def kube_proxy_config(self) -> Path:
        return self.root / "kube-proxy.yaml"

    @property
    def corefile(self) -> Path:
        return self.root / "Corefile"


def containerd_config(paths: NodePaths) -> str:
    c = paths.root / "containerd"
    cri = 'plugins."io.containerd.grpc.v1.cri"'
    return f"""version = 2
root = "{c / 'root'}"
state = "{c / 'state'}"

[grpc]
  address = "{paths.containerd_sock}"

[plugins."io.containerd.internal.v1.opt"]
  path = "{c / 'opt'}"

[{cri}]
  sandbox_image = "{PAUSE_IMAGE}"
  stream_server_address = "127.0.0.1"
  stream_server_port = "0"
  netns_mounts_under_state_dir = true
  # Never below containerd's own OOM score: lowering it needs CAP_SYS_RESOURCE, which some
  # machines (this project's CI VMs among them) drop from the bounding set; the kubelet asks
  # -998 for every pod sandbox and runc then fails ("can't get final child's PID from pipe").
  restrict_oom_score_adj = true
  enable_selinux = false
  max_container_log_line_size = 16384

[{cri}.containerd]
  snapshotter = "overlayfs"
  default_runtime_name = "runc"

[{cri}.containerd.runtimes.runc]
  runtime_type = "io.containerd.runc.v2"

[{cri}.containerd.runtimes.runc.options]
  SystemdCgroup = false
  Root = "{c / 'runc'}"

[{cri}.cni]
  bin_dir = "{CNI_BIN_DIR}"
  conf_dir = "{paths.cni_conf_dir}"
  max_conf_num = 1
"""


CNI_NETWORK = "mf-pods"


def cni_conflist(paths: NodePaths, net: NodeNetwork) -> dict:
    return {
        "cniVersion": "1.0.0",
        "name": CNI_NETWORK,
        "plugins": [
            {
                "type": "bridge", "bridge": "cni0", "isGateway": True, "ipMasq": True,
                "hairpinMode": True,
                "ipam": {
                    "type": "host-local", "dataDir": str(paths.root / "ipam"),
                    "ranges": [[{"subnet": net.pod_cidr, "gateway": net.bridge_ip}]],
                    "routes": [{"dst": "0.0.0.0/0"}],
                },
            },
            {"type": "portmap", "capabilities": {"portMappings": True}},
        ],
    }


def kubelet_config(paths: NodePaths, net: NodeNetwork, ca: Path) -> dict:
    return {
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "kind": "KubeletConfiguration",
        "containerRuntimeEndpoint": f"unix://{paths.containerd_sock}",
        "cgroupDriver": "cgroupfs",
        "failCgroupV1": False,
        "failSwapOn": False,
        "address": net.node_ip,
        "port": 10250,
        "readOnlyPort": 0,
        "healthzBindAddress": "127.0.0.1",
        "authentication": {
            "anonymous": {"enabled": False},
            "webhook": {"enabled": True},
            "x509": {"clientCAFile": str(ca)},
        },
        "authorization": {"mode": "Webhook"},
        "clusterDomain": CLUSTER_DOMAIN,
        "clusterDNS": [net.node_ip],
        "resolvConf": str(paths.root / "resolv.conf"),
        "podLogsDir": str(paths.root / "pod-logs"),
        "registerNode": True,
        "registerWithTaints": [],
        "maxPods": 110,
        "serializeImagePulls": False,
        "imageGCHighThresholdPercent": 100,
        "imageGCLowThresholdPercent": 99,
        "imageMinimumGCAge": "8760h",
        # No eviction for disk, as kind's nodes: the node's filesystem is the machine's own, shared
        # with everything else on it, and a percentage of a large disk (1% of 250 GB) tainted the
        # node while gigabytes were free. A truly full disk fails the write that fills it instead.
        "evictionHard": {"memory.available": "50Mi", "nodefs.available": "0%",
                         "nodefs.inodesFree": "0%", "imagefs.available": "0%"},
        "evictionPressureTransitionPeriod": "5s",
        "protectKernelDefaults": False,
        "nodeStatusUpdateFrequency": "10s",
        "shutdownGracePeriod": "0s",
        "fileCheckFrequency": "20s",
        "syncFrequency": "10s",
    }


def kube_proxy_config(paths: NodePaths, net: NodeNetwork, name: str, kubeconfig: Path) -> dict:
    return {
        "apiVersion": "kubeproxy.config.k8s.io/v1alpha1",
        "kind": "KubeProxyConfiguration",
        "mode": "iptables",
        "clusterCIDR": net.pod_cidr,
        "hostnameOverride": name,
        "bindAddress": net.node_ip,
        "healthzBindAddress": "127.0.0.1:10256",
        "metricsBindAddress": "127.0.0.1:10249",
        "clientConnection": {"kubeconfig": str(kubeconfig)},
        # Zero leaves the (machine-wide) conntrack table size and timeouts as they are.
        "conntrack": {"maxPerCore": 0, "min": 0, "tcpEstablishedTimeout": "0s",
                      "tcpCloseWaitTimeout": "0s"},
        "iptables": {"syncPeriod": "10s", "minSyncPeriod": "0s"},
        "nodePortAddresses": [f"{net.node_ip}/32"],
    }


def corefile(net: NodeNetwork, kubeconfig: Path) -> str:
    """cluster.local and reverse lookups from the cluster; every other name REFUSED."""
    return f"""{CLUSTER_DOMAIN}:53 in-addr.arpa:53 ip6.arpa:53 {{
    bind {net.node_ip}
    errors
    kubernetes {CLUSTER_DOMAIN} in-addr.arpa ip6.arpa {{
        kubeconfig {kubeconfig} e2e
        pods insecure
        ttl 5
    }}
}}

.:53 {{
    bind {net.node_ip}
    acl {{
        block
    }}
}}
"""


def write_configs(paths: NodePaths, net: NodeNetwork, name: str, pki_dir: Path, admin: Path) -> None:
    """Every file the node's processes read, under DIR/node (created fresh)."""
    import yaml

    paths.cni_conf_dir.mkdir(parents=True, exist_ok=True)
    (paths.root / "pod-logs").mkdir(exist_ok=True)
    paths.containerd_config.write_text(containerd_config(paths))
    (paths.cni_conf_dir / "10-mf-pods.conflist").write_text(json.dumps(cni_conflist(paths, net), indent=2))
    (paths.root / "resolv.conf").write_text(f"nameserver {net.node_ip}\n")
    paths.kubelet_config.write_text(yaml.safe_dump(kubelet_config(paths, net, pki_dir / "ca.crt")))
    paths.kube_proxy_config.write_text(
        yaml.safe_dump(kube_proxy_config(paths, net, name, pki_dir / "kube-proxy.kubeconfig"))
    )
    paths.corefile.write_text(corefile(net, admin))


def kubelet_args(paths: NodePaths, net: NodeNetwork, name: str, pki_dir: Path, gpus: int) -> list[str]:
    """The kubelet's flags; the node registers with the GPU labels of e2e/nodes.py and no taint."""
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": GPU_PRODUCT,
        "nvidia.com/gpu.count": str(gpus),
        "node.kubernetes.io/instance-type": f"e2e-real-gpu-{gpus}x",
    }
    return [
        f"--config={paths.kubelet_config}",
        f"--kubeconfig={pki_dir / 'kubelet.kubeconfig'}",
        f"--root-dir={paths.root / 'kubelet'}",
        f"--cert-dir={paths.root / 'kubelet-pki'}",
        f"--hostname-override={name}",
        f"--node-ip={net.node_ip}",
        "--node-labels=" + ",".join(f"{k}={v}" for k, v in labels.items()),
        "--v=2",
    ]


def gpu_capacity_patch(gpus: int) -> str:
    """The JSON patch of the node status that advertises `gpus` nvidia.com/gpu."""
    return json.dumps([
        {"op": "add", "path": f"/status/{field}/nvidia.com~1gpu", "value": str(gpus)}
        for field in ("capacity", "allocatable")
    ])


# -- DNS --------------------------------------------------------------------------------------


def dns_query(server: str, name: str, timeout: float = 2.0) -> tuple[int, list[str]]:
    """Ask `server`:53 over UDP for A records of `name`; return (rcode, addresses)."""
    qid = int.from_bytes(os.urandom(2), "big")
    question = b"".join(bytes([len(p)]) + p.encode() for p in name.rstrip(".").split(".")) + b"\0"
    packet = struct.pack("!HHHHHH", qid, 0x0100, 1, 0, 0, 0) + question + struct.pack("!HH", 1, 1)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as sock:
        sock.settimeout(timeout)
        sock.sendto(packet, (server, 53))
        reply, _ = sock.recvfrom(4096)
    rid, flags, _, ancount, _, _ = struct.unpack("!HHHHHH", reply[:12])
    if rid != qid:
        raise NodeError("DNS reply with another id")
    offset = 12 + len(question) + 4
    addresses = []
    for _ in range(ancount):
        while True:  # the answer's name: labels or a compression pointer
            length = reply[offset]
            if length & 0xC0 == 0xC0:
                offset += 2
                break
            offset += 1 + length
            if length == 0:
                break
        rtype, _, _, rdlength = struct.unpack("!HHIH", reply[offset:offset + 10])
        offset += 10
        if rtype == 1 and rdlength == 4:
            addresses.append(socket.inet_ntoa(reply[offset:offset + 4]))
        offset += rdlength
    return flags & 0xF, addresses


# -- teardown ---------------------------------------------------------------------------------

NODE_PROGRAMS = ("containerd", "containerd-shim-runc-v2", "runc", "kubelet", "kube-proxy", "coredns",
                 "catatonit")
# Host folders the kubelet, CNI or containerd may create whatever their configuration says.
HOST_PATHS = ("/var/lib/kubelet", "/var/log/containers", "/var/log/pods", "/var/lib/cni",
              "/run/containerd", "/etc/kubernetes", "/opt/cni", "/etc/cni")


def record_host(state: dict) -> None:
    """What `cleanup` must put back: kernel tunables, and host folders that did not exist."""
    state["sysctls"] = {
        k: Path(f"/proc/sys/{k}").read_text().strip() for k in KUBELET_SYSCTLS
        if Path(f"/proc/sys/{k}").exists()
    }
    state["created_paths"] = [p for p in HOST_PATHS if not Path(p).exists()]
    # `ip netns add` bind-mounts /run/netns onto itself the first time it runs.
    state["run_netns_mounted"] = is_mount_point("/run/netns")
    state["run_netns_existed"] = Path("/run/netns").exists()


def mount_points() -> set[str]:
    """Every mount point of this mount namespace (bind mounts included, unlike Path.is_mount)."""
    lines = Path("/proc/self/mountinfo").read_text().splitlines()
    return {line.split()[4].encode().decode("unicode_escape") for line in lines}


def is_mount_point(path: Path | str) -> bool:
    return str(path) in mount_points()


def mounts_under(*roots: Path) -> list[str]:
    """Mount points at or below `roots`, deepest first (from /proc/self/mountinfo)."""
    found = {p for p in mount_points() if any(p == str(r) or p.startswith(f"{r}/") for r in roots)}
    return sorted(found, key=lambda p: p.count("/"), reverse=True)


def node_processes(dir: Path) -> list[int]:
    """Processes of this node: node programs whose command line names `dir`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        program = Path(argv[0].decode(errors="replace")).name
        if program in NODE_PROGRAMS and str(dir).encode() in b" ".join(argv):
            found.append(int(entry.name))
    return found


def pod_cgroups() -> list[Path]:
    """The kubelet's pod cgroups in every hierarchy, deepest first."""
    found: list[Path] = []
    # cgroup v1: one per hierarchy (/sys/fs/cgroup/<controller>/kubepods); v2: one tree.
    hierarchies = [CGROUP_ROOT, *CGROUP_ROOT.iterdir()] if CGROUP_ROOT.exists() else []
    for hierarchy in hierarchies:
        top = hierarchy / "kubepods"
        if top.is_dir():
            found += [Path(d) for d, _, _ in os.walk(top)]
    return sorted(found, key=lambda p: len(p.parts), reverse=True)


def cgroup_pids(cgroups: list[Path]) -> set[int]:
    pids: set[int] = set()
    for group in cgroups:
        with contextlib.suppress(OSError):
            pids |= {int(p) for p in (group / "cgroup.procs").read_text().split()}
    return pids


def remove_containers(sock: Path) -> int:
    """Kill and delete every task and container of containerd's k8s.io namespace; return how many."""
    if not sock.exists():
        return 0
    try:
        containers = ctr(sock, "containers", "ls", "-q", timeout=20).split()
        tasks = ctr(sock, "tasks", "ls", "-q", timeout=20).split()
        if tasks:
            run("ctr", f"--address={sock}", "--namespace=k8s.io", "tasks", "rm", "-f", *tasks,
                check=False, timeout=60)
        if containers:
            run("ctr", f"--address={sock}", "--namespace=k8s.io", "containers", "rm", *containers,
                check=False, timeout=60)
    except (NodeError, subprocess.TimeoutExpired) as err:
        log(f"could not list containers through {sock}: {err}")
        return 0
    return len(containers)


def _kill_all(pids: set[int] | list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)


def cleanup(dir: Path, state: dict | None = None) -> list[str]:
    """Remove what is left of the node of `dir` once its main processes are stopped.

    Kills leftover shims and containers, unmounts everything under DIR/node, removes the
    pod cgroups, the namespace and veth, CNI cache entries, and host folders the node created;
    restores the kernel tunables. Returns what it had to remove (for the report).
    """
    dir = Path(dir)
    state = state or {}
    done: list[str] = []
    leftovers = node_processes(dir)
    groups = pod_cgroups()
    in_pods = cgroup_pids(groups)
    if leftovers or in_pods:
        _kill_all([*leftovers, *in_pods])
        done.append(f"{len(leftovers) + len(in_pods)} processes")
        deadline = time.monotonic() + 10
        while (node_processes(dir) or cgroup_pids(groups)) and time.monotonic() < deadline:
            time.sleep(0.1)
    points = mounts_under(dir / "node")
    for point in points:
        run("umount", point, check=False)
        if is_mount_point(point):
            run("umount", "-l", point, check=False)
    if points:
        done.append(f"{len(points)} mounts")
    removed = 0
    for group in pod_cgroups():
        with contextlib.suppress(OSError):
            group.rmdir()
            removed += 1
    if removed:
        done.append(f"{removed} cgroups")
    if Path(f"/run/netns/{NETNS}").exists() or Path(f"/sys/class/net/{HOST_VETH}").exists():
        delete_netns()
        done.append(f"netns {NETNS}")
    run_netns = Path("/run/netns")
    if state.get("run_netns_mounted") is False and is_mount_point(run_netns) and not any(run_netns.iterdir()):
        run("umount", str(run_netns), check=False)
        done.append("mount /run/netns")
    if state.get("run_netns_existed") is False and run_netns.exists() and not is_mount_point(run_netns):
        with contextlib.suppress(OSError):
            run_netns.rmdir()
    for cached in Path("/var/lib/cni/results").glob(f"{CNI_NETWORK}-*"):
        cached.unlink(missing_ok=True)
    for path in state.get("created_paths", []):
        if Path(path).exists():
            shutil.rmtree(path, ignore_errors=True)
            done.append(f"host folder {path}")
    for key, value in state.get("sysctls", {}).items():
        with contextlib.suppress(OSError):
            Path(f"/proc/sys/{key}").write_text(value)
    release_lock(dir)
    return done


def machine_snapshot() -> dict[str, list]:
    """Machine-wide traces a node could leave: compare one taken before `up` with one after `down`.

    Processes are not in it (other work on the machine runs runc too); `leftovers(dir)`
    finds this node's own processes by their command lines.
    """
    return {
        "mounts": sorted(mount_points()),
        "interfaces": sorted(p.name for p in Path("/sys/class/net").iterdir()),
        "netns": sorted(p.name for p in Path("/run/netns").iterdir()) if Path("/run/netns").exists() else [],
        "cgroups": sorted(str(g) for g in pod_cgroups()),
        "sysctls": [f"{k}={Path(f'/proc/sys/{k}').read_text().strip()}" for k in KUBELET_SYSCTLS],
    }


def leftovers(dir: Path) -> dict[str, list]:
    """What of a node would still be on the machine: empty lists when `down` was complete."""
    links = [n for n in (HOST_VETH,) if Path(f"/sys/class/net/{n}").exists()]
    return {
        "processes": node_processes(Path(dir)),
        "mounts": mounts_under(Path(dir)),
        "netns": [NETNS] if Path(f"/run/netns/{NETNS}").exists() else [],
        "interfaces": links,
        "cgroups": [str(g) for g in pod_cgroups()],
    }
