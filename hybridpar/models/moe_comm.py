"""Communication volume of one MoE layer: tensor-parallel experts versus expert parallelism (counted bytes).

Per MoE layer and forward pass of ``T`` tokens (hidden size ``h``, ``b`` bytes per element, top-``k``):

* **TP experts** (:class:`~hybridpar.layers.fused_moe.FusedMoE` without an EP group): one all-reduce
  of ``[T, h]`` over the TP group. A ring all-reduce sends ``2 (tp-1)/tp * T h b`` bytes per rank.
* **EP** over an EP group of ``ep`` ranks whose ``tp`` token owners each route ``T/tp`` tokens:
  dispatch sends each (token, choice) row whose expert lives elsewhere, and the combine sends each
  result back to where its row came from. With uniform routing an owner sends
  ``k T (ep + tp - 2) / (ep tp) * h b`` bytes (its rows out, others' results back), a rank that owns
  no token (a TKNP non-root) ``k T / ep * h b`` (results only). hybridpar then still does the one
  all-reduce (the shared expert is TP-sharded and every TP rank needs all ``T`` outputs), so EP
  *adds* the all-to-all to the same all-reduce.

On volume alone the all-to-all beats the all-reduce it could replace when its busiest rank sends
less; for EP over TP (``ep = tp = n``) the ratio is ``k / n``: EP moves less than TP experts once
the EP group is larger than top-k, and ties at ``n = k``. :func:`crossover_table` lays
this out; :func:`counted_volume` counts the same bytes from the dispatches a real run recorded, which
differ from the uniform estimate by the routing's imbalance.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from hybridpar.layers.moe_dispatch import DispatchRecord


def all_reduce_bytes(payload_bytes: int, n: int) -> int:
    """Bytes one rank sends in a ring all-reduce of ``payload_bytes`` over ``n`` ranks."""
    return 2 * (n - 1) * payload_bytes // n


@dataclass(frozen=True)
class MoeCommVolume:
    """Bytes sent per rank by one MoE layer's collectives in one forward pass."""

    label: str
    all_reduce: int  # per token-owning (TP) rank
    all_to_all: tuple[int, ...]  # per EP rank (empty for TP experts)

    @property
    def max_per_rank(self) -> int:
        return self.all_reduce + max(self.all_to_all, default=0)


def tp_experts_volume(tokens: int, hidden: int, tp: int, element_size: int = 4) -> MoeCommVolume:
    return MoeCommVolume(f"TP experts, TP {tp}", all_reduce_bytes(tokens * hidden * element_size, tp), ())


def expected_ep_volume(tokens: int, hidden: int, top_k: int, tp: int, ep: int, element_size: int = 4) -> MoeCommVolume:
    """Uniform routing: the bytes each EP rank sends (owners first, then the ranks that own no token)."""
    row = hidden * element_size
    owner, other = a2a_rows_per_token(top_k, tp, ep)
    sends = (round(owner * tokens * row),) * tp + (round(other * tokens * row),) * (ep - tp)
    return MoeCommVolume(f"EP {ep} over TP {tp}", all_reduce_bytes(tokens * row, tp), sends)


def a2a_rows_per_token(top_k: int, tp: int, ep: int) -> tuple[float, float]:
    """Rows an owner / a non-owner sends per token of the batch (dispatch + combine, uniform routing)."""
    return top_k * (ep + tp - 2) / (ep * tp), top_k / ep


def counted_volume(step: Sequence[DispatchRecord], tp: int, label: str = "") -> MoeCommVolume:
    """The bytes one recorded dispatch (one :class:`DispatchRecord` per EP rank, same layer and step) moved."""
    tokens = sum(r.tokens for r in step)
    first = step[0]
    return MoeCommVolume(label or f"EP {len(step)} over TP {tp} (counted)",
                         all_reduce_bytes(tokens * first.hidden_size * first.element_size, tp),
                         tuple(r.bytes_sent() for r in step))


def crossover_table(top_k: int, sizes: Sequence[tuple[int, int]] = ((2, 2), (4, 4), (8, 8), (2, 4), (2, 8), (4, 8))
                    ) -> list[dict[str, float]]:
    """Per (tp, ep), in rows per token of the batch: the busiest rank's all-to-all and the all-reduce
    (ratio < 1: EP's exchange is lighter than the all-reduce it could replace)."""
    rows = []
    for tp, ep in sizes:
        a2a = a2a_rows_per_token(top_k, tp, ep)[0]  # an owner is the busiest rank (ep >= 2)
        ar = 2 * (tp - 1) / tp
        rows.append({"tp": tp, "ep": ep, "all_to_all": a2a, "all_reduce": ar,
                     "ratio": a2a / ar if ar else float("inf")})
    return rows
