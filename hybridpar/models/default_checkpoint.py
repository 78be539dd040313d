"""Built-in checkpoints: one shipped trained model, recipes that hybridpar writes itself, and model-name resolution.

The course must run offline, so nothing is downloaded:

* the default, ``hybridpar/qwen2-tiny``, is a 2.9M-parameter Qwen2 trained on this course's own text
  (:mod:`hybridpar.models.train_tiny`). Its files are package data, in
  ``hybridpar/models/checkpoints/qwen2-tiny-book/``, and :func:`default_model_path` returns that
  directory as it is. Greedy text from it is English lifted from the book;
* every other built-in is a *recipe* (random weights, optionally with a copy circuit, or the shapes of
  a real model for benchmarks), or a re-packing of the shipped model (``qwen2-tiny-sharded``).
  :func:`default_model_path` writes it on first use into a cache directory (``$HYBRIDPAR_CACHE``,
  default ``~/.cache/hybridpar``)::

    <cache>/models/<name>-<spec hash>/
        config.json                 transformers-compatible (Qwen2ForCausalLM, LlamaForCausalLM, ...)
        generation_config.json
        model.safetensors           or model-0000k-of-0000n.safetensors + model.safetensors.index.json
        tokenizer.json              byte-level BPE (256 byte tokens, no merges) + special tokens
        tokenizer_config.json

A built-in checkpoint is then loaded through exactly the same code path as a hub checkpoint
(``config.json`` -> :mod:`hybridpar.models.config`, safetensors -> :mod:`hybridpar.models.loader`)
and by ``transformers.AutoModelForCausalLM.from_pretrained`` for the reference runs.

Invariants:

* Weights are a pure function of (recipe, tensor name): every tensor draws from its own generator,
  seeded from the recipe seed and the tensor name, so a sharded and an unsharded copy of the same
  recipe hold identical tensors (:func:`~hybridpar.models.recipe_files.recipe_tensor`).
* ``qwen2-tiny-copy`` and ``llama-tiny`` wire a small *copy circuit* into layer 0 on top of the random
  weights (see :mod:`hybridpar.models.recipe_files`): greedy text repeats the last 8 tokens, with logit gaps large
  enough that bf16 and fp32 pick the same tokens, as with a trained model.
* A recipe built on a shipped checkpoint (``shipped=``) takes its tensors from the shipped files, and
  its directory name hashes their bytes: retraining the default never reuses a stale re-packing.
* Writing is atomic: files go to a temporary sibling directory that is renamed into place, so
  concurrent ranks or processes either see no directory or a complete one.
* The directory name carries a hash of the recipe: changing a recipe never reuses a stale copy.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from hybridpar.models.builtin_models import (  # noqa: F401  (re-exported: the names users import from here)
    BUILTIN_MODELS,
    BUILTIN_PREFIX,
    DEFAULT_MODEL,
    QWEN_TOKENIZER,
    ModelSpec,
    TokenizerSpec,
    _qwen2_config,
)
from hybridpar.models.builtin_models import _SHIPPED_FILES




class ModelNotFoundError(FileNotFoundError):
    """A model name that is neither a built-in, nor a usable local directory, nor a reachable hub id."""




def builtin_name(model_name: str | None) -> str | None:
    """The registry key for ``None``, ``"qwen2-tiny"`` or ``"hybridpar/qwen2-tiny"``; else ``None``."""
    if model_name is None:
        return DEFAULT_MODEL
    key = model_name[len(BUILTIN_PREFIX):] if model_name.startswith(BUILTIN_PREFIX) else model_name
    return key if key in BUILTIN_MODELS else None


# --------------------------------------------------------------------------- writing / resolving
def cache_root() -> Path:
    """``$HYBRIDPAR_CACHE`` or ``~/.cache/hybridpar``."""
    return Path(os.environ.get("HYBRIDPAR_CACHE") or Path.home() / ".cache" / "hybridpar").expanduser()


def default_model_path(arch: str = "qwen2", size: str = "tiny", name: str | None = None) -> Path:
    """Path of a built-in checkpoint, written on first use.

    ``name`` (e.g. ``"llama-tiny"``, ``"qwen2.5-0.5b-shape"``) wins over ``arch``/``size``
    (``default_model_path("llama")`` is ``"llama-tiny"``). Safe under concurrency: the checkpoint is
    written into a temporary directory and renamed into place; a process that loses the race
    discards its copy.
    """
    key = name or f"{arch}-{size}"
    if key not in BUILTIN_MODELS:
        raise ModelNotFoundError(
            f"no built-in model {key!r}; built-in models: {', '.join(BUILTIN_MODELS)}")
    spec = BUILTIN_MODELS[key]
    if spec.shipped_dir is not None:
        missing = [f for f in _SHIPPED_FILES if not (spec.shipped_dir / f).is_file()]
        if missing:
            raise ModelNotFoundError(
                f"the built-in {key!r} is shipped as package data in {str(spec.shipped_dir)!r}, but "
                f"{', '.join(missing)} {'is' if len(missing) == 1 else 'are'} missing: reinstall hybridpar (its wheel "
                f"must include hybridpar/models/checkpoints/), or retrain it with "
                f"'python -m hybridpar.models.train_tiny' from a repository checkout")
        if spec.num_shards == 1:
            return spec.shipped_dir  # the shipped files as they are
    final = cache_root() / "models" / f"{spec.name}-{spec.hash()}"
    if (final / "hybridpar_recipe.json").exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        from hybridpar.models.recipe_files import write_checkpoint

        write_checkpoint(spec, tmp)
        try:
            os.rename(tmp, final)
        except OSError:  # another process renamed its complete copy first
            if not (final / "hybridpar_recipe.json").exists():
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def describe_model(model_name: str | None = None) -> str:
    """One line for the demos: the model's name and what it is (``"hybridpar/qwen2-tiny, a 2.9M-parameter
    Qwen2 trained on this book; ..."``). Reads config.json only for a local directory or hub id."""
    key = builtin_name(model_name)
    if model_name is not None and Path(model_name).expanduser().exists():  # a shipped directory is its built-in
        local = Path(model_name).expanduser().resolve()
        key = next((name for name, spec in BUILTIN_MODELS.items()
                    if spec.shipped_dir == local and spec.num_shards == 1), None)
    if key is not None:
        spec = BUILTIN_MODELS[key]
        return f"{BUILTIN_PREFIX}{key}, {spec.summary or spec.description}"
    from hybridpar.models.config import ModelConfig

    try:
        cfg = ModelConfig.from_pretrained(resolve_model(model_name))
    except Exception:  # noqa: BLE001 - a description never fails a demo
        return str(model_name)
    return (f"{model_name}, a {format_count(cfg.num_parameters())}-parameter {cfg.architecture} checkpoint "
            f"({cfg.num_layers} layers, {cfg.num_heads} query / {cfg.num_kv_heads} KV heads)")


def format_count(n: int) -> str:
    """2_888_704 -> '2.9M', 494_032_768 -> '494M', 6_738_415_616 -> '6.7B'."""
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            v = n / scale
            return f"{v:.1f}{unit}" if v < 10 else f"{v:.0f}{unit}"
    return str(n)


_DOWNLOAD_PATTERNS = ["*.json", "*.safetensors", "tokenizer*", "*.txt", "*.model"]


def check_checkpoint_dir(path: Path) -> Path:
    """Raise :class:`ModelNotFoundError` naming what is missing unless ``path`` is a loadable checkpoint."""
    path = Path(path)
    if not path.is_dir():
        raise ModelNotFoundError(f"checkpoint directory {str(path)!r} does not exist; pass an existing local "
                                 f"directory, a hub id, or model_name=None for the built-in 'hybridpar/{DEFAULT_MODEL}'")
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(f"{str(path)!r} has no config.json; a checkpoint directory needs config.json "
                                 f"and *.safetensors weights (Hugging Face format)")
    if not any(path.glob("*.safetensors")):
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt"))
        hint = (f" It has only pickle weights ({', '.join(pickles)}); hybridpar never loads pickle: convert them "
                f"to safetensors (e.g. transformers' save_pretrained(safe_serialization=True)).") if pickles else ""
        raise ModelNotFoundError(f"{str(path)!r} has no *.safetensors weight file.{hint}")
    return path


def _hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "0").strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_model(model_name: str | None = None) -> Path:
    """Turn ``model_name`` into a local checkpoint directory.

    * ``None``, ``"qwen2-tiny"``, ``"hybridpar/llama-tiny"``, ...: a built-in, written on first use;
    * an existing local directory: checked (config.json and safetensors present) and returned;
    * otherwise a hub id (``"Qwen/Qwen2.5-0.5B"``): downloaded with huggingface_hub (json, safetensors
      and tokenizer files only; never pickle, never remote code). Offline (``HF_HUB_OFFLINE=1`` or no
      network) only the local hub cache is used; a miss raises :class:`ModelNotFoundError` that names
      the built-in default.
    """
    key = builtin_name(model_name)
    if model_name is not None:
        local = Path(model_name).expanduser()
        if local.exists() or model_name.startswith(("/", ".", "~")) or model_name.count("/") > 1:
            return check_checkpoint_dir(local)
    if key is not None:
        return default_model_path(name=key)
    assert model_name is not None
    if model_name.count("/") != 1:
        raise ModelNotFoundError(
            f"model {model_name!r} is not an existing directory, not a built-in model ({', '.join(BUILTIN_MODELS)}) "
            f"and not a hub id of the form 'org/name'; use model_name=None for the built-in 'hybridpar/{DEFAULT_MODEL}'")
    from huggingface_hub import snapshot_download

    offline = _hub_offline()
    try:
        path = snapshot_download(model_name, allow_patterns=_DOWNLOAD_PATTERNS, local_files_only=offline)
    except Exception as exc:  # offline miss, no network, unknown repo, gated repo, ...
        why = "the hub is offline (HF_HUB_OFFLINE=1) and it is not in the local hub cache" if offline \
            else f"it could not be downloaded ({type(exc).__name__}: {exc})"
        raise ModelNotFoundError(
            f"model {model_name!r} is not available: {why}. Use model_name=None for the built-in "
            f"'hybridpar/{DEFAULT_MODEL}' (written locally, no network), another built-in "
            f"({', '.join(BUILTIN_MODELS)}), or a local checkpoint directory.") from exc
    return check_checkpoint_dir(Path(path))
