"""What every demo prints around its results: what ran, what to look for, and a one-line verdict.

A demo's output reads top to bottom without the source at hand::

    == Tensor-parallel generation ==
    ran:       hybridpar/qwen2-tiny, a 2.9M-parameter Qwen2 trained on this book; ...
               TP 2 on gloo (CPU), float32, greedy, 24 new tokens per prompt
    look for:  ...
    <the demo's own table or text>
    verdict:   ...

The functions only format; each demo decides its verdict from what it measured.
"""
from __future__ import annotations

import textwrap
from collections.abc import Sequence

WIDTH = 100
_LABEL = 11  # "look for:  " and the indent of continuation lines


def model_line(model_name: str | None) -> str:
    """``"hybridpar/qwen2-tiny, a 2.9M-parameter Qwen2 trained on this book; ..."`` (never raises)."""
    from hybridpar.models.default_checkpoint import describe_model

    return describe_model(model_name)


def model_kind(model_name: str | None) -> str:
    """``"trained"`` (a shipped built-in: its text reads as English), ``"random"`` (a recipe with random
    weights: its text is noise by design) or ``"external"`` (a local directory or hub checkpoint)."""
    from pathlib import Path

    from hybridpar.models.default_checkpoint import BUILTIN_MODELS, builtin_name

    key = builtin_name(model_name)
    if model_name is not None and Path(model_name).expanduser().exists():
        local = Path(model_name).expanduser().resolve()
        key = next((k for k, spec in BUILTIN_MODELS.items() if spec.shipped_dir == local), None)
    if key is None:
        return "external"
    return "trained" if BUILTIN_MODELS[key].shipped is not None else "random"


def _field(label: str, lines: str | Sequence[str]) -> list[str]:
    items = [lines] if isinstance(lines, str) else list(lines)
    out: list[str] = []
    for i, item in enumerate(items):
        prefix = f"{label + ':' if i == 0 else '':<{_LABEL}}"
        out += textwrap.wrap(item, WIDTH, initial_indent=prefix, subsequent_indent=" " * _LABEL) or [prefix]
    return out


def intro(title: str, ran: str | Sequence[str], look_for: str | Sequence[str]) -> str:
    """The heading of a demo's output: its title, what ran (one item a line), and what to look for."""
    return "\n".join([f"== {title} ==", *_field("ran", ran), *_field("look for", look_for)])


def verdict(text: str) -> str:
    """The closing line(s): ``verdict:   <text>``, wrapped."""
    return "\n".join(_field("verdict", text))


def one_line(text: str, limit: int | None = None) -> str:
    """Generated text on one line: whitespace runs (newlines too) become one space; ``limit`` characters
    at most (an ellipsis marks a cut)."""
    flat = " ".join(text.split())
    return flat if limit is None or len(flat) <= limit else flat[: limit - 1].rstrip() + "…"


def percent(x: float) -> str:
    """0.604 -> '60 %'."""
    return f"{100 * x:.0f} %"


def binary_bytes(n: float) -> str:
    """Bytes in binary units: 0 -> '0 B', 3072 -> '3.0 KiB', 11_560_120 -> '11.0 MiB'."""
    for unit, scale in (("GiB", 2 ** 30), ("MiB", 2 ** 20), ("KiB", 2 ** 10)):
        if abs(n) >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"
