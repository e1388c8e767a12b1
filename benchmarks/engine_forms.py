"""What the engine's form and a served request's trip cost the engine, with no server at all.

A closed loop of N streams (each sends its next request when the last one ends, as
`serve_load.py`'s clients do) drives, in alternation:

- `thread`: LLMEngine stepping on a thread of this process, which shares the interpreter
  lock with the loop that consumes its outputs (a replica's engine with `--engine-thread`,
  and `serve_load.py --offline in-process`);
- `process`: the engine in a process of its own driven from this loop (`EngineProcess`, as
  a model replica runs it, and `serve_load.py`'s offline side);
- `process+gap`: the same engine process, each request sent only after a pause of
  `--gap-ms`, the time a served request spends outside the engine on its way in (the
  client's TTFT less the replica's, as `serve_load.py` splits it). With requests of equal
  length the streams move in step, so the engine idles while they cross;
- `process+jitter`: the same engine process, each request sent after a random pause of up
  to `--jitter-ms`: arrivals spread over several steps, as a burst of requests crossing the
  serving path one after another spreads them, so new prompts join steps of streams that are
  already decoding.

Each round runs the four in turn; the figures are the medians over rounds of each form's
tokens/s and of the ratios within a round (runs seconds apart, so a drift in the machine's
speed between rounds cancels out of the ratios).

    python benchmarks/engine_forms.py --json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
# The served benchmark's prompts, closed loop and offline engines, so the forms here are those
# its offline side runs.
from serve_load import Level, make_prompts, offline_engine, offline_level


def process_cpu_s(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def closed_loop(
    engine: Any, prompts: list[str], streams: int, max_tokens: int, gap_s: float, jitter_s: float = 0.0
) -> dict:
    """Every prompt through `engine` by `streams` streams; tokens/s and the engine's CPU."""
    level = Level(streams)
    pid = getattr(engine, "pid", None) or os.getpid()
    cpu0 = process_cpu_s(pid)
    await offline_level(engine, prompts, streams, max_tokens, level, gap_s, jitter_s)
    engine_cpu = (process_cpu_s(pid) - cpu0) / level.offline_wall_s
    return {"tokens": level.offline_tokens, "tok_s": level.offline_tok_s, "engine_cpu": engine_cpu}


async def run(args: argparse.Namespace) -> dict:
    print("loading the engine twice (a thread of this process, and a process of its own)", file=sys.stderr)
    on_thread = await offline_engine(argparse.Namespace(**vars(args), offline="in-process"))
    own_process = await offline_engine(argparse.Namespace(**vars(args), offline="process"))
    forms = {
        "thread": (on_thread, 0.0, 0.0),
        "process": (own_process, 0.0, 0.0),
        "process+gap": (own_process, args.gap_ms / 1e3, 0.0),
        "process+jitter": (own_process, 0.0, args.jitter_ms / 1e3),
    }
    prompts = make_prompts(args.streams * args.requests_per_stream)
    rounds: list[dict[str, dict]] = []
    try:
        for engine, _, _ in forms.values():  # warm both
            await closed_loop(engine, prompts[:4], 4, 8, 0.0)
        for r in range(args.rounds):
            result = {}
            for name, (engine, gap, jitter) in forms.items():
                result[name] = await closed_loop(engine, prompts, args.streams, args.max_tokens, gap, jitter)
            rounds.append(result)
            done = ", ".join(
                f"{name} {res['tok_s']:.0f} tok/s (engine {res['engine_cpu']:.0%} of a core)"
                for name, res in result.items()
            )
            print(f"round {r + 1}/{args.rounds}: {done}", file=sys.stderr, flush=True)
    finally:
        await on_thread.shutdown()
        await own_process.shutdown()

    def med(values: list[float]) -> float:
        return round(statistics.median(values), 3)

    return {
        "streams": args.streams,
        "requests": len(prompts),
        "max_tokens": args.max_tokens,
        "gap_ms": args.gap_ms,
        "jitter_ms": args.jitter_ms,
        "tok_s": {name: round(statistics.median(r[name]["tok_s"] for r in rounds), 1) for name in forms},
        "engine_cpu": {name: med([r[name]["engine_cpu"] for r in rounds]) for name in forms},
        "process_over_thread": med([r["process"]["tok_s"] / r["thread"]["tok_s"] for r in rounds]),
        "gap_over_no_gap": med([r["process+gap"]["tok_s"] / r["process"]["tok_s"] for r in rounds]),
        "jitter_over_no_gap": med([r["process+jitter"]["tok_s"] / r["process"]["tok_s"] for r in rounds]),
        "process_over_thread_each": [round(r["process"]["tok_s"] / r["thread"]["tok_s"], 3) for r in rounds],
        "gap_over_no_gap_each": [round(r["process+gap"]["tok_s"] / r["process"]["tok_s"], 3) for r in rounds],
        "jitter_over_no_gap_each": [
            round(r["process+jitter"]["tok_s"] / r["process"]["tok_s"], 3) for r in rounds
        ],
        "tokens_each_run": {name: sorted({r[name]["tokens"] for r in rounds}) for name in forms},
    }


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-uri", default="builtin://tiny-llama")
    p.add_argument("--streams", type=int, default=32)
    p.add_argument("--requests-per-stream", type=int, default=8)
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--gap-ms", type=float, default=50.0, help="pause before each request of process+gap")
    p.add_argument(
        "--jitter-ms", type=float, default=10.0,
        help="longest random pause before each request of process+jitter",
    )
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--engine-threads", type=int, default=1, help="torch threads of each engine")
    p.add_argument("--quick", action="store_true", help="3 rounds of 4 requests per stream")
    p.add_argument("--json", action="store_true", help="print one JSON line last")
    args = p.parse_args()
    if args.quick:
        args.rounds, args.requests_per_stream = 3, 4
    if args.rounds < 1 or args.streams < 1 or args.requests_per_stream < 1:
        p.error("--rounds, --streams and --requests-per-stream must be at least 1")
    out = asyncio.run(run(args))
    t = out["tok_s"]

    def each(key: str) -> str:
        return " ".join(f"{x:.2f}" for x in out[key])

    print(
        f"\n{args.streams} streams, {out['requests']} requests of {args.max_tokens} tokens, "
        f"medians of {args.rounds} rounds:\n"
        f"  {'engine on a thread of this process':<42} {t['thread']:>9.1f} tok/s\n"
        f"  {'engine in a process of its own':<42} {t['process']:>9.1f} tok/s   "
        f"{out['process_over_thread']:.2f}x the thread (rounds: {each('process_over_thread_each')})\n"
        f"  {f'the same, {args.gap_ms:g} ms before each request':<42} {t['process+gap']:>9.1f} tok/s   "
        f"{out['gap_over_no_gap']:.2f}x without (rounds: {each('gap_over_no_gap_each')})\n"
        f"  {f'the same, 0-{args.jitter_ms:g} ms before each request':<42} "
        f"{t['process+jitter']:>9.1f} tok/s   "
        f"{out['jitter_over_no_gap']:.2f}x without (rounds: {each('jitter_over_no_gap_each')})"
    )
    if args.json:
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
