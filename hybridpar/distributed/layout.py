"""The rank layout: which global ranks form the TP, PP, DP, TKNP and external-DP groups (pure data).

:func:`compute_layout` takes the world size and the parallel sizes and returns a
:class:`RankLayout`; no processes, no ``torch.distributed``, so the book prints these tables and
the tests assert them exactly. :mod:`hybridpar.distributed.parallel_state` turns a layout into
real process groups.

Rank layout (TP innermost, so a TP group is a run of consecutive ranks)::

    rank = ((e * D + d) * PP + p) * TP + t

with ``e`` the external-DP index, ``d`` the DP index -- or the TKNP index when token parallelism
is on (DP and TKNP are mutually exclusive) -- ``p`` the pipeline stage and ``t`` the TP rank. The
group of a dimension is the set of ranks that differ only in that dimension's index.
``external_dp`` soaks up the ranks left over: ``world_size // (tp * pp * dp * tknp)`` independent
replicas.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hybridpar.config import ParallelConfig, ParallelConfigError

DIMENSIONS = ("tp", "pp", "dp", "tknp", "external_dp")


# --------------------------------------------------------------------------- layout


@dataclass(frozen=True)
class RankLayout:
    """Which global ranks form each process group (pure data, no processes).

    ``groups[name]`` lists the groups of dimension ``name`` (one of
    ``"tp", "pp", "dp", "tknp", "external_dp"``); the groups of one dimension
    partition ``range(world_size)``. Disabled dimensions have singleton groups.
    """

    world_size: int
    tensor_parallel_size: int
    pipeline_parallel_size: int
    data_parallel_size: int
    token_parallel_size: int
    external_dp_size: int
    enable_token_parallel: bool
    groups: dict[str, list[list[int]]] = field(repr=False)

    @property
    def _shape(self) -> tuple[int, int, int, int]:
        middle = self.token_parallel_size if self.enable_token_parallel else self.data_parallel_size
        return (self.external_dp_size, middle, self.pipeline_parallel_size, self.tensor_parallel_size)

    def coords(self, rank: int) -> dict[str, int]:
        """Index of ``rank`` along every dimension, e.g. ``{"tp": 1, "pp": 0, ...}``."""
        if not 0 <= rank < self.world_size:
            raise ValueError(f"rank {rank} is outside the world [0, {self.world_size})")
        e_size, d_size, p_size, t_size = self._shape
        t = rank % t_size
        p = rank // t_size % p_size
        d = rank // (t_size * p_size) % d_size
        e = rank // (t_size * p_size * d_size)
        return {
            "tp": t,
            "pp": p,
            "dp": 0 if self.enable_token_parallel else d,
            "tknp": d if self.enable_token_parallel else 0,
            "external_dp": e,
        }

    def group_of(self, name: str, rank: int) -> list[int]:
        """The group of dimension ``name`` that contains ``rank``."""
        for ranks in self.groups[name]:
            if rank in ranks:
                return ranks
        raise ValueError(f"rank {rank} is outside the world [0, {self.world_size})")

    def table(self) -> str:
        """ASCII table: one row per rank with its index along each dimension, then the groups."""
        middle = "tknp" if self.enable_token_parallel else "dp"
        columns = ["rank", "external_dp", middle, "pp", "tp"]
        widths = [max(len(c), len(str(self.world_size - 1))) for c in columns]
        sizes = dict(zip(columns[1:], self._shape))
        title = (
            f"RankLayout: world_size={self.world_size} = "
            + " x ".join(f"{name}={size}" for name, size in sizes.items())
        )
        lines = [title, " | ".join(c.rjust(w) for c, w in zip(columns, widths))]
        lines.append("-+-".join("-" * w for w in widths))
        for rank in range(self.world_size):
            c = self.coords(rank)
            row = [rank] + [c[name] for name in columns[1:]]
            lines.append(" | ".join(str(v).rjust(w) for v, w in zip(row, widths)))
        pad = max(len(name) for name in DIMENSIONS)
        for name in DIMENSIONS:
            lines.append(f"{name.ljust(pad)} groups: " + " ".join(str(g) for g in self.groups[name]))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()


def _groups_along(shape: tuple[int, ...], axis: int) -> list[list[int]]:
    """Groups of row-major ranks of ``shape`` that vary only along ``axis``."""
    strides = [1] * len(shape)
    for i in range(len(shape) - 2, -1, -1):
        strides[i] = strides[i + 1] * shape[i + 1]
    others = [range(n) if i != axis else range(1) for i, n in enumerate(shape)]
    groups = []
    for index in itertools.product(*others):
        base = sum(i * s for i, s in zip(index, strides))
        groups.append([base + a * strides[axis] for a in range(shape[axis])])
    return groups


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def compute_layout(
    world_size: int,
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    token_parallel_size: int = 1,
    data_parallel_size: int = 1,
    enable_token_parallel: bool | None = None,
) -> RankLayout:
    """Lay ``world_size`` ranks out as ExternalDP x (DP | TKNP) x PP x TP. Pure function.

    Raises :class:`ParallelConfigError` (naming the fix) on invalid sizes.
    """
    config = ParallelConfig(
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        data_parallel_size=data_parallel_size,
        token_parallel_size=token_parallel_size,
        enable_token_parallel=enable_token_parallel,
    ).validate()
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ParallelConfigError(f"world_size must be an int >= 1, got {world_size!r}.")
    product = config.world_size
    if world_size % product:
        raise ParallelConfigError(
            f"world_size={world_size} is not divisible by tp*pp*dp*tknp = "
            f"{tensor_parallel_size}*{pipeline_parallel_size}*{data_parallel_size}*{token_parallel_size}"
            f" = {product}; launch a multiple of {product} ranks "
            f"({product}, {2 * product}, ...), or pick sizes whose product divides {world_size} "
            f"(one of {_divisors(world_size)})."
        )
    tknp_on = config.token_parallel_enabled
    external = world_size // product
    middle = token_parallel_size if tknp_on else data_parallel_size
    shape = (external, middle, pipeline_parallel_size, tensor_parallel_size)
    singletons = [[r] for r in range(world_size)]
    groups = {
        "tp": _groups_along(shape, 3),
        "pp": _groups_along(shape, 2),
        "dp": singletons if tknp_on else _groups_along(shape, 1),
        "tknp": _groups_along(shape, 1) if tknp_on else [list(g) for g in singletons],
        "external_dp": _groups_along(shape, 0),
    }
    return RankLayout(
        world_size=world_size,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        data_parallel_size=data_parallel_size,
        token_parallel_size=token_parallel_size,
        external_dp_size=external,
        enable_token_parallel=tknp_on,
        groups=groups,
    )
