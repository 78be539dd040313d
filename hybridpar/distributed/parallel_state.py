"""Process groups for tensor, pipeline, data and token parallelism.

Two layers, kept apart on purpose:

* :func:`~hybridpar.distributed.layout.compute_layout` (:mod:`hybridpar.distributed.layout`) is
  a *pure* function: given the world size and the parallel sizes it returns a
  :class:`RankLayout` saying which global ranks form each group. No processes, no
  ``torch.distributed`` -- the book prints these tables and the tests assert them exactly.
* :func:`initialize_model_parallel` turns a layout into real
  ``torch.distributed`` groups, one :class:`GroupCoordinator` per dimension,
  stored in module state and read back with ``get_tp_group()`` and friends.

Rank layout (TP innermost, so a TP group is a run of consecutive ranks)::

    rank = ((e * D + d) * PP + p) * TP + t

with ``e`` the external-DP index, ``d`` the DP index -- or the TKNP index when
token parallelism is on (DP and TKNP are mutually exclusive) -- ``p`` the
pipeline stage and ``t`` the TP rank. The group of a dimension is the set of
ranks that differ only in that dimension's index. ``external_dp`` soaks up the
ranks left over: ``world_size // (tp * pp * dp * tknp)`` independent replicas.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from hybridpar.config import ParallelConfigError
from hybridpar.distributed.launcher import current_device
from hybridpar.distributed.layout import DIMENSIONS, RankLayout, compute_layout

__all__ = [
    "ParallelConfigError",
    "RankLayout",
    "compute_layout",
    "GroupCoordinator",
    "initialize_model_parallel",
    "initialize_tensor_parallel",
    "model_parallel_is_initialized",
    "destroy_model_parallel",
    "get_layout",
    "get_tp_group",
    "get_pp_group",
    "get_dp_group",
    "get_tknp_group",
    "get_external_dp_group",
    "expert_parallel_groups",
    "get_ep_group",
    "get_expert_parallel_rank",
    "get_expert_parallel_world_size",
    "get_tensor_model_parallel_rank",
    "get_tensor_model_parallel_world_size",
    "get_pipeline_model_parallel_rank",
    "get_pipeline_model_parallel_world_size",
    "get_data_parallel_rank",
    "get_data_parallel_world_size",
    "get_tknp_rank",
    "get_tknp_world_size",
    "is_tknp_initialized",
    "is_tknp_root",
]


@dataclass
class GroupCoordinator:
    """This rank's view of one process group.

    ``ranks`` are global ranks in group order; ``rank_in_group`` indexes them.
    ``device_group`` uses the world's backend (NCCL on GPU, gloo on CPU);
    ``cpu_group`` is a gloo group over the same ranks for pickled objects
    (the same object as ``device_group`` when the world is gloo). On a group of
    size 1 every collective in :mod:`hybridpar.distributed.communication_op` is
    the identity and never touches the process group.
    """

    ranks: list[int]
    rank: int
    rank_in_group: int
    world_size: int
    device_group: dist.ProcessGroup
    cpu_group: dist.ProcessGroup

    @property
    def first_rank(self) -> int:
        """Global rank of the group's rank 0."""
        return self.ranks[0]

    @property
    def is_first_rank(self) -> bool:
        return self.rank_in_group == 0

    @property
    def device(self) -> torch.device:
        """Device that tensors given to this group's collectives must live on."""
        return current_device()


_LAYOUT: RankLayout | None = None
_GROUPS: dict[str, GroupCoordinator] = {}


def _make_coordinator(ranks: list[int], rank: int, backend: str) -> GroupCoordinator | None:
    """Create the process groups for ``ranks``; every rank must call this for every group, in order."""
    # Singleton groups are created too: on gloo, 16 groups over 4 ranks take ~15 ms, so skipping
    # them is not worth a special case (every collective is the identity on one rank anyway).
    device_group = dist.new_group(ranks, backend=backend)
    cpu_group = device_group if backend == "gloo" else dist.new_group(ranks, backend="gloo")
    if rank not in ranks:
        return None
    return GroupCoordinator(
        ranks=list(ranks),
        rank=rank,
        rank_in_group=ranks.index(rank),
        world_size=len(ranks),
        device_group=device_group,
        cpu_group=cpu_group,
    )


def initialize_model_parallel(
    tensor_parallel_size: int = 1,
    pipeline_parallel_size: int = 1,
    token_parallel_size: int = 1,
    data_parallel_size: int = 1,
    enable_token_parallel: bool | None = None,
) -> RankLayout:
    """Create the TP/PP/DP/TKNP/external-DP groups of this process; returns the layout.

    Collective: every rank of the world must call it with the same arguments.
    """
    global _LAYOUT
    if _LAYOUT is not None:
        raise ParallelConfigError(
            "model parallel groups are already initialised; call destroy_model_parallel() "
            "before initialising them again."
        )
    if not dist.is_available() or not dist.is_initialized():
        raise ParallelConfigError(
            "torch.distributed is not initialised; run your function with hybridpar.launch(fn, nprocs) "
            "(or under torchrun with hybridpar.run_torchrun), which calls init_process_group first."
        )
    world_size = dist.get_world_size()
    layout = compute_layout(
        world_size,
        tensor_parallel_size=tensor_parallel_size,
        pipeline_parallel_size=pipeline_parallel_size,
        token_parallel_size=token_parallel_size,
        data_parallel_size=data_parallel_size,
        enable_token_parallel=enable_token_parallel,
    )
    rank = dist.get_rank()
    backend = str(dist.get_backend())
    groups: dict[str, GroupCoordinator] = {}
    for name in DIMENSIONS:
        for ranks in layout.groups[name]:
            coordinator = _make_coordinator(ranks, rank, backend)
            if coordinator is not None:
                groups[name] = coordinator
    for ranks in expert_parallel_groups(layout):
        coordinator = _make_coordinator(ranks, rank, backend)
        if coordinator is not None:
            groups["ep"] = coordinator
    _GROUPS.update(groups)
    _LAYOUT = layout
    return layout


def expert_parallel_groups(layout: RankLayout) -> list[list[int]]:
    """The expert-parallel (EP) groups, as vLLM forms them: the ranks that share every index but TP's
    -- and TKNP's, when token parallelism is on (the seed: EP spans TP x TKNP). Pure; EP rank
    ``tknp * tp_size + tp``."""
    groups: dict[tuple[int, int, int], list[int]] = {}
    for rank in range(layout.world_size):
        c = layout.coords(rank)
        groups.setdefault((c["external_dp"], c["dp"], c["pp"]), []).append(rank)
    return list(groups.values())


def initialize_tensor_parallel(tensor_parallel_size: int) -> RankLayout:
    """Shorthand for ``initialize_model_parallel(tensor_parallel_size=...)``."""
    return initialize_model_parallel(tensor_parallel_size=tensor_parallel_size)


def model_parallel_is_initialized() -> bool:
    return _LAYOUT is not None


def destroy_model_parallel() -> None:
    """Destroy this rank's groups and forget the layout (safe to call when not initialised)."""
    global _LAYOUT
    if dist.is_available() and dist.is_initialized():
        destroyed: set[int] = set()
        for coordinator in _GROUPS.values():
            for group in (coordinator.device_group, coordinator.cpu_group):
                if id(group) not in destroyed:
                    destroyed.add(id(group))
                    dist.destroy_process_group(group)
    _GROUPS.clear()
    _LAYOUT = None


def _require_initialized(what: str) -> RankLayout:
    if _LAYOUT is None:
        raise RuntimeError(
            f"{what} is not initialised; call initialize_model_parallel(...) first "
            f"(inside a rank started by hybridpar.launch)."
        )
    return _LAYOUT


def _get(name: str) -> GroupCoordinator:
    _require_initialized(f"the {name} group")
    return _GROUPS[name]


def get_layout() -> RankLayout:
    """The :class:`RankLayout` built by the last :func:`initialize_model_parallel`."""
    return _require_initialized("the rank layout")


def get_tp_group() -> GroupCoordinator:
    return _get("tp")


def get_pp_group() -> GroupCoordinator:
    return _get("pp")


def get_dp_group() -> GroupCoordinator:
    return _get("dp")


def get_tknp_group() -> GroupCoordinator:
    return _get("tknp")


def get_external_dp_group() -> GroupCoordinator:
    return _get("external_dp")


def get_ep_group() -> GroupCoordinator:
    """The expert-parallel group: TP, or TP x TKNP with token parallelism (:func:`expert_parallel_groups`)."""
    return _get("ep")


def get_expert_parallel_rank() -> int:
    return get_ep_group().rank_in_group


def get_expert_parallel_world_size() -> int:
    return get_ep_group().world_size


def get_tensor_model_parallel_rank() -> int:
    return get_tp_group().rank_in_group


def get_tensor_model_parallel_world_size() -> int:
    return get_tp_group().world_size


def get_pipeline_model_parallel_rank() -> int:
    return get_pp_group().rank_in_group


def get_pipeline_model_parallel_world_size() -> int:
    return get_pp_group().world_size


def get_data_parallel_rank() -> int:
    return get_dp_group().rank_in_group


def get_data_parallel_world_size() -> int:
    return get_dp_group().world_size


def get_tknp_rank() -> int:
    return get_tknp_group().rank_in_group


def get_tknp_world_size() -> int:
    return get_tknp_group().world_size


def is_tknp_initialized() -> bool:
    """True when groups are initialised with token parallelism enabled."""
    return _LAYOUT is not None and _LAYOUT.enable_token_parallel


def is_tknp_root() -> bool:
    """True on rank 0 of this rank's token-parallel group (always true without TKNP)."""
    return get_tknp_rank() == 0
