"""What ``LLM.generate`` returns, shaped like vLLM's ``RequestOutput`` (``outputs[0].text`` and so on)."""
from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class CompletionOutput:
    """One generated sequence. ``finish_reason``: ``"stop"`` (EOS or a stop string) or ``"length"``;
    ``stop_reason``: the stop string that ended it, ``None`` otherwise (vLLM's convention)."""

    index: int
    text: str
    token_ids: list[int]
    finish_reason: str
    stop_reason: str | None = None


@dataclass
class RequestMetrics:
    """Per-request numbers. ``cached_tokens``: prompt tokens served from the radix cache (prefix
    caching); ``num_preemptions``: times the request lost its place to memory pressure. Times are
    seconds measured on the rank that scheduled it."""

    cached_tokens: int
    num_preemptions: int
    time_to_first_token_s: float
    latency_s: float


@dataclass
class RequestOutput:
    """One request's result: ``request_id``, ``prompt`` (``None`` for token-id prompts),
    ``prompt_token_ids``, ``outputs`` (one :class:`CompletionOutput`), ``finished`` and ``metrics``."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput] = field(default_factory=list)
    finished: bool = True
    metrics: RequestMetrics | None = None

    @property
    def num_cached_tokens(self) -> int:
        """vLLM's name for the cached prefix length."""
        return self.metrics.cached_tokens if self.metrics else 0
