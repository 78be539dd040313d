"""Memory accounting: weight bytes and KV-cache capacity per rank for TP, DP and TKNP.

Every rank has the same memory budget ``M`` (a GPU's memory, minus what the runtime keeps).
What it spends on weights it cannot spend on KV cache:

=============  ==================================  ============================================
strategy       weights on a rank                   KV bytes per token on a rank
=============  ==================================  ============================================
TP ``g``       ``W / g`` (heads, MLP, vocab split)  ``2 L d b * max(1, Hkv / g)``
DP ``g``       ``W`` (a full replica each)          ``2 L d b * Hkv``
TKNP ``k``     root: ``W / t``; others: ``0``       ``2 L d b * max(1, Hkv / t)`` (TP ``t`` inside)
=============  ==================================  ============================================

Which ranks store a token? Under TP every rank of the TP group stores its head-share of
*every* token, so the group caches as many distinct tokens as one of its ranks can. Under DP
and TKNP a request lives on one replica / one TKNP index, so the capacities add up. Hence:

* TKNP ``k`` versus DP ``k``: the same KV layout, but ``k - 1`` fewer copies of the weights;
* TKNP ``k`` versus TP ``k``: the same total when the KV heads split evenly (``Hkv >= k``);
  TKNP wins when TP would have to *replicate* KV heads (``k > Hkv``, common with GQA), and
  TKNP works for any ``k`` while TP needs ``k`` to divide the head counts;
* the price: one request's KV must fit on one rank (``max_request_tokens``), and the
  root, with the weights, holds fewer tokens than the attention-only ranks.

A *KV owner* is the set of ranks that together hold one token's KV: a TP group (all heads).
The distinct tokens a deployment can cache is the sum, over owners, of the smallest
capacity among the owner's ranks.

Pure arithmetic on shapes, reused by the book, the demo and the benchmarks; the shapes and
per-rank formulas come from :mod:`hybridpar.roofline`, the rank layout from
:func:`~hybridpar.distributed.parallel_state.compute_layout`.
"""

from __future__ import annotations

from dataclasses import dataclass

from hybridpar.distributed.parallel_state import compute_layout
from hybridpar.roofline import ModelShape, format_bytes, kv_bytes_per_token, weight_bytes

ROLES = ("tp", "dp", "tknp-root", "tknp-attention")


def rank_kv_tokens(budget_bytes: int, param_bytes: int, bytes_per_token: int, granularity: int = 1,
                   reserved_tokens: int = 0) -> int:
    """KV tokens a rank can hold: ``(budget - params) // bytes_per_token``, rounded down to a multiple
    of ``granularity`` (a page, or a contiguous cache row), less ``reserved_tokens`` that are paid for
    but never handed out (a paged pool's page 0); 0 when the weights alone exceed the budget."""
    if bytes_per_token <= 0 or granularity < 1 or reserved_tokens < 0:
        raise ValueError(f"bytes_per_token must be > 0, granularity >= 1 and reserved_tokens >= 0, got "
                         f"{bytes_per_token}, {granularity}, {reserved_tokens}")
    tokens = max(budget_bytes - param_bytes, 0) // bytes_per_token
    return max(tokens // granularity * granularity - reserved_tokens, 0)


@dataclass(frozen=True)
class RankMemory:
    """One rank: its role, the bytes of weights it holds, and the KV it can hold with the rest."""

    rank: int
    role: str
    param_bytes: int
    kv_bytes_per_token: int
    kv_tokens: int

    @property
    def kv_bytes(self) -> int:
        return self.kv_tokens * self.kv_bytes_per_token


@dataclass(frozen=True)
class MemoryPlan:
    """Memory of every rank of one deployment at a per-rank ``budget_bytes``.

    ``owners``: groups of ranks that together hold a token's KV (see the module docstring).
    ``error``: why the deployment is impossible (e.g. TP size does not divide the heads); then
    ``ranks`` is empty.
    """

    label: str
    tensor_parallel_size: int
    data_parallel_size: int
    token_parallel_size: int
    budget_bytes: int
    ranks: tuple[RankMemory, ...] = ()
    owners: tuple[tuple[int, ...], ...] = ()
    error: str | None = None

    @property
    def num_gpus(self) -> int:
        return self.tensor_parallel_size * self.data_parallel_size * self.token_parallel_size

    @property
    def total_param_bytes(self) -> int:
        return sum(r.param_bytes for r in self.ranks)

    def owner_tokens(self) -> list[int]:
        """Distinct tokens each owner can cache (the smallest capacity among its ranks)."""
        return [min(self.ranks[r].kv_tokens for r in owner) for owner in self.owners]

    @property
    def kv_tokens_total(self) -> int:
        """Distinct tokens of KV the whole deployment can cache at once."""
        return sum(self.owner_tokens())

    @property
    def max_request_tokens(self) -> int:
        """The longest single request that fits: its KV must live in one owner."""
        return max(self.owner_tokens(), default=0)


def plan_memory(shape: ModelShape, budget_bytes: int, tensor_parallel_size: int = 1,
                token_parallel_size: int = 1, data_parallel_size: int = 1, bytes_per_param: float = 2,
                bytes_per_elem: float = 2, param_bytes: int | None = None, granularity: int = 1,
                reserved_tokens: int = 0) -> MemoryPlan:
    """Per-rank weights and KV capacity of one deployment (rank order of ``compute_layout``).

    ``param_bytes`` overrides the weight bytes of one TP-``t`` rank (e.g. measured on a real model,
    or :func:`decoder_param_bytes`); by default :func:`hybridpar.roofline.weight_bytes`.
    ``granularity``: KV capacity is counted in whole pages / cache rows of this many tokens;
    ``reserved_tokens``: of which this many per rank are never handed out (the engine's paged pools:
    ``granularity=page_size, reserved_tokens=page_size``, as
    :func:`~hybridpar.radix.mem_pool.max_tokens_for_budget` sizes them).
    """
    tp, tknp, dp = tensor_parallel_size, token_parallel_size, data_parallel_size
    label = "x".join(f"{n}{s}" for n, s in (("TP", tp), ("DP", dp), ("TKNP", tknp)) if s > 1) or "TP1"
    try:
        layout = compute_layout(tp * tknp * dp, tensor_parallel_size=tp, token_parallel_size=tknp,
                                data_parallel_size=dp)
        per_token = int(kv_bytes_per_token(shape, tp, bytes_per_elem))
    except ValueError as exc:
        return MemoryPlan(label, tp, dp, tknp, budget_bytes, error=str(exc))
    weights = int(weight_bytes(shape, tp, bytes_per_param)) if param_bytes is None else int(param_bytes)
    ranks = []
    for rank in range(layout.world_size):
        if layout.enable_token_parallel:
            root = layout.coords(rank)["tknp"] == 0
            role, held = ("tknp-root", weights) if root else ("tknp-attention", 0)
        else:
            role, held = ("dp" if dp > 1 else "tp"), weights
        ranks.append(RankMemory(rank, role, held, per_token, rank_kv_tokens(budget_bytes, held, per_token,
                                                                            granularity, reserved_tokens)))
    owners = tuple(tuple(g) for g in layout.groups["tp"])
    return MemoryPlan(label, tp, dp, tknp, budget_bytes, tuple(ranks), owners)


def compare_strategies(shape: ModelShape, num_gpus: int, budget_bytes: int, tknp_tensor_parallel_size: int = 1,
                       bytes_per_param: float = 2, bytes_per_elem: float = 2) -> list[MemoryPlan]:
    """TP ``g``, DP ``g`` and TKNP (``t`` x ``g/t``) on the same ``g = num_gpus`` GPUs."""
    t = tknp_tensor_parallel_size
    if num_gpus % t or num_gpus // t < 2:
        raise ValueError(f"num_gpus={num_gpus} must be a multiple of tknp_tensor_parallel_size={t} "
                         f"with at least 2 token-parallel ranks")
    common = dict(bytes_per_param=bytes_per_param, bytes_per_elem=bytes_per_elem)
    return [
        plan_memory(shape, budget_bytes, tensor_parallel_size=num_gpus, **common),
        plan_memory(shape, budget_bytes, data_parallel_size=num_gpus, **common),
        plan_memory(shape, budget_bytes, tensor_parallel_size=t, token_parallel_size=num_gpus // t, **common),
    ]


def format_memory_table(plans: list[MemoryPlan]) -> str:
    """One row per rank of every plan, then a per-plan summary (totals, longest request)."""
    lines = [f"{'plan':<12} {'rank':>4} {'role':<15} {'weights':>10} {'KV B/token':>10} {'KV tokens':>11}"]
    for plan in plans:
        if plan.error:
            lines.append(f"{plan.label:<12} {'-':>4} impossible: {plan.error}")
            continue
        for r in plan.ranks:
            lines.append(f"{plan.label:<12} {r.rank:>4} {r.role:<15} {format_bytes(r.param_bytes):>10} "
                         f"{r.kv_bytes_per_token:>10} {r.kv_tokens:>11,}")
    lines.append("")
    lines.append(f"{'plan':<12} {'weights (all GPUs)':>18} {'distinct KV tokens':>19} {'longest request':>16}")
    for plan in plans:
        if not plan.error:
            lines.append(f"{plan.label:<12} {format_bytes(plan.total_param_bytes):>18} "
                         f"{plan.kv_tokens_total:>19,} {plan.max_request_tokens:>16,}")
    return "\n".join(lines)


def decoder_param_bytes(config: object, tp_size: int = 1, bytes_per_param: int = 4, vocab_padding: int = 64) -> int:
    """Exact bytes of weights one TP rank of :class:`hybridpar.models.decoder.DecoderForCausalLM` holds.

    ``config`` is a ``ModelConfig`` (or anything with its size fields). Counts what the layers
    allocate: the padded vocabulary shard, this rank's query/KV heads (one KV head when
    ``tp > num_kv_heads``), replicated norms and row-parallel biases. A TKNP root holds exactly
    this; an attention-only TKNP rank holds 0.
    """
    from hybridpar.layers.linear import qkv_partition
    from hybridpar.layers.vocab_parallel_embedding import pad_vocab_size

    c = config
    part = qkv_partition(c.num_heads, c.num_kv_heads, tp_size, 0)
    h, hd, inter = c.hidden_size, c.head_dim, c.intermediate_size // tp_size
    q, kv = part.num_heads * hd, part.num_kv_heads * hd
    attn = h * (q + 2 * kv) + q * h + (q + 2 * kv) * c.qkv_bias + h * c.o_bias + 2 * hd * c.qk_norm
    mlp = 3 * h * inter + (2 * inter + h) * c.mlp_bias
    vocab_rows = pad_vocab_size(c.vocab_size, vocab_padding, tp_size) // tp_size
    embed = vocab_rows * h * (1 if c.tie_word_embeddings else 2)
    return (c.num_layers * (attn + mlp + 2 * h) + embed + h) * bytes_per_param


def shape_of(config: object, name: str = "model") -> ModelShape:
    """The :class:`~hybridpar.roofline.ModelShape` of a ``ModelConfig`` (for :func:`plan_memory`)."""
    return ModelShape(name=name, hidden_size=config.hidden_size, intermediate_size=config.intermediate_size,
                      num_layers=config.num_layers, num_heads=config.num_heads, num_kv_heads=config.num_kv_heads,
                      head_dim=config.head_dim, vocab_size=config.vocab_size,
                      tie_word_embeddings=config.tie_word_embeddings, qkv_bias=config.qkv_bias)
