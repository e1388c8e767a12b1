"""The OpenAI API through the official client, against the real tiny model served by Serve."""

from __future__ import annotations

import asyncio

import httpx
import openai
import pytest

CHAT = [{"role": "user", "content": "Tell me about the city."}]


def test_models_list(serving):
    models = serving.main.client().models.list()
    assert [m.id for m in models.data] == ["tiny"]
    assert models.data[0].owned_by == "modelfleet"


def test_completion(serving):
    out = serving.main.client().completions.create(model="tiny", prompt="Once upon a time", max_tokens=8)
    assert out.object == "text_completion"
    assert len(out.choices) == 1 and out.choices[0].text
    assert out.usage.completion_tokens <= 8
    assert out.usage.total_tokens == out.usage.prompt_tokens + out.usage.completion_tokens


def test_chat_completion(serving):
    out = serving.main.client().chat.completions.create(model="tiny", messages=CHAT, max_tokens=8)
    assert out.object == "chat.completion"
    msg = out.choices[0].message
    assert msg.role == "assistant" and msg.content
    assert out.choices[0].finish_reason in ("stop", "length")
    assert out.usage.prompt_tokens > 5


def test_max_tokens_is_exact_when_eos_is_ignored(serving):
    out = serving.main.client().completions.create(
        model="tiny", prompt="Hello", max_tokens=13, extra_body={"ignore_eos": True}
    )
    assert out.usage.completion_tokens == 13
    assert out.choices[0].finish_reason == "length"


def test_completion_stream_arrives_chunk_by_chunk(serving):
    chunks = list(
        serving.main.client().completions.create(
            model="tiny", prompt="Hello there", max_tokens=12, stream=True, extra_body={"ignore_eos": True}
        )
    )
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert len(texts) >= 6, texts  # one event per token (a few may hold back partial UTF-8)
    assert all(c.choices[0].finish_reason is None for c in chunks[:-1])
    assert chunks[-1].choices[0].finish_reason == "length"
    full = serving.main.client().completions.create(
        model="tiny", prompt="Hello there", max_tokens=12, temperature=0, extra_body={"ignore_eos": True}
    )
    streamed = serving.main.client().completions.create(
        model="tiny",
        prompt="Hello there",
        max_tokens=12,
        temperature=0,
        stream=True,
        extra_body={"ignore_eos": True},
    )
    assert "".join(c.choices[0].text for c in streamed) == full.choices[0].text


def test_chat_stream_with_usage(serving):
    chunks = list(
        serving.main.client().chat.completions.create(
            model="tiny",
            messages=CHAT,
            max_tokens=10,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[0].choices[0].delta.role == "assistant"
    content = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert len(content) >= 5
    with_choices = [c for c in chunks if c.choices]
    assert with_choices[-1].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 10
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_ends_with_done(serving):
    body = {"model": "tiny", "prompt": "Hi", "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{serving.main.v1}/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        events = [line for line in r.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "data: [DONE]"


def test_stop_string_ends_the_text(serving):
    client = serving.main.client()
    args = dict(
        model="tiny",
        prompt="The weather today",
        max_tokens=24,
        temperature=0,
        extra_body={"ignore_eos": True},
    )
    text = client.completions.create(**args).choices[0].text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    out = client.completions.create(**args, stop=[stop])
    assert out.choices[0].finish_reason == "stop"
    assert out.choices[0].text == text[: text.index(stop)]


def test_seeded_sampling_is_reproducible(serving):
    client = serving.main.client()
    args = dict(model="tiny", prompt="Pick a word", max_tokens=16, temperature=1.0, top_p=0.9, seed=1234)
    first = client.completions.create(**args).choices[0].text
    assert client.completions.create(**args).choices[0].text == first
    other = [client.completions.create(**{**args, "seed": s}).choices[0].text for s in (1, 2, 3)]
    assert any(t != first for t in other)


def test_n_choices_with_seed(serving):
    client = serving.main.client()
    out = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, n=3, seed=7, temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    single = client.completions.create(model="tiny", prompt="Hi", max_tokens=8, seed=8, temperature=1.0)
    assert out.choices[1].text == single.choices[0].text  # choice i samples with seed + i
    assert 0 < out.usage.completion_tokens <= 24


def test_logprobs(serving):
    client = serving.main.client()
    out = client.completions.create(
        model="tiny", prompt="Hi", max_tokens=5, logprobs=3, extra_body={"ignore_eos": True}
    )
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == 5
    assert all(v <= 0 for v in lp.token_logprobs)
    assert all(len(top) >= 3 for top in lp.top_logprobs)
    chat = client.chat.completions.create(
        model="tiny",
        messages=CHAT,
        max_tokens=5,
        logprobs=True,
        top_logprobs=2,
        extra_body={"ignore_eos": True},
    )
    content = chat.choices[0].logprobs.content
    assert len(content) == 5 and all(len(t.top_logprobs) == 2 for t in content)


def test_penalties_are_accepted(serving):
    out = serving.main.client().completions.create(
        model="tiny", prompt="Repeat repeat repeat", max_tokens=8, presence_penalty=1.5, frequency_penalty=1.0
    )
    assert out.choices[0].text is not None


async def test_twenty_concurrent_streams_complete(serving):
    client = serving.main.async_client()

    async def one(i: int) -> tuple[int, str | None, int]:
        stream = await client.completions.create(
            model="tiny",
            prompt=f"Story number {i}:",
            max_tokens=16,
            stream=True,
            stream_options={"include_usage": True},
            extra_body={"ignore_eos": True},
        )
        chunks, reason, tokens = 0, None, 0
        async for chunk in stream:
            if chunk.choices:
                chunks += 1
                reason = chunk.choices[0].finish_reason or reason
            if chunk.usage:
                tokens = chunk.usage.completion_tokens
        return chunks, reason, tokens

    results = await asyncio.gather(*(one(i) for i in range(20)))
    await client.close()
    assert all(reason == "length" and tokens == 16 for _, reason, tokens in results), results
    # Under load a chunk may carry several tokens, but each stream still arrives in pieces.
    assert all(chunks >= 2 for chunks, _, _ in results), results


# -- errors in OpenAI's shape --------------------------------------------------------------


def _error(resp: httpx.Response, status: int) -> dict:
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    return err


def test_unknown_model_is_404(serving):
    with pytest.raises(openai.NotFoundError) as info:
        serving.main.client().completions.create(model="nope", prompt="Hi")
    assert info.value.body["param"] == "model"
    assert info.value.body["code"] == "model_not_found"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", 5),
        ("top_p", 0),
        ("n", 0),
        ("max_tokens", 0),
        ("logprobs", 99),
        ("presence_penalty", 3),
        ("frequency_penalty", -3),
        ("stop", ["a"] * 40),
        ("prompt", []),
    ],
)
def test_bad_parameter_is_400_naming_it(serving, field, value):
    body = {"model": "tiny", "prompt": "Hi", field: value}
    err = _error(httpx.post(f"{serving.main.v1}/completions", json=body, timeout=30), 400)
    assert err["param"] == field
    assert err["type"] == "invalid_request_error"


def test_bad_chat_parameter_through_the_client(serving):
    with pytest.raises(openai.BadRequestError) as info:
        serving.main.client().chat.completions.create(model="tiny", messages=CHAT, top_logprobs=3)
    assert info.value.body["param"] == "top_logprobs"


def test_context_overflow_is_400(serving):
    with pytest.raises(openai.BadRequestError) as info:
        serving.main.client().completions.create(model="tiny", prompt="Hi", max_tokens=100_000)
    assert info.value.body["param"] == "max_tokens"
    assert info.value.body["code"] == "context_length_exceeded"
    long_prompt = "word " * 5000
    err = _error(
        httpx.post(
            f"{serving.main.v1}/chat/completions",
            timeout=60,
            json={"model": "tiny", "messages": [{"role": "user", "content": long_prompt}]},
        ),
        400,
    )
    assert err["code"] == "context_length_exceeded"


def test_malformed_json_is_400(serving):
    resp = httpx.post(
        f"{serving.main.v1}/completions",
        content=b'{"model": "tiny", ',
        timeout=30,
        headers={"content-type": "application/json"},
    )
    err = _error(resp, 400)
    assert err["code"] == "invalid_json"
    err = _error(httpx.post(f"{serving.main.v1}/completions", json=["not", "an", "object"], timeout=30), 400)


def test_missing_required_field_is_400(serving):
    err = _error(httpx.post(f"{serving.main.v1}/chat/completions", json={"model": "tiny"}, timeout=30), 400)
    assert err["param"] == "messages"


def test_a_generation_route_answers_other_methods_with_405(serving):
    for path in ("completions", "chat/completions"):
        err = _error(httpx.get(f"{serving.main.v1}/{path}", timeout=30), 405)
        assert err["code"] == "method_not_allowed" and "POST" in err["message"]
    assert httpx.get(f"{serving.main.v1}/models", timeout=30).status_code == 200  # still serving


def test_a_non_streamed_response_is_json_with_its_length(serving):
    resp = httpx.post(f"{serving.main.v1}/completions", timeout=60,
                      json={"model": "tiny", "prompt": "Hello", "max_tokens": 3})
    assert resp.status_code == 200 and resp.headers["content-type"] == "application/json"
    assert int(resp.headers["content-length"]) == len(resp.content)
    assert resp.json()["usage"]["completion_tokens"] <= 3


# -- health, readiness, metrics ----------------------------------------------------------


def test_health_and_ready(serving):
    assert httpx.get(f"{serving.main.base}/health", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(f"{serving.main.base}/ready", timeout=10)
    assert ready.status_code == 200 and ready.json()["ready_replicas"] == 1


def test_metrics_page(serving):
    from serving_support import eventually, per_replica

    from modelfleet.serving.metrics import METRIC_NAMES

    serving.main.client().completions.create(model="tiny", prompt="Count me", max_tokens=4)

    def page() -> str | None:
        text = serving.main.metrics()
        return (
            text
            if 'status="200"' in text and "modelfleet_time_to_first_token_seconds_count" in text
            # the ingress timed the request on its way to a replica (its histogram's count)
            and sum(per_replica(text, "modelfleet_ingress_wait_seconds_count").values()) >= 1
            # the replica's engine: a step for each of the request's 4 tokens, at least
            and sum(per_replica(text, "modelfleet_engine_steps_total").values()) >= 4
            else None
        )

    text = eventually(page, timeout=30)
    for name in METRIC_NAMES:
        assert f"# TYPE {name} " in text, name
    assert 'modelfleet_replicas_ready{model_deployment="main",namespace="default"} 1.0' in text
    assert 'modelfleet_queue_depth{model_deployment="main",namespace="default",replica=' in text
    assert "modelfleet_inter_token_latency_seconds_bucket" in text
    # The ingress' histogram of the time to reach a replica (page() waited for its count).
    assert "# TYPE modelfleet_ingress_wait_seconds histogram" in text
    assert "modelfleet_ingress_wait_seconds_bucket{" in text


def test_a_stream_sends_its_opening_with_the_first_token_and_its_closing_with_the_last(serving):
    """Every message of a stream crosses Serve's model replica, ingress and proxy, so the
    replica sends the chat role with the first token and the usage and [DONE] with the last
    chunk, rather than each on its own."""
    from modelfleet.serving.protocol import ChatCompletionRequest

    request = ChatCompletionRequest(
        model="tiny",
        messages=CHAT,
        max_tokens=6,
        stream=True,
        ignore_eos=True,
        stream_options={"include_usage": True},
    )
    handle = serving.main.handle().options(stream=True)
    firsts = []
    for _ in range(3):  # the opening waits 50 ms for the first token: allow a slow start or two
        messages = list(handle.stream.remote("chat", request))
        last = messages[-1]
        assert '"finish_reason":"length"' in last and '"completion_tokens":6' in last
        assert last.endswith("data: [DONE]\n\n") and "[DONE]" not in "".join(messages[:-1])
        assert len(messages) <= 6, messages  # at most one per token, the opening and closing ride along
        firsts.append(messages[0])
        if messages[0].count("data: ") >= 2:
            break
    assert any('"role":"assistant"' in m and m.count("data: ") >= 2 for m in firsts), firsts
