"""`modelfleet operator` (run the kopf operator) and `modelfleet plan` (show what it would create)."""

from __future__ import annotations

import argparse
import sys
from typing import Any


def _run_operator(args: argparse.Namespace) -> int:
    import asyncio
    import logging

    import kopf
    from prometheus_client import start_http_server

    from modelfleet.operator import handlers  # registers the handlers

    settings = handlers.SETTINGS
    _configure_logging(settings.log_format, args.verbose)
    if settings.metrics_port:
        start_http_server(settings.metrics_port)
    namespaces = list(args.namespace or settings.watch_namespaces)
    logging.getLogger("modelfleet.operator").info(
        "watching %s", ", ".join(namespaces) if namespaces else "all namespaces"
    )
    asyncio.run(
        kopf.operator(
            clusterwide=not namespaces,
            namespaces=namespaces,
            standalone=args.standalone,
            peering_name=settings.peering,
            liveness_endpoint=f"http://0.0.0.0:{settings.health_port}/healthz",
        )
    )
    return 0


def _configure_logging(fmt: str, verbose: bool) -> None:
    import json
    import logging

    level = logging.DEBUG if verbose else logging.INFO
    handler = logging.StreamHandler()
    if fmt == "json":

        class _Json(logging.Formatter):
            def format(self, record: logging.LogRecord) -> str:
                return json.dumps(
                    {
                        "time": self.formatTime(record),
                        "level": record.levelname,
                        "logger": record.name,
                        "message": record.getMessage(),
                    }
                )

        handler.setFormatter(_Json())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=level, handlers=[handler], force=True)
    if not verbose:  # one line per HTTP call or per timer tick drowns what matters
        for noisy in ("httpx", "kopf.objects"):
            logging.getLogger(noisy).setLevel(logging.WARNING)


def _plan(args: argparse.Namespace) -> int:
    import yaml

    from modelfleet.api import ManifestError, load_manifest
    from modelfleet.operator.children import build_children
    from modelfleet.operator.settings import OperatorSettings

    settings = OperatorSettings.from_env()
    status = 0
    for path in args.file:
        try:
            md = load_manifest(path)
        except ManifestError as err:
            for problem in err.problems:
                print(f"{path}: {problem}", file=sys.stderr)
            status = 1
            continue
        md.metadata.uid = md.metadata.uid or "<set-by-the-api-server>"
        children = build_children(md, settings, surge=False)
        sys.stdout.write(f"# {path}: {len(children)} objects for ModelDeployment {md.namespace}/{md.name}\n")
        sys.stdout.write(yaml.safe_dump_all(children, sort_keys=False, width=120))
        sys.stdout.write("---\n")
        if args.kubeconfig or args.cluster:
            print(f"# fleet: {_room(md, args.kubeconfig)}")
    return status


def _room(md: Any, kubeconfig: str | None) -> str:
    from kubernetes import client, config

    from modelfleet.operator.capacity import judge
    from modelfleet.operator.kube import FleetCache, Kube

    if kubeconfig:
        config.load_kube_config(config_file=kubeconfig)
    else:
        config.load_kube_config()
    kube = Kube(client.ApiClient())
    nodes, pods = FleetCache(kube).snapshot()
    verdict = judge(md, nodes, pods, 0)
    if verdict.limited:
        return f"CapacityLimited: {verdict.message}"
    return f"room for all {md.spec.replicas} replica(s) ({verdict.message})"


def register(sub: Any) -> None:
    op = sub.add_parser(
        "operator",
        help="run the Kubernetes operator",
        description="Watch ModelDeployments and build their Ray clusters, Serve apps and Services. "
        "Uses in-cluster credentials in a pod, else KUBECONFIG. Settings come from MODELFLEET_* "
        "environment variables (see modelfleet/operator/settings.py).",
    )
    op.add_argument(
        "-n",
        "--namespace",
        action="append",
        metavar="NS",
        help="watch only this namespace (repeatable; default: MODELFLEET_WATCH_NAMESPACES or all)",
    )
    op.add_argument("--standalone", action="store_true", help="no peering with other operator replicas")
    op.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    op.set_defaults(func=_run_operator)

    plan = sub.add_parser(
        "plan",
        help="print the objects the operator would create for a manifest",
        description="Print the Kubernetes objects the operator builds for each manifest (as `helm "
        "template` does for a chart). With --kubeconfig (or --cluster for KUBECONFIG), also say "
        "whether the fleet has room, in the words of the CapacityLimited condition.",
    )
    plan.add_argument("-f", "--file", action="append", required=True, metavar="FILE", help="manifest")
    plan.add_argument("--kubeconfig", metavar="K", help="judge the fleet of this cluster")
    plan.add_argument("--cluster", action="store_true", help="judge the fleet of the KUBECONFIG cluster")
    plan.set_defaults(func=_plan)
