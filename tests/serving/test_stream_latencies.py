"""Which latencies a replica records for a stream that gathers tokens between chunks.

The engine here is a stand-in that hands the Run its outputs at times the test chooses: the
point is when tokens arrive against when the stream sends them, which a real engine's steps
do not let a test set. Everything else (the Run, its metrics, the response writer, the
admission counts) is the replica's own code.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

from modelfleet.serving.metrics import ReplicaMetrics
from modelfleet.serving.replica import Admission, Run
from modelfleet.serving.responses import ResponseWriter

GAP_S = 0.05  # between two tokens of the sequence
HOLD_S = 0.3  # how long the stream gathers after a chunk: longer than several gaps


@dataclass
class Out:
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: Any = None


@dataclass
class ScriptedEngine:
    sinks: list[Any] = field(default_factory=list)

    def submit(self, prompt, params, sink, request_id):
        self.sinks.append(sink)
        return request_id

    def abort(self, request):
        pass


LABELS = {"model_deployment": "tiny", "namespace": "default", "replica": "r1"}


def _value(metrics: ReplicaMetrics, name: str, **labels: str) -> float | None:
    return metrics.registry.get_sample_value(name, {**LABELS, **labels})


async def test_gathered_tokens_keep_their_own_gaps():
    metrics = ReplicaMetrics(*LABELS.values())
    engine = ScriptedEngine()
    admission = Admission(8, 0)
    admission.admit()
    replica = SimpleNamespace(engine=engine, metrics=metrics, admission=admission, _fail=lambda exc: exc)
    writer = ResponseWriter("completion", "tiny", 1, want_logprobs=False, include_usage=False)
    run = Run(replica, writer, [([1, 2, 3], None)])
    (sink,) = engine.sinks

    async def produce() -> None:
        for k in range(5):
            if k:
                await asyncio.sleep(GAP_S)
            sink.put_nowait(Out(f" t{k}", [10 + k], "length" if k == 4 else None))

    producer = asyncio.create_task(produce())
    chunks = [[d.text for d in batch] async for batch in run.batches(lambda: HOLD_S)]
    await producer
    await run.close()

    # The first token went alone; the stream then gathered the rest into one chunk (the
    # finishing token ends the wait early).
    assert chunks == [[" t0"], [" t1 t2 t3 t4"]]
    itl = "modelfleet_inter_token_latency_seconds"
    assert _value(metrics, itl + "_count") == 4
    # Each of the four gaps lasted at least GAP_S; none was recorded as if it were nothing.
    assert _value(metrics, itl + "_bucket", le="0.025") == 0
    assert _value(metrics, itl + "_sum") >= 4 * GAP_S - 1e-6
    assert _value(metrics, "modelfleet_generation_tokens_total") == 5
    assert admission.running == 0 and admission.waiting == 0
