"""The chapters' opening figures (hybridpar.viz.figures): the ring's steps are a correct all-reduce, and
every figure draws the package's own numbers."""
from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

from hybridpar.roofline import HARDWARE_PRESETS, MODEL_PRESETS, decode_step_time, format_bytes  # noqa: E402
from hybridpar.viz import figures  # noqa: E402


def texts(fig: object) -> str:
    return "\n".join(t.get_text() for t in fig.axes[0].texts)


@pytest.mark.parametrize("n", [2, 3, 4, 8])
def test_ring_allreduce_ends_with_every_rank_holding_every_sum(n: int) -> None:
    steps = figures.ring_allreduce_steps(n)
    assert len(steps) == 1 + 2 * (n - 1)
    everyone = frozenset(range(n))
    middle = steps[n - 1]  # after the reduce-scatter: rank r holds the full sum of chunk r + 1
    assert [[c for c in range(n) if middle.holds[r][c] == everyone] for r in range(n)] == \
        [[(r + 1) % n] for r in range(n)]
    assert all(chunk == everyone for row in steps[-1].holds for chunk in row)
    # each step, each rank sends exactly one chunk to its right neighbour
    assert all(None not in s.sent and len(s.sent) == n for s in steps[1:])


def test_ring_needs_two_ranks() -> None:
    with pytest.raises(ValueError, match="n >= 2"):
        figures.ring_allreduce_steps(1)


def test_decode_step_figure_shows_the_roofline_numbers() -> None:
    llama, h100 = MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["h100"]
    step = decode_step_time(llama, h100, 1, 64, 1024)
    fig = figures.decode_step_figure(llama, h100, 64, 1024)
    shown = texts(fig)
    plt.close(fig)
    assert format_bytes(step.bytes_read) in shown and format_bytes(step.kv_cache_bytes) in shown
    assert "memory-bound" in shown


@pytest.mark.parametrize("draw, needles", [
    (lambda: figures.ring_allreduce_figure(3), ["rank 2", "4 steps"]),
    (lambda: figures.column_row_figure(2), ["rank 1", "f", "g"]),
    (lambda: figures.decoder_block_figure(4), ["g: all-reduce 1", "g: all-reduce 2", "t = 4"]),
    (lambda: figures.request_life_figure(), ["lock_ref += 1 (protected)", "lock_ref -= 1"]),
    (lambda: figures.tknp_pass_figure(2), ["scatter\nby request", "gather", "TKNP 2"]),
])
def test_each_figure_draws_its_mechanism(draw, needles) -> None:
    fig = draw()
    shown = texts(fig).split("\n") + [texts(fig)]
    plt.close(fig)
    for needle in needles:
        assert any(needle in s for s in shown), needle
