"""Every collective and every f/g mapping, checked inside real ranks against a local reference.

Each rank can rebuild every other rank's input (inputs are seeded by global rank), so it
computes the expected result of each collective with plain torch and compares. Values
are small integers in float32, so sums are exact and comparisons use torch.equal; the
autograd checks use float64 and compare with an unsharded reference model.
"""

from __future__ import annotations

import pytest
import torch

from hybridpar.distributed import parallel_state as ps
from hybridpar.distributed.communication_op import (
    all_gather,
    all_reduce,
    broadcast,
    broadcast_object,
    gather,
    gatherv,
    local_shard,
    reduce_scatter,
    scatter,
    scatterv,
    tensor_model_parallel_all_gather,
    tensor_model_parallel_all_reduce,
)
from hybridpar.distributed.launcher import current_device, launch
from hybridpar.distributed.mappings import (
    copy_to_tensor_model_parallel_region as copy_f,
    gather_from_tensor_model_parallel_region as gather_region,
    reduce_from_tensor_model_parallel_region as reduce_g,
    scatter_to_tensor_model_parallel_region as scatter_region,
)
from hybridpar.distributed.parallel_state import GroupCoordinator


def _data(seed: int, *shape: int, dtype=torch.float32) -> torch.Tensor:
    """Deterministic small-integer tensor: any rank can rebuild any other rank's input."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-8, 8, shape, generator=g).to(dtype).to(current_device())


def _collective_checks(group: GroupCoordinator, arg: GroupCoordinator | None) -> dict[str, bool]:
    """Compare each collective on ``group`` (passed as ``arg``; None = default TP group) with torch."""
    n, i, ranks = group.world_size, group.rank_in_group, group.ranks
    last = n - 1  # a non-zero src/dst checks the group-rank -> global-rank mapping
    ok: dict[str, bool] = {}

    x = [_data(r, n, 3, 2 * n) for r in ranks]  # x[j]: input of group rank j
    mine = x[i].clone()
    ok["all_reduce"] = torch.equal(all_reduce(x[i], arg), sum(x)) and torch.equal(x[i], mine)
    for dim in (0, 1, -1):
        ok[f"all_gather[dim={dim}]"] = torch.equal(all_gather(x[i], dim, arg), torch.cat(x, dim))
        if dim != 1:
            expected = sum(x).chunk(n, dim)[i]
            ok[f"reduce_scatter[dim={dim}]"] = torch.equal(reduce_scatter(x[i], dim, arg), expected)
    ok["local_shard"] = torch.equal(local_shard(x[i], -1, arg), x[i].chunk(n, -1)[i])
    got = gather(x[i], last, -1, arg)
    ok["gather"] = torch.equal(got, torch.cat(x, -1)) if i == last else got is None
    for dim in (0, 1):
        full = _data(1000 + ranks[last], 2 * n, 2 * n)
        buf = full if i == last else torch.zeros_like(full)
        ok[f"scatter[dim={dim}]"] = torch.equal(scatter(buf, last, dim, arg), full.chunk(n, dim)[i])
    buf = x[i].clone()
    out = broadcast(buf, last, arg)
    ok["broadcast"] = out is buf and torch.equal(buf, x[last])
    strided = x[i].clone().transpose(0, 2)  # non-contiguous: filled through a contiguous copy
    broadcast(strided, last, arg)
    ok["broadcast[non-contiguous]"] = torch.equal(strided, x[last].transpose(0, 2))
    payload = {"from": ranks[last], "sizes": [3, 0, 5]} if i == last else None
    ok["broadcast_object"] = broadcast_object(payload, last, arg) == {"from": ranks[last], "sizes": [3, 0, 5]}

    # uneven partitions, one of them empty (token parallelism scatters requests like this)
    sizes = [3, 0, 5, 1][:n] if n > 2 else [0, 3][:n]
    src = 1 % n
    for dim in (0, 1):
        shape = [2, 3]
        shape.insert(dim, sum(sizes))
        full = _data(2000 + ranks[src], *shape)
        empty_shape = list(shape)
        empty_shape[dim] = 0
        arg_x = full if i == src else full.new_empty(empty_shape)
        piece = scatterv(arg_x, sizes, src, dim, arg)
        ok[f"scatterv[dim={dim}]"] = torch.equal(piece, full.split(sizes, dim)[i])
        back = gatherv(piece, sizes, src, dim, arg)
        ok[f"gatherv[dim={dim}]"] = torch.equal(back, full) if i == src else back is None
    pieces = [_data(3000 + r, s, 4) for r, s in zip(ranks, sizes)]
    got = gatherv(pieces[i], sizes, 0, 0, arg)
    ok["gatherv[dst=0]"] = torch.equal(got, torch.cat(pieces)) if i == 0 else got is None
    zeros = [0] * n
    ok["scatterv[all empty]"] = scatterv(_data(4, 0, 4), zeros, 0, 0, arg).shape == (0, 4)
    if arg is None:  # vLLM aliases always use the TP group
        ok["tensor_model_parallel_all_reduce"] = torch.equal(tensor_model_parallel_all_reduce(x[i]), sum(x))
        ok["tensor_model_parallel_all_gather"] = torch.equal(tensor_model_parallel_all_gather(x[i]), torch.cat(x, -1))
    return ok


def _mapping_checks(group: GroupCoordinator, arg: GroupCoordinator | None) -> dict[str, bool]:
    """Forward and backward of f, g, scatter and gather against unsharded autograd references."""
    n, i, ranks = group.world_size, group.rank_in_group, group.ranks
    f64 = torch.float64
    ok: dict[str, bool] = {}

    def close(a: torch.Tensor, b: torch.Tensor) -> bool:
        return a.shape == b.shape and torch.allclose(a, b)

    shared = _data(7, 3, 2 * n, dtype=f64)  # identical on every rank
    w = [_data(100 + r, 3, 2 * n, dtype=f64) for r in ranks]  # per-rank upstream weights

    # f: identity forward; backward sums the ranks' gradients
    x = shared.clone().requires_grad_()
    y = copy_f(x, arg)
    (y * w[i]).sum().backward()
    ok["f.forward"] = torch.equal(y, shared)
    ok["f.backward"] = close(x.grad, sum(w))

    # g: all-reduce forward; identity backward
    parts = [_data(200 + r, 3, 2 * n, dtype=f64) for r in ranks]
    x = parts[i].clone().requires_grad_()
    y = reduce_g(x, arg)
    (y * shared).sum().backward()
    ok["g.forward"] = close(y, sum(parts))
    ok["g.backward"] = close(x.grad, shared)

    # scatter: own chunk of the last dim forward; all-gather backward
    x = shared.clone().requires_grad_()
    y = scatter_region(x, arg)
    chunks = [wr.chunk(n, -1)[j] for j, wr in enumerate(w)]
    (y * chunks[i]).sum().backward()
    ok["scatter.forward"] = torch.equal(y, shared.chunk(n, -1)[i])
    ok["scatter.backward"] = close(x.grad, torch.cat(chunks, -1))

    # gather: all-gather forward; own chunk of the gradient backward
    x = parts[i].chunk(n, -1)[i].clone().requires_grad_()
    y = gather_region(x, arg)
    (y * shared).sum().backward()
    ok["gather.forward"] = torch.equal(y, torch.cat([p.chunk(n, -1)[j] for j, p in enumerate(parts)], -1))
    ok["gather.backward"] = close(x.grad, shared.chunk(n, -1)[i])

    # an MLP sharded Megatron-style: Y = g(f(X) @ A_i @ B_i), A column-split, B row-split
    X, A, B, W = (_data(s, *shape, dtype=f64) for s, shape in
                  ((11, (4, 5)), (12, (5, 2 * n)), (13, (2 * n, 3)), (14, (4, 3))))
    ref = [t.clone().requires_grad_() for t in (X, A, B)]
    ref_y = ref[0] @ ref[1] @ ref[2]
    (ref_y * W).sum().backward()
    x, a, b = X.clone().requires_grad_(), A.chunk(n, 1)[i].clone().requires_grad_(), B.chunk(n, 0)[i].clone().requires_grad_()
    y = reduce_g(copy_f(x, arg) @ a @ b, arg)
    (y * W).sum().backward()
    ok["mlp.forward"] = close(y, ref_y)
    ok["mlp.grad_x"] = close(x.grad, ref[0].grad)
    ok["mlp.grad_a"] = close(a.grad, ref[1].grad.chunk(n, 1)[i])
    ok["mlp.grad_b"] = close(b.grad, ref[2].grad.chunk(n, 0)[i])

    # column-parallel with a gathered output: Z = gather(f(X) @ A_i) == X @ A
    x, a = X.clone().requires_grad_(), A.chunk(n, 1)[i].clone().requires_grad_()
    z = gather_region(copy_f(x, arg) @ a, arg)
    Wz = _data(15, 4, 2 * n, dtype=f64)
    (z * Wz).sum().backward()
    ok["column_gather.forward"] = close(z, X @ A)
    ok["column_gather.grad_x"] = close(x.grad, Wz @ A.T)
    ok["column_gather.grad_a"] = close(a.grad, (X.T @ Wz).chunk(n, 1)[i])
    return ok


def _suite(group: GroupCoordinator, label: str, as_default: bool = False) -> dict[str, bool]:
    arg = None if as_default else group
    checks = {**_collective_checks(group, arg), **_mapping_checks(group, arg)}
    return {f"{label}/{name}": passed for name, passed in checks.items()}


def _identity_checks(group: GroupCoordinator) -> dict[str, bool]:
    """On a one-rank group every op returns its input and never touches the network."""
    x = _data(5, 2, 4)
    ok = {
        name: out is x
        for name, out in (
            ("all_reduce", all_reduce(x, group)),
            ("all_gather", all_gather(x, 0, group)),
            ("reduce_scatter", reduce_scatter(x, -1, group)),
            ("gather", gather(x, 0, -1, group)),
            ("scatter", scatter(x, 0, 0, group)),
            ("broadcast", broadcast(x, 0, group)),
            ("scatterv", scatterv(x, [2], 0, 0, group)),
            ("gatherv", gatherv(x, [2], 0, 0, group)),
        )
    }
    ok["broadcast_object"] = broadcast_object("x", 0, group) == "x"
    leaf = x.double().requires_grad_()
    for name, fn in (("f", copy_f), ("g", reduce_g), ("scatter", scatter_region), ("gather", gather_region)):
        leaf.grad = None
        out = fn(leaf, group)
        (out * 3).sum().backward()
        ok[f"mapping {name}"] = torch.equal(out, leaf) and torch.equal(leaf.grad, torch.full_like(leaf, 3))
    return {f"singleton/{k}": v for k, v in ok.items()}


def four_rank_worker() -> dict[str, bool]:
    """TP4 (whole world, default group), then TP2 x TKNP2: contiguous TP pairs and strided TKNP pairs."""
    ps.initialize_model_parallel(tensor_parallel_size=4)
    results = _suite(ps.get_tp_group(), "tp4", as_default=True)
    ps.destroy_model_parallel()
    ps.initialize_model_parallel(tensor_parallel_size=2, token_parallel_size=2)
    results.update(_suite(ps.get_tp_group(), "tp2", as_default=True))
    results.update(_suite(ps.get_tknp_group(), "tknp2"))
    return results


def two_rank_worker() -> dict[str, bool]:
    """TP1 x DP2: the TP group is a singleton (identity ops), the DP group spans both ranks."""
    ps.initialize_model_parallel(data_parallel_size=2)
    results = _identity_checks(ps.get_tp_group())
    results.update(_suite(ps.get_dp_group(), "dp2"))
    return results


def _assert_all_passed(per_rank: list[dict[str, bool]]) -> None:
    failed = [f"rank {r}: {name}" for r, checks in enumerate(per_rank) for name, ok in checks.items() if not ok]
    assert not failed, "\n".join(failed)
    assert len({frozenset(c) for c in per_rank}) == 1  # every rank ran the same checks


def test_collectives_and_mappings_four_gloo_ranks():
    per_rank = launch(four_rank_worker, 4, backend="gloo")
    _assert_all_passed(per_rank)
    assert {"tp4/all_reduce", "tp2/mlp.grad_x", "tknp2/gatherv[dim=1]"} <= set(per_rank[0])


def test_collectives_two_gloo_ranks_and_singleton_group():
    per_rank = launch(two_rank_worker, 2, backend="gloo")
    _assert_all_passed(per_rank)
    assert "singleton/mapping g" in per_rank[0] and "dp2/scatterv[dim=0]" in per_rank[0]


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs for NCCL")
def test_collectives_nccl():
    _assert_all_passed(launch(two_rank_worker, 2, backend="nccl"))
    if torch.cuda.device_count() >= 4:
        _assert_all_passed(launch(four_rank_worker, 4, backend="nccl"))
