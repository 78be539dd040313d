"""Loading safetensors checkpoints into a tensor-parallel model.

Two modes, to contrast:

* ``"sharded"`` (default): each rank opens the safetensors files and hands every parameter's
  ``weight_loader`` a *slice handle* (``safe_open(...).get_slice(name)``). The loader indexes it
  with this rank's range, so only that range is read from the (memory-mapped) file: no rank ever
  materialises a full tensor, let alone the full model.
* ``"full"`` ("load then shard", what the seed did): each rank reads every tensor whole with
  ``get_tensor`` and the loader keeps its shard. Every rank reads the whole checkpoint.

Both go through the same ``weight_loader`` code; :class:`LoadStats` counts the bytes actually
handed out by the file layer per rank, so the difference is measurable (about ``1/tp`` of the
sharded weights plus the replicated ones, versus everything).

Only safetensors are read (no pickle). A file that is truncated or corrupt raises
:class:`CorruptCheckpointError` naming the file and the fix.
"""

from __future__ import annotations

import json
import os
import resource
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

LOAD_FORMATS = ("sharded", "full")

# A full checkpoint tensor, or a safetensors slice (``get_shape()`` and ``[...]`` indexing).
LoadedWeight = Any


class CorruptCheckpointError(RuntimeError):
    """A safetensors file that cannot be parsed (truncated download, disk error, not safetensors)."""


def default_weight_loader(param: nn.Parameter, loaded_weight: LoadedWeight) -> None:
    """Copy the whole tensor into a replicated parameter (norm weights), checking the shape."""
    shape = tuple(loaded_weight.shape) if isinstance(loaded_weight, torch.Tensor) else tuple(loaded_weight.get_shape())
    if shape != tuple(param.shape):
        raise ValueError(f"checkpoint tensor has shape {list(shape)}, parameter expects {list(param.shape)}")
    param.data.copy_(loaded_weight if isinstance(loaded_weight, torch.Tensor) else loaded_weight[:])


@dataclass
class LoadStats:
    """What one rank read while loading. ``bytes_read`` counts tensor bytes returned by the file layer."""

    mode: str
    files: list[str] = field(default_factory=list)
    tensors: int = 0
    bytes_read: int = 0
    checkpoint_bytes: int = 0  # size of all tensors in the checkpoint
    seconds: float = 0.0
    peak_rss_bytes: int = 0  # process peak resident memory after loading (includes torch itself)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class SliceProxy:
    """Wraps a safetensors slice handle; every read goes through :meth:`_on_read` (subclasses observe)."""

    def __init__(self, handle: Any) -> None:
        self._handle = handle

    def get_shape(self) -> list[int]:
        return self._handle.get_shape()

    def get_dtype(self) -> str:
        return self._handle.get_dtype()

    def __getitem__(self, index: Any) -> torch.Tensor:
        out = self._handle[index]
        self._on_read(index, out)
        return out

    def _on_read(self, index: Any, out: torch.Tensor) -> None:
        raise NotImplementedError


class CountingSlice(SliceProxy):
    """A safetensors slice handle that counts the bytes of every range read through it."""

    def __init__(self, handle: Any, stats: LoadStats) -> None:
        super().__init__(handle)
        self._stats = stats

    def _on_read(self, index: Any, out: torch.Tensor) -> None:
        self._stats.bytes_read += out.numel() * out.element_size()


def checkpoint_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint: those named by ``model.safetensors.index.json`` if present,
    else every ``*.safetensors`` in the directory."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [path / f for f in dict.fromkeys(weight_map.values())]
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} names files that are missing: {missing}; re-download the checkpoint")
        return files
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors file in {str(path)!r} (pickle checkpoints are not loaded)")
    return files


def _corrupt(file: Path, exc: Exception) -> CorruptCheckpointError:
    return CorruptCheckpointError(
        f"cannot read safetensors file {str(file)!r} ({type(exc).__name__}: {exc}); it is truncated or corrupt. "
        f"Delete the checkpoint directory and download it again (for a built-in model, delete it from the "
        f"cache, $HYBRIDPAR_CACHE or ~/.cache/hybridpar, and it is rewritten on next use).")


def check_safetensors_file(file: Path) -> None:
    """Validate the header and the data length of a safetensors file without reading tensor data."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _corrupt(file, ValueError(f"file has only {size} bytes"))
        header_len = int.from_bytes(head, "little")
        if header_len > size - 8:
            raise _corrupt(file, ValueError(f"header length {header_len} exceeds file size {size}"))
        try:
            header = json.loads(f.read(header_len))
        except ValueError as exc:
            raise _corrupt(file, exc) from exc
    end = max((t["data_offsets"][1] for k, t in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end != size:
        raise _corrupt(file, ValueError(f"tensor data needs {8 + header_len + end} bytes, file has {size}"))


def iter_checkpoint(path: Path, stats: LoadStats, device: str = "cpu") -> Iterator[tuple[str, LoadedWeight]]:
    """Yield ``(name, slice handle)`` (sharded) or ``(name, full tensor)`` (full) for every tensor."""
    from safetensors import safe_open

    for file in checkpoint_files(path):
        check_safetensors_file(file)
        stats.files.append(file.name)
        try:
            handle = safe_open(str(file), framework="pt", device=device)
        except Exception as exc:  # safetensors raises SafetensorError / OSError subclasses
            raise _corrupt(file, exc) from exc
        with handle as f:
            for name in f.keys():
                stats.tensors += 1
                if stats.mode == "sharded":
                    sl = f.get_slice(name)
                    shape = sl.get_shape()
                    numel = 1
                    for s in shape:
                        numel *= s
                    stats.checkpoint_bytes += numel * _dtype_size(sl.get_dtype())
                    yield name, CountingSlice(sl, stats)
                else:
                    tensor = f.get_tensor(name)
                    nbytes = tensor.numel() * tensor.element_size()
                    stats.bytes_read += nbytes
                    stats.checkpoint_bytes += nbytes
                    yield name, tensor


_DTYPE_SIZES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
                "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}


def _dtype_size(name: str) -> int:
    return _DTYPE_SIZES[name]


def peak_rss_bytes() -> int:
    """Peak resident set size of this process so far (``ru_maxrss``; KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def load_checkpoint(model: nn.Module, path: str | os.PathLike, load_format: str = "sharded") -> LoadStats:
    """Load the safetensors checkpoint at ``path`` into ``model`` (which has ``load_weights``)."""
    if load_format not in LOAD_FORMATS:
        raise ValueError(f"load_format must be one of {LOAD_FORMATS}, got {load_format!r}")
    stats = LoadStats(mode=load_format)
    start = time.perf_counter()
    with torch.no_grad():
        model.load_weights(iter_checkpoint(Path(path), stats))
    stats.seconds = time.perf_counter() - start
    stats.peak_rss_bytes = peak_rss_bytes()
    return stats
