"""Chapter 2: starting ranks, building process groups, and the collectives between them.

* :mod:`.launcher` -- ``launch(fn, nprocs)`` starts a ``torch.distributed`` world of processes.
* :mod:`.parallel_state` -- the rank layout (TP, PP, DP, TKNP) and its process groups.
* :mod:`.communication_op` -- collectives on a group (all-reduce, all-gather, scatterv, ...).
* :mod:`.mappings` -- the f/g conjugate autograd operators of tensor parallelism.
"""

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
from hybridpar.distributed.launcher import (
    LaunchTimeoutError,
    RankFailedError,
    current_device,
    launch,
    resolve_backend,
    run_torchrun,
)
from hybridpar.distributed.mappings import (
    copy_to_tensor_model_parallel_region,
    gather_from_tensor_model_parallel_region,
    reduce_from_tensor_model_parallel_region,
    scatter_to_tensor_model_parallel_region,
)
from hybridpar.distributed.parallel_state import (
    GroupCoordinator,
    ParallelConfigError,
    RankLayout,
    compute_layout,
    destroy_model_parallel,
    get_data_parallel_rank,
    get_data_parallel_world_size,
    get_dp_group,
    get_external_dp_group,
    get_layout,
    get_pipeline_model_parallel_rank,
    get_pipeline_model_parallel_world_size,
    get_pp_group,
    get_tensor_model_parallel_rank,
    get_tensor_model_parallel_world_size,
    get_tknp_group,
    get_tknp_rank,
    get_tknp_world_size,
    get_tp_group,
    initialize_model_parallel,
    initialize_tensor_parallel,
    is_tknp_initialized,
    is_tknp_root,
    model_parallel_is_initialized,
)

__all__ = [
    # launcher
    "launch",
    "resolve_backend",
    "current_device",
    "run_torchrun",
    "RankFailedError",
    "LaunchTimeoutError",
    # parallel_state
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
    # communication_op
    "all_reduce",
    "all_gather",
    "reduce_scatter",
    "gather",
    "scatter",
    "broadcast",
    "broadcast_object",
    "scatterv",
    "gatherv",
    "local_shard",
    "tensor_model_parallel_all_reduce",
    "tensor_model_parallel_all_gather",
    # mappings
    "copy_to_tensor_model_parallel_region",
    "reduce_from_tensor_model_parallel_region",
    "scatter_to_tensor_model_parallel_region",
    "gather_from_tensor_model_parallel_region",
]
