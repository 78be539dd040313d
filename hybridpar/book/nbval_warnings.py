"""A pytest plugin: nbval ignores deprecation warnings that come from installed packages.

A new release of a dependency (transformers, torch, ...) may start printing a ``FutureWarning`` or
``DeprecationWarning`` to stderr. nbval would then see a ``stderr`` stream that the stored
notebook lacks and fail the lab, although nothing the lab shows has changed. This plugin removes,
from the *fresh* outputs only, the stderr lines of such warnings whose file lies in
``site-packages`` or ``dist-packages`` (the warning line and the source line Python prints under
it), and drops a stderr stream that is left empty. Everything else still counts: a warning raised
by hybridpar's own code, any other stderr text and every error output.

It is enabled for every pytest run of the repository (``addopts`` in ``pyproject.toml``), so
``pytest --nbval labs/`` behaves the same by hand and in the test suite.
"""
from __future__ import annotations

import copy
import re
from typing import Any

import pytest

WARNING_LINE = re.compile(
    r"^.*[/\\](site|dist)-packages[/\\][^\n]*:\d+: (FutureWarning|DeprecationWarning|PendingDeprecationWarning): .*$")


def strip_dependency_warnings(text: str) -> str:
    """``text`` without dependency deprecation warnings (each with its indented source line)."""
    kept: list[str] = []
    skip_source = False
    for line in text.splitlines(keepends=True):
        if WARNING_LINE.match(line.rstrip("\n")):
            skip_source = True
            continue
        if skip_source and line.startswith("  "):
            skip_source = False
            continue
        skip_source = False
        kept.append(line)
    return "".join(kept)


def filter_outputs(outputs: list[Any]) -> list[Any]:
    """Fresh cell outputs with dependency warnings removed from stderr streams."""
    kept = []
    for out in outputs:
        if out.get("output_type") == "stream" and out.get("name") == "stderr":
            text = strip_dependency_warnings(out["text"])
            if not text:
                continue
            out = copy.copy(out)  # a NotebookNode stays one (nbval reads attributes)
            out["text"] = text
        kept.append(out)
    return kept


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    try:
        from nbval.plugin import IPyNbCell
    except ImportError:  # nbval is a test extra
        return
    if getattr(IPyNbCell.compare_outputs, "_hybridpar_filtered", False):
        return
    original = IPyNbCell.compare_outputs

    def compare_outputs(self: Any, test: list[Any], ref: list[Any], skip_compare: Any = None) -> bool:
        return original(self, filter_outputs(test), ref, skip_compare)

    compare_outputs._hybridpar_filtered = True  # type: ignore[attr-defined]
    IPyNbCell.compare_outputs = compare_outputs
