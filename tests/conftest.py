"""Shared fixtures, and Triton's interpreter on a machine without a GPU.

Without a GPU, Triton kernels run in Triton's interpreter (``TRITON_INTERPRET=1``, which must be
set before any kernel is defined), so the CPU tests can compare them with the PyTorch path.
"""
from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture
def world_of_one(monkeypatch) -> Iterator[None]:
    """A one-process gloo world in this process (for code that needs a TP group of one rank); torn down after."""
    import torch.distributed as dist

    from hybridpar.distributed.parallel_state import destroy_model_parallel

    monkeypatch.setenv("MASTER_ADDR", "127.0.0.1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        monkeypatch.setenv("MASTER_PORT", str(sock.getsockname()[1]))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        yield
    finally:
        destroy_model_parallel()
        dist.destroy_process_group()
