"""An engine in a process of its own, and the client that drives it from an event loop.

The engine's scheduler, model and detokenizer run in a child process; the client, on the
caller's event loop, checks and tokenizes each request, sends it down a pipe, and hands
each step's outputs (one message per step) to the requests' sinks. With an `OutputPacing`,
the child gathers each request's tokens while many are running and sends them together:
fewer, larger outputs for the client to take in, and each request's first tokens and its end
still at once.

Why a process: an engine on a thread shares the GIL with the server's event loop in the
same process. A step of a small model is mostly Python, so the step loop and the
streaming code take turns, and each waits for the other. In a process of its own the
engine steps back to back, and all the server's event loop does per step is read one
message.

    engine = EngineProcess(EngineConfig(model="builtin://tiny-llama"))  # blocks while loading
    # or EngineProcess(config, pacing=OutputPacing()), as a model replica runs it
    await engine.start()
    request = engine.submit("Hello", SamplingParams(max_tokens=8), sink)  # sink.put_nowait(out)
    engine.abort(request)
    await engine.shutdown()

The client has the parts of LLMEngine's API a server uses: `submit`, `abort`, `validate`,
`apply_chat_template`, `tokenizer`, `max_model_len`, `stats()`, `alive()`,
`inject_step_fault()`, `shutdown()`. A tensor-parallel engine whose ranks are Ray actors
stays in the caller's process: the ranks are placed in the caller's placement group, which
a child process does not belong to.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import multiprocessing
import os
import pickle
import subprocess
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from multiprocessing.connection import Connection
from pathlib import Path
from typing import TYPE_CHECKING, Any

from modelfleet.engine.config import EngineConfig, ModelConfig
from modelfleet.engine.frontend import EngineFrontend, Prompt
from modelfleet.engine.params import EngineStats, RequestOutput, SamplingParams, Usage
from modelfleet.engine.tokenizer import Tokenizer

if TYPE_CHECKING:
    from modelfleet.engine.engine import LLMEngine

log = logging.getLogger(__name__)

STATS_INTERVAL_S = 0.25  # while busy, the engine's counters reach the client this often


@dataclass(frozen=True)
class OutputPacing:
    """How long a request's tokens gather before they go out: not at all while it runs
    alone, else long enough that all the running requests together send about `chunks_per_s`
    outputs a second, and at most `max_hold_s`. What a server pays per streamed chunk is then
    bounded as the streams grow. A request's first tokens, its end and any error go at once."""

    chunks_per_s: float = 100.0
    max_hold_s: float = 0.25

    def __post_init__(self) -> None:
        if not self.chunks_per_s > 0:
            raise ValueError(f"chunks_per_s must be > 0, got {self.chunks_per_s}")
        if not self.max_hold_s >= 0:
            raise ValueError(f"max_hold_s must be >= 0, got {self.max_hold_s}")

    def hold(self, running: int) -> float:
        if running <= 1:
            return 0.0
        return min(self.max_hold_s, running / self.chunks_per_s)


@dataclass
class EngineInfo:
    """What the engine process tells its client once the model is loaded."""

    model_path: str
    model_config: ModelConfig
    max_model_len: int
    kv_blocks_total: int
    device: str
    torch_threads: int
    stats: EngineStats


# -- the wire --------------------------------------------------------------------------------
# A step's outputs cross the pipe as plain tuples: pickling 32 RequestOutput dataclasses (each
# with its Usage) costs several times what the tuples do, on both ends, once per step.


def _wire(request_id: str, out: RequestOutput | BaseException) -> tuple:
    if isinstance(out, BaseException):
        return (request_id, out)
    u = out.usage
    return (
        request_id,
        out.text,
        out.token_ids,
        out.logprobs,
        out.finish_reason,
        u.prompt_tokens,
        u.completion_tokens,
        out.num_cached_tokens,
    )


def _merge(a: tuple, b: tuple) -> tuple:
    """Two wired outputs of one request as one: the text and tokens of both, the counters
    and finish of the later."""
    logprobs = None if a[3] is None and b[3] is None else [*(a[3] or ()), *(b[3] or ())]
    return (a[0], a[1] + b[1], a[2] + b[2], logprobs, *b[4:])


def _unwire(item: tuple) -> tuple[str, RequestOutput | BaseException]:
    if len(item) == 2:
        return item[0], item[1]
    rid, text, token_ids, logprobs, finish_reason, prompt_tokens, completion_tokens, cached = item
    usage = Usage(prompt_tokens, completion_tokens)
    return rid, RequestOutput(rid, text, token_ids, logprobs, finish_reason, usage, cached)


# -- the child ---------------------------------------------------------------------------------


def _portable(exc: BaseException) -> BaseException:
    """The exception itself when it survives pickling, else a RuntimeError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def main(fd: int) -> None:
    """The child's entry point (`python -m modelfleet.engine.process FD`): its end of the
    client's socket pair is FD; the config comes first down it."""
    conn = Connection(fd)
    config, threads, log_level, cpus, pacing = conn.recv()
    if cpus:  # before torch starts its threads, so they inherit it
        from modelfleet.cpus import bind

        bind(cpus, "engine process")
    _engine_main(config, conn, threads, log_level, pacing)


def _engine_main(
    config: EngineConfig, conn: Any, threads: int | None, log_level: int, pacing: OutputPacing | None
) -> None:
    logging.basicConfig(level=log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    import torch

    from modelfleet.engine.engine import LLMEngine

    if threads:
        torch.set_num_threads(threads)
    try:
        engine = LLMEngine(config)
    except BaseException as exc:
        conn.send(("error", _portable(exc)))
        return
    info = EngineInfo(
        engine.served_model_path,
        engine.model_config,
        engine.max_model_len,
        engine.kv_blocks_total,
        engine.device,
        torch.get_num_threads(),
        engine.stats(),
    )
    conn.send(("ready", info))
    try:
        _Core(engine, conn, pacing).run()
    finally:
        engine.close()


class _Core:
    """The child's loop: take what the client sent, step while there is work, send each
    step's outputs (or, with a pacing, what is due of them), and with them the engine's
    counters when a request finished, on the first step after idling, every
    STATS_INTERVAL_S, and on going idle."""

    def __init__(self, engine: LLMEngine, conn: Any, pacing: OutputPacing | None = None) -> None:
        self.engine = engine
        self.conn = conn
        self.pacing = pacing
        self.live: dict[str, Any] = {}  # request id -> the engine's request
        self.items: list[tuple] = []  # outputs to send after this step, as _wire made them
        self.held: dict[str, tuple] = {}  # request id -> its outputs gathered since the last send
        self.held_since = 0.0
        self.stats_at = 0.0
        self.idle_reported = False

    def run(self) -> None:
        engine, conn = self.engine, self.conn
        while True:
            busy = self._has_work()
            try:
                if not busy:
                    if not self.idle_reported:  # the client sees the engine drained
                        conn.send(("out", [], engine.stats()))
                        self.idle_reported = True
                    conn.poll(None)  # until a message, or the client's end closes
                while conn.poll():
                    if not self._handle(conn.recv()):
                        return
            except (EOFError, OSError):  # the client is gone: so is its work
                return
            finished = woke = False
            if self._has_work():
                woke, self.idle_reported = self.idle_reported, False
                try:
                    outputs = engine._step()
                except Exception as exc:  # fail what is in flight, keep the process
                    log.exception("engine step failed")
                    outputs = engine._fail_all(exc)
                for req, out in outputs:
                    if isinstance(out, BaseException) or out.finish_reason is not None:
                        self.live.pop(req.request_id, None)
                        finished = True
                    self._output(req.request_id, out)
            now = time.monotonic()
            if self.held and (
                now - self.held_since >= self.pacing.hold(len(self.live)) or not self._has_work()
            ):
                self.items.extend(self.held.values())
                self.held.clear()
            stats = None
            # A request's last output carries the counters that include it, and the first step
            # after idling those that show the new work.
            if finished or woke or now - self.stats_at >= STATS_INTERVAL_S:
                stats, self.stats_at = engine.stats(), now
            if self.items or stats is not None:
                items, self.items = self.items, []
                try:
                    conn.send(("out", items, stats))
                except (BrokenPipeError, OSError):
                    return

    def _has_work(self) -> bool:
        engine = self.engine
        return bool(engine._adds or engine._aborts or engine.scheduler.has_work())

    def _output(self, rid: str, out: RequestOutput | BaseException) -> None:
        item = _wire(rid, out)
        if self.pacing is None:
            self.items.append(item)
            return
        prev = self.held.pop(rid, None)
        if isinstance(out, BaseException):
            if prev is not None:
                self.items.append(prev)
            self.items.append(item)
            return
        if prev is not None:
            item = _merge(prev, item)
        first = prev is None and out.usage.completion_tokens <= len(out.token_ids)
        if first or out.finish_reason is not None:  # a request's first tokens and its end go at once
            self.items.append(item)
            return
        if not self.held:
            self.held_since = time.monotonic()
        self.held[rid] = item

    def _handle(self, msg: tuple) -> bool:
        kind = msg[0]
        if kind == "add":
            _, rid, prompt, params = msg
            try:
                req = self.engine._new_request(prompt, params, rid)
            except Exception as exc:  # checked by the client already; still, answer it
                self.items.append((rid, _portable(exc)))
                return True
            self.engine._adds.append(req)
            self.live[rid] = req
        elif kind == "abort":
            self.held.pop(msg[1], None)
            req = self.live.pop(msg[1], None)
            if req is not None:
                self.engine.abort(req)
        elif kind == "fault":
            self.engine.inject_step_fault()
        elif kind == "close":
            return False
        return True


# -- the client --------------------------------------------------------------------------------


class EngineProcess(EngineFrontend):
    """Starts the engine process and waits until its model is loaded (this blocks: call it
    in a thread from async code). Then `await start()` on the loop that will consume.

    `threads` is the child's torch thread count; by default torch's own, which follows the
    OMP_NUM_THREADS the child inherits (Ray sets it to a replica's CPUs). `cpus`, when given,
    binds the child to those CPUs before torch starts (`modelfleet.cpus`). `pacing`, when
    given, has the child gather each request's tokens while others run (`OutputPacing`)."""

    def __init__(
        self,
        config: EngineConfig,
        threads: int | None = None,
        cpus: Iterable[int] = (),
        pacing: OutputPacing | None = None,
    ) -> None:
        self.config = config
        # A fresh interpreter rather than multiprocessing's spawn, which would re-run the
        # caller's main module (a script without a __main__ guard would start itself again).
        self._conn, child = multiprocessing.Pipe(duplex=True)
        self._proc = subprocess.Popen(
            [sys.executable, "-m", "modelfleet.engine.process", str(child.fileno())],
            pass_fds=[child.fileno()],
        )
        child.close()
        try:
            level = logging.getLogger().getEffectiveLevel()
            self._conn.send((config, threads, level, tuple(cpus), pacing))
            kind, payload = self._conn.recv()
        except (EOFError, OSError):
            code = self._wait(10)
            self._conn.close()
            raise RuntimeError(
                f"the engine process exited while loading the model (exit code {code})"
            ) from None
        if kind == "error":
            self._wait(10)
            self._conn.close()
            raise payload
        info: EngineInfo = payload
        self.info = info
        self.model_config = info.model_config
        self.max_model_len = info.max_model_len
        self.kv_blocks_total = info.kv_blocks_total
        self.served_model_path = info.model_path
        self.device = info.device
        self.tokenizer = Tokenizer(Path(info.model_path))
        self._stats = info.stats
        self._sinks: dict[str, Any] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._closed = False
        self._gone: str | None = None  # why the process is no longer there

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    async def start(self) -> None:
        """Read the engine's messages on the running loop (idempotent)."""
        if self._loop is None and self._gone is None:
            self._loop = asyncio.get_running_loop()
            self._loop.add_reader(self._conn.fileno(), self._readable)
            # uvloop (a Serve replica's loop) makes a watched descriptor non-blocking. A step's
            # message over 16 KB is two writes, header then body: with the pipe blocking again,
            # reading one that is half there waits for the rest instead of failing.
            os.set_blocking(self._conn.fileno(), True)

    def submit(
        self, prompt: Prompt, params: SamplingParams | None, sink: Any, request_id: str | None = None
    ) -> str:
        """As `LLMEngine.submit`: bad input raises here, before anything is sent; outputs
        reach `sink.put_nowait` on the loop `start()` ran on. Returns the request's handle."""
        if self._gone is not None:
            raise RuntimeError(f"engine process is not running: {self._gone}")
        params = params or SamplingParams()
        ids = self.validate(prompt, params)
        rid = request_id or uuid.uuid4().hex
        self._send(("add", rid, ids, params))
        self._sinks[rid] = sink
        return rid

    def abort(self, request: str) -> None:
        if self._sinks.pop(request, None) is not None and self._gone is None:
            self._send(("abort", request))

    def inject_step_fault(self) -> None:
        self._send(("fault",))

    def stats(self) -> EngineStats:
        """The engine's counters as of its last message (at most STATS_INTERVAL_S old while
        it works, exact once it is idle)."""
        return self._stats

    def alive(self) -> bool:
        return self._gone is None and self._proc.poll() is None

    async def shutdown(self) -> None:
        """Stop the process; requests still in flight end with an "engine shut down" error."""
        if self._closed:
            return
        self._closed = True
        if self._gone is None:
            with contextlib.suppress(RuntimeError):
                self._send(("close",))
        await asyncio.to_thread(self._wait, 30)
        self._lost("engine shut down")

    def close(self) -> None:
        """Synchronous shutdown, for scripts without a loop."""
        if not self._closed:
            self._closed = True
            if self._gone is None:
                with contextlib.suppress(RuntimeError):
                    self._send(("close",))
            self._wait(30)
            self._lost("engine shut down")

    # -- internals ------------------------------------------------------------------------------

    def _wait(self, timeout: float) -> int | None:
        """The process's exit code, killing it if it does not exit within `timeout`."""
        try:
            return self._proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self._proc.kill()
            return self._proc.wait(5)

    def _send(self, msg: tuple) -> None:
        try:
            self._conn.send(msg)
        except (BrokenPipeError, OSError) as exc:
            self._lost(f"the engine process is gone ({exc})")
            raise RuntimeError(f"engine process is not running: {self._gone}") from None

    def _readable(self) -> None:
        """Deliver every message waiting on the pipe."""
        conn, sinks = self._conn, self._sinks
        try:
            while conn.poll():
                _, items, stats = conn.recv()
                if stats is not None:
                    self._stats = stats
                for item in items:
                    sink = sinks.get(item[0])
                    if sink is None:  # aborted meanwhile
                        continue
                    rid, out = _unwire(item)
                    if isinstance(out, BaseException) or out.finish_reason is not None:
                        del sinks[rid]
                    sink.put_nowait(out)
        except (EOFError, OSError):
            try:
                code = self._proc.wait(1)
            except subprocess.TimeoutExpired:
                code = None
            self._lost("engine shut down" if self._closed else f"engine process exited (exit code {code})")

    def _lost(self, why: str) -> None:
        """The process is gone: stop reading, and fail every request still waiting on it."""
        if self._gone is None:
            self._gone = why
            if not self._closed:
                log.error("%s", why)
            if self._loop is not None:
                self._loop.remove_reader(self._conn.fileno())
            self._conn.close()
        sinks, self._sinks = self._sinks, {}
        for sink in sinks.values():
            sink.put_nowait(RuntimeError(f"engine step failed: {why}"))

    def __repr__(self) -> str:
        return f"EngineProcess({Path(self.served_model_path).name}, pid={self._proc.pid})"


if __name__ == "__main__":  # run as a module: pickled classes must come from their import name
    from modelfleet.engine.process import main as _main

    _main(int(sys.argv[1]))
