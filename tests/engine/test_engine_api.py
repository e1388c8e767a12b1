"""The async API serving uses: streaming, chat, cancellation, counters, bad input, shutdown."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time

import pytest

from modelfleet.engine import (
    TINY_LLAMA_URI,
    EngineConfig,
    EngineStats,
    InvalidRequest,
    LLMEngine,
    RequestOutput,
    SamplingParams,
)
from modelfleet.engine.builtin import materialize
from modelfleet.engine.process import EngineProcess


async def eventually(check, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


@pytest.fixture(params=["thread", "process"])
async def engine(request):
    """Each API test runs against the engine stepping on a thread of this process and
    against the engine in a process of its own, through its client."""
    config = EngineConfig(device="cpu", max_model_len=256)
    e = LLMEngine(config) if request.param == "thread" else await asyncio.to_thread(EngineProcess, config)
    await e.start()
    yield e
    await e.shutdown()


async def collect(engine, prompt, params) -> list[RequestOutput]:
    return [out async for out in engine.generate(prompt, params)]


async def test_streams_deltas_with_cumulative_usage(engine):
    assert engine.max_model_len == 256 and os.path.isdir(engine.served_model_path)
    outs = await collect(engine, "Hello there", SamplingParams(max_tokens=12, temperature=0,
                                                                ignore_eos=True))
    n_prompt = len(engine.tokenizer.encode("Hello there"))
    assert [o.usage.completion_tokens for o in outs] == list(range(1, 13))
    assert all(o.usage.prompt_tokens == n_prompt for o in outs)
    assert [o.finish_reason for o in outs] == [None] * 11 + ["length"]
    ids = [t for o in outs for t in o.token_ids]
    assert "".join(o.text for o in outs) == engine.tokenizer.decode(ids)
    stats = engine.stats()
    assert isinstance(stats, EngineStats)
    assert stats.generation_tokens_total == 12 and stats.prompt_tokens_total == n_prompt
    assert stats.running == stats.waiting == stats.kv_blocks_used == 0 and stats.kv_blocks_total > 0


async def test_token_ids_and_chat_messages(engine):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    text = engine.apply_chat_template(messages)
    assert text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
    assert text.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n")
    ids = engine.tokenizer.encode(text, add_special_tokens=False)
    params = SamplingParams(max_tokens=6, temperature=0, ignore_eos=True)
    by_messages = await collect(engine, messages, params)
    by_ids = await collect(engine, ids, params)
    assert by_messages[-1].usage.prompt_tokens == len(ids)
    assert [o.token_ids for o in by_messages] == [o.token_ids for o in by_ids]


async def test_closing_the_stream_aborts_and_frees_blocks(engine):
    params = SamplingParams(max_tokens=200, temperature=0, ignore_eos=True)
    stream = engine.generate("A long story", params)
    await stream.__anext__()
    await stream.__anext__()
    assert engine.stats().kv_blocks_used > 0
    await stream.aclose()
    await eventually(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)

    async def consume():
        async for _ in engine.generate("Another long story", params):
            pass

    task = asyncio.create_task(consume())
    await eventually(lambda: engine.stats().kv_blocks_used > 0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    await eventually(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)
    # the engine still serves
    assert (await collect(engine, "Hi", SamplingParams(max_tokens=3)))[-1].finish_reason


class ListSink:
    """A sink that keeps every output handed to it, as a server merging streams would."""

    def __init__(self) -> None:
        self.items: list = []

    def put_nowait(self, out) -> None:
        self.items.append(out)


async def test_submit_hands_each_step_to_the_sink_and_abort_frees_blocks(engine):
    params = SamplingParams(max_tokens=8, temperature=0, ignore_eos=True)
    prompts = ["Hello there", "Once upon a time"]
    sinks = [ListSink() for _ in prompts]
    for sink, prompt in zip(sinks, prompts, strict=True):
        engine.submit(prompt, params, sink)
    await eventually(lambda: all(s.items and s.items[-1].finish_reason for s in sinks))
    for sink, prompt in zip(sinks, prompts, strict=True):
        assert [o.finish_reason for o in sink.items] == [None] * 7 + ["length"]
        alone = await collect(engine, prompt, params)
        assert [o.token_ids for o in sink.items] == [o.token_ids for o in alone]

    long = ListSink()
    req = engine.submit("A long story", SamplingParams(max_tokens=200, ignore_eos=True), long)
    await eventually(lambda: len(long.items) >= 2)
    engine.abort(req)
    await eventually(lambda: engine.stats().kv_blocks_used == 0 and engine.stats().running == 0)
    seen = len(long.items)
    await asyncio.sleep(0.2)  # no step hands it anything more
    assert len(long.items) == seen < 200 and long.items[-1].finish_reason is None
    with pytest.raises(InvalidRequest):
        engine.submit("", params, ListSink())  # checked before anything is queued
    assert engine.stats().waiting == 0


@pytest.mark.parametrize(("prompt", "params", "param"), [
    ("", {}, "prompt"),
    ([], {}, "prompt"),
    ("word " * 300, {}, "prompt"),
    ("Hi", {"max_tokens": 255}, "max_tokens"),
    ("Hi", {"top_p": 0}, "top_p"),
    ("Hi", {"temperature": -0.5}, "temperature"),
    ("Hi", {"max_tokens": 0}, "max_tokens"),
    ("Hi", {"stop": 123}, "stop"),
    ("Hi", {"stop": ["ok", 5]}, "stop"),
    ("Hi", {"logprobs": 99}, "logprobs"),
    ([10**9], {}, "prompt"),
    ([{"content": "no role"}], {}, "messages"),
])
async def test_bad_input_names_the_parameter_and_the_engine_keeps_serving(engine, prompt, params, param):
    long_run = asyncio.create_task(collect(engine, "Keep going", SamplingParams(
        max_tokens=30, temperature=0, ignore_eos=True)))
    with pytest.raises(InvalidRequest) as err:
        good = SamplingParams()
        for k, v in params.items():
            setattr(good, k, v)  # bypass the constructor check: the engine checks again
        engine.validate(prompt, good)
    assert err.value.param == param and str(err.value).startswith(f"{param}:")
    assert isinstance(err.value, ValueError)
    with pytest.raises(InvalidRequest):
        await collect(engine, prompt, good)
    if params and params != {"max_tokens": 255}:  # the constructor checks ranges too
        with pytest.raises(ValueError, match=f"^{param}:"):
            SamplingParams(**params)
    outs = await long_run
    assert outs[-1].finish_reason == "length" and outs[-1].usage.completion_tokens == 30
    assert engine.stats().waiting == 0


@pytest.mark.parametrize(("field", "value"), [
    ("tensor_parallel_size", 3), ("block_size", 3), ("device", "tpu"), ("model", "s3://bucket/x"),
    ("max_model_len", 1 << 20), ("kv_cache_memory_fraction", 0), ("worker_backend", "threads"),
    ("dtype", "int8"), ("model", "/nonexistent/dir"),
])
def test_bad_config_names_the_field(field, value):
    with pytest.raises(ValueError, match=f"^{field}:"):
        LLMEngine(EngineConfig(**{field: value}))


def test_hf_uri_offline_fails_clearly(monkeypatch, tmp_path):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    with pytest.raises(ValueError, match=r"^model: cannot fetch hf://some-org/some-model@v1"):
        LLMEngine(EngineConfig(model="hf://some-org/some-model@v1"))


def test_builtin_tiny_llama_is_a_real_hf_directory_written_atomically(tmp_path):
    code = "from modelfleet.engine.builtin import materialize; print(materialize())"
    env = {**os.environ, "MODELFLEET_CACHE_DIR": str(tmp_path)}
    racers = [subprocess.Popen([sys.executable, "-c", code], env=env, stdout=subprocess.PIPE,
                               text=True) for _ in range(2)]
    paths = [p.communicate(timeout=120)[0].strip() for p in racers]
    assert all(p.returncode == 0 for p in racers) and paths[0] == paths[1]
    names = sorted(os.listdir(tmp_path / "models"))
    assert names == [os.path.basename(paths[0])]  # no temporary leftovers
    d = tmp_path / "models" / names[0]
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json",
              "chat_template.jinja", "generation_config.json"):
        assert (d / f).is_file()
    assert (d / "model.safetensors").read_bytes() == (materialize() / "model.safetensors").read_bytes()
    config = json.loads((d / "config.json").read_text())
    assert 1000 < config["vocab_size"] < 5000


async def test_chat_template_from_tokenizer_config_and_file_uri(tmp_path):
    src = materialize()
    d = tmp_path / "model"
    shutil.copytree(src, d)
    template = (d / "chat_template.jinja").read_text()
    (d / "chat_template.jinja").unlink()
    tc = json.loads((d / "tokenizer_config.json").read_text())
    tc["chat_template"] = template
    (d / "tokenizer_config.json").write_text(json.dumps(tc))
    engine = LLMEngine(EngineConfig(model=f"file://{d}", device="cpu"))
    msgs = [{"role": "user", "content": "Hello"}]
    assert engine.apply_chat_template(msgs) == LLMEngine(
        EngineConfig(model=TINY_LLAMA_URI, device="cpu")).apply_chat_template(msgs)
    await engine.shutdown()


async def test_tensor_parallel_engine_matches_tp1_and_leaves_no_processes():
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    prompts = ["The river ran", "Hello there, how are you?", "A model reads a prompt"]
    one = LLMEngine(EngineConfig(device="cpu"))
    want = [c.token_ids for c in one.generate_batch(prompts, params)]
    await one.shutdown()
    two = LLMEngine(EngineConfig(device="cpu", tensor_parallel_size=2))
    procs = list(two.workers.procs)
    assert all(p.is_alive() for p in procs)
    got = await asyncio.gather(*(collect(two, p, params) for p in prompts))
    assert [[t for o in outs for t in o.token_ids] for outs in got] == want
    await two.shutdown()
    assert not any(p.is_alive() for p in procs)
