"""Node objects for a simulated GPU fleet, kept alive by kwok.

GPU nodes look like the NVIDIA GPU operator's: `nvidia.com/gpu` capacity, the
`nvidia.com/gpu.product` / `gpu.count` / `gpu.present` labels and the usual
`nvidia.com/gpu:NoSchedule` taint. CPU-only nodes carry no taint, so pods without
GPUs (a Ray head, the operator) land there.
"""

from __future__ import annotations

# kwok only manages nodes carrying this annotation (see --manage-nodes-with-annotation-selector).
KWOK_ANNOTATION = "kwok.x-k8s.io/node"
KWOK_SELECTOR = f"{KWOK_ANNOTATION}=fake"
GPU_RESOURCE = "nvidia.com/gpu"


def node(name: str, labels: dict[str, str], capacity: dict[str, str], taints: list[dict]) -> dict:
    return {
        "apiVersion": "v1",
        "kind": "Node",
        "metadata": {
            "name": name,
            "annotations": {KWOK_ANNOTATION: "fake", "node.alpha.kubernetes.io/ttl": "0"},
            "labels": {
                "kubernetes.io/hostname": name,
                "kubernetes.io/os": "linux",
                "kubernetes.io/arch": "amd64",
                "type": "kwok",
                **labels,
            },
        },
        "spec": {"taints": taints},
        "status": {"capacity": capacity, "allocatable": capacity},
    }


def gpu_node(index: int, gpus: int, product: str) -> dict:
    labels = {
        "nvidia.com/gpu.present": "true",
        "nvidia.com/gpu.product": product,
        "nvidia.com/gpu.count": str(gpus),
        "node.kubernetes.io/instance-type": f"kwok-gpu-{gpus}x",
    }
    capacity = {"cpu": "96", "memory": "1024Gi", "pods": "110", "ephemeral-storage": "2Ti",
                GPU_RESOURCE: str(gpus)}
    taints = [{"key": GPU_RESOURCE, "value": "present", "effect": "NoSchedule"}]
    return node(f"kwok-gpu-{index}", labels, capacity, taints)


def cpu_node(index: int) -> dict:
    capacity = {"cpu": "32", "memory": "128Gi", "pods": "110", "ephemeral-storage": "500Gi"}
    labels = {"node.kubernetes.io/instance-type": "kwok-cpu"}
    return node(f"kwok-cpu-{index}", labels, capacity, [])


def fleet(gpu_nodes: int, gpu_per_node: int, gpu_product: str, cpu_nodes: int) -> list[dict]:
    """All fake nodes, as one list to apply."""
    gpus = [gpu_node(i, gpu_per_node, gpu_product) for i in range(gpu_nodes)]
    return gpus + [cpu_node(i) for i in range(cpu_nodes)]
