"""One colour per rank, shared by every figure and widget of the book (ranks look the same everywhere).

Pale colours (matplotlib's "tab20" light half) so that dark text stays readable on them in both
the light and the dark theme of the book.
"""
from __future__ import annotations

RANK_COLORS: tuple[str, ...] = (
    "#aec7e8", "#ffbb78", "#98df8a", "#ff9896", "#c5b0d5", "#c49c94", "#f7b6d2", "#dbdb8d",
    "#9edae5", "#c7c7c7",
)
TEXT_COLOR = "#111111"  # on RANK_COLORS, in both themes


def rank_color(rank: int) -> str:
    """The colour of ``rank`` (cycles after ``len(RANK_COLORS)`` ranks)."""
    return RANK_COLORS[rank % len(RANK_COLORS)]


def mixed_background(ranks: range | list[int]) -> str:
    """A CSS background striped with the colours of ``ranks``: a value that mixes all of them (a sum)."""
    ranks = list(ranks)
    step = 100 / len(ranks)
    stops = ", ".join(f"{rank_color(r)} {i * step:.1f}% {(i + 1) * step:.1f}%" for i, r in enumerate(ranks))
    return f"linear-gradient(135deg, {stops})"
