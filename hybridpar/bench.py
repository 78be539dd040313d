"""Shared helpers of the benchmarks in ``bench/`` and of the performance chapter.

* **Results files.** :func:`write_results` stores one benchmark run as
  ``bench/results/<name>-<device>-<date>.json``: ``{"name", "meta", "results"}`` where ``meta``
  (:func:`bench_env`) records the date, the device, torch/transformers versions, the git commit
  and the command line that produced it. :func:`load_results` reads them back (the chapter plots
  only from these files; nothing is benchmarked at build time).
* **Timing.** :func:`time_fn` times a callable with CUDA events on a GPU (``perf_counter`` on the
  CPU) after warm-up, and returns every sample; report the median (:func:`median`).
  :func:`time_sides` is the fair comparison of several engines: every side gets the same number of
  full-size warm-up calls at the measured shape, then the timed runs take turns (round robin), and
  each side reports its median and spread (:class:`SideTiming`).
  :func:`copy_bandwidth` measures the HBM roofline's bandwidth once with a device-to-device copy
  (bytes read + bytes written).
* **Models with random weights, in memory.** :func:`random_checkpoint` draws every tensor of a
  built-in recipe (``qwen2.5-0.5b-shape``, ``llama-7b-shape``, ...) directly on the device with the
  recipe's scaling rules (:func:`~hybridpar.models.recipe_files.make_tensor`), so a 7B model
  needs no 13.5 GB file. :func:`build_model` loads such tensors into a TP decoder through the
  ordinary ``load_weights`` path; :func:`build_hf_model` loads the *same* tensors into transformers'
  model, for like-for-like comparisons. :class:`ModelHandle` lets a
  :class:`~hybridpar.radix.scheduler.TPScheduler` serve such a model.
* :func:`format_table`: the plain-text tables the scripts print.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
RESULTS_DIR = ROOT / "bench" / "results"


# --------------------------------------------------------------------------- environment and files
def device_name(device: torch.device | str | None = None) -> str:
    """``"NVIDIA H200"`` for a GPU, ``"cpu (<processor>, N cores)"`` otherwise."""
    device = torch.device(device) if device is not None else (
        torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu"))
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.machine()}, {os.cpu_count()} cores)"


def slug(text: str) -> str:
    """``"NVIDIA H200"`` -> ``"nvidia-h200"`` (file-name safe)."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


def _git(*args: str) -> str:
    try:
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def bench_env(device: torch.device | str | None = None, label: str | None = None) -> dict[str, Any]:
    """What a results file records about where and how it was produced.

    ``label`` overrides the device description (e.g. ``"NVIDIA H200 (1 of nvidia-h200-x2)"``);
    ``HYBRIDPAR_DEVICE_LABEL`` in the environment does the same for scripts.
    """
    try:
        import transformers

        tf_version = transformers.__version__
    except ImportError:
        tf_version = None
    now = _dt.datetime.now(_dt.timezone.utc)
    name = label or os.environ.get("HYBRIDPAR_DEVICE_LABEL") or device_name(device)
    return {
        "date": now.strftime("%Y-%m-%d"),
        "time_utc": now.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "device": name,
        "device_slug": "cpu" if torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu")).type == "cpu"
        else slug(device_name(device)),
        "num_gpus": torch.cuda.device_count(),
        "torch": torch.__version__,
        "transformers": tf_version,
        "python": platform.python_version(),
        # the variable first: a copied checkout (the device tool's) may carry stale git metadata
        "git_commit": os.environ.get("HYBRIDPAR_GIT_COMMIT") or _git("rev-parse", "--short", "HEAD") or "unknown",
        "git_dirty": bool(_git("status", "--porcelain", "--untracked-files=no")),
        "command": " ".join(["python", *sys.argv]) if sys.argv and sys.argv[0] else "python",
    }


def write_results(name: str, results: Any, meta: dict[str, Any] | None = None,
                  out_dir: Path | str | None = None) -> Path:
    """Write ``{"name", "meta", "results"}`` to ``<out_dir>/<name>-<device>-<date>.json``; returns the path.

    ``out_dir`` defaults to ``$HYBRIDPAR_RESULTS_DIR`` or ``bench/results``.
    """
    meta = meta or bench_env()
    out = Path(out_dir or os.environ.get("HYBRIDPAR_RESULTS_DIR") or RESULTS_DIR)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{name}-{meta['device_slug']}-{meta['date']}.json"
    path.write_text(json.dumps({"name": name, "meta": meta, "results": results}, indent=1, default=_jsonable))
    return path


def _jsonable(obj: Any) -> Any:
    if hasattr(obj, "__dataclass_fields__"):
        from dataclasses import asdict

        return asdict(obj)
    if isinstance(obj, (torch.dtype, torch.device, Path)):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def load_results(name: str | None = None, out_dir: Path | str | None = None,
                 device_slug: str | None = None) -> list[dict[str, Any]]:
    """Every results file (optionally of one benchmark / device), newest first."""
    out = Path(out_dir or RESULTS_DIR)
    records = []
    for path in sorted(out.glob("*.json")):
        record = json.loads(path.read_text())
        if not isinstance(record, dict) or "meta" not in record:
            continue
        if (name is None or record.get("name") == name) and (
                device_slug is None or record["meta"].get("device_slug") == device_slug):
            record["path"] = str(path.relative_to(out.parent.parent) if out.is_relative_to(ROOT) else path)
            records.append(record)
    return sorted(records, key=lambda r: r["meta"].get("time_utc", ""), reverse=True)


def latest(name: str, out_dir: Path | str | None = None, device_slug: str | None = None) -> dict[str, Any] | None:
    """The newest results file of benchmark ``name`` (``None`` if there is none)."""
    found = load_results(name, out_dir, device_slug)
    return found[0] if found else None


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[tuple[str, str, str]]) -> str:
    """Plain-text table: ``columns`` are ``(key, header, format spec)``; missing values print as ``-``."""
    cells = [[h for _, h, _ in columns]]
    for row in rows:
        line = []
        for key, _, spec in columns:
            value = row.get(key)
            line.append("-" if value is None else format(value, spec) if spec else str(value))
        cells.append(line)
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells)


# --------------------------------------------------------------------------- timing
def synchronize(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


def time_fn(fn: Callable[[], Any], device: torch.device | str, iters: int = 20, warmup: int = 3) -> list[float]:
    """Seconds of each of ``iters`` calls of ``fn`` after ``warmup`` untimed ones (CUDA events on a GPU)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    synchronize(device)
    samples = []
    for _ in range(iters):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            samples.append(start.elapsed_time(end) / 1e3)
        else:
            t0 = time.perf_counter()
            fn()
            samples.append(time.perf_counter() - t0)
    return samples


def percentile(values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (1..99) of ``values``, interpolated; a single value is its own percentile."""
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if len(values) > 1 else values[0]


def median(samples: Iterable[float]) -> float:
    return float(statistics.median(list(samples)))


@dataclass
class SideTiming:
    """One side of a comparison: its warm-up count, its timed runs (seconds), or the error that stopped it."""

    label: str
    warmups: int = 0
    samples: list[float] = field(default_factory=list)
    error: str | None = None

    @property
    def median(self) -> float:
        return median(self.samples)

    @property
    def spread(self) -> tuple[float, float]:
        return min(self.samples), max(self.samples)


def time_sides(sides: dict[str, Callable[[], Any]], device: torch.device | str, warmup: int = 2,
               runs: int = 3) -> dict[str, SideTiming]:
    """Time every side of a comparison the same way: ``warmup`` full calls each, then ``runs`` timed calls each.

    The warm-up calls are the measured call itself (same shape, same length), so every side has
    compiled, autotuned, captured and allocated what the timed runs need. The timed runs take turns
    (side A, side B, ..., then again), so a drift of the machine hits every side alike. A side that
    raises is reported with its error and dropped from the remaining turns.
    """
    out = {label: SideTiming(label) for label in sides}
    for label, fn in sides.items():
        try:
            for _ in range(warmup):
                fn()
                out[label].warmups += 1
        except Exception as exc:  # report and go on with the other sides
            out[label].error = f"{type(exc).__name__}: {exc}"[:500]
    for _ in range(runs):
        for label, fn in sides.items():
            if out[label].error is not None:
                continue
            try:
                synchronize(device)
                t0 = time.perf_counter()
                fn()
                synchronize(device)
                out[label].samples.append(time.perf_counter() - t0)
            except Exception as exc:
                out[label].error = f"{type(exc).__name__}: {exc}"[:500]
    return out


def copy_bandwidth(device: torch.device | str, nbytes: int = 4 << 30, iters: int = 20) -> float:
    """Device-memory bandwidth in bytes/s from a large device-to-device copy (bytes read + written), median."""
    src = torch.randn(nbytes // 4, device=device)  # random, never zeros (METHOD.md)
    dst = torch.empty_like(src)
    seconds = median(time_fn(lambda: dst.copy_(src), device, iters=iters, warmup=3))
    return 2 * nbytes / seconds


# --------------------------------------------------------------------------- models with random weights
def builtin_hf_config(name: str) -> dict[str, Any]:
    """The ``config.json`` dict of a built-in recipe (``hybridpar.models.builtin_models.BUILTIN_MODELS``)."""
    from hybridpar.models.default_checkpoint import BUILTIN_MODELS

    if name not in BUILTIN_MODELS:
        raise ValueError(f"no built-in model {name!r}; choose one of {sorted(BUILTIN_MODELS)}")
    return dict(BUILTIN_MODELS[name].config)


def random_checkpoint(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16,
                      seed: int | None = None) -> dict[str, torch.Tensor]:
    """Every tensor of recipe ``name``'s checkpoint, drawn on ``device`` by the recipe's random rule.

    For the realistic shapes (``qwen2.5-0.5b-shape``, ``llama-7b-shape``, ...) the files hold the
    same rule's values drawn on the CPU; the tiny recipes' files add structure (see
    :mod:`hybridpar.models.default_checkpoint`), which benchmarks do not need.
    """
    from hybridpar.models.default_checkpoint import BUILTIN_MODELS
    from hybridpar.models.recipe_files import checkpoint_tensor_shapes, make_tensor

    spec = BUILTIN_MODELS[name]
    seed = spec.seed if seed is None else seed
    return {n: make_tensor(n, shape, seed, dtype, device) for n, shape in checkpoint_tensor_shapes(spec.config).items()}


def model_config(name: str):
    """:class:`~hybridpar.models.config.ModelConfig` of a built-in recipe, without writing its files."""
    from transformers import AutoConfig

    from hybridpar.models.config import ModelConfig

    raw = builtin_hf_config(name)
    return ModelConfig.from_hf_config(AutoConfig.for_model(**raw))


def build_model(name: str, device: torch.device | str, dtype: torch.dtype = torch.bfloat16, tp_group: Any = None,
                tensors: dict[str, torch.Tensor] | None = None):
    """A :class:`~hybridpar.models.decoder.DecoderForCausalLM` (this rank's TP shard) with random weights.

    ``tensors``: the full checkpoint tensors (default :func:`random_checkpoint` on ``device``); each
    parameter's ``weight_loader`` keeps its shard, exactly as when loading files.
    """
    from hybridpar.models.decoder import DecoderForCausalLM

    own = tensors is None
    tensors = random_checkpoint(name, device, dtype) if own else tensors
    with torch.device(device):
        model = DecoderForCausalLM(model_config(name), tp_group, dtype)
    model.load_weights(tensors.items())
    if own:
        del tensors
        if torch.device(device).type == "cuda":
            torch.cuda.empty_cache()
    return model.eval()


def build_hf_model(name: str, tensors: dict[str, torch.Tensor], device: torch.device | str,
                   dtype: torch.dtype = torch.bfloat16, attn_implementation: str = "sdpa"):
    """transformers' model of recipe ``name`` holding exactly ``tensors`` (the same weights as :func:`build_model`)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    import transformers

    config = AutoConfig.for_model(**builtin_hf_config(name))
    dtype_kw = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, attn_implementation=attn_implementation, **{dtype_kw: dtype})
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    missing = [m for m in missing if not (m == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise RuntimeError(f"transformers model does not match the recipe: missing {missing}, unexpected {unexpected}")
    return model.eval()


@dataclass
class ModelHandle:
    """The few attributes :class:`~hybridpar.radix.scheduler.TPScheduler` reads from a model wrapper,
    for a model built in memory (token-id prompts only)."""

    model: Any
    tp_group: Any
    device: torch.device
    server_args: Any = None
    server_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        from hybridpar.config import ServerArgs

        if self.server_args is None:
            self.server_args = ServerArgs(**self.server_kwargs)

    def encode(self, text: str) -> list[int]:
        raise TypeError("ModelHandle serves token-id prompts only")

    def decode(self, token_ids: Sequence[int]) -> str:
        return ""
