"""Collective bandwidth: the bus-bandwidth formula, and a measured all-reduce sweep.

Two numbers describe a timed collective on ``n`` ranks moving a tensor of ``S`` bytes in ``t`` seconds
(the conventions of NVIDIA's nccl-tests, so results compare with theirs):

* **algorithm bandwidth** ``algbw = S / t``: what the caller sees;
* **bus bandwidth** ``busbw = algbw * factor(n)``: the bytes each rank actually puts on its link
  per second, for the best (ring) algorithm. It is comparable with the link's peak bandwidth
  whatever ``n`` is, which ``algbw`` is not.

The factors (``S`` is the size of the *full* tensor: the all-reduce input, the all-gather output,
the reduce-scatter input):

==================  ===============  ===================================================
collective          factor           why (ring algorithm)
==================  ===============  ===================================================
all_reduce          ``2 (n-1) / n``  a reduce-scatter then an all-gather: each rank sends
                                     ``n-1`` chunks of ``S/n`` in each of the two phases
all_gather          ``(n-1) / n``    each rank receives the ``n-1`` chunks it lacks
reduce_scatter      ``(n-1) / n``    each rank sends ``n-1`` partial chunks
broadcast, reduce   ``1``            a pipelined chain forwards all ``S`` bytes once
==================  ===============  ===================================================

Run the sweep from Python with :func:`all_reduce_sweep` (it starts the ranks with
:func:`~hybridpar.distributed.launcher.launch`), or from a shell, like nccl-tests::

    python -m hybridpar.distributed.bandwidth --nprocs 2                     # starts its own ranks
    torchrun --nproc-per-node 2 -m hybridpar.distributed.bandwidth          # ranks started by torchrun
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridpar.distributed.launcher import BACKENDS, current_device, is_torchrun, launch, run_torchrun

BUS_COLLECTIVES = ("all_reduce", "all_gather", "reduce_scatter", "broadcast", "reduce")
DEFAULT_SIZES = tuple(4 ** k * 1024 for k in range(8))  # 1 KiB .. 16 MiB


def bus_factor(collective: str, world_size: int) -> float:
    """The factor that turns algorithm bandwidth into bus bandwidth for ``collective`` on ``world_size`` ranks."""
    if collective not in BUS_COLLECTIVES:
        raise ValueError(f"no bus-bandwidth factor for {collective!r}; known: {list(BUS_COLLECTIVES)}")
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be an int >= 1, got {world_size!r}")
    n = world_size
    if collective == "all_reduce":  # reduce-scatter, then all-gather: n-1 chunks of S/n sent in each
        return 2 * (n - 1) / n
    if collective in ("all_gather", "reduce_scatter"):  # n-1 chunks of S/n sent (or received)
        return (n - 1) / n
    return 1.0  # broadcast, reduce: a pipelined chain forwards all S bytes once


def algbw(size_bytes: float, seconds: float) -> float:
    """Algorithm bandwidth in bytes/s: the full tensor's size over the time of one collective."""
    if seconds <= 0:
        raise ValueError(f"seconds must be > 0, got {seconds!r}")
    return size_bytes / seconds


def busbw(collective: str, size_bytes: float, seconds: float, world_size: int) -> float:
    """Bus bandwidth in bytes/s: ``algbw * bus_factor(collective, world_size)``."""
    return algbw(size_bytes, seconds) * bus_factor(collective, world_size)


@dataclass(frozen=True)
class BandwidthResult:
    """One timed size: ``seconds`` per collective, the slowest rank's average over the timed iterations."""

    collective: str
    backend: str
    world_size: int
    size_bytes: int
    seconds: float

    @property
    def algbw(self) -> float:
        return algbw(self.size_bytes, self.seconds)

    @property
    def busbw(self) -> float:
        return busbw(self.collective, self.size_bytes, self.seconds, self.world_size)


def _synchronize() -> None:
    if dist.get_backend() == "nccl":
        torch.cuda.synchronize()


def _all_reduce_sweep_worker(sizes: Sequence[int], iters: int, warmup: int) -> list[BandwidthResult]:
    """Runs on every rank: time an in-place float32 all-reduce per size; every rank returns the same results."""
    device = current_device()
    results = []
    for size in sizes:
        x = torch.zeros(size // 4, dtype=torch.float32, device=device)  # zeros: the sum never overflows
        for _ in range(warmup):
            dist.all_reduce(x)
        _synchronize()
        dist.barrier()
        start = time.perf_counter()
        for _ in range(iters):
            dist.all_reduce(x)
        _synchronize()
        elapsed = torch.tensor([(time.perf_counter() - start) / iters], dtype=torch.float64, device=device)
        dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # a collective is as slow as its slowest rank
        results.append(BandwidthResult("all_reduce", str(dist.get_backend()), dist.get_world_size(), size,
                                       elapsed.item()))
    return results


def _check_sweep(sizes: Sequence[int], iters: int, warmup: int) -> list[int]:
    sizes = [int(s) for s in sizes]
    if not sizes or any(s < 4 or s % 4 for s in sizes):
        raise ValueError(f"sizes must be a non-empty list of byte counts that are multiples of 4 (float32), "
                         f"got {sizes}")
    if iters < 1 or warmup < 0:
        raise ValueError(f"iters must be >= 1 and warmup >= 0, got iters={iters}, warmup={warmup}")
    return sizes


def all_reduce_sweep(
    sizes: Sequence[int] = DEFAULT_SIZES,
    nprocs: int = 2,
    backend: str = "gloo",
    iters: int = 10,
    warmup: int = 2,
    timeout: float = 300.0,
) -> list[BandwidthResult]:
    """Launch ``nprocs`` ranks and time ``dist.all_reduce`` for each size in bytes (float32 tensors).

    Every rank times the same loop; each result keeps the slowest rank's average time.
    """
    sizes = _check_sweep(sizes, iters, warmup)
    return launch(_all_reduce_sweep_worker, nprocs, sizes, iters, warmup, backend=backend, timeout=timeout)[0]


def format_size(n: float) -> str:
    """``64 KiB``-style binary size (collective sizes are powers of two)."""
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:g} {unit}"
    return f"{n:g} B"


def format_results(results: Sequence[BandwidthResult]) -> str:
    """A plain-text table like nccl-tests': size, time, algbw and busbw in GB/s."""
    if not results:
        return "(no results)"
    first = results[0]
    lines = [f"{first.collective} on {first.world_size} ranks ({first.backend})",
             f"{'size':>10} {'time (us)':>11} {'algbw (GB/s)':>13} {'busbw (GB/s)':>13}"]
    for r in results:
        lines.append(f"{format_size(r.size_bytes):>10} {r.seconds * 1e6:>11.1f} "
                     f"{r.algbw / 1e9:>13.3f} {r.busbw / 1e9:>13.3f}")
    return "\n".join(lines)


def parse_size(text: str) -> int:
    """``"64K"``, ``"1M"``, ``"4096"`` -> bytes (K, M, G are powers of 1024)."""
    scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:].upper(), 1)
    number = text[:-1] if scale > 1 else text
    try:
        return int(float(number) * scale)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (examples: 4096, 64K, 16M)") from None


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description="Time all-reduce over a range of sizes (bus bandwidth, like nccl-tests).")
    parser.add_argument("-b", "--min-bytes", type=parse_size, default=DEFAULT_SIZES[0],
                        help="smallest size (default 1K)")
    parser.add_argument("-e", "--max-bytes", type=parse_size, default=DEFAULT_SIZES[-1],
                        help="largest size (default 16M)")
    parser.add_argument("-f", "--factor", type=int, default=4,
                        help="multiply the size by this between steps (default 4)")
    parser.add_argument("--iters", type=int, default=10, help="timed iterations per size (default 10)")
    parser.add_argument("--warmup", type=int, default=2, help="untimed iterations first (default 2)")
    parser.add_argument("--nprocs", type=int, default=2, help="ranks to start (ignored under torchrun)")
    parser.add_argument("--backend", choices=BACKENDS, default="auto", help="ignored under torchrun")
    args = parser.parse_args(argv)
    if args.factor < 2 or args.min_bytes > args.max_bytes:
        parser.error("need --factor >= 2 and --min-bytes <= --max-bytes")
    sizes = []
    size = args.min_bytes
    while size <= args.max_bytes:
        sizes.append(size)
        size *= args.factor
    try:
        sizes = _check_sweep(sizes, args.iters, args.warmup)
    except ValueError as exc:
        parser.error(str(exc))
    if is_torchrun():
        results = run_torchrun(_all_reduce_sweep_worker, sizes, args.iters, args.warmup)
        if int(os.environ["RANK"]) == 0:  # the ranks agree on the results; one of them prints
            print(format_results(results), flush=True)
        return 0
    try:
        results = all_reduce_sweep(sizes, args.nprocs, args.backend, args.iters, args.warmup)
    except ValueError as exc:
        parser.error(str(exc))
    print(format_results(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
