"""Rank layouts (pure, exact group lists), configuration errors, and real groups on 4 gloo ranks."""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist

from hybridpar.config import ParallelConfig
from hybridpar.distributed import parallel_state as ps
from hybridpar.distributed.communication_op import all_reduce
from hybridpar.distributed.launcher import launch
from hybridpar.distributed.parallel_state import ParallelConfigError, compute_layout

SINGLETONS_8 = [[r] for r in range(8)]


def test_layout_tp2_pp2_dp2():
    layout = compute_layout(8, tensor_parallel_size=2, pipeline_parallel_size=2, data_parallel_size=2)
    assert layout.groups == {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "pp": [[0, 2], [1, 3], [4, 6], [5, 7]],
        "dp": [[0, 4], [1, 5], [2, 6], [3, 7]],
        "tknp": SINGLETONS_8,
        "external_dp": SINGLETONS_8,
    }
    assert (layout.external_dp_size, layout.enable_token_parallel) == (1, False)
    assert layout.coords(6) == {"tp": 0, "pp": 1, "dp": 1, "tknp": 0, "external_dp": 0}


def test_layout_tp2_tknp4():
    layout = compute_layout(8, tensor_parallel_size=2, token_parallel_size=4)
    assert layout.enable_token_parallel
    assert layout.groups == {
        "tp": [[0, 1], [2, 3], [4, 5], [6, 7]],
        "pp": SINGLETONS_8,
        "dp": SINGLETONS_8,
        "tknp": [[0, 2, 4, 6], [1, 3, 5, 7]],
        "external_dp": SINGLETONS_8,
    }
    assert layout.coords(5) == {"tp": 1, "pp": 0, "dp": 0, "tknp": 2, "external_dp": 0}


def test_layout_tp4():
    layout = compute_layout(4, tensor_parallel_size=4)
    singletons = [[0], [1], [2], [3]]
    assert layout.groups == {
        "tp": [[0, 1, 2, 3]],
        "pp": singletons,
        "dp": singletons,
        "tknp": singletons,
        "external_dp": singletons,
    }


def test_layout_tp2_tknp2_and_table():
    layout = compute_layout(4, tensor_parallel_size=2, token_parallel_size=2)
    assert layout.groups["tp"] == [[0, 1], [2, 3]]
    assert layout.groups["tknp"] == [[0, 2], [1, 3]]
    assert layout.groups["dp"] == [[0], [1], [2], [3]]
    table = str(layout)
    assert table == layout.table()
    assert "tknp" in table.splitlines()[1] and " dp " not in table.splitlines()[1]
    # one row per rank: "rank | external_dp | tknp | pp | tp"
    rows = [line.replace(" ", "").split("|") for line in table.splitlines()[3:7]]
    assert rows == [["0", "0", "0", "0", "0"], ["1", "0", "0", "0", "1"],
                    ["2", "0", "1", "0", "0"], ["3", "0", "1", "0", "1"]]
    assert "tknp        groups: [0, 2] [1, 3]" in table


def test_layout_external_dp():
    layout = compute_layout(8, tensor_parallel_size=2)
    assert layout.external_dp_size == 4
    assert layout.groups["tp"] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert layout.groups["external_dp"] == [[0, 2, 4, 6], [1, 3, 5, 7]]
    assert layout.groups["dp"] == SINGLETONS_8
    assert layout.coords(7)["external_dp"] == 3
    # with TKNP, replicas of the whole TP x TKNP block
    layout = compute_layout(8, tensor_parallel_size=2, token_parallel_size=2)
    assert layout.groups["tknp"] == [[0, 2], [1, 3], [4, 6], [5, 7]]
    assert layout.groups["external_dp"] == [[0, 4], [1, 5], [2, 6], [3, 7]]


def test_every_dimension_partitions_the_world():
    layout = compute_layout(24, tensor_parallel_size=2, pipeline_parallel_size=3, data_parallel_size=2)
    for name, groups in layout.groups.items():
        assert sorted(r for g in groups for r in g) == list(range(24)), name
        for group in groups:  # a group's members agree on every coordinate except their own
            coords = [layout.coords(r) for r in group]
            for other in ("tp", "pp", "dp", "external_dp"):
                if other != name:
                    assert len({c[other] for c in coords}) == 1, (name, other)


@pytest.mark.parametrize(
    ("kwargs", "fix"),
    [
        (dict(world_size=4, tensor_parallel_size=0), "positive integer"),
        (dict(world_size=4, tensor_parallel_size=2.0), "positive integer"),
        (dict(world_size=4, pipeline_parallel_size=True), "positive integer"),
        (dict(world_size=0), "world_size must be an int >= 1"),
        (dict(world_size=6, tensor_parallel_size=4), "launch a multiple of 4 ranks"),
        (dict(world_size=8, tensor_parallel_size=2, token_parallel_size=2, data_parallel_size=2),
         "Pick one"),
        (dict(world_size=4, enable_token_parallel=True), "set token_parallel_size"),
        (dict(world_size=4, token_parallel_size=2, enable_token_parallel=False),
         "enable_token_parallel=True"),
    ],
)
def test_invalid_configs_name_the_fix(kwargs, fix):
    with pytest.raises(ParallelConfigError, match=fix):
        compute_layout(**kwargs)


def test_indivisible_world_lists_what_works():
    with pytest.raises(ParallelConfigError) as info:
        compute_layout(6, tensor_parallel_size=2, pipeline_parallel_size=2)
    assert "= 4" in str(info.value) and "[1, 2, 3, 6]" in str(info.value)


def test_parallel_config():
    config = ParallelConfig(tensor_parallel_size=2, token_parallel_size=4).validate()
    assert config.world_size == 8 and config.token_parallel_enabled
    assert not ParallelConfig(data_parallel_size=2).validate().token_parallel_enabled
    with pytest.raises(ParallelConfigError, match="mutually exclusive"):
        ParallelConfig(data_parallel_size=2, token_parallel_size=2).validate()


def test_initialize_without_torch_distributed():
    assert not dist.is_initialized()
    with pytest.raises(ParallelConfigError, match="hybridpar.launch"):
        ps.initialize_model_parallel(tensor_parallel_size=2)
    with pytest.raises(RuntimeError, match="initialize_model_parallel"):
        ps.get_tp_group()


def _group_state_worker() -> dict:
    """4 ranks: TP2 x TKNP2, then re-initialise as TP4 after destroy."""
    out: dict = {}
    layout = ps.initialize_model_parallel(tensor_parallel_size=2, token_parallel_size=2)
    out["layout_matches"] = layout == compute_layout(4, tensor_parallel_size=2, token_parallel_size=2)
    out["tp"] = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    out["tknp"] = (ps.get_tknp_rank(), ps.get_tknp_world_size())
    out["dp_world"] = ps.get_data_parallel_world_size()
    out["is_tknp_root"] = ps.is_tknp_root()
    out["is_tknp_initialized"] = ps.is_tknp_initialized()
    out["ranks"] = {name: getattr(ps, f"get_{name}_group")().ranks for name in ("tp", "pp", "dp", "tknp")}
    out["first_rank"] = ps.get_tknp_group().first_rank
    # the groups really connect the ranks they list: sum of global ranks over each group
    rank = dist.get_rank()
    out["tp_sum"] = int(all_reduce(_rank_tensor(rank), ps.get_tp_group()))
    out["tknp_sum"] = int(all_reduce(_rank_tensor(rank), ps.get_tknp_group()))
    try:
        ps.initialize_model_parallel(tensor_parallel_size=2, token_parallel_size=2)
        out["second_init"] = "no error"
    except ParallelConfigError as exc:
        out["second_init"] = str(exc)
    ps.destroy_model_parallel()
    try:
        ps.get_tknp_group()
        out["after_destroy"] = "no error"
    except RuntimeError as exc:
        out["after_destroy"] = str(exc)
    ps.initialize_tensor_parallel(4)
    out["reinit_tp"] = (ps.get_tensor_model_parallel_rank(), ps.get_tensor_model_parallel_world_size())
    out["reinit_tknp_initialized"] = ps.is_tknp_initialized()
    out["reinit_tp_sum"] = int(all_reduce(_rank_tensor(rank)))
    return out


def _rank_tensor(rank: int) -> torch.Tensor:
    return torch.tensor([float(rank)])


def test_groups_on_four_gloo_ranks():
    results = launch(_group_state_worker, 4, backend="gloo")
    for rank, r in enumerate(results):
        assert r["layout_matches"]
        assert r["tp"] == (rank % 2, 2)
        assert r["tknp"] == (rank // 2, 2)
        assert r["dp_world"] == 1
        assert r["is_tknp_root"] == (rank < 2)
        assert r["is_tknp_initialized"]
        assert r["ranks"] == {
            "tp": [rank - rank % 2, rank - rank % 2 + 1],
            "pp": [rank],
            "dp": [rank],
            "tknp": [rank % 2, rank % 2 + 2],
        }
        assert r["first_rank"] == rank % 2
        assert r["tp_sum"] == sum(r["ranks"]["tp"])
        assert r["tknp_sum"] == sum(r["ranks"]["tknp"])
        assert "destroy_model_parallel()" in r["second_init"]
        assert "initialize_model_parallel" in r["after_destroy"]
        assert r["reinit_tp"] == (rank, 4)
        assert not r["reinit_tknp_initialized"]
        assert r["reinit_tp_sum"] == 6
