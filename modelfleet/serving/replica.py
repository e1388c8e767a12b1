"""The model deployment: each Serve replica loads one engine (with one rank, in a process of
its own whose step outputs reach the replica's event loop down a pipe; with more, rank 0 on
a thread of the replica), admits requests against a bounded queue, and turns engine deltas
into OpenAI responses.

Where requests wait: mostly in Serve's router, not here. A replica takes at most
`replica_capacity` requests (Serve's `max_ongoing_requests`): its
sequence slots and a few more, so that a slot freed mid-batch is refilled at the next step.
Every request it takes goes straight to its engine, whose scheduler holds it until a slot
and KV blocks are free; it counts as waiting from acceptance until its first token. The
rest of a backlog waits at the ingress, unassigned, until some replica has room; a replica
that has just started takes from it at once instead of serving only new arrivals while the
old ones wait behind a busy replica. The ingress counts those requests in the same
queue-depth metric and answers 429 when they reach `max_queue_depth` per ready replica.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from typing import Any

from modelfleet.engine.process import OutputPacing
from modelfleet.serving import errors
from modelfleet.serving.metrics import ReplicaMetrics
from modelfleet.serving.protocol import ChatCompletionRequest, CompletionRequest
from modelfleet.serving.responses import ResponseWriter
from modelfleet.serving.settings import ServeSettings

log = logging.getLogger("modelfleet.serving")

PUSH_INTERVAL_S = 1.0
# How long a stream's opening waits to go out with the first token. A request that starts at
# once has its first token within a step or two; one that waits for a slot in the batch sends
# its opening alone after this, so the client has the response's status while it waits.
FIRST_TOKEN_WAIT_S = 0.05


class Admission:
    """Counts of one replica's requests: waiting (no token yet) and running. It takes a request
    while the waiting ones fit in the free sequence slots plus `queue` more."""

    def __init__(self, slots: int, queue: int):
        self.slots = slots
        self.queue = queue
        self.waiting = 0
        self.running = 0

    def admit(self) -> None:
        if self.waiting >= max(0, self.slots - self.running) + self.queue:
            raise errors.queue_full(self.waiting)
        self.waiting += 1

    def start(self) -> None:
        self.waiting -= 1
        self.running += 1

    def finish(self, started: bool) -> None:
        if started:
            self.running -= 1
        else:
            self.waiting -= 1


class ModelReplica:
    """One engine behind Serve. Methods are called through a DeploymentHandle."""

    async def __init__(self, settings: dict[str, Any], hub: Any = None):
        from modelfleet.engine.config import EngineConfig

        self.settings = ServeSettings.from_dict(settings)
        s = self.settings
        self.replica_id = _replica_id()
        self.metrics = ReplicaMetrics(s.name, s.namespace, self.replica_id)
        self.metrics.max_queue_depth.set(s.max_queue_depth)
        self.admission = Admission(s.max_num_seqs, self.queue_limit())
        self.fault: str | None = None
        self.pacing = output_pacing(s)
        # What a stream waits between two chunks; None where the engine gathers its tokens.
        self._stream_hold: Callable[[], float] | None = self._hold
        cfg = EngineConfig(
            model=s.model,
            dtype=s.dtype,
            max_model_len=s.max_model_len,
            tensor_parallel_size=s.tensor_parallel_size,
            max_num_seqs=s.max_num_seqs,
            kv_cache_memory_fraction=s.kv_cache_memory_fraction,
            num_kv_blocks=s.num_kv_blocks,
            block_size=s.block_size,
            device=s.device,
            worker_backend="ray" if s.tensor_parallel_size > 1 else "mp",
            emulated_step_s=s.emulated_step_s,
        )
        # Loading is synchronous (weights, workers); keep the replica's loop free meanwhile.
        # With one rank the engine steps in a process of its own, so its step loop and this
        # event loop do not take turns on one GIL; a tensor-parallel engine's ranks are Ray
        # actors in this replica's placement group, so its rank 0 stays in this process.
        if s.engine_process and s.tensor_parallel_size == 1:
            from modelfleet.engine.process import EngineProcess

            # torch loads in the child only. The child gathers the streams' tokens itself
            # (`stream_chunks_per_s`), so this loop takes in one output per chunk, not per token.
            self.engine = await asyncio.to_thread(EngineProcess, cfg, cpus=s.engine_cpus, pacing=self.pacing)
            self._stream_hold = None
        else:
            from modelfleet.engine.engine import LLMEngine

            self.engine = await asyncio.to_thread(LLMEngine, cfg)
        await self.engine.start()
        self.max_model_len: int = self.engine.max_model_len
        self._hub = hub
        self._pusher = asyncio.create_task(self._push_metrics()) if hub is not None else None
        self._ready_file = mark_ready(self.replica_id)
        log.info("replica %s ready: %s (TP %d)", self.replica_id, s.model, s.tensor_parallel_size)

    def queue_limit(self) -> int:
        """Requests this replica holds beyond its free sequence slots. Behind the separate
        ingress Serve's router sends no more than its capacity here (the backlog waits at the
        ingress), so the check only guards calls made past the router."""
        return self.settings.replica_waiting_limit

    # -- Serve hooks -------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve calls this periodically; raising makes Serve replace the replica."""
        if self.fault is not None:
            raise RuntimeError(f"engine failed: {self.fault}")
        if not self.engine.alive():
            raise RuntimeError("the engine is not running")

    async def __del__(self) -> None:
        # Readiness goes first: the pod stops taking traffic and a preStop drain may finish.
        unmark_ready(getattr(self, "_ready_file", None))
        if self._pusher is not None:
            self._pusher.cancel()
            with contextlib.suppress(Exception):  # else it expires from the page in 10 s
                await self._hub.drop.remote(self.replica_id)
        try:
            await self.engine.shutdown()
        except Exception:  # the process is going away either way
            log.exception("engine shutdown failed")

    # -- requests ----------------------------------------------------------------------

    async def complete(self, kind: str, request: Any) -> dict[str, Any]:
        """A whole non-streamed response."""
        writer, run = await self._begin(kind, request)
        try:
            async for _ in run.batches():
                pass
        finally:
            await run.close()
        return writer.body()

    async def stream(self, kind: str, request: Any) -> AsyncIterator[str]:
        """Server-sent events. The first item (the chat role chunk, if any, and the first
        token) comes once the request is admitted and has started, or FIRST_TOKEN_WAIT_S after
        admission if it waits in the queue, so the ingress can answer errors with a status
        before the stream starts."""
        writer, run = await self._begin(kind, request)
        batches = run.batches(self._stream_hold)
        first = asyncio.ensure_future(anext(batches, None))
        opening = writer.opening()
        closed = False
        try:
            # Each message costs a hop through Serve's ingress and proxy, so the stream's fixed
            # parts ride on its tokens: the opening on the first token when that comes within
            # FIRST_TOKEN_WAIT_S (a request that waits for a slot sends it alone, so the
            # ingress can answer with a status meanwhile), the closing on the last.
            done, _ = await asyncio.wait((first,), timeout=FIRST_TOKEN_WAIT_S)
            if not done:
                yield opening
                opening = ""
            batch = await first
            while batch is not None:
                chunk = opening + "".join(
                    writer.delta_chunk(d.index, d.text, d.logprobs, d.finish_reason) for d in batch
                )
                opening = ""
                if run.remaining == 0:  # every choice has finished
                    chunk += writer.closing()
                    closed = True
                yield chunk
                batch = await anext(batches, None)
        except errors.APIError as err:
            from modelfleet.serving.responses import error_event

            yield opening + error_event(err.body())
            return
        finally:
            first.cancel()  # a no-op once it is done
            await run.close()
        if not closed:  # a last output always comes with its choice's end: this is a guard
            yield opening + writer.closing()

    def _hold(self) -> float:
        return self.pacing.hold(self.admission.running)

    async def stats(self) -> dict[str, Any]:
        st = self.engine.stats()
        return {
            "replica": self.replica_id,
            "waiting": self.admission.waiting,
            "running": self.admission.running,
            "engine_waiting": st.waiting,
            "engine_running": st.running,
            "kv_blocks_used": st.kv_blocks_used,
            "kv_blocks_total": st.kv_blocks_total,
            "generation_tokens_total": st.generation_tokens_total,
            "torch_threads": _torch_threads(self.engine),
            "engine_pid": getattr(self.engine, "pid", None) or os.getpid(),
        }

    async def inject_fault(self) -> None:
        """Make the engine's next model step raise, as a broken device would (recovery tests)."""
        if not self.settings.enable_fault_injection:
            raise errors.APIError(403, "fault injection is disabled")
        self.engine.inject_step_fault()

    # -- the path of a request -----------------------------------------------------------

    async def _begin(self, kind: str, request: Any) -> tuple[ResponseWriter, Run]:
        if self.fault is not None:
            raise errors.engine_fault(self.fault)
        prompts, max_tokens, logprobs = self._prepare(kind, request)
        base = request.sampling_kwargs()
        params = []
        for c in range(len(prompts) * request.n):
            seed = base["seed"]
            if seed is not None and request.n > 1:
                seed += c % request.n
            params.append(self._sampling_params(base, seed, max_tokens[c // request.n], logprobs))
        for p_idx, prompt in enumerate(prompts):
            self._validate(prompt, params[p_idx * request.n])
        self.admission.admit()  # raises 429 when the replica's queue is full
        writer = ResponseWriter(
            "completion" if kind == "completion" else "chat",
            self.settings.served_name,
            len(params),
            logprobs is not None,
            request.stream and request.include_usage_in_stream(),
        )
        writer.prompt_tokens = sum(len(p) for p in prompts)
        jobs = [(prompts[c // request.n], params[c]) for c in range(len(params))]
        return writer, self._generate(writer, jobs)

    def _prepare(self, kind: str, request: Any) -> tuple[list[list[int]], list[int], int | None]:
        """Token ids of each prompt, the completion budget of each, and the logprobs asked."""
        tok = self.engine.tokenizer
        if kind == "completion":
            assert isinstance(request, CompletionRequest)
            prompts = [p if isinstance(p, list) else tok.encode(p) for p in request.prompts()]
            limit, logprobs = request.max_tokens, request.logprobs
        else:
            assert isinstance(request, ChatCompletionRequest)
            try:
                text = self.engine.apply_chat_template(
                    request.template_messages(), add_generation_prompt=request.add_generation_prompt
                )
            except errors.APIError:
                raise
            except Exception as exc:
                raise errors.bad_request(f"The chat template failed: {exc}", "messages") from None
            prompts = [tok.encode(text, add_special_tokens=False)]  # the template has them
            limit, logprobs = request.limit(), request.engine_logprobs()
        budgets = []
        for ids in prompts:
            if not ids:
                raise errors.bad_request("The prompt is empty.", "prompt")
            room = self.max_model_len - len(ids)
            want = limit if limit is not None else room
            if room < 1 or want > room:
                raise errors.bad_request(
                    f"This model's maximum context length is {self.max_model_len} tokens. However, "
                    f"you requested {len(ids) + want} tokens ({len(ids)} in the prompt, {want} for "
                    "the completion). Please reduce the prompt or the completion length.",
                    "messages" if kind == "chat" else ("max_tokens" if limit is not None else "prompt"),
                    code="context_length_exceeded",
                )
            budgets.append(want)
        return prompts, budgets, logprobs

    def _sampling_params(
        self, base: dict[str, Any], seed: int | None, max_tokens: int, logprobs: int | None
    ) -> Any:
        from modelfleet.engine import SamplingParams

        try:
            return SamplingParams(**{**base, "seed": seed, "max_tokens": max_tokens, "logprobs": logprobs})
        except ValueError as exc:
            raise errors.bad_request(str(exc), getattr(exc, "param", None)) from None

    def _validate(self, prompt: list[int], params: Any) -> None:
        try:
            self.engine.validate(prompt, params)
        except ValueError as exc:
            raise errors.bad_request(str(exc), getattr(exc, "param", None)) from None

    def _generate(self, writer: ResponseWriter, jobs: list[tuple[list[int], Any]]) -> Run:
        return Run(self, writer, jobs)

    def _fail(self, exc: BaseException) -> errors.APIError:
        if isinstance(exc, errors.APIError):
            return exc
        if isinstance(exc, ValueError) and hasattr(exc, "param"):
            return errors.bad_request(str(exc), exc.param)
        # Anything else means the engine's state can no longer be trusted: fail this
        # request, refuse new ones, and let the health check have the replica replaced.
        self.fault = f"{type(exc).__name__}: {exc}"
        log.error("engine fault on replica %s: %s", self.replica_id, self.fault)
        return errors.engine_fault(self.fault)

    async def _push_metrics(self) -> None:
        m = self.metrics
        while True:
            try:
                st = self.engine.stats()
                m.queue_depth.set(self.admission.waiting)
                m.running.set(self.admission.running)
                m.kv_usage.set(st.kv_blocks_used / st.kv_blocks_total if st.kv_blocks_total else 0.0)
                m.engine_steps_to(st.steps_total)
                await self._hub.push.remote(self.replica_id, "replica", m.text())
            except asyncio.CancelledError:
                raise
            except Exception:
                log.warning("metrics push failed", exc_info=True)
            await asyncio.sleep(PUSH_INTERVAL_S)


def _torch_threads(engine: Any) -> int:
    info = getattr(engine, "info", None)
    if info is not None:  # an engine process: its own count (this process has no torch)
        return info.torch_threads
    import torch

    return torch.get_num_threads()


def output_pacing(settings: ServeSettings) -> OutputPacing:
    """The replica's streams' pacing (`stream_chunks_per_s`, `stream_hold_max_s`): gathering
    time between two chunks of one stream grows with the streams running, so that a replica's
    chunks per second stay near `stream_chunks_per_s`; none for a lone one. The engine process
    gathers by it, or else the replica's streams do."""
    return OutputPacing(settings.stream_chunks_per_s, settings.stream_hold_max_s)


def mark_ready(replica_id: str) -> str | None:
    """Tell the pod this replica serves: the file MODELFLEET_READY_FILE names (the worker pod's
    readiness probe and preStop drain read it). No-op outside a modelfleet worker pod."""
    path = os.environ.get("MODELFLEET_READY_FILE")
    if not path:
        return None
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "w", encoding="utf-8") as f:
            f.write(replica_id + "\n")
    except OSError:
        log.exception("cannot write the ready file %s", path)
        return None
    return path


def unmark_ready(path: str | None) -> None:
    if path:
        with contextlib.suppress(FileNotFoundError):
            os.remove(path)


def _replica_id() -> str:
    try:
        from ray import serve

        return serve.get_replica_context().replica_id.unique_id
    except Exception:
        return uuid.uuid4().hex[:8]


@dataclass
class Delta:
    """What one choice produced since the last chunk."""

    index: int
    text: str
    logprobs: list[Any]
    finish_reason: str | None


class _Choice:
    """The engine's sink for one choice of a Run: its outputs go straight into the Run's
    queue, tagged with the choice's index, with no task of its own in between."""

    __slots__ = ("done", "index", "request", "run")

    def __init__(self, run: Run, index: int) -> None:
        self.run = run
        self.index = index
        self.request: Any = None
        self.done = False

    def put_nowait(self, out: Any) -> None:
        queue = self.run.queue
        queue.put_nowait((self.index, out, time.perf_counter()))  # when it came, for the latencies
        if isinstance(out, BaseException):  # the engine's step failed; the consumer raises it
            self.done = True
        elif out.finish_reason is not None:
            self.done = True
            queue.put_nowait((self.index, None, 0.0))
            self.run.finished.set()


class Run:
    """The engine requests behind one API request (one per choice), started at once.

    Every choice's outputs land in one queue as the engine's steps produce them;
    `batches()` drains all that is there at each wake-up, so a busy replica sends fewer,
    larger messages through Serve. `close()` aborts what is still running in the engine
    (freeing its KV blocks) and settles the admission counts; it is safe to call more than
    once.
    """

    def __init__(self, replica: ModelReplica, writer: ResponseWriter, jobs: list[tuple[list[int], Any]]):
        self.replica = replica
        self.writer = writer
        self.started = False
        self.closed = False
        self.t0 = time.perf_counter()
        self.queue: asyncio.Queue[tuple[int, Any, float]] = asyncio.Queue()
        self.finished = asyncio.Event()
        self.remaining = len(jobs)  # choices whose last output has not been drained yet
        request_id = uuid.uuid4().hex
        self.choices = [_Choice(self, i) for i in range(len(jobs))]
        for choice, (prompt, params) in zip(self.choices, jobs, strict=True):
            try:
                choice.request = replica.engine.submit(prompt, params, choice, f"{request_id}-{choice.index}")
            except Exception as exc:  # surfaced by the consumer, as a step's failure would be
                choice.done = True
                self.queue.put_nowait((choice.index, exc, 0.0))

    async def batches(self, hold: Callable[[], float] | None = None) -> AsyncIterator[list[Delta]]:
        """What the choices produced since the last batch, one merged Delta per choice.

        `hold()` is how long to gather after a batch before sending the next one. The first
        token always goes at once; after it a busy replica sends fewer, fuller chunks, so
        the messages per second through Serve stay bounded as the streams grow.
        """
        m = self.replica.metrics
        t0 = self.t0
        last = [t0] * len(self.choices)
        sent_at: float | None = None
        while self.remaining:
            if sent_at is not None and hold is not None:
                wait = sent_at + hold() - time.perf_counter()
                if wait > 0:  # gather, but a finishing choice ends the wait
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.finished.wait(), wait)
                    self.finished.clear()
            items = [await self.queue.get()]
            while not self.queue.empty():
                items.append(self.queue.get_nowait())
            merged: dict[int, Delta] = {}
            for i, out, at in items:
                if out is None:
                    self.remaining -= 1
                    continue
                if isinstance(out, BaseException):
                    raise self.replica._fail(out) from out
                n_tok = len(out.token_ids)
                if n_tok:
                    if not self.started:
                        self.started = True
                        self.replica.admission.start()
                        m.ttft.observe(at - t0)
                        m.prompt_tokens.inc(self.writer.prompt_tokens)
                    elif last[i] != t0:  # by arrival: a gathered chunk's tokens keep their gaps
                        m.itl.observe((at - last[i]) / n_tok)
                    last[i] = at
                    m.generation_tokens.inc(n_tok)
                self.writer.record(i, out.text, n_tok, out.logprobs, out.finish_reason)
                d = merged.get(i)
                if d is None:
                    merged[i] = Delta(i, out.text, list(out.logprobs or ()), out.finish_reason)
                else:
                    d.text += out.text
                    d.logprobs.extend(out.logprobs or ())
                    d.finish_reason = out.finish_reason or d.finish_reason
            if merged:
                sent_at = time.perf_counter()
                yield list(merged.values())
        m.duration.observe(time.perf_counter() - t0)

    async def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        for choice in self.choices:
            if not choice.done and choice.request is not None:
                choice.done = True
                self.replica.engine.abort(choice.request)
        self.replica.admission.finish(self.started)
