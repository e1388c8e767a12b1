"""Load test of the served API against the engine offline, on the same prompts, in one run.

For each concurrency level (closed loop: N streams, each sending its next request when the
last one ends) it measures output tokens/s, time to first token, inter-token latency and
errors through the HTTP endpoint (an aiohttp client), then runs the same requests through the
engine offline at the same concurrency: by default the engine as a replica runs it (a process
of its own, driven directly), so the ratio holds everything between the client and the engine
and nothing else. The serving overhead is served tokens/s over offline tokens/s: the two
alternate, a few pairs per level, and the level reports the pair with the median ratio (every
pair's ratio is printed too). Without --url it starts `modelfleet serve` on the tiny model in
a process of its own, as a user runs it, and stops it with Ctrl-C at the end.

    python benchmarks/serve_load.py                    # full sweep, plot in benchmarks/out/
    python benchmarks/serve_load.py --quick --json     # a few minutes; last line is JSON
    python benchmarks/serve_load.py --url http://127.0.0.1:8000 --model tiny
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import random
import re
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import httpx

from modelfleet.ports import free_port
from modelfleet.serving.command import INGRESS_NAMES

OUT = Path(__file__).resolve().parent / "out"
WORDS = [
    "the",
    "city",
    "river",
    "light",
    "morning",
    "story",
    "garden",
    "window",
    "music",
    "winter",
    "road",
    "letter",
    "market",
]


def make_prompts(n: int) -> list[str]:
    """Deterministic prompts of varied length (8..40 words)."""
    return [" ".join(WORDS[(i * 7 + k * 3) % len(WORDS)] for k in range(8 + (i * 5) % 33)) for i in range(n)]


def cpu_busy_s() -> float:
    """Busy CPU time of this machine so far, every core and process (/proc/stat). CPU per
    request moves far less than tokens/s on a machine whose speed drifts between runs."""
    with open("/proc/stat") as f:
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / os.sysconf("SC_CLK_TCK")


def pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, max(0, round(q / 100 * (len(values) - 1))))]


@dataclass
class Level:
    concurrency: int
    requests: int = 0
    errors: int = 0
    tokens: int = 0
    wall_s: float = 0.0
    ttft: list[float] = field(default_factory=list)
    itl: list[float] = field(default_factory=list)
    offline_tokens: int = 0
    offline_wall_s: float = 0.0
    cpu_s: float = 0.0
    """Busy CPU time of the whole machine during the served run (server, engine, load generator)."""
    offline_cpu_s: float = 0.0
    offline_requests: int = 0
    # Means over the served run, from the endpoint's own histograms (None against an endpoint
    # without them): how long a request took to reach a model replica, and its replica's time to
    # first token. Together with the client's TTFT they say where a first token's time went.
    ingress_wait_s: float | None = None
    replica_ttft_s: float | None = None
    # Sequences per engine step (generated tokens over forward passes) on each side: how full
    # the engine's batch was. Unlike tokens/s it does not move with the machine's speed, so
    # served over offline says how much of the ratio is requests in transit, outside the batch.
    batch: float | None = None
    offline_batch: float | None = None
    # Across the level's alternating pairs (median_pair): each pair's served/offline ratio,
    # and best served over best offline tokens/s.
    pair_ratios: list[float] = field(default_factory=list)
    best_of_ratio: float | None = None

    @property
    def tok_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    @property
    def offline_tok_s(self) -> float:
        return self.offline_tokens / self.offline_wall_s if self.offline_wall_s else 0.0

    @property
    def ratio(self) -> float:
        return self.tok_s / self.offline_tok_s if self.offline_tok_s else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "concurrency": self.concurrency,
            "requests": self.requests,
            "errors": self.errors,
            "tok_s": round(self.tok_s, 1),
            "offline_tok_s": round(self.offline_tok_s, 1),
            "overhead_ratio": round(self.ratio, 3) if self.offline_tok_s else None,
            "pair_ratios": [round(r, 3) for r in self.pair_ratios],
            "best_of_ratio": None if self.best_of_ratio is None else round(self.best_of_ratio, 3),
            "ttft_p50_s": round(pct(self.ttft, 50), 4),
            "ttft_p99_s": round(pct(self.ttft, 99), 4),
            "itl_p50_s": round(pct(self.itl, 50), 5),
            "itl_p99_s": round(pct(self.itl, 99), 5),
            "cpu_ms_per_request": round(1000 * self.cpu_s / self.requests, 2) if self.requests else None,
            "offline_cpu_ms_per_request": (
                round(1000 * self.offline_cpu_s / self.offline_requests, 2) if self.offline_requests else None
            ),
            "ingress_wait_mean_s": None if self.ingress_wait_s is None else round(self.ingress_wait_s, 4),
            "replica_ttft_mean_s": None if self.replica_ttft_s is None else round(self.replica_ttft_s, 4),
            "batch": None if self.batch is None else round(self.batch, 2),
            "offline_batch": None if self.offline_batch is None else round(self.offline_batch, 2),
            "batch_ratio": (
                round(self.batch / self.offline_batch, 3) if self.batch and self.offline_batch else None
            ),
        }


HISTOGRAMS = {
    "ingress_wait_s": "modelfleet_ingress_wait_seconds",
    "replica_ttft_s": "modelfleet_time_to_first_token_seconds",
}
COUNTERS = {
    "steps": "modelfleet_engine_steps_total",
    "generated": "modelfleet_generation_tokens_total",
}
METRICS_PUSH_S = 1.0  # the replicas and the ingress push their series to the page this often


def endpoint_totals(base: str) -> dict[str, tuple[float, float]]:
    """(sum, count) of each of HISTOGRAMS on the endpoint's /metrics, over every replica, and
    (total, 1) of each of COUNTERS."""
    from prometheus_client.parser import text_string_to_metric_families

    try:
        text = httpx.get(f"{base}/metrics", timeout=10).text
    except httpx.HTTPError:
        return {}
    keys = {name: key for key, name in HISTOGRAMS.items()}
    counters = {name.removesuffix("_total"): key for key, name in COUNTERS.items()}
    totals = {}
    for family in text_string_to_metric_families(text):
        if family.name in counters:  # the parser names a counter's family without _total
            total = sum(s.value for s in family.samples if s.name == family.name + "_total")
            totals[counters[family.name]] = (total, 1.0)
        if family.name in keys:
            total = sum(s.value for s in family.samples if s.name == family.name + "_sum")
            count = sum(s.value for s in family.samples if s.name == family.name + "_count")
            totals[keys[family.name]] = (total, count)
    return totals


async def one_stream(session: aiohttp.ClientSession, url: str, body: dict, level: Level) -> None:
    """One streamed request: TTFT to the first text, and its inter-token latency as the
    mean time per output token after the first ((last - first) / (tokens - 1)); under load
    a chunk can carry several tokens, so gaps between chunks would overstate it."""
    t0 = time.perf_counter()
    first = last = None
    tokens = 0
    try:
        async with session.post(url, json=body) as r:
            if r.status != 200:
                await r.read()
                level.errors += 1
                return
            async for raw in r.content:  # one server-sent-event line at a time
                line = raw.decode().rstrip("\r\n")
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    level.errors += 1
                    return
                if chunk.get("usage"):
                    tokens = chunk["usage"]["completion_tokens"]
                if chunk["choices"] and chunk["choices"][0].get("text"):
                    last = time.perf_counter()
                    first = first or last
    except (aiohttp.ClientError, TimeoutError):
        level.errors += 1
        return
    level.requests += 1
    level.tokens += tokens
    if first is not None:
        level.ttft.append(first - t0)
        if tokens > 1 and last is not None:
            level.itl.append((last - first) / (tokens - 1))


async def served_level(base: str, model: str, prompts: list[str], c: int, max_tokens: int) -> Level:
    """The load generator is aiohttp (C-accelerated HTTP parsing): on a machine it shares
    with the server it takes about a third of the CPU httpx took for the same streams."""
    level = Level(c)
    url = f"{base}/v1/completions"
    queue = list(enumerate(prompts))
    connector = aiohttp.TCPConnector(limit=c + 8)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def worker() -> None:
            while queue:
                _, prompt = queue.pop()
                body = {
                    "model": model,
                    "prompt": prompt,
                    "max_tokens": max_tokens,
                    "stream": True,
                    "temperature": 0.0,
                    "ignore_eos": True,
                    "stream_options": {"include_usage": True},
                }
                await one_stream(session, url, body, level)

        before = await asyncio.to_thread(endpoint_totals, base)
        t0, cpu0 = time.perf_counter(), cpu_busy_s()
        await asyncio.gather(*(worker() for _ in range(c)))
        level.wall_s = time.perf_counter() - t0
        level.cpu_s = cpu_busy_s() - cpu0
    await asyncio.sleep(METRICS_PUSH_S * 1.5)  # every series pushed since the last request
    after = await asyncio.to_thread(endpoint_totals, base)
    for key in HISTOGRAMS:
        if key in before and key in after and after[key][1] > before[key][1]:
            (s0, n0), (s1, n1) = before[key], after[key]
            setattr(level, key, (s1 - s0) / (n1 - n0))
    if all(key in before and key in after for key in COUNTERS):
        steps = after["steps"][0] - before["steps"][0]
        if steps > 0:
            level.batch = (after["generated"][0] - before["generated"][0]) / steps
    return level


async def offline_level(
    engine: Any, prompts: list[str], c: int, max_tokens: int, level: Level, gap_s: float = 0.0,
    jitter_s: float = 0.0,
) -> None:
    """Every prompt through `engine` by `c` closed-loop streams, into `level`'s offline side;
    each stream pauses `gap_s`, plus a random 0..`jitter_s` (seeded), before each request
    (engine_forms.py's stand-ins for a served request's trip)."""
    from modelfleet.engine import SamplingParams

    queue = list(prompts)
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True)
    rng = random.Random(0)

    async def worker() -> None:
        while queue:
            prompt = queue.pop()
            pause = gap_s + (rng.uniform(0.0, jitter_s) if jitter_s else 0.0)
            if pause:
                await asyncio.sleep(pause)
            async for out in engine.generate(prompt, params):
                if out.finish_reason is not None:
                    level.offline_tokens += out.usage.completion_tokens

    st0 = engine.stats()
    t0, cpu0 = time.perf_counter(), cpu_busy_s()
    await asyncio.gather(*(worker() for _ in range(c)))
    level.offline_wall_s = time.perf_counter() - t0
    level.offline_cpu_s = cpu_busy_s() - cpu0
    level.offline_requests = len(prompts)
    st1 = engine.stats()  # a request's last output brings the counters that include it
    if st1.steps_total > st0.steps_total:
        level.offline_batch = (st1.generation_tokens_total - st0.generation_tokens_total) / (
            st1.steps_total - st0.steps_total
        )


def start_command_endpoint(
    model_uri: str,
    max_num_seqs: int,
    http_proxy: str = "auto",
    cpu_binding: str = "off",
    ingress: str = "auto",
) -> tuple[str, str, str, str, str, subprocess.Popen]:
    """`modelfleet serve` in a process of its own, as a user runs it: the load generator and
    the offline engine then share no process (and no GIL) with Ray's driver."""
    OUT.mkdir(parents=True, exist_ok=True)
    manifest = OUT / "serve_load_endpoint.yaml"
    manifest.write_text(
        json.dumps(  # JSON is YAML
            {
                "apiVersion": "modelfleet.dev/v1alpha1",
                "kind": "ModelDeployment",
                "metadata": {"name": "bench"},
                "spec": {"model": {"uri": model_uri}, "engine": {"maxNumSeqs": max_num_seqs}, "replicas": 1},
            }
        )
    )
    port = free_port()
    log_path = OUT / "serve_load_endpoint.log"
    cmd = [sys.executable, "-m", "modelfleet.cli", "serve", "-f", str(manifest), "--port", str(port)]
    cmd += ["--device", "cpu", "--http-proxy", http_proxy, "--cpu-binding", cpu_binding, "--ingress", ingress]
    print(f"starting: modelfleet serve (log: {log_path})", file=sys.stderr, flush=True)
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while "Press Ctrl-C" not in log_path.read_text(errors="replace"):
        if proc.poll() is not None or time.monotonic() > deadline:
            stop_command_endpoint(proc)
            text = log_path.read_text(errors="replace")
            at = text.find("modelfleet serve:")  # its own account of what failed, when it gave one
            tail = text[at : at + 3000] if at >= 0 else text[-3000:]
            raise SystemExit(f"modelfleet serve did not become ready (log: {log_path}):\n{tail}")
        time.sleep(0.5)
    banner = log_path.read_text(errors="replace")
    proxy = "haproxy" if "proxy     HAProxy" in banner else "ray"
    cpus = re.search(r"^  cpus      (.+)$", banner, re.MULTILINE)
    served_by = next(form for form, words in INGRESS_NAMES.items() if words in banner)
    return base, "bench", proxy, cpus.group(1) if cpus else "off", served_by, proc


def stop_command_endpoint(proc: subprocess.Popen) -> None:
    """Ctrl-C, as a user stops it; killed if it has not stopped within a minute."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def start_endpoint(
    model_uri: str,
    max_num_seqs: int,
    engine_process: bool = True,
    http_proxy: str = "auto",
    ingress: str = "auto",
) -> tuple[str, str, str, str]:
    import ray
    from ray import serve

    from modelfleet.serving.app import build_application
    from modelfleet.serving.settings import ServeSettings, apply_serve_process_env

    proxy = apply_serve_process_env(http_proxy)  # as `modelfleet serve` does
    ray.init(num_cpus=4, include_dashboard=False, logging_level=logging.WARNING)
    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port}, logging_config={"log_level": "WARNING"})
    served_by = "replica" if ingress == "auto" else ingress  # as `modelfleet serve` with a replica
    settings = ServeSettings(
        name="bench",
        model=model_uri,
        max_num_seqs=max_num_seqs,
        device="cpu",
        engine_process=engine_process,
        ingress=served_by,
    )
    serve.run_many(
        [
            serve.RunTarget(
                build_application(settings),
                name="bench",
                route_prefix="/",
                logging_config={"log_level": "WARNING", "enable_access_log": False},
            )
        ],
        wait_for_applications_running=True,
    )
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            if httpx.get(f"{base}/ready", timeout=5).status_code == 200:
                break
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    return base, "bench", proxy, served_by


def stop_endpoint() -> None:
    import ray
    from ray import serve

    serve.shutdown()
    ray.shutdown()


def plot(levels: list[Level], path: Path, offline: str = "process") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    xs = [lv.concurrency for lv in levels]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4.2))
    a.plot(xs, [lv.tok_s for lv in levels], "o-", label="served (HTTP, SSE)")
    a.plot(xs, [lv.offline_tok_s for lv in levels], "s--", label=f"engine offline ({offline})")
    for lv in levels:
        if lv.offline_tok_s:
            a.annotate(
                f"{lv.tok_s / lv.offline_tok_s:.0%}",
                (lv.concurrency, lv.tok_s),
                textcoords="offset points",
                xytext=(0, -14),
                ha="center",
                fontsize=8,
            )
    a.set(xscale="log", xlabel="concurrent streams", ylabel="output tokens/s", title="Throughput")
    a.set_xticks(xs, [str(x) for x in xs])
    a.legend()
    a.grid(alpha=0.3)
    b.plot(xs, [pct(lv.ttft, 50) * 1000 for lv in levels], "o-", label="TTFT p50")
    b.plot(xs, [pct(lv.ttft, 99) * 1000 for lv in levels], "s--", label="TTFT p99")
    # Where the first token's time went, from the endpoint's own histograms (means).
    for key, style, label in (
        ("ingress_wait_s", "^:", "to reach a replica (mean)"),
        ("replica_ttft_s", "v:", "in the replica (mean)"),
    ):
        points = [(lv.concurrency, getattr(lv, key) * 1000) for lv in levels if getattr(lv, key) is not None]
        if points:
            b.plot(*zip(*points, strict=True), style, label=label)
    b.set(xscale="log", xlabel="concurrent streams", ylabel="ms", title="Time to first token (served)")
    b.set_xticks(xs, [str(x) for x in xs])
    b.legend()
    b.grid(alpha=0.3)
    fig.suptitle("modelfleet serve_load: tiny-llama on this machine's CPU")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)


async def offline_engine(args: argparse.Namespace) -> Any:
    """The offline side's engine, with the CPU threads a replica's engine has (its placement
    bundle), so the ratio measures what serving costs, not a different thread count.

    `process`: an engine process driven directly from this loop, as a replica drives its own
    (its outputs gathered as a replica's are).
    `in-process`: LLMEngine stepping on a thread of this process, whose interpreter lock it
    shares with the load loop (as a replica's engine does with `--engine-thread`)."""
    from modelfleet.engine import EngineConfig

    config = EngineConfig(model=args.model_uri, max_num_seqs=args.max_num_seqs, device="cpu")
    if args.offline == "process":
        from modelfleet.engine.process import EngineProcess
        from modelfleet.serving.replica import output_pacing
        from modelfleet.serving.settings import ServeSettings

        # gathering each stream's tokens as a replica's engine process does (`stream_chunks_per_s`)
        pacing = output_pacing(ServeSettings(name="bench", model=args.model_uri))
        engine: Any = await asyncio.to_thread(EngineProcess, config, args.engine_threads, pacing=pacing)
    else:
        import torch

        from modelfleet.engine import LLMEngine

        torch.set_num_threads(args.engine_threads)
        engine = LLMEngine(config)
    await engine.start()
    return engine


async def run(args: argparse.Namespace) -> list[Level]:
    levels = []
    print(
        f"engine threads (served and offline): {args.engine_threads}; offline engine: {args.offline}; "
        f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores",
        file=sys.stderr,
    )
    engine = await offline_engine(args)
    base, model = args.url, args.model
    try:
        # Warm both paths once.
        await served_level(base, model, make_prompts(4), 4, 8)
        await offline_level(engine, make_prompts(4), 4, 8, Level(4))
        for c in args.concurrency:
            n = max(c * args.rounds, args.min_requests)
            prompts = make_prompts(n)
            # Served and offline alternate, `repeats` pairs: each pair's ratio compares two
            # runs a few seconds apart, so a drift in the machine's speed between pairs (it
            # moves the offline engine alone by up to 70%) cancels out. The level is the
            # pair with the median ratio, with its own latencies.
            runs = []
            for _ in range(args.repeats):
                served = await served_level(base, model, prompts, c, args.max_tokens)
                await offline_level(engine, prompts, c, args.max_tokens, served)
                runs.append(served)
            level = median_pair(runs)
            levels.append(level)
            print(json.dumps(level.summary()), file=sys.stderr, flush=True)
    finally:
        await engine.shutdown()
    return levels


def median_pair(runs: list[Level]) -> Level:
    """The run whose served/offline ratio is the median of `runs` (the lower one of an even
    count), with every run's ratio, the ratio of the best runs of each side (what this
    benchmark printed before), every error of every run, and CPU per request and the engine's
    batch as the median of each side."""
    ranked = sorted(runs, key=lambda r: r.ratio)
    level = ranked[(len(ranked) - 1) // 2]
    level.pair_ratios = [r.ratio for r in runs]
    best_offline = max(r.offline_tok_s for r in runs)
    level.best_of_ratio = max(r.tok_s for r in runs) / best_offline if best_offline else 0.0
    level.errors = sum(r.errors for r in runs)
    level.cpu_s = statistics.median(r.cpu_s * level.requests / max(r.requests, 1) for r in runs)
    level.offline_cpu_s = statistics.median(r.offline_cpu_s for r in runs)
    level.batch = _median_of([r.batch for r in runs])
    level.offline_batch = _median_of([r.offline_batch for r in runs])
    return level


def _median_of(values: list[float | None]) -> float | None:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else None


def _num(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}"


def _ms(seconds: float | None) -> str:
    return "-" if seconds is None else f"{1000 * seconds:.1f}"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--url", help="a running endpoint (default: start a local one)")
    p.add_argument("--model", default="bench", help="served model name (with --url)")
    p.add_argument("--model-uri", default="builtin://tiny-llama", help="model of the offline engine")
    p.add_argument("--concurrency", type=int, nargs="+", default=[1, 8, 32, 64])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument(
        "--rounds",
        type=int,
        default=12,
        help="requests per stream at each level (default 12: a level's first rounds, every stream "
        "starting at once, are its start-up, not its steady throughput; see benchmarks/RESULTS.md)",
    )
    p.add_argument("--min-requests", type=int, default=16)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument(
        "--engine-threads",
        type=int,
        default=1,
        help="torch threads of the offline engine: a CPU replica's engine has one per rank",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="alternating served/offline pairs per level, the median pair kept (default 5; 3 with --quick)",
    )
    p.add_argument(
        "--quick", action="store_true", help="fewer pairs per level, and 8 requests at 1 stream instead of 16"
    )
    p.add_argument(
        "--engine-thread",
        action="store_true",
        help="serve with the engine on a thread of the replica instead of a process of its own",
    )
    p.add_argument(
        "--offline",
        choices=("process", "in-process"),
        help="the offline engine: a process of its own driven directly, as a replica runs it "
        "(the default), or LLMEngine on a thread of this process (the default with --engine-thread)",
    )
    p.add_argument(
        "--endpoint",
        choices=("command", "in-process"),
        default="command",
        help="without --url: `modelfleet serve` in a process of its own (as users run it), or the "
        "Serve application started from this process (its Ray driver then shares this process with "
        "the load generator and the offline engine; --engine-thread implies it)",
    )
    p.add_argument(
        "--http-proxy",
        choices=("auto", "haproxy", "ray"),
        default="auto",
        help="what the local endpoint listens with, as `modelfleet serve --http-proxy`",
    )
    p.add_argument(
        "--ingress",
        choices=("auto", "replica", "separate"),
        default="auto",
        help="where the local endpoint serves the API, as `modelfleet serve --ingress` (auto: the "
        "model replica itself)",
    )
    p.add_argument(
        "--cpu-binding",
        choices=("off", "auto"),
        default="off",
        help="the CPU binding of the `modelfleet serve` it starts (`--endpoint command`)",
    )
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    p.add_argument("--plot", type=Path, default=OUT / "serve_load.png")
    args = p.parse_args()
    if args.quick:
        # Fewer pairs, but requests as many per stream as the full sweep's: with fewer, the
        # ramp of each level (every stream's first request at once, and the rounds that stay
        # in step after it) weighs more than its steady state.
        args.min_requests = 8
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.offline is None:
        args.offline = "in-process" if args.engine_thread else "process"
    if args.repeats < 1:
        p.error("--repeats must be at least 1")
    endpoint = "external" if args.url else "in-process" if args.engine_thread else args.endpoint
    if endpoint == "in-process" and args.cpu_binding != "off":
        p.error("--cpu-binding applies to the `modelfleet serve` it starts (--endpoint command)")
    command, proxy, binding, served_by = None, "external", "external", "external"
    if endpoint == "command":
        args.url, args.model, proxy, binding, served_by, command = start_command_endpoint(
            args.model_uri, args.max_num_seqs, args.http_proxy, args.cpu_binding, args.ingress
        )
    elif endpoint == "in-process":
        args.url, args.model, proxy, served_by = start_endpoint(
            args.model_uri, args.max_num_seqs, not args.engine_thread, args.http_proxy, args.ingress
        )
        binding = "off"
    if endpoint != "external":
        print(
            f"endpoint {args.url} ({endpoint}), HTTP proxy: {proxy}, API served by: {served_by}, "
            f"CPUs: {binding}",
            file=sys.stderr,
        )
    try:
        levels = asyncio.run(run(args))
    finally:
        if command is not None:
            stop_command_endpoint(command)
        elif endpoint == "in-process":
            stop_endpoint()
    plot(levels, args.plot, args.offline)
    print(
        f"\n{'streams':>7} {'served tok/s':>12} {'offline tok/s':>13} {'ratio':>6} {'TTFT p50':>9} "
        f"{'TTFT p99':>9} {'ITL p50':>8} {'ITL p99':>8} {'errors':>6}  CPU ms/request served / offline"
        "   mean ms to reach a replica / replica TTFT   batch served / offline"
        "   every pair's ratio (best of each side)"
    )
    for lv in levels:
        s = lv.summary()
        ratio, ms = s["overhead_ratio"] or 0.0, 1000.0
        print(
            f"{s['concurrency']:>7} {s['tok_s']:>12.1f} {s['offline_tok_s']:>13.1f} {ratio:>6.2f} "
            f"{s['ttft_p50_s'] * ms:>7.1f}ms {s['ttft_p99_s'] * ms:>7.1f}ms {s['itl_p50_s'] * ms:>6.2f}ms "
            f"{s['itl_p99_s'] * ms:>6.2f}ms {s['errors']:>6}  "
            f"{s['cpu_ms_per_request'] or 0:.1f} / {s['offline_cpu_ms_per_request'] or 0:.1f}"
            f"   {_ms(s['ingress_wait_mean_s'])} / {_ms(s['replica_ttft_mean_s'])}"
            f"   {_num(s['batch'])} / {_num(s['offline_batch'])}"
            f"   {' '.join(f'{r:.2f}' for r in s['pair_ratios'])} ({s['best_of_ratio'] or 0:.2f})"
        )
    print(f"offline engine: {args.offline}; plot: {args.plot}")
    key = next((lv for lv in levels if lv.concurrency == 32), levels[-1]).summary()
    if args.json:
        print(
            json.dumps(
                {
                    "overhead_ratio": key["overhead_ratio"],
                    "pair_ratios": key["pair_ratios"],
                    "best_of_ratio": key["best_of_ratio"],
                    "tok_s": key["tok_s"],
                    "offline_tok_s": key["offline_tok_s"],
                    "ttft_p50_s": key["ttft_p50_s"],
                    "ttft_p99_s": key["ttft_p99_s"],
                    "itl_p50_s": key["itl_p50_s"],
                    "itl_p99_s": key["itl_p99_s"],
                    "concurrency": key["concurrency"],
                    "cpu_ms_per_request": key["cpu_ms_per_request"],
                    "offline_cpu_ms_per_request": key["offline_cpu_ms_per_request"],
                    "ingress_wait_mean_s": key["ingress_wait_mean_s"],
                    "replica_ttft_mean_s": key["replica_ttft_mean_s"],
                    "batch": key["batch"],
                    "offline_batch": key["offline_batch"],
                    "batch_ratio": key["batch_ratio"],
                    "http_proxy": proxy,
                    "ingress": served_by,
                    "cpu_binding": binding,
                    "endpoint": endpoint,
                    "offline_engine": args.offline,
                    "rounds": args.rounds,
                    "errors": sum(lv.errors for lv in levels),
                    "levels": [lv.summary() for lv in levels],
                }
            )
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
