"""Widgets in the static book: every control either picks a precomputed view, or is left out of the page.

The book is plain HTML: its widgets are rendered from the state stored when the page (or lab) was
executed, and no Python runs behind them. A control works there only if the browser alone can
carry out what it does. Two kinds of widget follow from that:

* **Precomputed** (the explorers): every view a control can reach is drawn when the cell runs, and
  each control is ``jslink``-ed to the ``Stack`` that holds those views, so moving it only picks
  another view. :func:`linked_stacks` builds that structure for any number of controls. Such a
  widget works the same in the book, in Jupyter and in Colab.
* **Kernel-only** (:data:`KERNEL_ONLY_WIDGETS`): the controls call Python (free text, buttons
  that change a live object, ranges too large to draw in advance). In the book their cell is
  tagged :data:`KERNEL_ONLY_TAG`, so the page shows the code but not the inert controls, and the
  text next to it says that the widget needs a live kernel. ``tests/test_book.py`` checks both
  the tags and, in headless Chromium, that every control left in the built book changes the page;
  :func:`hybridpar.book.run_labs.check_lab` checks the tags of the labs.

ipywidgets is imported inside the functions, so importing this module stays cheap.
"""
from __future__ import annotations

import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import ipywidgets

# jupyter-book / myst-nb tag: show the cell's code in the book, leave its output out.
KERNEL_ONLY_TAG = "remove-output"

# Widget functions whose controls run Python callbacks, and the precomputed twin shown in the book.
KERNEL_ONLY_WIDGETS: dict[str, str] = {
    "roofline_calculator": "hybridpar.viz.roofline_widget.roofline_explorer",
    "collectives_widget": "hybridpar.viz.collectives_widget.collectives_explorer",
    "shard_viewer": "hybridpar.viz.shard_viewer.shard_explorer",
    "radix_playground": "hybridpar.viz.radix_explorer.radix_explorer",
    "tknp_flow_widget": "hybridpar.viz.tknp_flow.tknp_layout_explorer",
}


def kernel_only_calls(source: str) -> list[str]:
    """The kernel-only widget functions that ``source`` (a cell's code) calls, in order of appearance."""
    names = "|".join(map(re.escape, KERNEL_ONLY_WIDGETS))
    return [m[1] for m in re.finditer(rf"(?<![\w.])(?:\w+\.)*({names})\s*\(", source)
            if not source[:m.start()].rstrip().endswith("def")]


def _selector_trait(control: ipywidgets.Widget) -> str:
    """``index`` for a selection widget (Dropdown, ToggleButtons, SelectionSlider), else ``value``
    (an IntSlider whose values are 0, 1, 2, ...)."""
    return "index" if control.has_trait("index") else "value"


def linked_stacks(controls: Sequence[ipywidgets.Widget], frames: Sequence[Any]) -> ipywidgets.Stack:
    """Nested ``Stack`` widgets over ``frames``, level ``i`` picked by ``controls[i]``.

    ``frames`` is nested as deep as there are controls: ``frames[a][b]`` is the view for option
    ``a`` of the first control and option ``b`` of the second. A control's ``index`` (or, for an
    integer slider from 0, its ``value``) is ``jslink``-ed to the ``selected_index`` of every stack
    of its level, so the browser alone switches views: this works in the static book. Each stack
    starts on the view the controls show now.
    """
    import ipywidgets as widgets

    if not controls:
        raise ValueError("linked_stacks needs at least one control")
    traits = [_selector_trait(c) for c in controls]

    def build(level: int, items: Sequence[Any]) -> ipywidgets.Stack:
        control, trait = controls[level], traits[level]
        options = getattr(control, "options", None)
        if options is not None and len(options) != len(items):
            raise ValueError(f"control {level} ({control.description!r}) has {len(options)} options but "
                             f"{len(items)} frames")
        children = items if level == len(controls) - 1 else [build(level + 1, sub) for sub in items]
        stack = widgets.Stack(list(children), selected_index=getattr(control, trait) or 0)
        widgets.jslink((control, trait), (stack, "selected_index"))
        return stack

    return build(0, frames)
