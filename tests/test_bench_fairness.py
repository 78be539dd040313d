"""The comparison harness warms every side alike and reports median and spread (hybridpar.bench.time_sides)."""
from __future__ import annotations

import sys
from pathlib import Path

from hybridpar.bench import time_sides


def test_time_sides_warms_every_side_equally_and_times_in_turns() -> None:
    calls: list[str] = []
    sides = {name: (lambda name=name: calls.append(name)) for name in ("transformers", "static", "hybridpar")}
    out = time_sides(sides, "cpu", warmup=2, runs=3)
    assert [t.warmups for t in out.values()] == [2, 2, 2]
    assert [len(t.samples) for t in out.values()] == [3, 3, 3]
    # warm-ups first (each side its own), then the timed runs take turns
    assert calls[:6] == ["transformers"] * 2 + ["static"] * 2 + ["hybridpar"] * 2
    assert calls[6:] == ["transformers", "static", "hybridpar"] * 3
    lo, hi = out["static"].spread
    assert lo <= out["static"].median <= hi


def test_time_sides_reports_a_failing_side_and_times_the_others() -> None:
    def broken() -> None:
        raise RuntimeError("no static cache here")

    out = time_sides({"broken": broken, "ok": lambda: None}, "cpu", warmup=1, runs=2)
    assert out["broken"].error == "RuntimeError: no static cache here" and out["broken"].samples == []
    assert out["ok"].error is None and len(out["ok"].samples) == 2


def test_bench_vs_transformers_times_both_transformers_setups_after_equal_warmup(world_of_one) -> None:
    """The benchmark's own worker, on the CPU with a tiny model: every side of every batch gets the same
    number of warm-up calls and timed runs, and both transformers set-ups are among them."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    import bench_vs_transformers as bvt

    rows = bvt.worker(["qwen2-tiny"], 2, 4, 3, "float32", True, warmup=1, runs=2)
    timed = [r for r in rows if "engine" in r and "warmups" in r]
    assert {(r["batch"], r["engine"]) for r in timed} == {
        (1, "transformers"), (1, "transformers static+compile"), (1, "hybridpar generate"),
        (2, "transformers"), (2, "transformers static+compile"), (2, "hybridpar generate"), (2, "hybridpar server")}
    assert all(r["warmups"] == 1 and r["runs"] == 2 and "error" not in r for r in timed), timed
    assert all(r["min_s"] <= r["seconds"] <= r["max_s"] for r in timed)
