"""Byte counts as the book's figures and widgets print them: binary units, labelled KiB, MiB, GiB, TiB.

A KV cache entry, a page, a checkpoint tensor are sized in powers of two, and the chapters speak of
"512 KiB of KV per token": every plot and widget under :mod:`hybridpar.viz` uses the same units, so
a number in a picture reads the same as the one in the text next to it. (Rates such as GB/s stay
decimal, as data sheets and nccl-tests print them.)
"""
from __future__ import annotations

BINARY_UNITS: tuple[tuple[str, int], ...] = (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10))


def format_binary(n: float) -> str:
    """``512 KiB``, ``12.6 GiB``, ``1000 KiB``, ``300 B``: the largest binary unit that fits, three
    significant digits (whole numbers from 1000 to 1023, never an exponent)."""
    for unit, scale in BINARY_UNITS:
        if abs(n) >= scale:
            value = n / scale
            return f"{value:.3g} {unit}" if abs(value) < 1000 else f"{value:.0f} {unit}"
    return f"{n:.0f} B"
