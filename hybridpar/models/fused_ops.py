"""When the decoder's small operations run as fused Triton kernels, and when as plain PyTorch.

Each of :class:`~hybridpar.models.decoder.RMSNorm`, :class:`~hybridpar.models.decoder.MLP`'s
activation and :class:`~hybridpar.models.rotary.RotaryEmbedding` has two implementations, as
vLLM's custom ops do: the PyTorch code in the module (the reference, and the only path on the
CPU) and one kernel of :mod:`hybridpar.models.triton_ops`. The kernel runs when

* the tensor is on a CUDA device and Triton imports,
* fused ops are enabled: by default; ``HYBRIDPAR_FUSED_OPS=0`` or :func:`fused_ops_disabled`
  (a context manager, for A/B benchmarks and tests) turn them off,
* the kernel takes the shape (RoPE needs a power-of-two head size).

The switch is read when a module runs, so a CUDA graph records whichever path was on while it
was captured. :func:`force_fused_ops` makes the kernels run on CPU tensors too, which only works
under Triton's interpreter (``TRITON_INTERPRET=1``): the CPU tests use it to compare the kernels
with the PyTorch path.
"""
from __future__ import annotations

import contextlib
import functools
import os
from collections.abc import Iterator

import torch

_state = {"enabled": os.environ.get("HYBRIDPAR_FUSED_OPS", "1") != "0", "force": False}


@functools.cache
def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def use_fused(x: torch.Tensor) -> bool:
    """Whether the module holding ``x`` should call its Triton kernel."""
    if not _state["enabled"]:
        return False
    return (_state["force"] or x.is_cuda) and triton_available()


@contextlib.contextmanager
def fused_ops_disabled() -> Iterator[None]:
    """Run the PyTorch reference path inside the block (graphs captured here keep it)."""
    saved = _state["enabled"]
    _state["enabled"] = False
    try:
        yield
    finally:
        _state["enabled"] = saved


@contextlib.contextmanager
def force_fused_ops() -> Iterator[None]:
    """Run the kernels on any device inside the block (the CPU needs ``TRITON_INTERPRET=1``)."""
    saved = dict(_state)
    _state.update(enabled=True, force=True)
    try:
        yield
    finally:
        _state.update(saved)
