"""Tensor-parallel layers against their unsharded torch references (picotron style).

Every rank builds the same reference modules from the same seed, loads its shard through the
layers' ``weight_loader``, runs the sharded layer and compares with the reference. One launch
per TP size runs all checks; each rank returns ``{check name: passed}`` and the parent asserts.

Exact checks use integer-valued weights and inputs: every product and partial sum is then an
exactly representable float, so the result cannot depend on the matmul kernel's summation order
and ``torch.equal`` is a fair test of the sharding itself.
"""
from __future__ import annotations

import random
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from hybridpar.distributed.communication_op import all_reduce
from hybridpar.distributed.launcher import current_device, launch
from hybridpar.distributed.parallel_state import (
    ParallelConfigError,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    initialize_tensor_parallel,
)
from hybridpar.layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
    valid_tp_sizes,
    validate_tp_size,
    vocab_shard,
)

HIDDEN, FFN, VOCAB, HEAD_SIZE = 16, 32, 259, 4  # 259: not divisible by any TP size


def _int_linear(gen: torch.Generator, fan_in: int, fan_out: int, bias: bool = True) -> nn.Linear:
    """nn.Linear with small integer weights (see module docstring)."""
    layer = nn.Linear(fan_in, fan_out, bias=bias)
    with torch.no_grad():
        for p in layer.parameters():
            p.copy_(torch.randint(-3, 4, p.shape, generator=gen).float())
    return layer


def _ints(gen: torch.Generator, *shape: int) -> torch.Tensor:
    return torch.randint(-3, 4, shape, generator=gen).float()


def _checkpoint(seed: int) -> dict[str, torch.Tensor]:
    """The tensors that both the parent (safetensors file) and the ranks (full tensors) use."""
    gen = torch.Generator().manual_seed(seed + 1)
    return {
        "col.weight": torch.randn(FFN, HIDDEN, generator=gen),
        "row.weight": torch.randn(HIDDEN, FFN, generator=gen),
        "row.bias": torch.randn(HIDDEN, generator=gen),
        "k.weight": torch.randn(2 * HEAD_SIZE, HIDDEN, generator=gen),
        "emb.weight": torch.randn(VOCAB, HIDDEN, generator=gen),
    }


def _layers_worker(seed: int, ckpt_path: str) -> dict[str, Any]:
    initialize_tensor_parallel(dist.get_world_size())
    tp, rank = get_tensor_model_parallel_world_size(), get_tensor_model_parallel_rank()
    dev = current_device()
    torch.manual_seed(seed)  # nn.Linear / nn.Embedding initialisation: the same on every rank
    gen = torch.Generator().manual_seed(seed)
    checks: dict[str, bool] = {}
    info: dict[str, Any] = {"rank": rank}

    def exact(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        checks[name] = got.shape == want.shape and torch.equal(got, want)

    def close(name: str, got: torch.Tensor, want: torch.Tensor) -> None:
        checks[name] = got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-5)

    def load(param: nn.Parameter, tensor: Any, *shard_id: Any) -> None:
        param.weight_loader(param, tensor, *shard_id)

    def cols(t: torch.Tensor, start: int, size: int) -> torch.Tensor:
        return t[..., start : start + size]

    # ---- ColumnParallelLinear (exact)
    ref = _int_linear(gen, HIDDEN, FFN).to(dev)
    x = _ints(gen, 3, 5, HIDDEN).to(dev)
    n = FFN // tp
    for gather in (True, False):
        layer = ColumnParallelLinear(HIDDEN, FFN, gather_output=gather)
        load(layer.weight, ref.weight.detach().cpu())
        load(layer.bias, ref.bias.detach().cpu())
        out = layer.to(dev)(x)
        exact(f"column gather_output={gather}", out, ref(x) if gather else cols(ref(x), rank * n, n))
    checks["column weight shape"] = tuple(layer.weight.shape) == (n, HIDDEN)

    # ---- RowParallelLinear (fp32, fresh normal inputs)
    ref = nn.Linear(FFN, HIDDEN).to(dev)
    x = torch.randn(4, FFN, generator=gen).to(dev)
    k = FFN // tp
    for parallel_in in (True, False):
        layer = RowParallelLinear(FFN, HIDDEN, input_is_parallel=parallel_in)
        load(layer.weight, ref.weight.detach().cpu())
        load(layer.bias, ref.bias.detach().cpu())
        layer.to(dev)
        close(f"row input_is_parallel={parallel_in}", layer(cols(x, rank * k, k) if parallel_in else x), ref(x))
    exact("row bias added once", layer(torch.zeros_like(x)), ref.bias.detach().expand(4, HIDDEN))
    layer.reduce_results = False
    partial = layer(x)
    close("row reduce_results=False: outputs sum to y", all_reduce(partial), ref(x))
    exact("row reduce_results=False: bias only on rank 0", layer(torch.zeros_like(x)),
          ref.bias.detach().expand(4, HIDDEN) * (rank == 0))

    # ---- MergedColumnParallelLinear (gate/up), exact
    gate, up = _int_linear(gen, HIDDEN, FFN).to(dev), _int_linear(gen, HIDDEN, 2 * FFN).to(dev)
    x = _ints(gen, 6, HIDDEN).to(dev)
    merged = MergedColumnParallelLinear(HIDDEN, [FFN, 2 * FFN])
    for i, part in enumerate((gate, up)):
        load(merged.weight, part.weight.detach().cpu(), i)
        load(merged.bias, part.bias.detach().cpu(), i)
    g, u = merged.to(dev)(x).split(merged.output_sizes_per_partition, dim=-1)
    exact("merged gate shard", g, cols(gate(x), rank * n, n))
    exact("merged up shard", u, cols(up(x), rank * 2 * n, 2 * n))
    fused = MergedColumnParallelLinear(HIDDEN, [FFN, 2 * FFN], gather_output=True)
    load(fused.weight, torch.cat([gate.weight, up.weight]).detach().cpu())  # already-fused checkpoint
    load(fused.bias, torch.cat([gate.bias, up.bias]).detach().cpu())
    exact("merged fused load == per-part load", fused.weight.to(dev), merged.weight)
    exact("merged gather_output=True", fused.to(dev)(x), torch.cat([gate(x), up(x)], dim=-1))

    # ---- QKVParallelLinear: (8 heads, 4 KV heads) shards KV heads; (4, 2) replicates them at tp=4
    for heads, kv_heads in ((8, 4), (4, 2)):
        refs = {
            "q": _int_linear(gen, HIDDEN, heads * HEAD_SIZE).to(dev),
            "k": _int_linear(gen, HIDDEN, kv_heads * HEAD_SIZE).to(dev),
            "v": _int_linear(gen, HIDDEN, kv_heads * HEAD_SIZE).to(dev),
        }
        x = _ints(gen, 5, HIDDEN).to(dev)
        qkv = QKVParallelLinear(HIDDEN, HEAD_SIZE, heads, kv_heads, bias=True)
        for sid, r in refs.items():
            load(qkv.weight, r.weight.detach().cpu(), sid)
            load(qkv.bias, r.bias.detach().cpu(), sid)
        q, k_, v = qkv.to(dev)(x).split([qkv.q_size, qkv.kv_size, qkv.kv_size], dim=-1)
        kv_start = qkv.kv_head_start * HEAD_SIZE
        tag = f"qkv heads={heads} kv={kv_heads}"
        exact(f"{tag} q", q, cols(refs["q"](x), rank * qkv.q_size, qkv.q_size))
        exact(f"{tag} k", k_, cols(refs["k"](x), kv_start, qkv.kv_size))
        exact(f"{tag} v", v, cols(refs["v"](x), kv_start, qkv.kv_size))
        fused = QKVParallelLinear(HIDDEN, HEAD_SIZE, heads, kv_heads, bias=True)
        load(fused.weight, torch.cat([refs[s].weight for s in "qkv"]).detach().cpu())
        exact(f"{tag} fused load == per-part load", fused.weight.to(dev), qkv.weight)
        info[tag] = (qkv.num_heads, qkv.num_kv_heads, qkv.num_kv_head_replicas, qkv.kv_head_start)

    # ---- validation errors, raised at construction
    for heads, kv_heads in ((6, 2), (12, 3)):
        try:
            QKVParallelLinear(HIDDEN, HEAD_SIZE, heads, kv_heads)
            info[f"error {heads},{kv_heads}"] = None
        except ParallelConfigError as exc:
            info[f"error {heads},{kv_heads}"] = str(exc)

    # ---- VocabParallelEmbedding: vocab 259, ids covering every shard and the padding range
    ref_emb = nn.Embedding(VOCAB, HIDDEN).to(dev)
    emb = VocabParallelEmbedding(VOCAB, HIDDEN)
    load(emb.weight, ref_emb.weight.detach().cpu())
    emb.to(dev)
    ids = torch.cat([torch.tensor([0, 63, 64, 127, 128, 255, 256, 258]),
                     torch.randint(0, VOCAB, (24,), generator=gen)]).view(4, 8).to(dev)
    exact("embedding", emb(ids), ref_emb(ids))
    pad_ids = torch.arange(VOCAB, emb.num_embeddings_padded, device=dev)
    exact("embedding padding ids -> zeros", emb(pad_ids), torch.zeros(len(pad_ids), HIDDEN, device=dev))
    info["shard"] = emb.shard

    # ---- ParallelLMHead: untied with bias (exact), tied to the embedding (exact)
    ref_head = _int_linear(gen, HIDDEN, VOCAB).to(dev)
    h = _ints(gen, 2, 3, HIDDEN).to(dev)
    head = ParallelLMHead(VOCAB, HIDDEN, bias=True)
    load(head.weight, ref_head.weight.detach().cpu())
    load(head.bias, ref_head.bias.detach().cpu())
    exact("lm_head logits", head.to(dev)(h), ref_head(h))
    int_emb = _ints(gen, VOCAB, HIDDEN)
    tied_emb = VocabParallelEmbedding(VOCAB, HIDDEN)
    tied_head = ParallelLMHead(VOCAB, HIDDEN).tie_weights(tied_emb)
    load(tied_head.weight, int_emb)  # one load fills both
    model = nn.ModuleDict({"embed_tokens": tied_emb, "lm_head": tied_head}).to(dev)
    checks["tied: one shared parameter"] = len(list(model.parameters())) == 1 and tied_head.weight is tied_emb.weight
    exact("tied lm_head logits", tied_head(h), h @ int_emb.to(dev).T)
    exact("tied embedding", tied_emb(ids), F.embedding(ids, int_emb.to(dev)))

    # ---- gradients through a Column -> GELU -> Row MLP block
    fc1, fc2 = nn.Linear(HIDDEN, FFN).to(dev), nn.Linear(FFN, HIDDEN).to(dev)
    col, row = ColumnParallelLinear(HIDDEN, FFN), RowParallelLinear(FFN, HIDDEN)
    for layer, r in ((col, fc1), (row, fc2)):
        load(layer.weight, r.weight.detach().cpu())
        load(layer.bias, r.bias.detach().cpu())
        layer.to(dev)
    x = torch.randn(3, 4, HIDDEN, generator=gen).to(dev)
    dy = torch.randn(3, 4, HIDDEN, generator=gen).to(dev)
    x_ref, x_tp = x.clone().requires_grad_(), x.clone().requires_grad_()
    y_ref = fc2(F.gelu(fc1(x_ref)))
    y_tp = row(F.gelu(col(x_tp)))
    (y_ref * dy).sum().backward()
    (y_tp * dy).sum().backward()
    close("mlp output", y_tp, y_ref)
    close("mlp grad input", x_tp.grad, x_ref.grad)
    close("mlp grad fc1.weight shard", col.weight.grad, fc1.weight.grad[rank * n : (rank + 1) * n])
    close("mlp grad fc1.bias shard", col.bias.grad, fc1.bias.grad[rank * n : (rank + 1) * n])
    close("mlp grad fc2.weight shard", row.weight.grad, fc2.weight.grad[:, rank * k : (rank + 1) * k])
    close("mlp grad fc2.bias", row.bias.grad, fc2.bias.grad)

    # ---- weight_loader with safetensors slices == with full tensors
    full = _checkpoint(seed)
    make = {
        "col.weight": lambda: ColumnParallelLinear(HIDDEN, FFN).weight,
        "row.weight": lambda: RowParallelLinear(FFN, HIDDEN).weight,
        "row.bias": lambda: RowParallelLinear(FFN, HIDDEN).bias,
        "emb.weight": lambda: VocabParallelEmbedding(VOCAB, HIDDEN).weight,
    }
    with safe_open(ckpt_path, framework="pt") as f:
        for name, new_param in make.items():
            from_slice, from_tensor = new_param(), new_param()
            load(from_slice, f.get_slice(name))
            load(from_tensor, full[name])
            exact(f"slice load {name}", from_slice, from_tensor)
        qkv_slice = QKVParallelLinear(HIDDEN, HEAD_SIZE, 4, 2, bias=False)
        qkv_full = QKVParallelLinear(HIDDEN, HEAD_SIZE, 4, 2, bias=False)
        load(qkv_slice.weight, f.get_slice("k.weight"), "k")
        load(qkv_full.weight, full["k.weight"], "k")
        exact("slice load qkv k", qkv_slice.weight, qkv_full.weight)
        checks["slice load qkv k is nonzero"] = bool(qkv_slice.weight.abs().sum() > 0)
    return {"checks": checks, "info": info}


def _run(tp: int, tmp_path, backend: str = "gloo") -> tuple[list[dict[str, Any]], int]:
    seed = random.SystemRandom().randrange(2**31)
    path = str(tmp_path / "ckpt.safetensors")
    save_file(_checkpoint(seed), path)
    results = launch(_layers_worker, tp, seed, path, backend=backend, timeout=120)
    for rank, res in enumerate(results):
        failed = [name for name, ok in res["checks"].items() if not ok]
        assert not failed, f"tp={tp} rank {rank} (seed {seed}): failed {failed}"
        assert res["info"]["rank"] == rank
    return results, seed


def _assert_layout(results: list[dict[str, Any]], tp: int) -> None:
    infos = [res["info"] for res in results]
    # vocab shards: equal sizes, contiguous, padded to a multiple of 64 * tp
    shards = [i["shard"] for i in infos]
    assert shards[0].start == 0 and shards[-1].end == shards[0].num_embeddings_padded
    assert all(a.end == b.start for a, b in zip(shards, shards[1:]))
    assert {s.num_rows for s in shards} == {shards[0].num_embeddings_padded // tp}
    assert shards[0].num_embeddings_padded % (64 * tp) == 0 and shards[0].num_embeddings_padded >= VOCAB
    # KV heads: (num_heads, num_kv_heads, replicas, first kv head) per rank
    sharded = [i["qkv heads=8 kv=4"] for i in infos]
    assert sharded == [(8 // tp, 4 // tp, 1, r * 4 // tp) for r in range(tp)]
    replicated = [i["qkv heads=4 kv=2"] for i in infos]
    if tp == 4:  # ranks 0,1 hold KV head 0; ranks 2,3 hold KV head 1
        assert replicated == [(1, 1, 2, 0), (1, 1, 2, 0), (1, 1, 2, 1), (1, 1, 2, 1)]
    else:
        assert [kv_start for *_, kv_start in replicated] == [r * 2 // tp for r in range(tp)]
    # validation errors, with the sizes that would work
    for info in infos:
        if tp == 1:
            assert info["error 6,2"] is None and info["error 12,3"] is None
        if tp == 4:
            assert "valid tensor_parallel_size values are 1, 2, 6" in info["error 6,2"]
        if tp in (2, 4):
            assert "valid tensor_parallel_size values are 1, 3, 6, 12" in info["error 12,3"]
            assert f"tensor_parallel_size={tp}" in info["error 12,3"]


@pytest.mark.parametrize("tp", [1, 2, 4])
def test_layers_match_unsharded_reference(tp, tmp_path):
    results, _ = _run(tp, tmp_path)
    _assert_layout(results, tp)


@pytest.mark.gpu
def test_layers_match_unsharded_reference_nccl(tmp_path):
    if torch.cuda.device_count() < 2:
        pytest.skip("needs 2 GPUs")
    results, _ = _run(2, tmp_path, backend="nccl")
    _assert_layout(results, 2)


def test_valid_tp_sizes():
    assert valid_tp_sizes(14, 2) == [1, 2, 14]  # 7 divides the heads but not the 2 KV heads
    assert valid_tp_sizes(32, 8) == [1, 2, 4, 8, 16, 32]
    assert valid_tp_sizes(8) == [1, 2, 4, 8]  # MHA: KV heads = heads
    assert valid_tp_sizes(12, 3) == [1, 3, 6, 12]


def test_validate_tp_size_names_the_fix():
    validate_tp_size(14, 2, 14)  # replicated KV heads: fine
    with pytest.raises(ValueError, match=r"num_heads=14, num_kv_heads=2: valid tensor_parallel_size values are 1, 2, 14"):
        validate_tp_size(14, 2, 7)
    with pytest.raises(ParallelConfigError, match="query heads cannot be split evenly over 4 ranks"):
        validate_tp_size(14, 2, 4)


def test_vocab_shard_is_pure_and_pads_per_rank():
    shards = [vocab_shard(259, r, 4, padding_size=64) for r in range(4)]
    assert [(s.start, s.end) for s in shards] == [(0, 128), (128, 256), (256, 384), (384, 512)]
    assert [s.num_org_rows for s in shards] == [128, 128, 3, 0]
    assert vocab_shard(259, 0, 1).num_embeddings_padded == 320
    with pytest.raises(ValueError, match="tp_rank=4"):
        vocab_shard(259, 4, 4)
