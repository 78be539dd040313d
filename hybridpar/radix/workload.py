"""Synthetic shared-prefix workloads and the best cache hit rate they allow (SGLang's generated-shared-prefix benchmark).

``G`` groups of ``P`` prompts each. Every prompt of a group is the group's system prompt of ``S``
tokens followed by its own question of ``Q`` tokens; each request generates ``O`` tokens. Token
ids are drawn from a seeded generator, with two guarantees that make the hit rate exact:

* the system prompts of different groups differ in their first token, so groups share nothing;
* the questions of one group differ in their first token, so two prompts of a group share
  exactly their ``S`` system tokens.

With a cache large enough to keep every system prompt, the first prompt of a group computes
its system prompt and the other ``P - 1`` hit it. Caches match whole pages, so the best hit rate
(cached prompt tokens / prompt tokens) is::

    (P - 1) * floor(S / page_size) * page_size / (P * (S + Q))

which is ``(P - 1) * S / (P * (S + Q))`` when ``S`` is a multiple of ``page_size``.
"""

from __future__ import annotations

import random
from dataclasses import dataclass


@dataclass(frozen=True)
class WorkloadRequest:
    """One request of a workload: ``group`` and ``index`` (within the group) identify it."""

    group: int
    index: int
    prompt_ids: list[int]
    max_new_tokens: int


@dataclass(frozen=True)
class SharedPrefixWorkload:
    """``G`` groups x ``P`` prompts, ``S`` system + ``Q`` question tokens, ``O`` output tokens."""

    num_groups: int
    prompts_per_group: int
    system_len: int
    question_len: int
    output_len: int
    vocab_size: int = 256
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("num_groups", "prompts_per_group", "question_len", "output_len"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if isinstance(self.system_len, bool) or not isinstance(self.system_len, int) or self.system_len < 0:
            raise ValueError(f"system_len must be an int >= 0, got {self.system_len!r}")
        distinct = max(self.num_groups, self.prompts_per_group)
        if self.vocab_size < distinct:
            raise ValueError(f"vocab_size={self.vocab_size} is too small for {distinct} distinct first tokens; "
                             f"use fewer groups / prompts per group or a larger vocabulary")

    @property
    def num_requests(self) -> int:
        return self.num_groups * self.prompts_per_group

    def requests(self, shuffle: bool = False) -> list[WorkloadRequest]:
        """All requests, group by group (``shuffle=False``) or in a seeded random order."""
        rng = random.Random(self.seed)
        first_sys = rng.sample(range(self.vocab_size), self.num_groups)
        out = []
        for g in range(self.num_groups):
            system = ([first_sys[g]] + [rng.randrange(self.vocab_size) for _ in range(self.system_len - 1)]
                      if self.system_len else [])
            first_q = rng.sample(range(self.vocab_size), self.prompts_per_group)
            for p in range(self.prompts_per_group):
                question = [first_q[p]] + [rng.randrange(self.vocab_size) for _ in range(self.question_len - 1)]
                out.append(WorkloadRequest(g, p, system + question, self.output_len))
        if shuffle:
            random.Random(self.seed + 1).shuffle(out)
        return out

    def theoretical_hit_rate(self, page_size: int = 1) -> float:
        """The best cache hit rate any schedule can reach with a large enough cache (module docstring)."""
        return theoretical_hit_rate(self.num_groups, self.prompts_per_group, self.system_len, self.question_len,
                                    page_size)


def theoretical_hit_rate(num_groups: int, prompts_per_group: int, system_len: int, question_len: int,
                         page_size: int = 1) -> float:
    """``(P - 1) * floor(S / page_size) * page_size / (P * (S + Q))``; ``G`` cancels out."""
    cached = (prompts_per_group - 1) * (system_len // page_size * page_size)
    return cached / (prompts_per_group * (system_len + question_len)) if num_groups else 0.0
