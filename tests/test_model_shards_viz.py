"""hybridpar.viz.model_shards: ownership from recorded reads (pure), drawings and the static explorer."""
from __future__ import annotations

import pytest

from hybridpar.demos.tp_anatomy import Read, TensorReads
from hybridpar.viz.model_shards import (
    Segment,
    bytes_read,
    checkpoint_map_explorer,
    checkpoint_map_html,
    checkpoint_ownership,
    first_layer_table_html,
    order_key,
    plot_checkpoint_map,
)


def _reads(shape: tuple[int, ...], *ranges: tuple[tuple[int, int], ...]) -> TensorReads:
    return TensorReads(shape, [Read(r, 4 * (r[0][1] - r[0][0]) * (r[1][1] - r[1][0] if len(r) > 1 else 1))
                               for r in ranges])


def _two_ranks_kv_replicated() -> list[dict[str, TensorReads]]:
    """TP 4 over 2 KV heads of 8 rows: ranks 0, 1 read k rows 0-7, ranks 2, 3 rows 8-15."""
    out = []
    for r in range(4):
        kv = (8 * (r // 2), 8 * (r // 2 + 1))
        out.append({
            "model.layers.0.self_attn.k_proj.weight": _reads((16, 32), (kv, (0, 32))),
            "model.layers.0.self_attn.o_proj.weight": _reads((32, 64), ((0, 32), (16 * r, 16 * r + 16))),
            "model.layers.0.input_layernorm.weight": _reads((32,), ((0, 32),)),
            "model.embed_tokens.weight": _reads((100, 32), ((64 * r, min(100, 64 * r + 64)), (0, 32)))
            if r < 2 else TensorReads((100, 32)),
        })
    return out


def test_ownership_finds_split_dim_replication_and_unread_ranks() -> None:
    owners = {o.name: o for o in checkpoint_ownership(_two_ranks_kv_replicated())}
    k = owners["model.layers.0.self_attn.k_proj.weight"]
    assert (k.split, k.segments) == ("rows", (Segment(0, 8, (0, 1)), Segment(8, 16, (2, 3))))
    o = owners["model.layers.0.self_attn.o_proj.weight"]
    assert o.split == "columns" and [s.ranks for s in o.segments] == [(0,), (1,), (2,), (3,)]
    norm = owners["model.layers.0.input_layernorm.weight"]
    assert norm.split_dim is None and norm.segments == (Segment(0, 32, (0, 1, 2, 3)),)
    embed = owners["model.embed_tokens.weight"]
    assert embed.segments == (Segment(0, 64, (0,)), Segment(64, 100, (1,)))
    assert embed.ranges_of(3) == [] and embed.ranges_of(1) == [(64, 100)]


def test_ownership_rejects_reads_split_along_two_dims() -> None:
    bad = [{"w": _reads((8, 8), ((0, 4), (0, 8)))}, {"w": _reads((8, 8), ((0, 8), (4, 8)))}]
    with pytest.raises(ValueError, match="several dimensions"):
        checkpoint_ownership(bad)


def test_order_is_forward_order_with_layers_numerically() -> None:
    names = ["lm_head.weight", "model.norm.weight", "model.layers.10.mlp.down_proj.weight",
             "model.layers.2.self_attn.q_proj.bias", "model.layers.2.self_attn.q_proj.weight",
             "model.layers.2.input_layernorm.weight", "model.embed_tokens.weight"]
    assert sorted(names, key=order_key) == [
        "model.embed_tokens.weight", "model.layers.2.input_layernorm.weight", "model.layers.2.self_attn.q_proj.weight",
        "model.layers.2.self_attn.q_proj.bias", "model.layers.10.mlp.down_proj.weight", "model.norm.weight",
        "lm_head.weight"]


def test_drawings_and_static_explorer() -> None:
    reads = _two_ranks_kv_replicated()
    assert bytes_read(reads)[3] == 4 * (8 * 32 + 32 * 16 + 32)
    ax = plot_checkpoint_map(reads, "example")
    assert len(ax.get_yticklabels()) == 4 and "rank 3: read" in ax.get_legend().get_texts()[3].get_text()
    table = first_layer_table_html(reads)
    assert "<td style=\"padding:0 0.5em\">0-7</td>" in table and table.count("<tr>") == 5
    assert checkpoint_map_html(reads).startswith('<div class="hybridpar-model-shards"><img')
    explorer = checkpoint_map_explorer({4: reads, 2: reads[:2]}, model="example")
    toggle, stack = explorer.children
    assert toggle.options == ("4", "2") and len(stack.children) == 2 and "TP = 2" in stack.children[1].value
