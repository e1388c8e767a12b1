"""LLMEngine: requests in, streamed deltas out; a background loop of schedule -> run -> sample.

The model runs in one dedicated thread so the event loop (HTTP, streaming) stays responsive.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from modelfleet.engine.block_manager import BlockManager
from modelfleet.engine.config import EngineConfig, ModelConfig, resolve_dtype
from modelfleet.engine.errors import InvalidConfig
from modelfleet.engine.frontend import EngineFrontend, Prompt
from modelfleet.engine.loader import resolve_model_path
from modelfleet.engine.model_runner import ModelRunner, RunnerSpec, StepInput
from modelfleet.engine.params import (
    EngineStats,
    RequestOutput,
    SamplingParams,
    TokenLogprob,
    Usage,
)
from modelfleet.engine.sampler import sample
from modelfleet.engine.scheduler import Scheduler
from modelfleet.engine.sequence import Sequence, Status
from modelfleet.engine.tokenizer import IncrementalDetokenizer, Tokenizer
from modelfleet.engine.workers import start_workers

log = logging.getLogger(__name__)



@dataclass
class _Request:
    request_id: str
    seq: Sequence
    detok: IncrementalDetokenizer
    stops: list[str]
    sink: Any = None  # has put_nowait(output | exception), called on the event loop
    text: str = ""  # all output text so far (after stop-string truncation)
    emitted: int = 0  # characters of `text` already sent
    sent_tokens: int = 0
    finish_reason: str | None = None
    logprobs: list[TokenLogprob] = field(default_factory=list)


@dataclass
class Completion:
    """A whole request's result, for the synchronous generate_batch."""

    text: str
    token_ids: list[int]
    finish_reason: str
    logprobs: list[TokenLogprob] | None
    num_cached_tokens: int


class LLMEngine(EngineFrontend):
    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        path = resolve_model_path(config.model)
        self.served_model_path = str(path)
        self.model_config = mcfg = ModelConfig.from_dir(path)
        mcfg.check_parallel(config.tensor_parallel_size)
        self.max_model_len = config.max_model_len or mcfg.max_position_embeddings
        if self.max_model_len > mcfg.max_position_embeddings:
            raise InvalidConfig(
                "max_model_len",
                f"{self.max_model_len} exceeds the model's {mcfg.max_position_embeddings} positions",
            )
        self.tokenizer = Tokenizer(path)
        eos = list(mcfg.eos_token_ids)
        if not eos and self.tokenizer.eos_token_id is not None:
            eos = [self.tokenizer.eos_token_id]
        self.eos_token_ids = set(eos)
        device = config.resolved_device()
        self.device = device
        dtype = resolve_dtype(config.dtype, mcfg.torch_dtype, device)
        self.spec = RunnerSpec(config, str(path), mcfg, dtype, device, self.max_model_len)
        started = time.monotonic()
        self.workers = start_workers(self.spec)
        try:
            self.runner = ModelRunner(self.spec, rank=0)
            num_blocks = self._num_blocks()
            self.runner.call("allocate_kv_cache", num_blocks)
        except BaseException:
            if self.workers is not None:
                self.workers.join(timeout=5)
            raise
        if config.emulated_step_s:
            log.warning("every step lasts at least %.3fs (emulated device step time)", config.emulated_step_s)
        log.info("engine ready: %s on %s (%s, tp=%d) in %.1fs, %d KV blocks of %d tokens",
                 path.name, device, str(dtype), config.tensor_parallel_size,
                 time.monotonic() - started, num_blocks - 1, config.block_size)
        self.block_manager = BlockManager(num_blocks, config.block_size, config.enable_prefix_caching)
        budget = config.max_num_batched_tokens or max(self.max_model_len, 2048)
        self.scheduler = Scheduler(self.block_manager, config.max_num_seqs, budget)
        self._generator = torch.Generator(device=self.runner.device).manual_seed(config.seed)
        self._requests: dict[int, _Request] = {}
        self._adds: deque[_Request] = deque()
        self._aborts: deque[_Request] = deque()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None  # the step loop
        self._work = threading.Event()  # set when a request arrives or is aborted
        self._closed = False
        self.prompt_tokens_total = 0
        self.generation_tokens_total = 0
        self.steps_total = 0

    # -- config-time helpers ------------------------------------------------------------------

    def _num_blocks(self) -> int:
        cfg = self.config
        per_seq = -(-self.max_model_len // cfg.block_size)
        if cfg.num_kv_blocks is not None:
            return cfg.num_kv_blocks + 1  # + the reserved null block
        n = self.runner.available_kv_bytes() // self.runner.bytes_per_block()
        if self.device == "cpu":  # memory is shared with everything else: take what can be used
            n = min(n, cfg.max_num_seqs * per_seq + 1)
        if n < per_seq + 1:
            raise InvalidConfig(
                "kv_cache_memory_fraction",
                f"leaves room for {max(0, n - 1)} KV blocks, fewer than one sequence of "
                f"max_model_len={self.max_model_len} needs ({per_seq})",
            )
        return int(n)

    # -- requests -----------------------------------------------------------------------------

    @property
    def kv_blocks_total(self) -> int:  # type: ignore[override]
        return self.block_manager.num_total

    def _new_request(self, prompt: Prompt, params: SamplingParams, request_id: str | None) -> _Request:
        ids = self.validate(prompt, params)
        generator = None
        if params.seed is not None:
            generator = torch.Generator(device=self.runner.device).manual_seed(params.seed)
        seq = Sequence(ids, params, self.config.block_size, generator)
        return _Request(
            request_id or uuid.uuid4().hex, seq, IncrementalDetokenizer(self.tokenizer, ids),
            params.stop_strings,
        )

    # -- the step -----------------------------------------------------------------------------

    def _drain_control(self) -> list[tuple[_Request, RequestOutput]]:
        while self._adds:
            req = self._adds.popleft()
            self._requests[req.seq.seq_id] = req
            self.scheduler.add(req.seq)
        while self._aborts:
            req = self._aborts.popleft()
            if req.finish_reason is None and req.seq.seq_id in self._requests:
                req.finish_reason = "abort"
                self.scheduler.finish(req.seq)
                del self._requests[req.seq.seq_id]
        return []

    def _step(self) -> list[tuple[_Request, RequestOutput]]:
        started = time.monotonic()
        with self._lock:
            self._drain_control()
            if not self.scheduler.has_work():
                return []
            prefill, decode = self.scheduler.schedule()
            if not (prefill or decode):
                return []
            self.steps_total += 1
            decode.sort(key=len)  # similar lengths side by side: less padding in attention
            seqs = prefill + decode
            step = self._step_input(seqs, len(prefill))
            logits = self.runner.call("run", step)
            result = sample(logits, seqs, self._generator)
            outputs = self._postprocess(seqs, result)
        if self.config.emulated_step_s:  # outside the lock: submit and abort go on meanwhile
            time.sleep(max(0.0, started + self.config.emulated_step_s - time.monotonic()))
        return outputs

    def _step_input(self, seqs: list[Sequence], num_prefill: int) -> StepInput:
        """The first `num_prefill` sequences run their prompts (past any cached prefix), the
        rest their last token."""
        ids: list[int] = []
        pos: list[int] = []
        qlens: list[int] = []
        for i, s in enumerate(seqs):
            start = s.num_computed_tokens
            ids += s.token_ids[start:]
            pos += range(start, len(s))
            qlens.append(len(s) - start)
            if i < num_prefill and s.num_output_tokens == 0:
                self.prompt_tokens_total += s.num_prompt_tokens
        return StepInput(num_prefill, ids, pos, [s.block_table for s in seqs], qlens, [len(s) for s in seqs])

    def _postprocess(self, seqs, result) -> list[tuple[_Request, RequestOutput]]:
        outputs = []
        for i, seq in enumerate(seqs):
            req = self._requests[seq.seq_id]
            token = result.token_ids[i]
            seq.num_computed_tokens = len(seq)
            seq.token_ids.append(token)
            self.generation_tokens_total += 1
            p = seq.params
            reason = None
            hidden = False  # stop and eos tokens are not part of the text
            if token in (p.stop_token_ids or ()) or (not p.ignore_eos and token in self.eos_token_ids):
                reason, hidden = "stop", True
            elif (p.max_tokens is not None and seq.num_output_tokens >= p.max_tokens) or len(
                seq
            ) >= self.max_model_len:
                reason = "length"
            if not hidden:
                req.text += req.detok.add([token])
            if reason is not None:
                req.text += req.detok.flush()
            if req.stops:
                reason = self._check_stop_strings(req, reason)
            if result.logprobs[i] is not None:
                lp, top = result.logprobs[i]
                tid = self.tokenizer.id_to_token
                req.logprobs.append(
                    TokenLogprob(token, tid(token), lp, [(t, tid(t), v) for t, v in top])
                )
            if reason is not None:
                req.finish_reason = reason
                self.scheduler.finish(seq)
                del self._requests[seq.seq_id]
            outputs.append((req, self._delta(req)))
        return outputs

    def _check_stop_strings(self, req: _Request, reason: str | None) -> str | None:
        longest = max(len(s) for s in req.stops)
        start = max(0, req.emitted - longest)
        hits = [i for i in (req.text.find(s, start) for s in req.stops) if i >= 0]
        if hits:
            req.text = req.text[: min(hits)]
            return "stop"
        return reason

    def _delta(self, req: _Request) -> RequestOutput:
        seq = req.seq
        end = len(req.text)
        if req.finish_reason is None and req.stops:  # hold back what may begin a stop string
            end = max(req.emitted, end - (max(len(s) for s in req.stops) - 1))
        text = req.text[req.emitted : end]
        req.emitted = end
        new_ids = seq.output_ids[req.sent_tokens :]
        req.sent_tokens = seq.num_output_tokens
        lps = None
        if seq.params.logprobs is not None:
            lps, req.logprobs = req.logprobs, []
        return RequestOutput(
            req.request_id, text, new_ids, lps, req.finish_reason,
            Usage(seq.num_prompt_tokens, seq.num_output_tokens), seq.num_cached_tokens,
        )

    # -- the async API --------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the step loop on the engine thread, delivering to the running event loop
        (idempotent)."""
        self._start()

    def _start(self) -> None:
        if self._closed:
            raise RuntimeError("engine is shut down")
        self._loop = asyncio.get_running_loop()  # outputs go to the latest caller's loop
        if self._thread is None or not self._thread.is_alive():
            self._thread = threading.Thread(target=self._thread_loop, name="modelfleet-steps", daemon=True)
            self._thread.start()

    def _thread_loop(self) -> None:
        """Steps back to back on the engine thread while there is work.

        Outputs go to the event loop in one callback per step, and the next step starts at
        once: the event loop's own work (streaming the outputs through the server) overlaps
        the model's compute instead of sitting between two steps.
        """
        while not self._closed:
            if not (self._adds or self._aborts or self.scheduler.has_work()):
                self._work.wait(timeout=1.0)
                self._work.clear()
                continue
            try:
                outputs = self._step()
            except Exception as e:  # keep serving: fail the requests in flight, not the engine
                log.exception("engine step failed")
                outputs = self._fail_all(e)
            if outputs and self._loop is not None:
                with contextlib.suppress(RuntimeError):  # a closed event loop: nobody listens
                    self._loop.call_soon_threadsafe(_deliver, outputs)

    def _fail_all(self, error: Exception) -> list[tuple[_Request, Any]]:
        """Finish every request in flight; each gets the step's error, wrapped once here."""
        with self._lock:
            failed: list[tuple[_Request, Any]] = []
            for req in list(self._requests.values()):
                self.scheduler.finish(req.seq)
                req.finish_reason = "abort"
                wrapped = RuntimeError(f"engine step failed: {error}")
                wrapped.__cause__ = error
                failed.append((req, wrapped))
            self._requests.clear()
            return failed

    def submit(
        self, prompt: Prompt, params: SamplingParams | None, sink: Any, request_id: str | None = None
    ) -> _Request:
        """Start one request whose outputs go to `sink.put_nowait(...)` on the event loop:
        one call per step that produced something, the last with a `finish_reason`, or a
        RuntimeError ("engine step failed: ...") when the step failed. Call it on the event
        loop; `abort(request)` stops it.

        `generate` is built on it. A server that merges many requests' outputs into one
        place passes its own sink and saves a task wake-up per token per request."""
        req = self._new_request(prompt, params or SamplingParams(), request_id)
        self._start()
        req.sink = sink
        self._adds.append(req)
        self._work.set()
        return req

    def abort(self, req: _Request) -> None:
        self._aborts.append(req)
        if self._lock.acquire(blocking=False):  # not mid-step: free the blocks right now
            try:
                self._drain_control()
            finally:
                self._lock.release()
        else:
            self._work.set()

    def inject_step_fault(self) -> None:
        """Make the next model step raise, as a broken device would (recovery tests)."""
        runner = self.runner
        original = runner.call

        def failing(method: str, *args: Any, **kwargs: Any) -> Any:
            if method == "run":
                runner.call = original
                raise RuntimeError("injected fault in the model step")
            return original(method, *args, **kwargs)

        runner.call = failing

    def alive(self) -> bool:
        """False once the engine is shut down or a tensor-parallel rank has exited."""
        return not self._closed and (self.workers is None or self.workers.alive())

    def stats(self) -> EngineStats:
        bm = self.block_manager
        return EngineStats(
            waiting=len(self.scheduler.waiting) + len(self._adds),
            running=len(self.scheduler.running),
            kv_blocks_used=bm.num_total - bm.num_free,
            kv_blocks_total=bm.num_total,
            prefix_cache_hits=bm.cache_hits,
            prefix_cache_queries=bm.cache_queries,
            prompt_tokens_total=self.prompt_tokens_total,
            generation_tokens_total=self.generation_tokens_total,
            num_preemptions=self.scheduler.num_preemptions,
            steps_total=self.steps_total,
        )

    async def shutdown(self) -> None:
        """Stop the loop and the tensor-parallel workers."""
        if self._closed:
            return
        self._closed = True
        self._work.set()
        # The step loop sees `_closed` after its current step; the close waits for it.
        _deliver(await asyncio.to_thread(self._close_workers))

    def _close_workers(self) -> list[tuple[_Request, RequestOutput]]:
        """Abort what is in flight (each gets a last "abort" delta) and stop the ranks."""
        if self._thread is not None:
            self._thread.join()
        with self._lock:
            self._drain_control()
            outputs = []
            for req in list(self._requests.values()):
                req.finish_reason = "abort"
                self.scheduler.finish(req.seq)
                outputs.append((req, self._delta(req)))
            self._requests.clear()
            if self.workers is not None:
                self.runner.call("exit")
                self.workers.join()
                self.workers = None
            else:
                self.runner.exit()
            return outputs

    def close(self) -> None:
        """Synchronous shutdown, for scripts that never started the async loop."""
        if not self._closed:
            self._closed = True
            self._work.set()
            self._close_workers()

    # -- synchronous use (benchmarks, scripts) ----------------------------------------------------

    def generate_batch(
        self, prompts: list[Prompt], params: SamplingParams | list[SamplingParams]
    ) -> list[Completion]:
        """Run requests to completion without an event loop (not while the async loop runs)."""
        plist = params if isinstance(params, list) else [params] * len(prompts)
        reqs = [self._new_request(p, sp, None) for p, sp in zip(prompts, plist, strict=True)]
        texts = {id(r): [] for r in reqs}
        ids = {id(r): [] for r in reqs}
        lps: dict[int, list[TokenLogprob]] = {id(r): [] for r in reqs}
        self._adds.extend(reqs)
        pending = set(map(id, reqs))
        while pending:
            for req, out in self._step():
                texts[id(req)].append(out.text)
                ids[id(req)] += out.token_ids
                lps[id(req)] += out.logprobs or []
                if out.finish_reason is not None:
                    pending.discard(id(req))
        return [
            Completion("".join(texts[id(r)]), ids[id(r)], r.finish_reason or "abort",
                       lps[id(r)] if r.seq.params.logprobs is not None else None,
                       r.seq.num_cached_tokens)
            for r in reqs
        ]

    def __repr__(self) -> str:
        return f"LLMEngine({Path(self.served_model_path).name}, tp={self.config.tensor_parallel_size})"


def _deliver(outputs: list[tuple[_Request, Any]]) -> None:
    """Hand a step's outputs to their requests' sinks (on the event loop)."""
    for req, out in outputs:
        if req.sink is not None:
            req.sink.put_nowait(out)


__all__ = ["Completion", "LLMEngine", "Status"]
