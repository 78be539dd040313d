"""A request as the serving scheduler sees it: :class:`~hybridpar.radix.request.Req` + sampling + bookkeeping.

Life cycle (all on TP rank 0)::

    pending --arrival_step--> waiting --admitted (start_req)--> prefill chunk(s) --first token--> running
       running --EOS / max_new_tokens--> finished          running --preempted--> waiting (again)

A preempted request keeps its ``output_ids``; when readmitted it prefills ``prompt + outputs``
(mostly a cache hit) and continues, so its final output is the same as without preemption.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from hybridpar.models.sampling import SamplingParams
from hybridpar.radix.request import Req


@dataclass(eq=False)
class ServeReq(Req):
    """Extra state: sampling, arrival, metrics. ``cached_tokens`` is the prefix hit at first admission."""

    sampling: SamplingParams = field(default_factory=SamplingParams)
    arrival_step: int = 0
    arrival_seq: int = -1  # order of first entry into the waiting queue (FCFS key, kept on preemption)
    prompt_text: str | None = None
    generator: torch.Generator | None = None
    cached_tokens: int | None = None
    num_preemptions: int = 0
    finish_reason: str | None = None
    arrival_time: float | None = None
    first_token_time: float | None = None
    finish_time: float | None = None

    def __post_init__(self) -> None:
        if self.generator is None:
            self.generator = self.sampling.make_generator()

    @property
    def remaining_new_tokens(self) -> int:
        return self.sampling.max_new_tokens - len(self.output_ids)

    def reserved_tokens(self, new_token_ratio: float) -> int:
        """KV slots set aside for this request's future decode steps when admitting others."""
        return math.ceil(self.remaining_new_tokens * new_token_ratio)

    def reset_for_retract(self) -> None:
        """Forget KV bookkeeping after the hooks released it; outputs and sampling state stay."""
        self.kv_len = 0
        self.num_preemptions += 1
