"""A cost model of one decode step under TP, DP and TKNP, built from measured component costs.

Every piece of a decode step moves bytes, so each is modelled as a fixed cost plus bytes over an
effective bandwidth, :class:`LinearCost` ``t(bytes) = latency + bytes / bandwidth``, fitted to a
few timed sizes (:func:`fit_linear`):

* ``gemm``: one projection reading ``W`` bytes of weights (decode GEMMs are memory-bound up to
  about 200 tokens on Hopper);
* ``attention``: one layer's decode attention over ``K + V`` bytes of cache (the backend's
  gather, mask and softmax included);
* ``all_reduce``: one all-reduce of the hidden state (TP);
* ``scatter`` / ``gather``: TKNP's per-layer exchange of packed Q/K/V and of attention outputs;
* ``overhead``: host time per layer that no kernel covers (eager launches, Python), one number
  per strategy, calibrated from one measured step (:func:`calibrate_overhead`).

A step of ``B`` requests of ``ctx`` tokens on ``g`` GPUs (:class:`StepShape`, shapes from
:class:`~hybridpar.roofline.ModelShape`) is then, per layer (``L`` layers), plus the LM head:

==============  =========================================================================
TP ``g``        ``4 gemm(W_l / g) + attn(B ctx kv_l / g) + 2 all_reduce_g(B h b) + overhead``
DP ``g``        the TP-1 step of ``B / g`` requests (the replicas run side by side)
TKNP ``k``      ``4 gemm(W_l) + scatter((k-1)/k B (Hq + 2 Hkv) d b) + attn(B/k ctx kv_l)``
                ``+ gather((k-1)/k B Hq d b) + overhead``
TP ``t`` x      TKNP ``k = g / t`` over ``1/t`` of the heads and weights, plus TP's
TKNP ``k``      ``2 all_reduce_t(B h b)`` among the ``t`` roots
==============  =========================================================================

(the four GEMMs are QKV, O, gate/up, down; ``W_l`` a layer's weight bytes, ``kv_l`` a layer's
KV bytes per token). Throughput is ``B / step``. Where TKNP can win follows from the table: it
pays a full-model GEMM on one GPU and two exchanges per layer, and saves nothing on attention
bytes over TP (both split the KV two ways); it wins over DP only on memory (one weight copy) and
over TP only when TP must *replicate* KV heads (``g > Hkv``), which the formula shows through
``kv_l / g`` becoming ``kv_l / Hkv``. An all-reduce's cost depends on its group size, so
:class:`ComponentCosts` can hold one fit per size (``all_reduce_by_size``).

Pure arithmetic; the measurements come from ``bench/bench_tknp.py``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field, replace

from hybridpar.roofline import ModelShape

STRATEGIES = ("tp", "dp", "tknp")


@dataclass(frozen=True)
class LinearCost:
    """``seconds(nbytes) = latency + nbytes / bandwidth`` (bandwidth in bytes/s)."""

    latency: float
    bandwidth: float

    def __call__(self, nbytes: float) -> float:
        return self.latency + nbytes / self.bandwidth


def fit_linear(sizes: Sequence[float], seconds: Sequence[float]) -> LinearCost:
    """Least-squares fit of ``t = latency + bytes / bandwidth`` (latency clamped at >= 0).

    Needs at least two distinct sizes. Timings that do not grow with size (a latency-bound piece,
    or noise) give a constant: the mean time and an infinite bandwidth.
    """
    if len(sizes) != len(seconds) or len(set(sizes)) < 2:
        raise ValueError("fit_linear needs at least two distinct sizes, one time per size")
    n = len(sizes)
    mx, my = sum(sizes) / n, sum(seconds) / n
    sxx = sum((x - mx) ** 2 for x in sizes)
    slope = sum((x - mx) * (y - my) for x, y in zip(sizes, seconds)) / sxx
    if slope <= 0:
        return LinearCost(my, float("inf"))
    return LinearCost(max(my - slope * mx, 0.0), 1.0 / slope)


@dataclass(frozen=True)
class ComponentCosts:
    """Fitted costs of the pieces of a step (see the module docstring); ``overhead`` per strategy, per layer."""

    gemm: LinearCost
    attention: LinearCost
    all_reduce: LinearCost
    scatter: LinearCost
    gather: LinearCost
    overhead: dict[str, float]
    all_reduce_by_size: dict[int, LinearCost] = field(default_factory=dict)

    def all_reduce_for(self, group_size: int) -> LinearCost:
        """The all-reduce fit of a group of ``group_size`` ranks (``all_reduce`` when none was measured)."""
        return self.all_reduce_by_size.get(group_size, self.all_reduce)

    def with_overhead(self, overhead: dict[str, float]) -> ComponentCosts:
        return replace(self, overhead=dict(overhead))


@dataclass(frozen=True)
class StepShape:
    """One decode step: ``batch`` requests of ``context`` tokens on ``num_gpus`` GPUs, ``bytes_per_elem`` per value.

    ``tensor_parallel_size``: TKNP only, the TP size ``t`` of TP ``t`` x TKNP ``num_gpus / t``.
    """

    batch: int
    context: int
    num_gpus: int = 2
    bytes_per_elem: int = 2
    tensor_parallel_size: int = 1


def config_key(strategy: str, step: StepShape) -> str:
    """The name a configuration's overhead is kept under: ``tp``, ``dp``, ``tknp`` or ``tknp-tp2`` (TP 2 x TKNP)."""
    t = step.tensor_parallel_size
    return f"{strategy}-tp{t}" if strategy == "tknp" and t > 1 else strategy


def split_sizes(strategy: str, step: StepShape) -> tuple[int, int]:
    """``(tp, ways)``: the TP size of the step's GEMMs and how many ways its batch is split for attention."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    g, t = step.num_gpus, step.tensor_parallel_size
    if strategy == "tp":
        return g, 1
    if strategy == "dp":
        return 1, g
    if t < 1 or g % t or g // t < 2:
        raise ValueError(f"TKNP on {g} GPUs needs tensor_parallel_size dividing {g} with at least 2 token-parallel "
                         f"ranks, got {t}")
    return t, g // t


def layer_weight_bytes(shape: ModelShape, tp: int = 1, b: int = 2) -> float:
    """Weight bytes of one layer's four projections on one TP-``tp`` rank."""
    h, d = shape.hidden_size, shape.head_dim
    kv_heads = max(shape.num_kv_heads // tp, 1)
    qkv = h * (shape.num_heads // tp + 2 * kv_heads) * d
    return (qkv + shape.num_heads // tp * d * h + 3 * h * shape.intermediate_size // tp) * b


def layer_kv_bytes_per_token(shape: ModelShape, tp: int = 1, b: int = 2) -> float:
    """K + V bytes of one layer, one token, on one TP-``tp`` rank (one KV head at least: replication)."""
    return 2 * max(shape.num_kv_heads // tp, 1) * shape.head_dim * b


def lm_head_bytes(shape: ModelShape, tp: int = 1, b: int = 2) -> float:
    return shape.vocab_size * shape.hidden_size * b / tp


def step_components(strategy: str, shape: ModelShape, step: StepShape, costs: ComponentCosts) -> dict[str, float]:
    """Predicted seconds of one step, by component (``qkv``, ``scatter``, ``attention``, ``gather``,
    ``o_mlp``, ``all_reduce``, ``lm_head``, ``overhead``); their sum is the step."""
    tp, ways = split_sizes(strategy, step)
    b, batch, ctx, layers = step.bytes_per_elem, step.batch, step.context, shape.num_layers
    if batch % ways:
        raise ValueError(f"batch {batch} must split evenly over {ways} {strategy.upper()} ranks")
    local_batch = batch // ways
    h, d = shape.hidden_size, shape.head_dim
    kv_heads = max(shape.num_kv_heads // tp, 1)
    qkv_bytes = h * (shape.num_heads // tp + 2 * kv_heads) * d * b
    rest_bytes = layer_weight_bytes(shape, tp, b) - qkv_bytes
    out = {
        "qkv": layers * costs.gemm(qkv_bytes),
        "o_mlp": layers * 3 * costs.gemm(rest_bytes / 3),
        "attention": layers * costs.attention(local_batch * ctx * layer_kv_bytes_per_token(shape, tp, b)),
        "lm_head": costs.gemm(lm_head_bytes(shape, tp, b)),
        "all_reduce": 0.0, "scatter": 0.0, "gather": 0.0,
        "overhead": layers * costs.overhead.get(config_key(strategy, step), 0.0),
    }
    if strategy != "dp" and tp > 1:
        out["all_reduce"] = layers * 2 * costs.all_reduce_for(tp)(batch * h * b)
    if strategy == "tknp":
        remote = batch - local_batch
        out["scatter"] = layers * costs.scatter(remote * (shape.num_heads // tp + 2 * kv_heads) * d * b)
        out["gather"] = layers * costs.gather(remote * shape.num_heads // tp * d * b)
    return out


def predict_step(strategy: str, shape: ModelShape, step: StepShape, costs: ComponentCosts) -> float:
    """Predicted seconds of one decode step (DP: one replica's step over its ``B / g`` requests)."""
    return sum(step_components(strategy, shape, step, costs).values())


def predict_throughput(strategy: str, shape: ModelShape, step: StepShape, costs: ComponentCosts) -> float:
    """Predicted tokens/s of the whole deployment: ``B / step`` (DP's replicas run in parallel)."""
    return step.batch / predict_step(strategy, shape, step, costs)


def calibrate_overhead(strategy: str, shape: ModelShape, step: StepShape, costs: ComponentCosts,
                       measured_s: float) -> float:
    """The per-layer host overhead that makes the model match one measured step (>= 0)."""
    zero = costs.with_overhead({**costs.overhead, config_key(strategy, step): 0.0})
    return max((measured_s - predict_step(strategy, shape, step, zero)) / shape.num_layers, 0.0)


def relative_error(predicted: float, measured: float) -> float:
    """``(predicted - measured) / measured``."""
    return (predicted - measured) / measured
