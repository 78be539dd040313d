"""Request placement by KV tokens (pure)."""
from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hybridpar.tknp.placement import RequestPlacer, least_loaded, place_all


def test_least_loaded_ties_go_to_the_lowest_allowed_rank():
    assert least_loaded([5, 3, 3, 9]) == 1
    assert least_loaded([5, 3, 3, 9], [True, False, True, True]) == 2
    assert least_loaded([1, 2], [False, False]) is None


def test_balances_tokens_not_request_count():
    # one long request costs as much as many short ones: after it, the short ones go elsewhere
    ranks = place_all([1000, 10, 10, 10, 10, 10], num_ranks=2)
    assert ranks == [0, 1, 1, 1, 1, 1]
    placer = RequestPlacer(3)
    for rid, cost in enumerate([50, 40, 30, 20, 10]):
        placer.place(rid, cost)
    assert placer.loads == [50, 50, 50] and placer.requests_on(2) == [2, 3] and placer.requests_on(1) == [1, 4]


def test_placement_is_stable_until_release():
    placer = RequestPlacer(2)
    assert placer.place("a", 100) == 0
    assert placer.place("b", 10) == 1
    assert placer.place("c", 10) == 1  # "a" still reserves 100 on rank 0
    assert placer.rank_of("a") == 0
    with pytest.raises(ValueError, match="already placed"):
        placer.place("a", 5)
    assert placer.release("a") == 0 and placer.loads == [0, 20]
    with pytest.raises(KeyError, match="not placed"):
        placer.rank_of("a")
    assert placer.place("d", 1) == 0
    placer.check()


def test_no_allowed_rank_changes_nothing():
    placer = RequestPlacer(2)
    placer.place(0, 7)
    assert placer.place(1, 3, allowed=[False, False]) is None
    assert placer.loads == [7, 0] and 1 not in placer.assignment
    assert placer.place(1, 3, allowed=[True, False]) == 0


@pytest.mark.parametrize("bad", [0, -3, 2.5, True])
def test_bad_inputs_name_the_fix(bad):
    with pytest.raises(ValueError, match="kv_tokens must be an int >= 1"):
        RequestPlacer(2).place(0, bad)
    with pytest.raises(ValueError, match="num_ranks"):
        RequestPlacer(bad if bad != 2.5 else 0)
    with pytest.raises(ValueError, match="allowed has 3 entries"):
        RequestPlacer(2).place(0, 1, allowed=[True] * 3)


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 6), st.lists(st.tuples(st.integers(1, 500), st.booleans()), min_size=1, max_size=60))
def test_greedy_bound_and_exact_bookkeeping(num_ranks, events):
    """With every rank allowed, max - min load stays within the largest live reservation, and the
    loads always equal the sum of the live reservations (requests are released at random)."""
    placer = RequestPlacer(num_ranks)
    live: list[int] = []
    for rid, (cost, release_one) in enumerate(events):
        before = list(placer.loads)
        rank = placer.place(rid, cost)
        assert before[rank] == min(before)
        live.append(rid)
        if release_one and len(live) > 1:
            placer.release(live.pop(0))
        placer.check()
    if len(events) == len(live):  # nothing released: the list-scheduling bound holds
        assert max(placer.loads) - min(placer.loads) <= max(c for c, _ in events)
