"""The per-request state the radix cache and the memory pools need (SGLang's ``Req``, trimmed).

A request's tokens are ``all_ids = origin_input_ids + output_ids``. Its KV lives in row
``req_pool_idx`` of the :class:`~hybridpar.radix.mem_pool.ReqToTokenPool`:

* positions ``[0, cache_protected_len)`` hold slots owned by the radix tree; the request
  keeps them alive by holding one lock on ``last_node`` (the tree node that ends there);
* positions ``[cache_protected_len, kv_len)`` hold slots owned by the request itself;
* ``kv_len`` counts the positions that have a slot. The newest sampled token has none
  until the next decode step, so after prefill and ``k`` sampled tokens
  ``kv_len == len(all_ids) - 1``.

The scheduler may subclass :class:`Req` to add sampling parameters and stop conditions.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from hybridpar.radix.radix_cache import TreeNode


@dataclass(eq=False)
class Req:
    """A request as seen by the KV-cache bookkeeping. Compared by identity."""

    rid: int | str
    origin_input_ids: list[int]
    output_ids: list[int] = field(default_factory=list)
    req_pool_idx: int | None = None
    # Slots of the tokens whose KV is already present when the next forward starts:
    # the matched cache prefix after admission, the whole row after a prefill chunk.
    prefix_indices: torch.Tensor = field(default_factory=lambda: torch.empty(0, dtype=torch.int64))
    last_node: TreeNode | None = None
    cache_protected_len: int = 0
    kv_len: int = 0

    @property
    def all_ids(self) -> list[int]:
        return self.origin_input_ids + self.output_ids
