"""``TPRadixAttentionModelWrapper``: a checkpoint, loaded tensor-parallel, with a tokenizer and ``generate``.

Use it inside every rank of a TP group (``hybridpar.launch`` or ``torchrun`` + ``run_torchrun``)
after ``initialize_tensor_parallel(tp)``::

    def worker():
        initialize_tensor_parallel(2)
        m = TPRadixAttentionModelWrapper(model_name=None)       # built-in qwen2-tiny
        return m.generate(["Hello"], max_new_tokens=16)

    hybridpar.launch(worker, 2)

``generate`` serves a batch from a contiguous KV cache
(:class:`~hybridpar.models.attention_backend.ContiguousKVCache`). The serving arguments
(``page_size``, pool size, radix cache on/off, schedule policy, chunked prefill, ...) are kept in
``server_args`` (:class:`~hybridpar.config.ServerArgs`) for
:class:`~hybridpar.radix.scheduler.TPScheduler`, which serves requests with RadixAttention: a
paged KV pool plugged into the same :class:`~hybridpar.models.attention_backend.AttentionBackend`
seam, continuous batching and a radix cache coordinated across the TP ranks::

    sched = TPScheduler(TPRadixAttentionModelWrapper(None, page_size=16, max_total_tokens=4096))
    rid = sched.add_request("What is AI?", max_new_tokens=20)
    results = sched.process_requests()      # {rid: RequestResult} on every rank
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import cached_property
from pathlib import Path
from typing import Any

import torch

from hybridpar.distributed.parallel_state import GroupCoordinator, get_tp_group, model_parallel_is_initialized
from hybridpar.models.attention_backend import ForwardBatch
from hybridpar.models.config import ModelConfig
from hybridpar.models.decoder import DecoderForCausalLM
from hybridpar.models.default_checkpoint import resolve_model
from hybridpar.models.generate import GenerationOutput, generate
from hybridpar.models.loader import LOAD_FORMATS, LoadStats, load_checkpoint
from hybridpar.core import SamplingParams
from hybridpar.config import ServerArgs

DTYPES = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
          "fp16": torch.float16, "float16": torch.float16}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """``"bf16"``/``"bfloat16"``/``torch.bfloat16`` -> ``torch.bfloat16`` (and fp32, fp16)."""
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {dtype!r}")
    return DTYPES[dtype]


class TPRadixAttentionModelWrapper:
    """Resolve ``model_name``, build the TP decoder for this rank, load this rank's weight shards.

    Attributes: ``path`` (checkpoint directory), ``config`` (:class:`ModelConfig`), ``model``
    (:class:`DecoderForCausalLM`), ``load_stats`` (:class:`LoadStats` of this rank), ``tokenizer``
    (loaded on first use), ``tp_group``, ``device``, ``dtype``, ``page_size``, ``server_args``
    (:class:`~hybridpar.config.ServerArgs` built from ``page_size``, the keyword-only
    serving arguments and ``**server_args``; validated before any weight is read).
    """

    def __init__(self, model_name: str | None = None, device: str | torch.device | None = None, page_size: int = 16,
                 dtype: str | torch.dtype = torch.float32, load_format: str = "sharded",
                 tp_group: GroupCoordinator | None = None, *, ep_group: GroupCoordinator | None = None,
                 max_total_tokens: int | None = None,
                 mem_fraction_static: float = 0.85, disable_radix_cache: bool = False, schedule_policy: str = "lpm",
                 chunked_prefill_size: int | None = 8192, **server_args: Any) -> None:
        if tp_group is None and not model_parallel_is_initialized():
            raise RuntimeError(
                "TPRadixAttentionModelWrapper needs an initialised tensor-parallel group: inside each rank "
                "(started by hybridpar.launch, or torchrun + hybridpar.run_torchrun) call "
                "hybridpar.initialize_tensor_parallel(tp_size) first, or pass tp_group=")
        if load_format not in LOAD_FORMATS:
            raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
        self.server_args = ServerArgs(page_size=page_size, max_total_tokens=max_total_tokens,
                                      mem_fraction_static=mem_fraction_static, disable_radix_cache=disable_radix_cache,
                                      schedule_policy=schedule_policy, chunked_prefill_size=chunked_prefill_size,
                                      **server_args)
        from hybridpar.distributed.launcher import current_device

        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        self.device = torch.device(device) if device is not None else current_device()
        self.dtype = parse_dtype(dtype)
        self.page_size = page_size
        self.path: Path = resolve_model(model_name)
        self.config = ModelConfig.from_pretrained(self.path)
        with torch.device(self.device):
            self.model = DecoderForCausalLM(self.config, self.tp_group, self.dtype, ep_group)
        self.model.eval()
        self.load_stats: LoadStats = load_checkpoint(self.model, self.path, load_format)

    @cached_property
    def tokenizer(self) -> Any:
        """The checkpoint's tokenizer via ``transformers.AutoTokenizer`` (no remote code)."""
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(self.path), trust_remote_code=False)

    def forward(self, input_ids: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        """Hidden states ``[T, hidden]`` of a flattened ragged batch (positions from ``forward_batch``)."""
        return self.model(input_ids, forward_batch.positions, forward_batch)

    def encode(self, text: str) -> list[int]:
        return list(self.tokenizer(text).input_ids)

    def decode(self, token_ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(token_ids), skip_special_tokens=True)

    def generate_ids(self, prompts: Sequence[Sequence[int]], sampling: SamplingParams | Sequence[SamplingParams]
                     = SamplingParams(), return_logits: bool = False) -> list[GenerationOutput]:
        """Generate from token-id prompts; every rank returns the same outputs."""
        return generate(self.model, prompts, sampling, return_logits=return_logits,
                        use_cuda_graph=self.server_args.use_cuda_graph)

    def generate(self, prompts: Sequence[str], max_new_tokens: int = 32, sampling: SamplingParams | None = None,
                 ) -> list[str]:
        """Generate text for each prompt (greedy unless ``sampling`` says otherwise)."""
        params = sampling or SamplingParams(max_new_tokens=max_new_tokens)
        outputs = self.generate_ids([self.encode(p) for p in prompts], params)
        return [self.decode(o.token_ids) for o in outputs]

    def __repr__(self) -> str:
        return (f"TPRadixAttentionModelWrapper({self.config.architecture} from {str(self.path)!r}, "
                f"tp_rank={self.tp_group.rank_in_group}/{self.tp_group.world_size}, dtype={self.dtype}, "
                f"device={self.device}, page_size={self.page_size})")
