"""The whole benchmark suite in miniature, on the CPU: gloo, tiny models, about a minute on a laptop.

Runs every ``bench/bench_*.py`` with ``--cpu`` (small sizes, float32, two gloo ranks where the
benchmark needs two) and writes their results files with device ``cpu``. The numbers measure
Python and the CPU, not a GPU: they show the code paths and the shape of each table, and let
a reader without a GPU rerun the chapter's pipeline end to end.

    python bench/bench_cpu.py                  # all of them
    python bench/bench_cpu.py decode radix     # some of them
"""
from __future__ import annotations

import importlib
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
sys.path.insert(0, str(Path(__file__).resolve().parent))

BENCHMARKS = ("allreduce", "decode", "vs_transformers", "tp_scaling", "radix", "tknp")


def main(argv: list[str] | None = None) -> dict[str, float]:
    names = list(argv or BENCHMARKS)
    unknown = [n for n in names if n not in BENCHMARKS]
    if unknown:
        raise SystemExit(f"unknown benchmarks {unknown}; choose from {list(BENCHMARKS)}")
    seconds = {}
    start = time.perf_counter()
    for name in names:
        print(f"\n===== bench_{name} --cpu")
        t0 = time.perf_counter()
        extra = ["--max-bytes", str(256 << 10)] if name == "allreduce" else []
        importlib.import_module(f"bench_{name}").main(["--cpu", *extra])
        seconds[name] = time.perf_counter() - t0
    print(f"\nCPU miniature suite: {time.perf_counter() - start:.0f} s "
          + ", ".join(f"{n} {s:.0f} s" for n, s in seconds.items()))
    return seconds


if __name__ == "__main__":
    main(sys.argv[1:])
