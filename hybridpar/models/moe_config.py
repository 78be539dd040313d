"""Mixture-of-experts settings of a checkpoint, and the checks that a parallel layout can hold its experts.

The Qwen2-MoE architecture (transformers' ``Qwen2MoeForCausalLM``) is the Qwen2 decoder whose MLP,
in the *sparse* layers, is replaced by a block of ``num_experts`` small SwiGLU experts, a router
that sends each token to ``top_k`` of them, and one *shared* expert every token passes through,
scaled by a sigmoid gate. A layer is sparse unless it is listed in ``mlp_only_layers``, and only
every ``decoder_sparse_step``-th layer is.

Two ways to spread the experts over ranks (:class:`~hybridpar.layers.fused_moe.FusedMoE`):

* tensor-parallel experts: every rank of the TP group holds ``1/tp`` of every expert's
  intermediate dimension, which must divide ``moe_intermediate_size``;
* expert parallelism (``enable_expert_parallel``): every rank of the EP group holds
  ``num_experts / ep`` whole experts. The EP group spans TP, or TP x TKNP when token
  parallelism is on (:func:`expert_parallel_size`), so ``num_experts`` must divide by it.

:func:`check_moe_parallel` applies both rules in the parent, before any process starts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

MOE_ARCHITECTURES = ("Qwen2MoeForCausalLM",)


@dataclass(frozen=True)
class MoeConfig:
    """The MoE switches of a config.json (transformers' names)."""

    num_experts: int
    num_experts_per_tok: int  # top-k
    moe_intermediate_size: int
    shared_expert_intermediate_size: int  # 0: no shared expert
    norm_topk_prob: bool  # renormalise the top-k probabilities to sum to 1
    decoder_sparse_step: int = 1
    mlp_only_layers: tuple[int, ...] = ()

    @property
    def top_k(self) -> int:
        return self.num_experts_per_tok

    def is_sparse(self, layer_id: int) -> bool:
        """Whether layer ``layer_id`` has the MoE block (else the dense MLP), as transformers decides."""
        return (layer_id not in self.mlp_only_layers and self.num_experts > 0
                and (layer_id + 1) % self.decoder_sparse_step == 0)

    def block_parameters(self, hidden: int) -> int:
        """Parameters of one MoE block: router, experts, shared expert and its gate."""
        shared = 3 * hidden * self.shared_expert_intermediate_size + hidden if self.shared_expert_intermediate_size else 0
        return self.num_experts * hidden + self.num_experts * 3 * hidden * self.moe_intermediate_size + shared

    @classmethod
    def from_hf_config(cls, hf: Any) -> MoeConfig:
        return cls(num_experts=hf.num_experts, num_experts_per_tok=hf.num_experts_per_tok,
                   moe_intermediate_size=hf.moe_intermediate_size,
                   shared_expert_intermediate_size=getattr(hf, "shared_expert_intermediate_size", 0) or 0,
                   norm_topk_prob=bool(hf.norm_topk_prob),
                   decoder_sparse_step=getattr(hf, "decoder_sparse_step", 1) or 1,
                   mlp_only_layers=tuple(getattr(hf, "mlp_only_layers", None) or ()))


def expert_parallel_size(tensor_parallel_size: int, token_parallel_size: int = 1,
                         enable_token_parallel: bool = False) -> int:
    """Ranks of one EP group, as vLLM lays it out: TP, or TP x TKNP when token parallelism is on."""
    return tensor_parallel_size * (token_parallel_size if enable_token_parallel else 1)


def valid_expert_parallel_sizes(num_experts: int) -> list[int]:
    return [d for d in range(1, num_experts + 1) if num_experts % d == 0]


def check_expert_parallel(num_experts: int, ep_size: int, how: str = "") -> None:
    """Raise ``ParallelConfigError`` (one line, naming the valid sizes) unless ``ep_size`` divides the experts."""
    from hybridpar.config import ParallelConfigError

    if num_experts % ep_size:
        valid = ", ".join(map(str, valid_expert_parallel_sizes(num_experts)))
        raise ParallelConfigError(
            f"enable_expert_parallel: num_experts={num_experts} is not divisible by the expert-parallel size "
            f"{ep_size}{how}; valid expert-parallel sizes for this model: {valid}")


def check_moe_parallel(moe: MoeConfig, tensor_parallel_size: int, token_parallel_size: int = 1,
                       enable_token_parallel: bool = False, enable_expert_parallel: bool = False) -> None:
    """Every size rule of an MoE model under a layout (pure: call it before spawning ranks)."""
    from hybridpar.config import ParallelConfigError

    tp = tensor_parallel_size
    if enable_expert_parallel:
        ep = expert_parallel_size(tp, token_parallel_size, enable_token_parallel)
        how = f" (tensor_parallel_size {tp} x token_parallel_size {token_parallel_size})" \
            if enable_token_parallel else f" (= tensor_parallel_size {tp})"
        check_expert_parallel(moe.num_experts, ep, how)
    elif moe.moe_intermediate_size % tp:
        raise ParallelConfigError(
            f"tensor-parallel experts: tensor_parallel_size={tp} does not divide moe_intermediate_size="
            f"{moe.moe_intermediate_size}; pick a size that divides it, or set enable_expert_parallel=True")
    if moe.shared_expert_intermediate_size % tp:
        raise ParallelConfigError(
            f"tensor_parallel_size={tp} does not divide shared_expert_intermediate_size="
            f"{moe.shared_expert_intermediate_size}; pick a tensor_parallel_size that divides it")


def moe_tensor_shapes(config: dict[str, Any], prefix: str) -> dict[str, tuple[int, ...]]:
    """Checkpoint tensors of one sparse layer's MLP (``prefix`` = ``"model.layers.{i}."``), Hugging Face layout:
    the router ``mlp.gate``, every expert's gate/up/down, the shared expert and its gate."""
    h, i, s = config["hidden_size"], config["moe_intermediate_size"], config.get("shared_expert_intermediate_size", 0)
    shapes: dict[str, tuple[int, ...]] = {prefix + "mlp.gate.weight": (config["num_experts"], h)}
    for e in range(config["num_experts"]):
        for proj, shape in (("gate_proj", (i, h)), ("up_proj", (i, h)), ("down_proj", (h, i))):
            shapes[prefix + f"mlp.experts.{e}.{proj}.weight"] = shape
    if s:
        for proj, shape in (("gate_proj", (s, h)), ("up_proj", (s, h)), ("down_proj", (h, s))):
            shapes[prefix + f"mlp.shared_expert.{proj}.weight"] = shape
        shapes[prefix + "mlp.shared_expert_gate.weight"] = (1, h)
    return shapes


def is_sparse_layer(config: dict[str, Any], layer_id: int) -> bool:
    """:meth:`MoeConfig.is_sparse` on a raw config.json dict (False for a dense model)."""
    if config.get("model_type") != "qwen2_moe":
        return False
    step = config.get("decoder_sparse_step", 1) or 1
    return (layer_id not in (config.get("mlp_only_layers") or []) and config["num_experts"] > 0
            and (layer_id + 1) % step == 0)
