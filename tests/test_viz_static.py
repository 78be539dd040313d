"""hybridpar.viz.static (precomputed views behind jslink-ed controls) and hybridpar.viz.units (binary units).

The browser side, every control of the built book operated in Chromium, is in tests/test_book.py.
"""
from __future__ import annotations

import re

import pytest

from hybridpar.viz.static import linked_stacks
from hybridpar.viz.units import format_binary


def _record_jslinks(monkeypatch: pytest.MonkeyPatch) -> set[tuple[str, str, str, str]]:
    import ipywidgets as widgets

    pairs: set[tuple[str, str, str, str]] = set()
    real = widgets.jslink

    def recording(source, target):
        pairs.add((source[0].model_id, source[1], target[0].model_id, target[1]))
        return real(source, target)

    monkeypatch.setattr(widgets, "jslink", recording)
    return pairs


def _stacks_by_level(stack, level: int = 0, out: dict[int, list] | None = None) -> dict[int, list]:
    import ipywidgets as widgets

    out = {} if out is None else out
    out.setdefault(level, []).append(stack)
    for child in stack.children:
        if isinstance(child, widgets.Stack):
            _stacks_by_level(child, level + 1, out)
    return out


def test_linked_stacks_link_every_stack_of_a_level_to_its_control(monkeypatch: pytest.MonkeyPatch) -> None:
    import ipywidgets as widgets

    pairs = _record_jslinks(monkeypatch)
    pick = widgets.Dropdown(options=["a", "b", "c"], value="b")
    size = widgets.SelectionSlider(options=["1", "2"])
    step = widgets.IntSlider(value=3, min=0, max=3)
    frames = [[[widgets.HTML(f"{x}{y}{z}") for z in range(4)] for y in "12"] for x in "abc"]
    top = linked_stacks([pick, size, step], frames)
    levels = _stacks_by_level(top)
    assert [len(levels[i]) for i in range(3)] == [1, 3, 6]
    expected = {(c.model_id, trait, s.model_id, "selected_index")
                for c, trait, level in ((pick, "index", 0), (size, "index", 1), (step, "value", 2))
                for s in levels[level]}
    assert pairs == expected
    # every stack starts on what its control shows: "b", "1", step 3
    assert top.selected_index == 1 and all(s.selected_index == 0 for s in levels[1])
    assert all(s.selected_index == 3 for s in levels[2])
    shown = top.children[top.selected_index]
    shown = shown.children[shown.selected_index]
    assert shown.children[shown.selected_index].value == "b13"


def test_linked_stacks_refuse_frames_that_do_not_match_the_options() -> None:
    import ipywidgets as widgets

    pick = widgets.ToggleButtons(options=["1", "2", "4"])
    with pytest.raises(ValueError, match="3 options but 2 frames"):
        linked_stacks([pick], [widgets.HTML("x"), widgets.HTML("y")])
    with pytest.raises(ValueError, match="at least one control"):
        linked_stacks([], [])


def test_tknp_layout_explorer_draws_every_layout_and_stage() -> None:
    import ipywidgets as widgets

    from hybridpar.viz.tknp_flow import STAGES, random_requests, tknp_layout_explorer

    view = tknp_layout_explorer("tiny", random_requests(8, seed=0), tensor_parallel_size=2, token_parallel_size=2)
    (tp_w, tknp_w), stage_w, top = view.children[0].children, view.children[1], view.children[2]
    assert [type(w).__name__ for w in (tp_w, tknp_w, stage_w)] == ["ToggleButtons", "ToggleButtons", "SelectionSlider"]
    assert (tp_w.value, tknp_w.value, stage_w.value) == ("2", "2", "plan")
    levels = _stacks_by_level(top)
    leaves = [f.value for s in levels[2] for f in s.children]
    assert len(leaves) == 3 * 4 * len(STAGES) and len(set(leaves)) == len(leaves), "every frame differs"
    shown = top.children[top.selected_index].children[top.children[top.selected_index].selected_index]
    assert "TP 2 x TKNP 2" in shown.children[0].value and isinstance(shown, widgets.Stack)
    with pytest.raises(ValueError, match="must be one of"):
        tknp_layout_explorer(tensor_parallel_size=8)
    # a layout the model cannot take says why, in every stage
    bad = tknp_layout_explorer("tiny", tp_sizes=(1, 3), tknp_sizes=(2,))
    stages = _stacks_by_level(bad.children[2])[2][1].children
    assert len({s.value for s in stages}) == len(STAGES) and all("not a valid layout" in s.value for s in stages)


@pytest.mark.parametrize("n, text", [
    (0, "0 B"), (1023, "1023 B"), (1024, "1 KiB"), (12288, "12 KiB"), (512 * 1024, "512 KiB"),
    (1000 * 1024, "1000 KiB"), (589_824, "576 KiB"), (2**20 * 1.5, "1.5 MiB"), (13.5e9, "12.6 GiB"),
    (80e9, "74.5 GiB"), (3 * 2**40, "3 TiB"),
])
def test_format_binary(n: float, text: str) -> None:
    assert format_binary(n) == text


def test_widgets_print_binary_units() -> None:
    """The viz modules' tables and frames use KiB / MiB / GiB, never the decimal kB / MB / GB."""
    from hybridpar.roofline import HARDWARE_PRESETS, MODEL_PRESETS, decode_step_time
    from hybridpar.viz.roofline_widget import comparison_table_html, step_table_html
    from hybridpar.viz.tknp_flow import flow_html, step_flow

    llama, h100 = MODEL_PRESETS["llama-7b"], HARDWARE_PRESETS["h100"]
    pages = [step_table_html(llama, h100, decode_step_time(llama, h100, 1, 64, 4096)),
             comparison_table_html(llama, h100, (1, 2), (1, 64), 4096)]
    pages += [flow_html(step_flow("tiny", 2, 2), stage) for stage in ("scatter", "attend", "gather")]
    text = " ".join(pages)
    assert "512 KiB" in pages[0] and "12.6 GiB" in pages[0]  # KV per token, weights: as chapter 1 and 6 say
    assert re.findall(r"\d (KiB|MiB|GiB)\b", text)
    assert not re.findall(r"\d (kB|MB|GB|TB)\b", text)


def test_collectives_explorer_starts_on_the_world_size_asked_for() -> None:
    from hybridpar.viz.collectives_widget import collectives_explorer

    view = collectives_explorer(world_sizes=range(1, 9), world_size=3)
    pick, size = view.children[0].children
    top = view.children[1]
    assert size.value == "3" and all(inner.selected_index == 2 for inner in top.children)
    assert "all_reduce on 3 ranks" in top.children[0].children[2].value
    with pytest.raises(ValueError, match="not one of"):
        collectives_explorer(world_sizes=(2, 4), world_size=3)
