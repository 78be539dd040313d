"""The pure simulation of every collective equals the real collectives, and the drawings show it.

One gloo launch on 3 ranks (an odd world size; lab 2 checks 2 and 4) runs every collective of
:mod:`hybridpar.distributed.communication_op`; a GPU test repeats it on NCCL with 2 ranks.
"""
from __future__ import annotations

import pytest
import torch

from hybridpar.viz.collectives_widget import (
    COLLECTIVES,
    CollectiveFrame,
    after_origins,
    collectives_explorer,
    collectives_widget,
    example_inputs,
    frame_html,
    simulate,
    trace_collectives,
)


def test_simulation_equals_real_gloo_collectives():
    real = trace_collectives(3, backend="gloo")
    assert set(real) == set(COLLECTIVES)
    for name in COLLECTIVES:
        assert real[name] == simulate(name, 3), name


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_simulation_equals_real_nccl_collectives():
    real = trace_collectives(2, backend="nccl")
    assert all(real[name] == simulate(name, 2) for name in COLLECTIVES)


def test_simulated_semantics_by_hand():
    expected = CollectiveFrame("all_reduce", 2, [[1, 2], [11, 12]], [[12, 14], [12, 14]])
    assert simulate("all_reduce", 2, chunk=1) == expected
    assert simulate("reduce_scatter", 2, chunk=1).after == [[12], [14]]
    assert simulate("all_gather", 3, chunk=1).after == [[1, 11, 21]] * 3
    assert simulate("gather", 3, chunk=1).after == [[1, 11, 21], None, None]
    assert simulate("scatter", 2, chunk=2) == CollectiveFrame("scatter", 2, [[1, 2, 3, 4], None], [[1, 2], [3, 4]])
    assert simulate("broadcast", 3).after == [[1, 2]] * 3
    # one rank: every collective is the identity on the data
    for name in COLLECTIVES:
        frame = simulate(name, 1)
        assert frame.after == frame.before, name


def test_inputs_say_where_they_started():
    inputs = example_inputs("all_reduce", 4, chunk=3)  # 12 elements per rank: values 100*r + 1 ..
    assert inputs[2][:2] == [201, 202] and len({x for v in inputs for x in v}) == 48
    assert example_inputs("scatter", 3)[1:] == [None, None]


def test_origins():
    assert after_origins("all_gather", 2) == [[0, 0, 1, 1], [0, 0, 1, 1]]
    assert after_origins("gather", 2) == [[0, 0, 1, 1], None]
    assert after_origins("reduce_scatter", 2) == [[None, None], [None, None]]
    assert after_origins("scatter", 3) == [[0, 0]] * 3


@pytest.mark.parametrize("bad, match", [
    (dict(collective="all_to_all", world_size=2), "unknown collective"),
    (dict(collective="all_reduce", world_size=0), "world_size"),
    (dict(collective="all_reduce", world_size=2, chunk=0), "chunk"),
])
def test_bad_input_is_rejected_before_launching(bad, match):
    with pytest.raises(ValueError, match=match):
        simulate(**bad)
    if "chunk" not in bad:
        with pytest.raises(ValueError, match=match):
            trace_collectives(bad["world_size"], [bad["collective"]])


def test_frame_html_shows_every_rank_and_value():
    page = frame_html(simulate("gather", 3))
    for text in ("rank 0", "rank 2", ">21<", "None", "dist.gather", "from rank 2"):
        assert text in page
    assert "sum over all ranks" in frame_html(simulate("all_reduce", 2))


def test_widgets_build_and_link():
    import ipywidgets as widgets

    live = collectives_widget("reduce_scatter", 3)
    pick, size = live.children[0].children
    pick.value, size.value = "all_gather", 2
    assert "all_gather on 2 ranks" in live.children[1].value  # the callback redrew it

    static = collectives_explorer(world_sizes=(2, 4), collectives=("all_reduce", "gather"))
    outer = static.children[1]
    assert isinstance(outer, widgets.Stack) and len(outer.children) == 2
    assert "gather on 4 ranks" in outer.children[1].children[1].value
