"""Fixtures for tests against a real local control plane (see e2e/cluster.py).

One cluster per test session: etcd, kube-apiserver, controller-manager, scheduler and
kwok with 2 fake GPU nodes (8 x NVIDIA-H100-80GB-HBM3 each) and 1 CPU node. Each test
gets a fresh namespace. Missing binaries fail the tests with the reason; they are built
by `python -m e2e.build`. Set MODELFLEET_E2E_CLUSTER_DIR to reuse a cluster already
started with `python -m e2e.cluster up` (it is then left running).
"""

from __future__ import annotations

import json
import os
import re
import secrets
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from e2e import build  # noqa: E402
from e2e.cluster import Cluster, ClusterError  # noqa: E402
from e2e.waiting import eventually  # noqa: E402

# MODELFLEET_CRD_FILE tries a CRD on the server before it is written to crds/.
CRD_FILE = Path(os.environ.get("MODELFLEET_CRD_FILE", ROOT / "crds" / "modeldeployments.modelfleet.dev.yaml"))
CRD_NAME = "modeldeployments.modelfleet.dev"
GPU_NODES, GPUS_PER_NODE, GPU_PRODUCT = 2, 8, "NVIDIA-H100-80GB-HBM3"


@pytest.fixture(scope="session")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A running cluster: `.kubeconfig`, `.kubectl(*args)`, `.bin_dir`, `.dir`."""
    reuse = os.environ.get("MODELFLEET_E2E_CLUSTER_DIR")
    if reuse:
        running = Cluster.attach(Path(reuse))
        if not running.status()["apiserver_ready"]:
            pytest.fail(f"MODELFLEET_E2E_CLUSTER_DIR={reuse} holds no ready cluster", pytrace=False)
        yield running
        return
    missing = build.missing_binaries()
    if missing:
        pytest.fail(
            f"Kubernetes binaries missing in {build.bin_dir()}: {', '.join(missing)}. "
            "Build them with `python -m e2e.build` (needs Go and the module proxy).",
            pytrace=False,
        )
    started = Cluster(tmp_path_factory.mktemp("cluster"))
    try:
        started.up(gpu_nodes=GPU_NODES, gpu_per_node=GPUS_PER_NODE, gpu_product=GPU_PRODUCT)
    except ClusterError as err:
        pytest.fail(f"the local cluster did not start (logs in {started.dir}/logs):\n{err}",
                    pytrace=False)
    try:
        yield started
    finally:
        started.down()


@pytest.fixture(scope="session")
def crd(cluster: Cluster) -> str:
    """The ModelDeployment CRD from crds/, installed and Established."""
    if not CRD_FILE.exists():
        pytest.fail(f"{CRD_FILE} does not exist", pytrace=False)
    cluster.kubectl("apply", "--server-side", "-f", str(CRD_FILE))
    cluster.kubectl("wait", "--for=condition=Established", f"crd/{CRD_NAME}", "--timeout=60s")
    # Discovery catches up a moment after Established.
    eventually(lambda: cluster.kubectl("get", "md", "-A", check=False).returncode == 0, timeout=30)
    return CRD_NAME


@pytest.fixture
def namespace(cluster: Cluster, request: pytest.FixtureRequest) -> Iterator[str]:
    """A fresh namespace, deleted (without waiting) after the test."""
    slug = re.sub(r"[^a-z0-9-]+", "-", request.node.name.lower()).strip("-")[:40].strip("-")
    name = f"t-{slug}-{secrets.token_hex(3)}"
    cluster.kubectl("create", "namespace", name)
    eventually(
        lambda: cluster.kubectl("get", "serviceaccount", "default", "-n", name, check=False)
        .returncode == 0,
        timeout=30,
    )
    yield name
    cluster.kubectl("delete", "namespace", name, "--wait=false", check=False)



@pytest.fixture(scope="session")
def node_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """A cluster with one real node (e2e/node.py) and the busybox test image imported.

    Separate from `cluster` and only started by tests that ask for it, so the kwok-based
    tests stay as fast as before. Needs root (network namespaces, containerd, cgroups).
    """
    from e2e import node

    if os.geteuid() != 0:
        pytest.fail("the real node needs root (network namespaces, containerd, cgroups)", pytrace=False)
    missing = build.missing_binaries()
    if missing:
        pytest.fail(f"binaries missing in {build.bin_dir()}: {', '.join(missing)}; "
                    "build them with `python -m e2e.build`", pytrace=False)
    started = Cluster(tmp_path_factory.mktemp("node-cluster"))
    # test_node.py's last test compares the machine after `down` with this: first remove what
    # a node whose run was killed left behind (`up` would remove it after the snapshot).
    try:
        cleared = node.clear_stale(started.dir)
    except node.NodeError as err:
        pytest.fail(str(err), pytrace=False)
    if cleared:
        print(f"removed what an earlier node left on this machine: {', '.join(cleared)}")
    (started.dir / "machine-before.json").write_text(json.dumps(node.machine_snapshot()))
    try:
        started.up(real_node=True)
        # Streamed, as the project's image is (the pause image came in as a file).
        started.load_image(node.busybox_archive(started.dir / "images"))
    except ClusterError as err:
        started.down()
        pytest.fail(f"the cluster with a real node did not start (logs in {started.dir}/logs):\n{err}",
                    pytrace=False)
    try:
        yield started
    finally:
        started.down()
