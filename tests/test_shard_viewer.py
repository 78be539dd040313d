"""The shard viewer's ownership maps agree with the shards the real layers load (TP 2 and 4 on gloo).

One launch of 4 ranks builds the four layers at TP 2 (two TP groups) and then at TP 4. Each layer
loads an *index* weight (element ``[i, j]`` holds its own flat position + 1, so every value says
where it came from; padding stays 0) and each rank returns its local weights. The parent rebuilds
every local weight from the map's blocks and compares exactly.
"""
from __future__ import annotations

from dataclasses import asdict

import pytest
import torch

from hybridpar.config import ParallelConfigError
from hybridpar.distributed.launcher import launch
from hybridpar.distributed.parallel_state import (
    destroy_model_parallel,
    get_tensor_model_parallel_rank,
    initialize_tensor_parallel,
)
from hybridpar.layers import ColumnParallelLinear, QKVParallelLinear, RowParallelLinear, VocabParallelEmbedding
from hybridpar.roofline import ModelShape
from hybridpar.viz.shard_viewer import (
    EXAMPLE_MODEL,
    LAYER_KINDS,
    describe,
    plot_shard_map,
    shard_explorer,
    shard_map,
    shard_map_html,
    shard_viewer,
)

# 4 query heads on 2 KV heads: TP 4 replicates each KV head twice. Vocab 259: TP 4 has an all-padding rank.
SMALL = ModelShape(name="small", hidden_size=8, intermediate_size=16, num_layers=1, num_heads=4,
                   num_kv_heads=2, head_dim=2, vocab_size=259)


def _index(rows: int, cols: int) -> torch.Tensor:
    return torch.arange(1, rows * cols + 1, dtype=torch.float64).view(rows, cols)


def _local_weights(m: ModelShape) -> dict[str, torch.Tensor]:
    """This rank's local weight of each layer kind, in the TP group that is initialised."""
    h, f, d = m.hidden_size, m.intermediate_size, m.head_dim
    f64 = torch.float64
    column = ColumnParallelLinear(h, f, bias=False, params_dtype=f64)
    column.weight.weight_loader(column.weight, _index(f, h))
    row = RowParallelLinear(f, h, bias=False, params_dtype=f64)
    row.weight.weight_loader(row.weight, _index(h, f))
    qkv = QKVParallelLinear(h, d, m.num_heads, m.num_kv_heads, bias=False, params_dtype=f64)
    fused = _index((m.num_heads + 2 * m.num_kv_heads) * d, h)
    qkv.weight.weight_loader(qkv.weight, fused)  # the stacked [q; k; v] tensor in one go ...
    per_part = QKVParallelLinear(h, d, m.num_heads, m.num_kv_heads, bias=False, params_dtype=f64)
    q_rows, kv_rows = m.num_heads * d, m.num_kv_heads * d
    for shard_id, part in zip("qkv", fused.split([q_rows, kv_rows, kv_rows])):  # ... and part by part
        per_part.weight.weight_loader(per_part.weight, part, shard_id)
    vocab = VocabParallelEmbedding(m.vocab_size, h, params_dtype=f64)
    vocab.weight.weight_loader(vocab.weight, _index(m.vocab_size, h))
    return {"column": column.weight.data, "row": row.weight.data, "qkv": qkv.weight.data,
            "qkv per part": per_part.weight.data, "vocab": vocab.weight.data,
            "tp rank": get_tensor_model_parallel_rank()}


def _local_weights_worker(fields: dict, tp_sizes: list[int]) -> dict[int, dict[str, torch.Tensor]]:
    out = {}
    for tp in tp_sizes:
        initialize_tensor_parallel(tp)
        out[tp] = _local_weights(ModelShape(**fields))
        destroy_model_parallel()
    return out


def _expected_local(kind: str, tp: int, rank: int) -> torch.Tensor:
    smap = shard_map(kind, tp, SMALL)
    full = torch.zeros(smap.padded_rows, smap.shape[1], dtype=torch.float64)
    full[: smap.shape[0]] = _index(*smap.shape)  # rows past the checkpoint: zeros (padding)
    blocks = [full[slice(*b.rows), slice(*b.cols)] for b in smap.blocks_of(rank)]
    return torch.cat(blocks, dim=smap.split_dim)


def test_ownership_maps_match_the_layers_shards():
    per_rank = launch(_local_weights_worker, 4, asdict(SMALL), [2, 4], backend="gloo")
    for global_rank, by_tp in enumerate(per_rank):
        for tp, weights in by_tp.items():
            rank = weights["tp rank"]
            assert rank == global_rank % tp  # TP groups are runs of consecutive ranks
            assert torch.equal(weights["qkv"], weights["qkv per part"])
            for kind in LAYER_KINDS:
                assert torch.equal(weights[kind], _expected_local(kind, tp, rank)), (kind, tp, rank)
                assert tuple(weights[kind].shape) == shard_map(kind, tp, SMALL).local_shape(rank)


@pytest.mark.parametrize("kind", LAYER_KINDS)
@pytest.mark.parametrize("tp", [1, 2, 4, 8])
def test_blocks_tile_the_weight(kind, tp):
    smap = shard_map(kind, tp, EXAMPLE_MODEL)
    cover = torch.zeros(smap.padded_rows, smap.shape[1], dtype=torch.int64)
    for b in smap.blocks:
        cover[slice(*b.rows), slice(*b.cols)] += 1
    assert torch.all(cover == 1)
    assert {r for b in smap.blocks for r in b.ranks} == set(range(tp))


def test_qkv_replication_and_padding():
    smap = shard_map("qkv", 8, EXAMPLE_MODEL)  # 2 KV heads on 8 ranks: each held by 4 ranks
    k_heads = [b for b in smap.blocks if b.label.startswith("k head")]
    assert [b.ranks for b in k_heads] == [(0, 1, 2, 3), (4, 5, 6, 7)]
    assert describe(smap, 1) == "q head 1; k head 0 (also on ranks 0, 2, 3); v head 0 (also on ranks 0, 2, 3)"
    four = shard_map("qkv", 4, EXAMPLE_MODEL)
    assert describe(four, 3) == "q heads 6-7; k head 1 (also on rank 2); v head 1 (also on rank 2)"
    assert shard_map("qkv", 2, EXAMPLE_MODEL).local_shape(1) == ((4 + 2) * 64, 512)
    vocab = shard_map("vocab", 4, SMALL)  # 259 rows padded to 512: rank 3 holds only padding
    assert vocab.padded_rows == 512 and all(b.padding for b in vocab.blocks_of(3))
    assert [b.padding for b in vocab.blocks_of(2)] == [False, True]


def test_bad_sizes_name_the_fix():
    with pytest.raises(ParallelConfigError, match="valid tensor_parallel_size values are 1, 2, 4, 8"):
        shard_map("qkv", 3, EXAMPLE_MODEL)
    with pytest.raises(ParallelConfigError, match="intermediate_size=1536 is not divisible"):
        shard_map("column", 7, EXAMPLE_MODEL)
    with pytest.raises(ValueError, match="unknown layer kind"):
        shard_map("expert", 2)


def test_drawing_and_widgets():
    import ipywidgets as widgets

    ax = plot_shard_map(shard_map("qkv", 4))
    assert len(ax.patches) > 12 and "TP = 4" in ax.get_title()
    page = shard_map_html(shard_map("vocab", 4, SMALL))
    assert page.count("data:image/png;base64,") == 1 and "padding rows 259-383" in page

    live = shard_viewer(kind="row", tp_size=2)
    model_w, kind_w = live.children[0].children
    kind_w.value = "qkv"
    assert "qkv-parallel" in live.children[2].value  # the callback redrew it
    live.children[1].value = 8
    model_w.value = "qwen2.5-0.5b"  # 14 heads cannot be split 8 ways: the view says so
    assert "valid tensor_parallel_size values are 1, 2, 14" in live.children[2].value

    static = shard_explorer(SMALL, kinds=("column", "vocab"), tp_sizes=(1, 2))
    outer = static.children[2]
    assert isinstance(outer, widgets.Stack) and len(outer.children) == 2
    assert "embed_tokens.weight split over 2 ranks" in outer.children[1].children[1].value
