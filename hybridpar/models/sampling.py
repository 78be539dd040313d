"""Choosing the next token: greedy, or sampling with temperature, top-k and top-p under a seed.

Determinism: each request owns a CPU ``torch.Generator`` seeded with its ``seed``; sampling is done
in float32 on the CPU, so a request draws the same tokens whether it runs alone or in a batch,
and on any device. ``temperature == 0`` means greedy (argmax, ties to the lowest id).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch


@dataclass(frozen=True, init=False)
class SamplingParams:
    """How to pick tokens and when to stop; the names are vLLM's (keyword arguments only).

    ``max_tokens`` (alias ``max_new_tokens``, the field): generation stops after this many new
    tokens, or at an EOS token unless ``ignore_eos``, or when the text contains one of the ``stop``
    strings (the text is cut before it; finish reason ``"stop"``). ``temperature=0`` (the default,
    unlike vLLM's 1.0): greedy. ``top_k=0``: no top-k cut (vLLM's -1 means the same). ``top_p=1``: no
    nucleus cut. ``seed``: seeds this request's generator (``None``: seed 0).
    Bad values raise ``ValueError`` at construction, so they never reach a rank.
    """

    max_new_tokens: int = 32
    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False
    stop: tuple[str, ...] = ()

    def __init__(self, *, max_tokens: int | None = None, max_new_tokens: int | None = None, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0, seed: int | None = None, ignore_eos: bool = False,
                 stop: str | Sequence[str] | None = None) -> None:
        if max_tokens is not None and max_new_tokens is not None and max_tokens != max_new_tokens:
            raise ValueError(f"max_tokens={max_tokens} and max_new_tokens={max_new_tokens} disagree; give one of them")
        n = max_tokens if max_tokens is not None else 32 if max_new_tokens is None else max_new_tokens
        stops = (stop,) if isinstance(stop, str) else tuple(stop or ())
        top_k = 0 if top_k == -1 else top_k
        _check_int("max_tokens", n, 1)
        _check_int("top_k", top_k, 0, "(0 or -1 = off)")
        if seed is not None:
            _check_int("seed", seed, 0)
        for name, value in (("temperature", temperature), ("top_p", top_p)):
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {temperature}")
        if not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {top_p}")
        if not isinstance(ignore_eos, bool):
            raise ValueError(f"ignore_eos must be True or False, got {ignore_eos!r}")
        if any(not isinstance(x, str) or not x for x in stops):
            raise ValueError(f"stop must be a non-empty string or a list of them, got {stop!r}")
        for name, value in (("max_new_tokens", n), ("temperature", float(temperature)), ("top_k", top_k),
                            ("top_p", float(top_p)), ("seed", seed), ("ignore_eos", ignore_eos), ("stop", stops)):
            object.__setattr__(self, name, value)

    @property
    def max_tokens(self) -> int:
        """vLLM's name for :attr:`max_new_tokens`."""
        return self.max_new_tokens

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0

    def make_generator(self) -> torch.Generator:
        return torch.Generator().manual_seed(0 if self.seed is None else self.seed)


def _check_int(name: str, value: object, low: int, note: str = "") -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}{' ' + note if note else ''}, got {value!r}")


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
