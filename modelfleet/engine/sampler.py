"""Turning a step's logits into next tokens: penalties, temperature, top-k/top-p/min-p, seeds.

The draw uses the exponential race (argmax of p / E with E ~ Exp(1)), with E taken from each
request's own generator when it has a seed, so a seeded request draws the same tokens whatever
else is in the batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from modelfleet.engine.sequence import Sequence


@dataclass
class SampleResult:
    token_ids: list[int]
    # per sequence: (chosen logprob, [(token_id, logprob) of the top-n]) or None
    logprobs: list[tuple[float, list[tuple[int, float]]] | None]


def apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    # logits: [B, V]
    b, v = logits.shape
    dev = logits.device
    rep = torch.tensor([s.params.repetition_penalty for s in seqs], device=dev)
    pres = torch.tensor([s.params.presence_penalty for s in seqs], device=dev)
    freq = torch.tensor([s.params.frequency_penalty for s in seqs], device=dev)
    counts = torch.zeros(b, v, device=dev)
    seen = torch.zeros(b, v, dtype=torch.bool, device=dev)
    for i, s in enumerate(seqs):
        out = s.output_ids
        if out:
            counts[i].index_add_(0, torch.tensor(out, device=dev), torch.ones(len(out), device=dev))
        if s.params.repetition_penalty != 1.0:
            seen[i, torch.tensor(s.token_ids, device=dev)] = True
    seen |= counts > 0
    r = rep[:, None]
    penalized = torch.where(logits > 0, logits / r, logits * r)  # repetition: prompt and output
    logits = torch.where(seen & (r != 1.0), penalized, logits)
    return logits - freq[:, None] * counts - pres[:, None] * (counts > 0).float()


def sample(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> SampleResult:
    """logits: [B, V] float32, one row per sequence."""
    params = [s.params for s in seqs]
    want_logprobs = [p.logprobs for p in params]
    raw_logprobs = (
        torch.log_softmax(logits, dim=-1) if any(n is not None for n in want_logprobs) else None
    )
    if any(
        p.repetition_penalty != 1.0 or p.presence_penalty or p.frequency_penalty for p in params
    ):
        logits = apply_penalties(logits, seqs)
    greedy = logits.argmax(dim=-1)
    if all(p.greedy for p in params):
        chosen = greedy
    else:
        chosen = torch.where(
            torch.tensor([p.greedy for p in params], device=logits.device),
            greedy,
            _draw(logits, seqs, generator),
        )
    token_ids = chosen.tolist()
    lps: list[tuple[float, list[tuple[int, float]]] | None] = [None] * len(seqs)
    if raw_logprobs is not None:
        for i, n in enumerate(want_logprobs):
            if n is None:
                continue
            row = raw_logprobs[i]
            top: list[tuple[int, float]] = []
            if n > 0:
                vals, idx = row.topk(n)
                top = list(zip(idx.tolist(), vals.tolist(), strict=True))
            lps[i] = (float(row[token_ids[i]]), top)
    return SampleResult(token_ids, lps)


def _draw(logits: torch.Tensor, seqs: list[Sequence], generator: torch.Generator | None) -> torch.Tensor:
    v = logits.shape[1]
    dev = logits.device
    params = [s.params for s in seqs]
    temp = torch.tensor([p.temperature if p.temperature > 0 else 1.0 for p in params], device=dev)
    logits = logits / temp[:, None]
    top_k = [p.top_k if p.top_k > 0 else v for p in params]
    if any(k < v for k in top_k):
        k = torch.tensor(top_k, device=dev).clamp(max=v)
        kth = logits.sort(dim=-1, descending=True).values.gather(1, (k - 1)[:, None])  # [B, 1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    top_p = torch.tensor([p.top_p for p in params], device=dev)
    if (top_p < 1.0).any():
        sorted_p, order = probs.sort(dim=-1, descending=True)
        before = sorted_p.cumsum(dim=-1) - sorted_p  # mass of the strictly better tokens
        drop_sorted = before >= top_p[:, None]
        drop = torch.zeros_like(drop_sorted).scatter(1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
    min_p = torch.tensor([p.min_p for p in params], device=dev)
    if (min_p > 0).any():
        probs = probs.masked_fill(probs < min_p[:, None] * probs.max(dim=-1, keepdim=True).values, 0.0)
    # exponential race; seeded rows use their own generator so batch mates cannot shift them
    noise = torch.empty_like(probs).exponential_(generator=generator)
    for i, s in enumerate(seqs):
        if s.generator is not None:
            noise[i] = torch.empty(v, device=dev).exponential_(generator=s.generator)
    return (probs / noise).argmax(dim=-1)
