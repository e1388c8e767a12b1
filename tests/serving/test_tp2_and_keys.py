"""TP 2 on the CPU through Serve, on a random-weight Hugging Face checkpoint: greedy
completions through the API equal transformers' `generate`. The app also requires a key."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch

PROMPTS = [[1, 17, 230, 45, 9], [1, 400, 12], [1, 5, 6, 7, 8, 9, 10, 11, 12, 13]]


@pytest.fixture(scope="module")
def reference(serving):
    import transformers

    model = transformers.AutoModelForCausalLM.from_pretrained(serving.checkpoint, dtype=torch.float32).eval()
    model.generation_config.pad_token_id = 2
    return model


def test_greedy_completions_equal_transformers(serving, reference):
    from modelfleet.engine.tokenizer import Tokenizer

    tok = Tokenizer(serving.checkpoint)
    client = serving.tp2.client()
    for prompt in PROMPTS:
        out = client.completions.create(model="tp2", prompt=prompt, max_tokens=12, temperature=0, logprobs=0)
        with torch.no_grad():
            ids = reference.generate(torch.tensor([prompt]), max_new_tokens=12, do_sample=False)[0]
        new = ids[len(prompt) :].tolist()
        if 2 in new:
            new = new[: new.index(2)]
        assert out.choices[0].text == tok.decode(new), (prompt, new)
        assert len(out.choices[0].logprobs.tokens) == out.usage.completion_tokens


def test_tp2_streams(serving):
    chunks = list(
        serving.tp2.client().chat.completions.create(
            model="tp2",
            messages=[{"role": "user", "content": "Hi"}],
            max_tokens=6,
            stream=True,
            extra_body={"ignore_eos": True},
        )
    )
    assert chunks[-1].choices[0].finish_reason == "length"


def test_requests_without_the_key_get_401(serving):
    app = serving.tp2
    for key in ("wrong-key", None):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        resp = httpx.post(
            f"{app.v1}/completions", json={"model": "tp2", "prompt": "Hi"}, headers=headers, timeout=30
        )
        assert resp.status_code == 401
        err = resp.json()["error"]
        assert err["code"] == "invalid_api_key" and set(err) == {"message", "type", "param", "code"}
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=app.v1, api_key="wrong", max_retries=0).models.list()
    assert app.client().models.list().data[0].id == "tp2"


def test_health_and_metrics_stay_open(serving):
    app = serving.tp2
    assert httpx.get(f"{app.base}/health", timeout=10).status_code == 200
    assert httpx.get(f"{app.base}/ready", timeout=10).status_code == 200
    assert "modelfleet_replicas_ready" in httpx.get(f"{app.base}/metrics", timeout=10).text
