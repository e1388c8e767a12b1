"""Autoscaling on a replayed load: modelfleet's queue-depth autoscaler against Ray Serve's own.

One local Ray + Serve, the tiny model, a real Prometheus scraping the application's /metrics.
The same trace is replayed twice: once with modelfleet's autoscaler
setting the replica count, once with Ray Serve's built-in autoscaler at its default delays
(`target_ongoing_requests`, 30 s up, 600 s down). For each: reaction time (queue above target
-> decision -> a new replica running), TTFT p99 during the burst, replica-seconds (both runs
counted to the same end: the later run's last finished request), failed requests. The
timeline (queue depth, replicas, TTFT) is plotted to PNG.

Traces: `step` (idle, one 10x burst, idle) and `bursty` (10x bursts of 15 s, 30 s apart). The
burst's rate is `--burst-load` times what one replica serves, measured before the runs, so the
burst needs more replicas on any machine (or set `--base-rps`).

On a CPU-only machine a second replica shares the cores of the first: it takes capacity as it
starts instead of adding it. `--emulated-step-ms N` makes every engine step last at least N ms,
asleep for the rest, as a device's step would: each replica then brings capacity of its own
and leaves the cores to the serving path, as replicas on GPU nodes do. The tokens, the serving
path, Prometheus and both autoscalers stay real.

    python benchmarks/autoscale.py [--quick] [--json] [--trace step|bursty] [--burst-load 1.5]
        [--emulated-step-ms 25] [--max-replicas N] [--target-queue-depth 4] [--out DIR]

modelfleet runs at the default `targetQueueDepth` of a ModelDeployment (4) unless
`--target-queue-depth` says otherwise, with a 20 s down window in quick runs and 60 s in full
ones (a ModelDeployment's default is 300 s); Ray Serve's autoscaler runs at its defaults.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import itertools
import json
import logging
import os
import sys
import threading
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from e2e.cluster import free_port  # noqa: E402
from e2e.prometheus import PrometheusServer  # noqa: E402
from modelfleet.api import AutoscalingSpec  # noqa: E402
from modelfleet.operator.autoscaling.loop import LocalAutoscaler  # noqa: E402


@dataclasses.dataclass
class Trace:
    name: str
    bursts: list[tuple[float, float]]  # [start, end) windows at ten times the base rate
    total_s: float
    base_rps: float
    max_tokens: int

    @classmethod
    def step(cls, idle_s: float, burst_s: float, tail_s: float, base_rps: float, max_tokens: int) -> Trace:
        return cls("step", [(idle_s, idle_s + burst_s)], idle_s + burst_s + tail_s, base_rps, max_tokens)

    @classmethod
    def bursty(cls, count: int, burst_s: float, gap_s: float, base_rps: float, max_tokens: int) -> Trace:
        starts = [gap_s / 2 + k * (burst_s + gap_s) for k in range(count)]
        total = starts[-1] + burst_s + gap_s
        return cls("bursty", [(a, a + burst_s) for a in starts], total, base_rps, max_tokens)

    def in_burst(self, t: float) -> bool:
        return any(a <= t < b for a, b in self.bursts)

    def arrivals(self) -> list[float]:
        """Request start times: evenly spaced at the base rate, ten times faster in a burst."""
        times, t = [], 0.0
        while t < self.total_s:
            times.append(t)
            t += 1.0 / (self.base_rps * (10 if self.in_burst(t) else 1))
        return times


@dataclasses.dataclass
class Result:
    name: str
    ttft: list[tuple[float, float]] = dataclasses.field(default_factory=list)  # (start, ttft)
    failures: list[str] = dataclasses.field(default_factory=list)
    replicas: list[tuple[float, int]] = dataclasses.field(default_factory=list)  # (t, running)
    queue: list[tuple[float, float]] = dataclasses.field(default_factory=list)
    decision_t: float | None = None
    serving_t: float | None = None
    queue_rise_t: float | None = None
    wall0: float = 0.0  # Unix time of t = 0, to ask Prometheus about the run afterwards
    metrics_unavailable_ticks: int = 0  # autoscaler rounds that got no queue depth

    def replica_seconds(self, until: float) -> float:
        """Up to `until`, the same for both runs: a run whose last request finished earlier
        is charged for the replicas it still had until then."""
        total = 0.0
        points = [*self.replicas, (max(until, self.replicas[-1][0]), 0)]
        for (t0, n), (t1, _) in itertools.pairwise(points):
            total += n * (t1 - t0)
        return total

    def ttft_p99(self, trace: Trace) -> float:
        """Over the requests sent during a burst."""
        values = sorted(v for s, v in self.ttft if trace.in_burst(s))
        return values[min(len(values) - 1, int(0.99 * (len(values) - 1)))] if values else float("nan")


def replica_counts(app: str) -> tuple[int, int]:
    """(running, all) replicas of the Model deployment."""
    from ray import serve

    status = serve.status().applications.get(app)
    dep = status.deployments.get("Model") if status else None
    if dep is None:
        return 0, 0
    states = dep.replica_states
    return states.get("RUNNING", 0), sum(states.values())


async def replay(base: str, trace: Trace, result: Result, t0: float) -> None:
    async def one(client: httpx.AsyncClient, start: float, i: int) -> None:
        await asyncio.sleep(max(0.0, t0 + start - time.monotonic()))
        body = {
            "model": "auto",
            "prompt": f"request {i}",
            "max_tokens": trace.max_tokens,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        sent = time.monotonic()
        try:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    result.failures.append(f"{resp.status_code}")
                    return
                first = None
                async for line in resp.aiter_lines():
                    if first is None and line.startswith("data: {"):
                        first = time.monotonic()
                        result.ttft.append((sent - t0, first - sent))
                    if line == "data: [DONE]":
                        return
                result.failures.append("no [DONE]")
        except httpx.HTTPError as err:
            result.failures.append(type(err).__name__)

    async with httpx.AsyncClient(timeout=600, limits=httpx.Limits(max_connections=512)) as client:
        await asyncio.gather(*(one(client, s, i) for i, s in enumerate(trace.arrivals())))


async def capacity_rps(base: str, streams: int, max_tokens: int, rounds: int = 3) -> float:
    """Requests per second one replica completes with `streams` requests always in flight,
    streamed like the trace's (a stream's chunks cost the serving path more than one body)."""
    body = {"model": "auto", "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, "stream": True}

    async def worker(client: httpx.AsyncClient, k: int) -> None:
        for r in range(rounds):
            request = {**body, "prompt": f"calibrate {k} {r}"}
            async with client.stream("POST", f"{base}/v1/completions", json=request) as resp:
                resp.raise_for_status()
                async for _ in resp.aiter_lines():
                    pass

    async with httpx.AsyncClient(timeout=120) as client:
        await worker(client, -1)  # warm
        t0 = time.monotonic()
        await asyncio.gather(*(worker(client, k) for k in range(streams)))
        return streams * rounds / (time.monotonic() - t0)


def run_one(
    name: str, base: str, deploy, prom: PrometheusServer, trace: Trace, spec: AutoscalingSpec, ours: bool
) -> Result:
    result = Result(name)
    stop = threading.Event()
    t0 = time.monotonic() + 1.0
    result.wall0 = time.time() + 1.0
    scaler = None
    if ours:
        scaler = LocalAutoscaler(
            spec,
            max_num_seqs=2,
            prometheus_url=prom.url,
            namespace="bench",
            name="auto",
            get_ready=lambda: replica_counts("auto")[0],
            set_replicas=deploy,
            replicas=1,
            interval=1.0,
        )
        scaler.start()

    def sample() -> None:
        while not stop.is_set():
            t = time.monotonic() - t0
            running, every = replica_counts("auto")
            result.replicas.append((t, running))
            try:
                found = prom.query('sum(max by (replica) (modelfleet_queue_depth{model_deployment="auto"}))')
                q = float(found[0]["value"][1]) if found else float("nan")  # a missed scrape
            except httpx.HTTPError:
                q = float("nan")
            result.queue.append((t, q))
            if result.queue_rise_t is None and q > spec.target_queue_depth:
                result.queue_rise_t = t
            if result.decision_t is None and every > 1:
                result.decision_t = t
            if result.serving_t is None and running > 1:
                result.serving_t = t
            stop.wait(0.5)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    print(f"[{name}] replaying {len(trace.arrivals())} requests over {trace.total_s:.0f}s ...", flush=True)
    asyncio.run(replay(base, trace, result, t0))
    while time.monotonic() - t0 < trace.total_s:
        time.sleep(0.5)
    stop.set()
    sampler.join(5)
    if scaler is not None:
        scaler.stop()
        # The policy's own decision time is exact; the sampler only sees its effect.
        result.metrics_unavailable_ticks = sum(p.decision == "MetricsUnavailable" for p in scaler.timeline)
        ups = [p for p in scaler.timeline if p.decision == "ScaleUp"]
        if ups:
            result.decision_t = ups[0].t - (t0 - scaler.started)
    return result


def scrape_report(prom: PrometheusServer, result: Result, total_s: float) -> list[str]:
    """Where the queue-depth series was missing during a run, and what the scrapes did then:
    a stretch without it is blind time for any autoscaler that reads it."""
    start, end = result.wall0, result.wall0 + total_s
    job = 'job="modelfleet"'
    raw_up = prom.query(f"up{{{job}}}[{int(total_s) + 1}s]", at=end)
    raw_dur = prom.query(f"scrape_duration_seconds{{{job}}}[{int(total_s) + 1}s]", at=end)
    ups = [(float(t) - start, float(v)) for t, v in raw_up[0]["values"]] if raw_up else []
    durations = sorted(float(v) for _, v in raw_dur[0]["values"]) if raw_dur else []
    present = prom.query_range('count(modelfleet_queue_depth{model_deployment="auto"})', start, end, 1.0)
    seen = {round(float(t) - start) for t, _ in present[0]["values"]} if present else set()
    lines = [
        f"scrapes: {len(ups)}, failed {sum(v == 0 for _, v in ups)}, duration p50 "
        + (f"{durations[len(durations) // 2]:.3f} s, max {durations[-1]:.3f} s" if durations else "-")
    ]
    gap: int | None = None
    for second in range(int(total_s) + 1):
        if second not in seen and gap is None:
            gap = second
        elif second in seen and gap is not None:
            failed = sum(v == 0 for t, v in ups if gap <= t < second)
            total = sum(gap <= t < second for t, _ in ups)
            lines.append(
                f"no queue-depth series from {gap} s to {second} s: {failed} of {total} scrapes failed there"
            )
            gap = None
    if gap is not None:
        lines.append(f"no queue-depth series from {gap} s to the end")
    return lines


def plot(results: list[Result], trace: Trace, out: Path, emulated_ms: float) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(3, 1, figsize=(10, 8), sharex=True)
    for r in results:
        axes[0].plot([t for t, _ in r.queue], [q for _, q in r.queue], label=r.name)
        axes[1].step([t for t, _ in r.replicas], [n for _, n in r.replicas], where="post", label=r.name)
        axes[2].scatter([s for s, _ in r.ttft], [v for _, v in r.ttft], s=6, label=r.name)
    for ax in axes:
        for a, b in trace.bursts:
            ax.axvspan(a, b, color="0.9", zorder=0)  # behind the data
        ax.legend(loc="upper right")
    axes[0].set_ylabel("queue depth")
    axes[1].set_ylabel("running replicas")
    axes[2].set_ylabel("TTFT (s)")
    axes[2].set_xlabel("seconds (shaded: 10x burst)")
    device = f", emulated {emulated_ms:g} ms steps" if emulated_ms else ""
    fig.suptitle(
        f"modelfleet autoscaler vs Ray Serve autoscaler defaults: {trace.name} trace, tiny model{device}"
    )
    fig.tight_layout()
    suffix = ("" if trace.name == "step" else f"_{trace.name}") + ("_emulated" if emulated_ms else "")
    path = out / f"autoscale_timeline{suffix}.png"
    fig.savefig(path, dpi=110)
    return path


def make_trace(args: argparse.Namespace) -> Trace:
    load = {"base_rps": args.base_rps, "max_tokens": args.max_tokens}
    if args.trace == "bursty":
        return Trace.bursty(count=3 if args.quick else 6, burst_s=15, gap_s=30, **load)
    if args.quick:
        # The idle tail outlasts three of the quick down windows (20 s), so a run can come
        # back to one replica inside the trace.
        return Trace.step(idle_s=15, burst_s=45, tail_s=105, **load)
    return Trace.step(idle_s=30, burst_s=120, tail_s=240, **load)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "out")
    # The load is sized to what replicas can add on a small CPU machine: the burst (10x the base
    # rate) is 1.5 times what one replica of `maxNumSeqs` 2 serves, measured at the start, so it
    # needs a second replica. A burst beyond what the machine's cores can serve with any number
    # of replicas measures the cores, not the autoscaler; one that a replica absorbs, nothing.
    parser.add_argument(
        "--base-rps", type=float, help="requests/s outside the burst (default: from --burst-load)"
    )
    parser.add_argument(
        "--burst-load",
        type=float,
        default=1.5,
        help="the burst's rate as a multiple of what one replica serves, measured at the start",
    )
    parser.add_argument("--max-tokens", type=int, default=256, help="tokens per request")
    parser.add_argument("--trace", choices=("step", "bursty"), default="step")
    # A CPU replica adds capacity only while it has a core of its own; beyond that, starting
    # one (a Ray worker, imports, the model load) takes CPU from the replicas already serving.
    # With emulated steps a replica needs little CPU, and more of them add capacity.
    parser.add_argument("--max-replicas", type=int, help="default: 4 with --emulated-step-ms, else the cores")
    parser.add_argument(
        "--target-queue-depth",
        type=float,
        default=AutoscalingSpec().target_queue_depth,
        help="modelfleet's targetQueueDepth (default: a ModelDeployment's); Ray's "
        "target_ongoing_requests stays at its default, 2",
    )
    parser.add_argument(
        "--emulated-step-ms",
        type=float,
        default=0.0,
        help="every engine step lasts at least this long (a device's step time); 0: CPU steps as they are",
    )
    args = parser.parse_args()
    if args.max_replicas is None:
        args.max_replicas = 4 if args.emulated_step_ms else max(2, min(4, os.cpu_count() or 2))
    args.out.mkdir(parents=True, exist_ok=True)
    down = 20 if args.quick else 60
    spec = AutoscalingSpec(
        enabled=True,
        min_replicas=1,
        max_replicas=args.max_replicas,
        target_queue_depth=args.target_queue_depth,
        scale_down_stabilization_seconds=down,
    )

    import ray
    from ray import serve

    from modelfleet.serving.app import build_application
    from modelfleet.serving.scaling import set_model_replicas
    from modelfleet.serving.settings import ServeSettings, apply_serve_process_env

    apply_serve_process_env()  # as `modelfleet serve` runs the replicas
    ray.init(num_cpus=8, include_dashboard=False, logging_level=logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    base = f"http://127.0.0.1:{port}/auto"
    settings = ServeSettings(
        name="auto",
        namespace="bench",
        model="builtin://tiny-llama",
        max_num_seqs=2,
        max_queue_depth=512,
        device="cpu",
        replicas=1,
        emulated_step_s=args.emulated_step_ms / 1000,
    )
    quiet = {"log_level": "WARNING"}  # no access log line per request
    results = []
    try:
        with PrometheusServer(
            [f"127.0.0.1:{port}"], "1s", metrics_path="/auto/metrics", workdir=args.out / "prometheus"
        ) as prom:
            serve.run_many(
                [
                    serve.RunTarget(
                        build_application(settings),
                        name="auto",
                        route_prefix="/auto",
                        external_scaler_enabled=True,
                        logging_config=quiet,
                    )
                ],
                wait_for_applications_running=True,
            )

            # The burst is sized to the replica this machine runs: beyond one replica, within
            # what more could serve. A fixed rate would queue nothing on a fast machine.
            if args.base_rps is None:
                one = asyncio.run(capacity_rps(base, settings.max_num_seqs, args.max_tokens))
                args.base_rps = args.burst_load * one / 10
                print(
                    f"one replica serves {one:.2f} requests/s of {args.max_tokens} tokens: "
                    f"burst {10 * args.base_rps:.2f}/s ({args.burst_load}x), base {args.base_rps:.2f}/s",
                    flush=True,
                )
            trace = make_trace(args)

            def deploy(n: int) -> None:
                set_model_replicas("auto", n)

            results.append(run_one("modelfleet", base, deploy, prom, trace, spec, ours=True))
            serve.delete("auto")
            ray_config = {
                "min_replicas": spec.min_replicas,
                "max_replicas": spec.max_replicas,
                "target_ongoing_requests": 2,
            }
            serve.run(
                build_application(
                    settings, model_overrides={"num_replicas": "auto", "autoscaling_config": ray_config}
                ),
                name="auto",
                route_prefix="/auto",
                logging_config=quiet,
            )
            results.append(run_one("ray-serve-default", base, None, prom, trace, spec, ours=False))
            for r in results:
                for line in scrape_report(prom, r, trace.total_s):
                    print(f"[{r.name}] {line}", flush=True)
            print(f"[modelfleet] autoscaler rounds without metrics: {results[0].metrics_unavailable_ticks}")
    finally:
        serve.shutdown()
        ray.shutdown()

    ours, theirs = results
    # Each run samples until its last request is done; replica-seconds count to the later end.
    horizon = max(ours.replicas[-1][0], theirs.replicas[-1][0])
    spent = (ours.replica_seconds(horizon), theirs.replica_seconds(horizon))
    png = plot(results, trace, args.out, args.emulated_step_ms)
    print()
    print(f"{'':32} {'modelfleet':>12} {'ray default':>12}")

    def row(label: str, a: float | None, b: float | None, fmt: str = "{:12.1f}") -> None:
        def show(v: float | None) -> str:
            return fmt.format(v) if v is not None else f"{'-':>12}"

        print(f"{label:32} {show(a)} {show(b)}")

    def since_rise(r: Result, t: float | None) -> float | None:
        return None if t is None or r.queue_rise_t is None else t - r.queue_rise_t

    row(
        "queue rise -> decision (s)", since_rise(ours, ours.decision_t), since_rise(theirs, theirs.decision_t)
    )
    row(
        "queue rise -> replica serving (s)",
        since_rise(ours, ours.serving_t),
        since_rise(theirs, theirs.serving_t),
    )
    row("TTFT p99 in burst (s)", ours.ttft_p99(trace), theirs.ttft_p99(trace), "{:12.2f}")
    row(f"replica-seconds to {horizon:.0f} s", *spent)
    row("failed requests", len(ours.failures), len(theirs.failures), "{:12d}")
    row("replicas at the trace's end", ours.replicas[-1][1], theirs.replicas[-1][1], "{:12d}")
    print(f"timeline: {png}")
    reaction = since_rise(ours, ours.decision_t)
    summary = {
        "reaction_s": round(reaction, 2) if reaction is not None else None,
        "failed_requests": len(ours.failures),
        "ray_failed_requests": len(theirs.failures),
        "replica_seconds_ratio_vs_ray": round(spent[0] / spent[1], 3) if spent[1] else None,
        "ttft_p99_ratio_vs_ray": round(ours.ttft_p99(trace) / theirs.ttft_p99(trace), 3),
        "trace": trace.name,
        "base_rps": round(trace.base_rps, 3),
        "emulated_step_ms": args.emulated_step_ms,
        "max_replicas": args.max_replicas,
        "target_queue_depth": args.target_queue_depth,
        "plot": str(png),
    }
    if args.json:
        print(json.dumps(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
