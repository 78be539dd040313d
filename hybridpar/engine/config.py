"""EngineConfig: every setting of one engine, checked in the parent before any rank starts.

One frozen, picklable dataclass travels to every rank (:class:`~hybridpar.engine.worker.EngineWorker`).
:meth:`EngineConfig.check` raises a one-line ``ValueError`` (or
:class:`~hybridpar.config.ParallelConfigError`) that names the fix, for everything that can be known
without a process: the layout (TKNP with DP, sizes), the model (resolvable, heads divisible by TP),
dtype, page size, policy, lengths.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from hybridpar.config import ParallelConfig
from hybridpar.config import ServerArgs

if TYPE_CHECKING:
    from hybridpar.models.config import ModelConfig


@dataclass(frozen=True, kw_only=True)
class EngineConfig:
    """The engine's settings (vLLM's names where vLLM has one).

    ``model``: a built-in name, a checkpoint directory or a hub id (``None``: the built-in default).
    ``max_num_seqs``: requests running at once per KV pool. ``max_model_len``: prompt + output
    tokens of one request (``None``: the model's ``max_position_embeddings``). KV pool per rank:
    ``kv_cache_tokens`` if given, else ``gpu_memory_utilization`` of the GPU (SGLang's
    ``mem_fraction_static``), or ``cpu_kv_cache_bytes`` on the CPU; under token parallelism each
    rank's pool holds ``max_num_seqs`` requests of ``max_model_len`` tokens. ``debug_checks``: the
    radix cache's integrity check after every step (slow; a broken invariant fails the rank).
    ``enforce_eager``: no CUDA graphs (:attr:`use_cuda_graph`). ``attention_backend`` (SGLang's name):
    the decode attention of graph steps, ``"torch_native"`` or ``"triton"`` (``None``: the device's default).
    """

    model: str | None = None
    tensor_parallel_size: int = 1
    token_parallel_size: int = 1
    enable_token_parallel: bool | None = None
    data_parallel_size: int = 1
    enable_expert_parallel: bool = False  # MoE models: whole experts per rank over the EP group (TP, or TP x TKNP)
    dtype: str = "auto"
    page_size: int = 16
    enable_prefix_caching: bool = True
    schedule_policy: str = "lpm"
    max_num_seqs: int = 64
    max_model_len: int | None = None
    kv_cache_tokens: int | None = None
    gpu_memory_utilization: float = 0.85
    cpu_kv_cache_bytes: int = 64 << 20
    chunked_prefill_size: int | None = 8192
    seed: int = 0
    debug_checks: bool = False
    enforce_eager: bool = False
    attention_backend: str | None = None

    @property
    def parallel(self) -> ParallelConfig:
        return ParallelConfig(tensor_parallel_size=self.tensor_parallel_size,
                              token_parallel_size=self.token_parallel_size,
                              data_parallel_size=self.data_parallel_size,
                              enable_token_parallel=self.enable_token_parallel)

    @property
    def world_size(self) -> int:
        return self.parallel.world_size

    @property
    def token_parallel(self) -> bool:
        return self.parallel.token_parallel_enabled

    @property
    def torch_dtype_name(self) -> str:
        """``"auto"`` is fp32: the built-in checkpoints are fp32, and the CPU runs fp32 best."""
        return "fp32" if self.dtype == "auto" else self.dtype

    def check(self) -> ModelConfig:
        """Validate everything knowable before spawning; returns the model's config."""
        from hybridpar.models.config import ModelConfig, check_tp_size
        from hybridpar.models.default_checkpoint import resolve_model
        from hybridpar.models.model_wrapper import parse_dtype

        self.parallel.validate()
        parse_dtype(self.torch_dtype_name)
        model = ModelConfig.from_pretrained(resolve_model(self.model))
        check_tp_size(model, self.tensor_parallel_size, enable_expert_parallel=self.enable_expert_parallel)
        if model.moe is not None:
            from hybridpar.models.moe_config import check_moe_parallel

            check_moe_parallel(model.moe, self.tensor_parallel_size, self.token_parallel_size, self.token_parallel,
                               self.enable_expert_parallel)
        if self.max_model_len is not None and not 2 <= self.max_model_len <= model.max_position_embeddings:
            raise ValueError(f"max_model_len must be in [2, {model.max_position_embeddings}] (the model's "
                             f"max_position_embeddings), got {self.max_model_len}")
        self.server_args(model)  # page size, policy, pool and memory settings (ServerArgs checks them)
        return model

    def server_args(self, model: ModelConfig) -> ServerArgs:
        """The serving arguments of every TP scheduler (SGLang's names)."""
        return ServerArgs(page_size=self.page_size, max_total_tokens=self.kv_cache_tokens,
                          mem_fraction_static=self.gpu_memory_utilization, cpu_kv_cache_bytes=self.cpu_kv_cache_bytes,
                          max_running_requests=self.max_num_seqs, max_context_len=self.context_len(model),
                          disable_radix_cache=not self.enable_prefix_caching, schedule_policy=self.schedule_policy,
                          chunked_prefill_size=self.chunked_prefill_size, debug_checks=self.debug_checks,
                          use_cuda_graph=self.use_cuda_graph, attention_backend=self.attention_backend)

    @property
    def use_cuda_graph(self) -> bool:
        """Decode steps replay CUDA graphs where the ranks have GPUs, unless ``enforce_eager`` (vLLM's name);
        not under token parallelism, whose attention crosses ranks inside the step."""
        import torch

        return not self.enforce_eager and not self.token_parallel and torch.cuda.is_available()

    def context_len(self, model: ModelConfig) -> int:
        """Prompt + output tokens one request may have."""
        return self.max_model_len or model.max_position_embeddings
