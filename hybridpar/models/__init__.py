"""Chapter 4: a tensor-parallel transformer (Qwen2 / Llama / Qwen3) that matches transformers.

=====================================  ===============================================
module                                 concept
=====================================  ===============================================
:mod:`~.default_checkpoint`            built-in offline checkpoints, model-name resolution
:mod:`~.config`                        transformers config -> :class:`ModelConfig`
:mod:`~.rotary`                        RoPE (default, linear, llama3)
:mod:`~.attention_backend`             ForwardBatch + the KV-cache seam (contiguous cache)
:mod:`~.decoder`                       the TP decoder built from :mod:`hybridpar.layers`
:mod:`~.loader`                        sharded (get_slice) vs full safetensors loading
:mod:`~.sampling`, :mod:`~.generate`   greedy / top-k / top-p, batched generation
:mod:`~.model_wrapper`                 ``TPRadixAttentionModelWrapper``
:mod:`~.decode_attention`              batched decode attention (no per-request loop)
:mod:`~.cuda_graph`                    CUDA-graph capture/replay of the decode step
:mod:`~.fused_ops`                     when the fused Triton kernels run (GPU default)
:mod:`~.triton_ops`                    RMSNorm(+residual), RoPE, SwiGLU, KV write kernels
:mod:`~.shard_report`                  per-rank shard reports for notebooks
:mod:`~.verify`                        TP vs transformers check (CLI)
=====================================  ===============================================

Submodules are imported on demand; nothing here imports transformers.
"""
