"""A compact tensor-parallel decoder for the Qwen2, Llama and Qwen3 families.

One set of classes, switched by :class:`~hybridpar.models.config.ModelConfig` flags (QKV bias,
q/k norm, tied embeddings, ...), built from hybridpar's TP layers::

    embed_tokens   VocabParallelEmbedding   vocabulary rows split; all-reduce
    per layer:
      input_layernorm, post_attention_layernorm   RMSNorm, replicated
      self_attn.qkv_proj   QKVParallelLinear   heads split (KV heads replicated when tp > KV heads)
      self_attn.o_proj     RowParallelLinear   all-reduce #1
      mlp.gate_up_proj     MergedColumnParallelLinear
      mlp.down_proj        RowParallelLinear   all-reduce #2
    norm           RMSNorm
    lm_head        ParallelLMHead (or tied to embed_tokens); all-gather of the logits

Qwen2-MoE is the same decoder with, in its sparse layers, a :class:`~hybridpar.models.moe.SparseMoeBlock`
in place of ``mlp`` (router, routed experts as TP slices or by expert parallelism, shared expert;
one all-reduce).

Module names mirror the Hugging Face checkpoints, so :meth:`DecoderForCausalLM.load_weights`
only has to map the fused parameters (``q/k/v_proj -> qkv_proj``, ``gate/up_proj -> gate_up_proj``).

The model runs on a flattened ragged batch (``input_ids [T]``, ``positions [T]``) and reaches the
KV cache only through ``forward_batch.attn_backend`` (see :mod:`hybridpar.models.attention_backend`).
Numerics match transformers: RMSNorm in float32, residual adds in the model dtype.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from hybridpar.distributed.parallel_state import GroupCoordinator, get_tp_group
from hybridpar.layers.linear import MergedColumnParallelLinear, QKVParallelLinear, RowParallelLinear
from hybridpar.layers.vocab_parallel_embedding import ParallelLMHead, VocabParallelEmbedding
from hybridpar.models.attention_backend import ContiguousKVCache, ForwardBatch
from hybridpar.models.config import ModelConfig, check_tp_size
from hybridpar.models.fused_ops import use_fused
from hybridpar.models.loader import LoadedWeight, default_weight_loader
from hybridpar.models.moe import SparseMoeBlock, expert_param_name
from hybridpar.models.rotary import RotaryEmbedding


class WeightMismatchError(ValueError):
    """The checkpoint's tensor names do not match the model (missing or unexpected tensors)."""


class RMSNorm(nn.Module):
    """``weight * x / sqrt(mean(x^2) + eps)``, computed in float32, replicated on every rank."""

    def __init__(self, size: int, eps: float, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size, dtype=dtype))
        self.weight.weight_loader = default_weight_loader

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None
                ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``norm(x)``; with ``residual``, ``(norm(x + residual), x + residual)``: the residual add
        happens here, so that a GPU does it in the norm's kernel (:mod:`hybridpar.models.fused_ops`)."""
        if use_fused(x):
            from hybridpar.models.triton_ops import rms_norm

            return rms_norm(x, self.weight, self.eps, residual)
        if residual is None:
            return self._norm(x)
        x = x + residual  # in the activation dtype, as transformers adds
        return self._norm(x), x

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        x = x.to(torch.float32)
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x.to(dtype)


class Attention(nn.Module):
    """Grouped-query self-attention over this rank's heads; the cache lives in the attention backend."""

    def __init__(self, config: ModelConfig, layer_id: int, tp_group: GroupCoordinator, dtype: torch.dtype) -> None:
        super().__init__()
        self.layer_id = layer_id
        self.head_dim = config.head_dim
        self.qkv_proj = QKVParallelLinear(config.hidden_size, config.head_dim, config.num_heads, config.num_kv_heads,
                                          bias=config.qkv_bias, params_dtype=dtype, tp_group=tp_group)
        self.num_heads, self.num_kv_heads = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads
        self.o_proj = RowParallelLinear(config.num_heads * config.head_dim, config.hidden_size, bias=config.o_bias,
                                        params_dtype=dtype, tp_group=tp_group)
        if config.qk_norm:
            self.q_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
            self.k_norm = RMSNorm(config.head_dim, config.rms_norm_eps, dtype)
        self.qk_norm = config.qk_norm
        self.rotary_emb = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)

    def forward(self, positions: torch.Tensor, x: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        t = x.shape[0]
        q, k, v = self.qkv_proj(x).split([self.qkv_proj.q_size, self.qkv_proj.kv_size, self.qkv_proj.kv_size], -1)
        q = q.view(t, self.num_heads, self.head_dim)
        k = k.view(t, self.num_kv_heads, self.head_dim)
        v = v.view(t, self.num_kv_heads, self.head_dim)
        if self.qk_norm:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = self.rotary_emb(positions, q, k)
        o = forward_batch.attn_backend.forward(self.layer_id, q, k, v, forward_batch)
        return self.o_proj(o.reshape(t, self.num_heads * self.head_dim))


class MLP(nn.Module):
    """SwiGLU: ``down(silu(gate(x)) * up(x))``, gate and up fused in one column-parallel matmul."""

    def __init__(self, config: ModelConfig, tp_group: GroupCoordinator, dtype: torch.dtype,
                 intermediate_size: int | None = None, reduce_results: bool = True) -> None:
        super().__init__()
        inter = intermediate_size or config.intermediate_size
        self.gate_up_proj = MergedColumnParallelLinear(config.hidden_size, [inter, inter], bias=config.mlp_bias,
                                                       params_dtype=dtype, tp_group=tp_group)
        self.down_proj = RowParallelLinear(inter, config.hidden_size, bias=config.mlp_bias, params_dtype=dtype,
                                           tp_group=tp_group, reduce_results=reduce_results)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        if use_fused(gate_up):
            from hybridpar.models.triton_ops import silu_and_mul

            return self.down_proj(silu_and_mul(gate_up))
        gate, up = gate_up.chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


def make_mlp(config: ModelConfig, layer_id: int, tp_group: GroupCoordinator, dtype: torch.dtype,
             ep_group: GroupCoordinator | None = None) -> nn.Module:
    """The dense MLP, or in a sparse layer of an MoE model the :class:`SparseMoeBlock` (whose shared
    expert is a TP MLP left unreduced: the block reduces once)."""
    moe = config.moe
    if moe is None or not moe.is_sparse(layer_id):
        return MLP(config, tp_group, dtype)
    shared = MLP(config, tp_group, dtype, moe.shared_expert_intermediate_size, reduce_results=False) \
        if moe.shared_expert_intermediate_size else None
    return SparseMoeBlock(config, layer_id, tp_group, ep_group, dtype, shared)


class DecoderLayer(nn.Module):
    def __init__(self, config: ModelConfig, layer_id: int, tp_group: GroupCoordinator, dtype: torch.dtype,
                 ep_group: GroupCoordinator | None = None) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.self_attn = Attention(config, layer_id, tp_group, dtype)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)
        self.mlp = make_mlp(config, layer_id, tp_group, dtype, ep_group)

    def forward(self, positions: torch.Tensor, h: torch.Tensor, residual: torch.Tensor | None,
                forward_batch: ForwardBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mlp output, residual stream)``: the next norm adds the two (``residual`` is ``None``
        before the first layer, whose input is the residual stream itself)."""
        if residual is None:
            h, residual = self.input_layernorm(h), h
        else:
            h, residual = self.input_layernorm(h, residual)
        h = self.self_attn(positions, h, forward_batch)
        h, residual = self.post_attention_layernorm(h, residual)
        return self.mlp(h), residual


class DecoderModel(nn.Module):
    def __init__(self, config: ModelConfig, tp_group: GroupCoordinator, dtype: torch.dtype,
                 ep_group: GroupCoordinator | None = None) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(config.vocab_size, config.hidden_size, params_dtype=dtype,
                                                   tp_group=tp_group)
        self.layers = nn.ModuleList(DecoderLayer(config, i, tp_group, dtype, ep_group)
                                    for i in range(config.num_layers))
        self.norm = RMSNorm(config.hidden_size, config.rms_norm_eps, dtype)

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        h, residual = self.embed_tokens(input_ids), None
        for layer in self.layers:
            h, residual = layer(positions, h, residual, forward_batch)
        return self.norm(h, residual)[0]


# checkpoint name fragment -> (fused parameter fragment, shard id)
_STACKED = {
    ".q_proj.": (".qkv_proj.", "q"), ".k_proj.": (".qkv_proj.", "k"), ".v_proj.": (".qkv_proj.", "v"),
    ".gate_proj.": (".gate_up_proj.", 0), ".up_proj.": (".gate_up_proj.", 1),
}


class DecoderForCausalLM(nn.Module):
    """The whole tensor-parallel model. Build it inside a rank whose TP group is initialised.

    ``forward(input_ids [T], positions [T], forward_batch) -> hidden [T, hidden_size]`` (same on
    every rank); ``compute_logits(hidden [N, hidden]) -> [N, vocab_size]`` full-vocabulary logits on
    every rank. ``ep_group`` (MoE models): spread the experts by expert parallelism over it
    (``get_ep_group()``); ``None``: tensor-parallel experts.
    """

    def __init__(self, config: ModelConfig, tp_group: GroupCoordinator | None = None,
                 dtype: torch.dtype | None = None, ep_group: GroupCoordinator | None = None) -> None:
        super().__init__()
        self.config = config
        self.tp_group = tp_group if tp_group is not None else get_tp_group()
        check_tp_size(config, self.tp_group.world_size, enable_expert_parallel=ep_group is not None)
        self.dtype = dtype or torch.get_default_dtype()
        self.model = DecoderModel(config, self.tp_group, self.dtype, ep_group)
        self.lm_head = ParallelLMHead(config.vocab_size, config.hidden_size, params_dtype=self.dtype,
                                      tp_group=self.tp_group)
        if config.tie_word_embeddings:
            self.lm_head.tie_weights(self.model.embed_tokens)

    @property
    def num_kv_heads_per_rank(self) -> int:
        return self.model.layers[0].self_attn.num_kv_heads

    def forward(self, input_ids: torch.Tensor, positions: torch.Tensor, forward_batch: ForwardBatch) -> torch.Tensor:
        forward_batch.attn_backend.init_forward_metadata(forward_batch)
        return self.model(input_ids, positions, forward_batch)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden)

    def make_kv_cache(self, max_batch_size: int, max_seq_len: int) -> ContiguousKVCache:
        """A :class:`ContiguousKVCache` sized for this rank's KV heads, on the model's device and dtype."""
        device = self.lm_head.weight.device
        return ContiguousKVCache(self.config.num_layers, self.num_kv_heads_per_rank, self.config.head_dim,
                                 max_batch_size, max_seq_len, dtype=self.dtype, device=device)

    @staticmethod
    def param_name(checkpoint_name: str) -> tuple[str, str | int | tuple[int, str] | None]:
        """The model parameter a checkpoint tensor loads into, and the shard id to pass its loader."""
        expert = expert_param_name(checkpoint_name)
        if expert is not None:
            return expert
        for fragment, (fused, shard_id) in _STACKED.items():
            if fragment in checkpoint_name:
                return checkpoint_name.replace(fragment, fused), shard_id
        return checkpoint_name, None

    def load_weights(self, weights: Iterable[tuple[str, LoadedWeight]]) -> dict[str, int]:
        """Load ``(checkpoint name, tensor or safetensors slice)`` pairs; each parameter keeps its shard.

        Every parameter (and every shard of a fused one) must be loaded exactly once, and every
        checkpoint tensor must be used: otherwise :class:`WeightMismatchError` lists the names.
        ``lm_head.weight`` of a tied model and rotary ``inv_freq`` buffers are skipped. Returns the
        number of checkpoint tensors loaded into each parameter.
        """
        params = dict(self.named_parameters())
        loaded: dict[str, int] = {name: 0 for name in params}
        unexpected: list[str] = []
        for name, weight in weights:
            if name.endswith("rotary_emb.inv_freq") or (name == "lm_head.weight" and self.config.tie_word_embeddings):
                continue
            param_name, shard_id = self.param_name(name)
            param = params.get(param_name)
            if param is None:
                unexpected.append(name)
                continue
            loader = getattr(param, "weight_loader", default_weight_loader)
            if shard_id is None:
                loader(param, weight)
            else:
                loader(param, weight, shard_id)
            loaded[param_name] += 1
        expected = {name: getattr(p, "checkpoint_parts", 3 if ".qkv_proj." in name else 2 if ".gate_up_proj." in name
                                  else 1) for name, p in params.items()}
        missing = [f"{n} ({loaded[n]} of {expected[n]} parts)" for n in params if loaded[n] != expected[n]]
        if unexpected or missing:
            raise WeightMismatchError(
                "checkpoint does not match the model built from its config.json: "
                + (f"unexpected checkpoint tensors: {unexpected}; " if unexpected else "")
                + (f"parameters not loaded (missing or duplicated in the checkpoint): {missing}" if missing else ""))
        return loaded
