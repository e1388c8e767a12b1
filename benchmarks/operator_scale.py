"""Operator throughput on the local control plane with a kwok GPU fleet.

Applies N ModelDeployments at a fixed rate and measures, per object, the time from its create
call to its status being written (the operator writes status after every child exists), the
time until all are reconciled, and the operator's peak RSS; then deletes them all and times
the clean-up. The baseline, measured in the same run, is the API server's own latency for the
same create calls and Kubernetes' 1 s SLO for mutating calls.

    python benchmarks/operator_scale.py [--count 200] [--rate 10] [--nodes 100] [--quick] [--json]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e.cluster import Cluster, free_port  # noqa: E402


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))] if ordered else float("nan")


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def direct_apply(kube, count: int, rate: float) -> list[float]:
    """Create ModelDeployments and write their children ourselves; seconds from create to done."""
    from modelfleet.api import ModelDeployment
    from modelfleet.operator.children import build_children, ray_token_secret
    from modelfleet.operator.settings import OperatorSettings

    settings = OperatorSettings(head_cpu="10m", head_memory="64Mi")
    latencies: list[float] = []
    start = time.monotonic()
    for i in range(count):
        due = start + i / rate  # latency counts from when it was due, so a backlog shows
        time.sleep(max(0.0, due - time.monotonic()))
        body = kube.call(
            "POST",
            "/apis/modelfleet.dev/v1alpha1/namespaces/bench/modeldeployments",
            body=manifest(f"direct-{i:04d}"),
        )
        md = ModelDeployment.parse(body)
        kube.create(ray_token_secret(md, "t"))
        for child in build_children(md, settings):
            kube.apply(child)
        latencies.append(time.monotonic() - due)
    return latencies


def manifest(name: str) -> dict:
    return {
        "apiVersion": "modelfleet.dev/v1alpha1",
        "kind": "ModelDeployment",
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "builtin://tiny-llama"},
            "engine": {"tensorParallelSize": 2},
            "resources": {"cpu": "100m", "memory": "256Mi"},
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=200)
    parser.add_argument("--rate", type=float, default=10.0, help="creates per second")
    parser.add_argument("--nodes", type=int, default=100, help="kwok GPU nodes (8 GPUs each)")
    parser.add_argument("--quick", action="store_true", help="40 objects on 20 nodes")
    parser.add_argument("--json", action="store_true", help="print one JSON line last")
    args = parser.parse_args()
    if args.quick:
        args.count, args.nodes = min(args.count, 40), min(args.nodes, 20)

    from modelfleet.operator.kube import Kube, load_config  # noqa: F401  (imports checked early)

    workdir = Path(tempfile.mkdtemp(prefix="modelfleet-bench-"))
    cluster = Cluster(workdir / "cluster")
    print(f"starting a control plane with {args.nodes} kwok GPU nodes ...", flush=True)
    cluster.up(gpu_nodes=args.nodes, gpu_per_node=8, cpu_nodes=4)
    operator = None
    try:
        cluster.kubectl(
            "apply", "--server-side", "-f", str(ROOT / "crds/modeldeployments.modelfleet.dev.yaml")
        )
        cluster.kubectl("wait", "--for=condition=Established", "crd/modeldeployments.modelfleet.dev")
        cluster.kubectl("create", "namespace", "bench")
        time.sleep(2)
        os.environ["KUBECONFIG"] = str(cluster.kubeconfig)
        from kubernetes import config

        config.load_kube_config(config_file=str(cluster.kubeconfig))
        from modelfleet.operator.kube import Kube

        kube = Kube()
        env = {
            **os.environ,
            "MODELFLEET_DASHBOARD_URL": "http://127.0.0.1:9/{namespace}/{head}",
            "MODELFLEET_DASHBOARD_TIMEOUT_SECONDS": "0.2",
            "MODELFLEET_HEAD_CPU": "10m",
            "MODELFLEET_HEAD_MEMORY": "64Mi",
            "MODELFLEET_HEALTH_PORT": str(free_port()),
            "MODELFLEET_METRICS_PORT": "0",
        }
        log = (workdir / "operator.log").open("wb")
        operator = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.cli", "operator", "--standalone"],
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=ROOT,
        )
        time.sleep(5)

        created: dict[str, float] = {}
        api_latency: list[float] = []
        reconciled: dict[str, float] = {}
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                for item in kube.list("ModelDeployment", "bench"):
                    name = item["metadata"]["name"]
                    status = item.get("status") or {}
                    if (
                        name not in reconciled
                        and status.get("observedGeneration") == item["metadata"]["generation"]
                    ):
                        reconciled[name] = time.monotonic()
                time.sleep(0.05)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        print(f"creating {args.count} ModelDeployments at {args.rate}/s ...", flush=True)
        start = time.monotonic()
        for i in range(args.count):
            due = start + i / args.rate
            time.sleep(max(0.0, due - time.monotonic()))
            name = f"md-{i:04d}"
            t0 = time.monotonic()
            kube.call(
                "POST", "/apis/modelfleet.dev/v1alpha1/namespaces/bench/modeldeployments", body=manifest(name)
            )
            created[name] = t0
            api_latency.append(time.monotonic() - t0)
            if (i + 1) % 50 == 0:
                print(f"  {i + 1}/{args.count} created, {len(reconciled)} reconciled", flush=True)
        deadline = time.monotonic() + 300
        while len(reconciled) < args.count and time.monotonic() < deadline:
            time.sleep(0.2)
        all_s = max(reconciled.values(), default=start) - start
        latencies = [reconciled[n] - created[n] for n in created if n in reconciled]
        rss = peak_rss_mb(operator.pid)
        print(f"reconciled {len(reconciled)}/{args.count}; deleting ...", flush=True)

        t0 = time.monotonic()
        cluster.kubectl("delete", "md", "--all", "-n", "bench", "--wait=false", timeout=120)

        def leftovers() -> int:
            kinds = ("deployments", "services", "configmaps", "poddisruptionbudgets")
            return sum(
                len(
                    cluster.get_json("-n", "bench", k, "-l", "app.kubernetes.io/managed-by=modelfleet")[
                        "items"
                    ]
                )
                for k in kinds
            )

        while leftovers() and time.monotonic() - t0 < 300:
            time.sleep(1)
        cleanup_s = time.monotonic() - t0
        done.set()

        # Baseline: the same children written straight from this client at the same rate, no
        # operator. It shows what the control plane itself sustains on this machine.
        operator.terminate()
        operator.wait(30)
        direct = direct_apply(kube, args.count, args.rate)
        print(
            f"direct apply of the same children: p50 {pct(direct, 0.5):.3f}s p99 {pct(direct, 0.99):.3f}s",
            flush=True,
        )

        p50, p99 = pct(latencies, 0.5), pct(latencies, 0.99)
        api_p50, api_p99 = pct(api_latency, 0.5), pct(api_latency, 0.99)
        print()
        print(f"{'measure':38} {'operator':>10} {'baseline':>10}  baseline is")
        print(f"{'apply -> children + status, p50 (s)':38} {p50:10.3f} {api_p50:10.3f}  API create p50")
        print(f"{'apply -> children + status, p99 (s)':38} {p99:10.3f} {1.0:10.3f}  Kubernetes SLO")
        label = "apply -> children, p99, no operator (s)"
        print(f"{label:38} {p99:10.3f} {pct(direct, 0.99):10.3f}  direct writes")
        window = args.count / args.rate
        print(f"{'all reconciled after first apply (s)':38} {all_s:10.1f} {window:10.1f}  apply window")
        print(f"{'operator peak RSS (MB)':38} {rss:10.0f} {250:10.0f}  goal")
        print(f"{'delete all -> no children left (s)':38} {cleanup_s:10.1f}")
        result = {
            "count": args.count,
            "nodes": args.nodes,
            "reconciled": len(reconciled),
            "p50_s": round(p50, 4),
            "p99_s": round(p99, 4),
            "api_p99_s": round(api_p99, 4),
            "all_s": round(all_s, 2),
            "direct_p99_s": round(pct(direct, 0.99), 4),
            "rss_mb": round(rss, 1),
            "cleanup_s": round(cleanup_s, 1),
        }
        if args.json:
            print(json.dumps(result))
        return 0 if len(reconciled) == args.count else 1
    finally:
        if operator is not None:
            operator.terminate()
            try:
                operator.wait(20)
            except subprocess.TimeoutExpired:
                operator.kill()
        cluster.down()


if __name__ == "__main__":
    sys.exit(main())
