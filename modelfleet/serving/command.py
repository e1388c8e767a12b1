"""`modelfleet serve`: one ModelDeployment on this machine, no Kubernetes.

Starts a local Ray sized to the machine, deploys the same Serve application the operator
deploys, shows progress while the model loads, prints the endpoint with ready-to-paste
examples, and takes everything down on Ctrl-C.
"""

from __future__ import annotations

import argparse
import logging
import os
import re
import signal
import sys
import time
from pathlib import Path
from typing import Any

from modelfleet.cpus import BINDINGS
from modelfleet.serving.settings import (
    API_KEY_ENV,
    HTTP_PROXIES,
    INGRESS_FORMS,
    apply_serve_process_env,
    choose_http_proxy,
)

APP_ROUTE = "/"
PROXY_NAMES = {"haproxy": "HAProxy", "ray": "Ray Serve's HTTP proxy"}
INGRESS_NAMES = {
    "replica": "to the model replicas, which serve the API themselves",
    "separate": "to the ingress, which hands requests to the model replicas",
}


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve a model on this machine behind an OpenAI-compatible API",
        description="Serve a ModelDeployment manifest (or a model URI) on this machine with a local "
        "Ray: the same application the operator runs on Kubernetes. Ctrl-C stops it.",
        epilog="Examples:\n  modelfleet serve -f examples/tiny.yaml\n"
        "  modelfleet serve --model builtin://tiny-llama --tp 2 --port 8001",
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("-f", "--file", metavar="FILE", help="ModelDeployment manifest to serve")
    src.add_argument(
        "--model", metavar="URI", help="model to serve without a manifest (builtin://, hf://, file://)"
    )
    p.add_argument("--name", help="deployment name with --model (default: from the URI)")
    p.add_argument("--tp", type=int, metavar="N", help="tensor-parallel ranks per replica")
    p.add_argument("--replicas", type=int, metavar="N", help="model replicas")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, help="API port (default: spec.service.port, 8000)")
    p.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto", help="where the model runs")
    p.add_argument(
        "--http-proxy",
        choices=HTTP_PROXIES,
        default="auto",
        help="what listens on the API port: haproxy (forwards to an ingress replica that serves HTTP "
        "itself; the faster path), ray (Ray Serve's Python proxy), or auto: haproxy when its binary "
        "is installed (ray[serve] brings one on Linux)",
    )
    p.add_argument(
        "--ingress",
        choices=("auto", *INGRESS_FORMS),
        default="auto",
        help="where the OpenAI API is served: replica (each model replica serves it itself: one hop "
        "fewer per request), separate (an ingress deployment in front, as the operator runs it: holds "
        "requests while no replica is ready), or auto: replica unless the deployment has 0 replicas",
    )
    p.add_argument(
        "--cpu-binding",
        choices=BINDINGS,
        default="off",
        help="off: every process shares every core; auto: when the model runs on this machine's "
        "CPU, its engines get cores of their own and Ray and the HTTP path the rest (more tokens/s "
        "once the load is steady, a longer time to first token when many requests arrive at once)",
    )
    p.add_argument(
        "--max-queue-depth", type=int, metavar="N", help="waiting requests per ready replica before 429"
    )
    p.add_argument(
        "--api-key-file",
        metavar="FILE",
        help=f"require `Authorization: Bearer <key>` with the key in FILE (or set {API_KEY_ENV})",
    )
    p.set_defaults(func=serve_command)


def serve_command(args: argparse.Namespace) -> int:
    from modelfleet.api import ManifestError

    try:
        md = _deployment(args)
    except ManifestError as err:
        for problem in err.problems:
            print(f"{args.file}: {problem}", file=sys.stderr)
        return 1
    try:
        settings = _settings(md, args)
        proxy = choose_http_proxy(args.http_proxy)
    except (OSError, ValueError, RuntimeError) as err:
        print(f"modelfleet serve: {err}", file=sys.stderr)
        return 2
    port = args.port or md.spec.service.port
    return _run(settings, args.host, port, proxy, args.cpu_binding)


def _deployment(args: argparse.Namespace) -> Any:
    from modelfleet.api import ModelDeployment, load_manifest

    if args.file:
        return load_manifest(args.file)
    name = args.name or _name_from_uri(args.model)
    return ModelDeployment.parse(
        {
            "apiVersion": "modelfleet.dev/v1alpha1",
            "kind": "ModelDeployment",
            "metadata": {"name": name},
            "spec": {"model": {"uri": args.model}},
        },
        source="--model",
    )


def _name_from_uri(uri: str) -> str:
    tail = uri.rstrip("/").rsplit("/", 1)[-1].lower()
    name = re.sub(r"[^a-z0-9-]+", "-", tail).strip("-")[:63].strip("-")
    return name or "model"


def _settings(md: Any, args: argparse.Namespace) -> Any:
    from modelfleet.serving.settings import settings_from_deployment

    key = None
    if args.api_key_file:
        key = Path(args.api_key_file).read_text().strip()
        if not key:
            raise ValueError(f"{args.api_key_file} is empty")
    key = key or os.environ.get(API_KEY_ENV, "").strip() or None
    settings = settings_from_deployment(
        md,
        tensor_parallel_size=args.tp,
        replicas=args.replicas,
        max_queue_depth=args.max_queue_depth,
        device=args.device,
        api_key=key,
        ingress=_ingress(args.ingress, args.replicas if args.replicas is not None else md.spec.replicas),
    )
    settings.resolve_api_key()  # a manifest that names a key secret needs a key here too
    return settings


def _ingress(requested: str, replicas: int) -> str:
    if requested != "auto":
        return requested
    return "replica" if replicas >= 1 else "separate"


def _run(settings: Any, host: str, port: int, proxy: str, cpu_binding: str = "off") -> int:
    from rich.console import Console

    console = Console(stderr=True)
    started = False
    try:
        with console.status("Starting a local Ray instance...") as status:
            settings, cpus_line = _start_ray(settings, proxy, cpu_binding)
            started = True
            _stop_on_signals()
            status.update("Deploying the application...")
            _deploy(settings, host, port)
            ok = _wait_until_ready(settings, host, port, status)
        if not ok:
            return 1
        _print_ready(settings, host, port, proxy, cpus_line)
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        console.print("\nShutting down...")
        return 0
    finally:
        if started:
            _stop_ray()


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt


def _stop_on_signals() -> None:
    """Ctrl-C and SIGTERM (a service manager, `kill`) both shut down cleanly. Installed after
    ray.init, which sets its own SIGTERM handler, and also when started in the background,
    where the shell leaves SIGINT ignored."""
    signal.signal(signal.SIGINT, _interrupt)
    signal.signal(signal.SIGTERM, _interrupt)


def _start_ray(settings: Any, proxy: str, cpu_binding: str = "off") -> tuple[Any, str | None]:
    """Starts Ray for the application, its Serve processes set up for `proxy` (as chosen by
    choose_http_proxy). Returns the settings to deploy and, with `--cpu-binding auto`, the
    banner's line on the CPUs."""
    import ray

    from modelfleet.serving.placement import cpus_needed

    gpus = 0
    if settings.device != "cpu":
        import torch

        gpus = torch.cuda.device_count()
        if settings.device == "cuda" and gpus == 0:
            raise SystemExit("modelfleet serve: --device cuda but no GPU is visible")
    if gpus:
        need = settings.tensor_parallel_size * settings.replicas
        if need > gpus:
            raise SystemExit(
                f"modelfleet serve: {settings.replicas} replicas x TP {settings.tensor_parallel_size} "
                f"need {need} GPUs; this machine has {gpus}"
            )
    # Logical CPUs: enough for every replica's CPU bundles even on a small machine; the
    # replicas share the real cores.
    cpus = max(os.cpu_count() or 1, cpus_needed(settings.tensor_parallel_size, settings.replicas))
    apply_serve_process_env(proxy)
    cpus_line = None
    if cpu_binding == "auto":
        settings, cpus_line = _bind_cpus(settings, gpus)
    # Ray's token authentication stays on (its default for local clusters): ray.init
    # makes a token, so other users of this machine cannot drive the cluster.
    ray.init(
        num_cpus=cpus,
        num_gpus=gpus,
        include_dashboard=False,
        namespace="modelfleet",
        logging_level=logging.WARNING,
        configure_logging=True,
    )
    return settings, cpus_line


def _bind_cpus(settings: Any, gpus: int) -> tuple[Any, str]:
    """`--cpu-binding auto`: on the CPU the engines get cores of their own. This process, and
    so every process Ray starts from now on, keeps to the serving cores; each engine process
    binds itself to the rest (`engine_cpus`). Returns the settings to deploy and the banner's
    account: the split, or why the cores stay shared."""
    import dataclasses

    from modelfleet.cpus import bind, plan_cpus

    if gpus:
        return settings, "shared (--cpu-binding auto: the model runs on GPUs)"
    allowed = os.sched_getaffinity(0)
    tp, replicas = settings.tensor_parallel_size, settings.replicas
    plan = plan_cpus(allowed, tp, replicas)
    if plan is None:
        return settings, (
            f"shared (--cpu-binding auto: {len(allowed)} CPU(s) for {replicas} replica(s) x TP {tp}; "
            "it binds one-rank engines, a core each, beside a core for serving)"
        )
    if not bind(plan.serving, "serving processes"):
        return settings, "shared (--cpu-binding auto: this process cannot bind its CPUs; see the warning)"
    return dataclasses.replace(settings, engine_cpus=plan.engine), plan.describe()


def _deploy(settings: Any, host: str, port: int) -> None:
    from ray import serve

    from modelfleet.serving.app import build_application

    serve.start(http_options={"host": host, "port": port}, logging_config={"log_level": "WARNING"})
    serve.run_many(
        [
            serve.RunTarget(
                build_application(settings),
                name=settings.name,
                route_prefix=APP_ROUTE,
                logging_config={"log_level": "WARNING"},
                external_scaler_enabled=True,  # replicas can change in place
            )
        ],
        wait_for_applications_running=False,
    )


def _wait_until_ready(settings: Any, host: str, port: int, status: Any) -> bool:
    import httpx
    from ray import serve

    t0 = time.monotonic()
    url = f"http://{_client_host(host)}:{port}/ready"
    while True:
        app = serve.status().applications.get(settings.name)
        state = str(app.status) if app else "NOT_STARTED"
        if "DEPLOY_FAILED" in state:
            print(f"modelfleet serve: deployment failed: {app.message}", file=sys.stderr)
            for name, dep in app.deployments.items():
                if dep.message:
                    print(f"  {name}: {dep.message}", file=sys.stderr)
            return False
        ready = 0
        try:
            r = httpx.get(url, timeout=2.0)
            ready = r.json().get("ready_replicas", 0) if r.status_code in (200, 503) else 0
        except (httpx.HTTPError, ValueError):
            pass
        if ready >= max(settings.replicas, 1) and "RUNNING" in state:
            return True
        status.update(
            f"Loading {settings.model} (TP {settings.tensor_parallel_size}): "
            f"{ready}/{settings.replicas} replicas ready, {time.monotonic() - t0:.0f} s"
        )
        time.sleep(0.5)


def _client_host(host: str) -> str:
    return "127.0.0.1" if host in ("0.0.0.0", "") else ("[::1]" if host == "::" else host)


def _print_ready(settings: Any, host: str, port: int, proxy: str, cpus_line: str | None = None) -> None:
    base = f"http://{_client_host(host)}:{port}/v1"
    auth = ' -H "Authorization: Bearer $MODELFLEET_API_KEY"' if settings.api_key else ""
    key = 'os.environ["MODELFLEET_API_KEY"]' if settings.api_key else '"none"'
    replicas, tp = settings.replicas, settings.tensor_parallel_size
    cpus = f"  cpus      {cpus_line}\n" if cpus_line else ""
    print(
        f"""
{settings.served_name} is ready: {settings.model}, {replicas} replica(s) x TP {tp}

  endpoint  {base}
  health    http://{_client_host(host)}:{port}/health   ready: /ready   metrics: /metrics
  proxy     {PROXY_NAMES[proxy]}, {INGRESS_NAMES[settings.ingress]}
{cpus}
Try it:

  curl {base}/chat/completions{auth} -H 'Content-Type: application/json' \\
    -d '{{"model": "{settings.served_name}", "max_tokens": 32,
         "messages": [{{"role": "user", "content": "Hello!"}}]}}'

  python - <<'PY'
import os
from openai import OpenAI
client = OpenAI(base_url="{base}", api_key={key})
reply = client.chat.completions.create(
    model="{settings.served_name}", messages=[{{"role": "user", "content": "Hello!"}}], max_tokens=32)
print(reply.choices[0].message.content)
PY

Press Ctrl-C to stop.""",
        flush=True,
    )


def _stop_ray() -> None:
    import ray
    from ray import serve

    try:
        serve.shutdown()
    except Exception as err:  # shutting down anyway
        print(f"modelfleet serve: serve shutdown: {err}", file=sys.stderr)
    ray.shutdown()
