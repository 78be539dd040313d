"""Bus-bandwidth formula values, and the all-reduce sweep from launch() and from torchrun (no timing assertions)."""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hybridpar.distributed.bandwidth import (
    BandwidthResult,
    algbw,
    all_reduce_sweep,
    bus_factor,
    busbw,
    format_results,
    format_size,
    parse_size,
)

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("collective, n, factor", [
    ("all_reduce", 1, 0.0), ("all_reduce", 2, 1.0), ("all_reduce", 4, 1.5), ("all_reduce", 8, 1.75),
    ("all_gather", 2, 0.5), ("all_gather", 4, 0.75), ("reduce_scatter", 8, 0.875),
    ("broadcast", 8, 1.0), ("reduce", 3, 1.0),
])
def test_bus_factor(collective, n, factor):
    assert bus_factor(collective, n) == pytest.approx(factor)


def test_bandwidths():
    # 1 GB all-reduced over 8 ranks in 10 ms: algbw 100 GB/s; each rank moved 2*7/8 GB: busbw 175 GB/s
    assert algbw(1e9, 0.01) == pytest.approx(100e9)
    assert busbw("all_reduce", 1e9, 0.01, 8) == pytest.approx(175e9)
    r = BandwidthResult("all_gather", "nccl", 4, 2**20, 1e-3)
    assert r.algbw == pytest.approx(2**20 / 1e-3) and r.busbw == pytest.approx(0.75 * r.algbw)


def test_bad_input_names_the_fix():
    with pytest.raises(ValueError, match="known: "):
        bus_factor("all_to_all_v", 4)
    with pytest.raises(ValueError, match="world_size"):
        bus_factor("all_reduce", 0)
    with pytest.raises(ValueError, match="seconds must be > 0"):
        algbw(10, 0)
    with pytest.raises(ValueError, match="multiples of 4"):
        all_reduce_sweep([6])  # rejected before any rank starts


def test_sizes_and_table():
    assert [parse_size(s) for s in ("4096", "64K", "1M", "2g")] == [4096, 65536, 2**20, 2 * 2**30]
    assert format_size(65536) == "64 KiB" and format_size(100) == "100 B"
    table = format_results([BandwidthResult("all_reduce", "gloo", 2, 2**20, 1e-3)])
    assert "all_reduce on 2 ranks (gloo)" in table and "1 MiB" in table and "1.049" in table


def test_sweep_on_two_gloo_ranks():
    results = all_reduce_sweep([4096, 65536], nprocs=2, backend="gloo", iters=2, warmup=1)
    assert [r.size_bytes for r in results] == [4096, 65536]
    assert all(r.backend == "gloo" and r.world_size == 2 and r.seconds > 0 for r in results)
    assert all(r.busbw == pytest.approx(r.algbw) for r in results)  # factor 2(n-1)/n = 1 for n = 2


def test_cli_under_torchrun():
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT", "TORCHELASTIC_RUN_ID")}
    env.update(PYTHONPATH=str(ROOT), HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
         "-m", "hybridpar.distributed.bandwidth", "-b", "4K", "-e", "16K", "--iters", "2"],
        cwd=ROOT, env=env, capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    backend = "nccl" if torch.cuda.device_count() >= 2 else "gloo"
    lines = proc.stdout.splitlines()
    assert lines[0] == f"all_reduce on 2 ranks ({backend})"  # printed once, by rank 0
    assert [line.split()[0] for line in lines[2:]] == ["4", "16"]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_sweep_on_two_gpus():
    results = all_reduce_sweep([2**20, 2**24], nprocs=2, backend="nccl", iters=5)
    assert all(r.backend == "nccl" and r.busbw > 0 for r in results)


def test_plot_bandwidth():
    from hybridpar.viz.bandwidth_plot import plot_bandwidth

    results = [BandwidthResult("all_reduce", "gloo", 4, 2**k, 1e-4 + 2**k / 1e9) for k in (10, 14, 18)]
    ax = plot_bandwidth(results)
    busbw, algbw = ax.get_lines()
    assert list(busbw.get_ydata()) == pytest.approx([r.busbw / 1e9 for r in results])
    assert list(algbw.get_ydata()) == pytest.approx([r.algbw / 1e9 for r in results])
    with pytest.raises(ValueError, match="no results"):
        plot_bandwidth([])
