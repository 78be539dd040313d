"""bench_radix's ideal speedup: the cache-off run without the prefill time that the cache's hits save."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
from bench_radix import ideal_speedup, share_of_ideal  # noqa: E402


def test_ideal_speedup_takes_the_saved_share_of_prefill_time_off_the_cache_off_run() -> None:
    # 10 s without the cache, 6 s of it in prefill steps; hits on 75 % of the prompt tokens save 4.5 s at best
    ideal = ideal_speedup(10.0, 6.0, 0.75)
    assert ideal == pytest.approx(10.0 / 5.5)
    assert ideal_speedup(10.0, 6.0, 0.0) == 1.0  # no hits, nothing to gain
    assert share_of_ideal(ideal, ideal) == pytest.approx(1.0) and share_of_ideal(1.0, ideal) == 0.0
    assert share_of_ideal(1.5, ideal) == pytest.approx(0.5 / (10.0 / 5.5 - 1))
    assert math.isnan(share_of_ideal(1.1, 1.0))
