"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p under a seed.

Determinism: each request owns a CPU ``torch.Generator`` seeded with its ``seed``; sampling is done
in float32 on the CPU, so a request draws the same tokens whether it runs alone or in a batch,
and on any device. ``temperature == 0`` means greedy (argmax, ties to the lowest id).
"""

from __future__ import annotations

import torch

from hybridpar.core import SamplingParams  # noqa: F401  (also importable from here, next to sample())


def filtered_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """Probabilities ``[V]`` after temperature, top-k and top-p (the smallest set of tokens whose
    probability reaches ``top_p``; the most likely token is always kept)."""
    logits = logits.to(torch.float32) / params.temperature
    if 0 < params.top_k < logits.numel():
        kth = torch.topk(logits, params.top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if params.top_p < 1.0:
        sorted_probs, order = probs.sort(descending=True)
        before = sorted_probs.cumsum(0) - sorted_probs  # mass of the strictly more likely tokens
        sorted_probs = sorted_probs.masked_fill(before >= params.top_p, 0.0)
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs)
        probs = probs / probs.sum()
    return probs


def sample(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One token per row of ``logits [B, V]``; row ``i`` uses ``params[i]`` and ``generators[i]``.

    An all-greedy batch takes the argmax where the logits are (first maximum, as on the CPU) and
    copies ``B`` ids to the host instead of ``B x V`` logits.
    """
    if all(p.greedy for p in params):
        return logits.detach().argmax(dim=-1).tolist()
    logits = logits.detach().to("cpu", torch.float32)
    tokens = []
    for row, p, gen in zip(logits, params, generators):
        if p.greedy:
            tokens.append(int(row.argmax()))
        else:
            tokens.append(int(torch.multinomial(filtered_probs(row, p), 1, generator=gen)))
    return tokens
