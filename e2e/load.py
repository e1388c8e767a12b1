"""Bursts of streamed completions for the autoscaling tests, on the node and on a local Serve."""

from __future__ import annotations

import asyncio

import httpx


async def stream_burst(base: str, model: str, count: int, max_tokens: int) -> list[str]:
    """`count` concurrent streamed completions against `base`; returns the failures (a status
    other than 200, a stream that ends without `[DONE]`, a transport error)."""
    failures: list[str] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        body = {
            "model": model,
            "prompt": f"request {i} says",
            "max_tokens": max_tokens,
            "stream": True,
            "temperature": 0,
            "ignore_eos": True,
        }
        try:
            async with client.stream("POST", f"{base}/v1/completions", json=body) as resp:
                if resp.status_code != 200:
                    failures.append(f"{resp.status_code}: {(await resp.aread())[:200]!r}")
                    return
                async for line in resp.aiter_lines():
                    if line == "data: [DONE]":
                        return
                failures.append("stream ended without [DONE]")
        except httpx.HTTPError as err:
            failures.append(f"{type(err).__name__}: {err}")

    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, i) for i in range(count)))
    return failures
