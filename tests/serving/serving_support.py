"""Helpers of the serving tests: polling, a random Hugging Face checkpoint, app handles."""

from __future__ import annotations

import json
import shutil
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx

API_KEY = "test-key-0123456789"


def per_replica(page: str, metric: str) -> dict[str, float]:
    """One series' value per `replica` label on a metrics page (`metric` is a sample name:
    a gauge's, or a histogram's `_count` or `_sum`)."""
    out = {}
    for line in page.splitlines():
        if line.startswith(metric + "{"):
            labels, value = line.rsplit(" ", 1)
            out[labels.split('replica="', 1)[1].split('"', 1)[0]] = float(value)
    return out


def eventually(check: Callable[[], Any], timeout: float = 60.0, interval: float = 0.25) -> Any:
    """Poll until `check()` returns a truthy value; fail with the last value or error."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = check()
            if last:
                return last
        except Exception as err:
            last = err
        time.sleep(interval)
    raise AssertionError(f"condition not met within {timeout}s; last: {last!r}")


def write_hf_checkpoint(path: Path, seed: int = 0) -> Any:
    """A random-weight Llama saved by transformers, with the builtin model's tokenizer."""
    import torch
    import transformers

    from modelfleet.engine.builtin import materialize

    tiny = materialize()
    vocab = len(json.loads((tiny / "tokenizer.json").read_text())["model"]["vocab"]) + 16
    config = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab,
        max_position_embeddings=256,
        rms_norm_eps=1e-5,
        tie_word_embeddings=False,
        bos_token_id=1,
        eos_token_id=2,
    )
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            p.copy_(torch.randn_like(p) * 0.15 + (1.0 if "norm" in name else 0.0))
    model.save_pretrained(path, safe_serialization=True)
    for name in ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        if (tiny / name).exists():
            shutil.copy(tiny / name, path / name)
    return model


@dataclass
class App:
    name: str
    base: str  # http://127.0.0.1:PORT/prefix
    served_name: str
    api_key: str | None = None

    @property
    def v1(self) -> str:
        return f"{self.base}/v1"

    def client(self, **kw: Any) -> Any:
        import openai

        return openai.OpenAI(base_url=self.v1, api_key=self.api_key or "unused", max_retries=0, **kw)

    def async_client(self, **kw: Any) -> Any:
        import openai

        return openai.AsyncOpenAI(base_url=self.v1, api_key=self.api_key or "unused", max_retries=0, **kw)

    def metrics(self) -> str:
        return httpx.get(f"{self.base}/metrics", timeout=10).text

    def handle(self) -> Any:
        from ray import serve

        from modelfleet.serving.app import MODEL_DEPLOYMENT

        return serve.get_deployment_handle(MODEL_DEPLOYMENT, app_name=self.name)

    def stats(self) -> dict[str, Any]:
        return self.handle().stats.remote().result(timeout_s=30)


@dataclass
class Serving:
    main: App
    small: App
    direct: App
    tp2: App
    checkpoint: Path


class Stream:
    """A raw SSE stream read in a thread, so a test can hold it open and then drop it."""

    def __init__(self, url: str, body: dict):
        self.client = httpx.Client(timeout=120)
        self.first = threading.Event()
        self.events = 0
        self.status: int | None = None
        self.data: list[str] = []  # every event's data
        self._cm = self.client.stream("POST", url, json=body)
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        try:
            with self._cm as r:
                self.status = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        self.events += 1
                        self.data.append(line[6:])
                        self.first.set()
        except httpx.HTTPError:
            pass
        finally:
            self.first.set()

    def close(self) -> None:
        self.client.close()  # drops the connection mid-stream
        self._thread.join(30)


def idle(app: App) -> dict | None:
    """The replica's stats when nothing waits or runs there, else None."""
    st = app.stats()
    return st if st["waiting"] == 0 and st["running"] == 0 and st["engine_running"] == 0 else None


def check_queue_full_answer(app: App) -> None:
    """A request to `app` now gets a 429 in OpenAI's shape, with Retry-After, and the official
    client raises its rate-limit error for it."""
    import openai

    body = {"model": app.served_name, "prompt": "Hi", "max_tokens": 4}
    resp = httpx.post(f"{app.v1}/completions", json=body, timeout=30)
    assert resp.status_code == 429, resp.text
    assert resp.headers["retry-after"] == "1"
    err = resp.json()["error"]
    assert err["type"] == "rate_limit_error" and err["code"] == "queue_full"
    try:
        app.client().completions.create(**body)
        raise AssertionError("expected 429")
    except openai.RateLimitError:
        pass


def check_cancelled_stream_frees_its_slot(app: App, long: dict[str, Any]) -> None:
    """A client that drops a long stream of `app` mid-way: the engine stops the request (nothing
    runs, its KV blocks are back), the API counts a 499, and the one slot serves the next one."""
    eventually(lambda: idle(app), 60)
    before = app.stats()["kv_blocks_used"]
    stream = Stream(f"{app.v1}/completions", {**long, "max_tokens": 2000})
    assert stream.first.wait(60)
    eventually(lambda: stream.events >= 3, 30)
    stream.close()
    st = eventually(lambda: idle(app), 60)
    assert st["kv_blocks_used"] <= before
    eventually(lambda: 'status="499"' in app.metrics(), 30)
    out = app.client().completions.create(model=app.served_name, prompt="Next", max_tokens=4)
    assert out.usage.completion_tokens >= 1
