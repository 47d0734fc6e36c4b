"""Tensors in ``<stem>.safetensors`` plus everything else in ``<stem>.json``: no pickle anywhere."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor


def sidecar_paths(path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """``(json_path, tensor_path)`` for a path ending in ``.json``, ``.safetensors`` or nothing."""
    path = Path(path)
    stem = path.with_suffix("") if path.suffix in (".json", ".safetensors") else path
    return stem.with_name(stem.name + ".json"), stem.with_name(stem.name + ".safetensors")


def write_sidecar(
    path: str | os.PathLike[str],
    tensors: dict[str, Tensor],
    meta: dict[str, Any],
    *,
    kind: str,
    indent: int | None = None,
) -> Path:
    """Write the tensors and the JSON metadata (which records the tensor file's name).

    Returns:
        The JSON path.
    """
    json_path, tensor_path = sidecar_paths(path)
    json_path.parent.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tensor_path), metadata={"format": f"cbscope-{kind}"})
    meta = {**meta, "tensors": tensor_path.name}
    json_path.write_text(json.dumps(meta, ensure_ascii=False, indent=indent), encoding="utf-8")
    return json_path


def read_sidecar(
    path: str | os.PathLike[str], *, kind: str
) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """Read what :func:`write_sidecar` wrote; a missing file raises a named FileNotFoundError."""
    json_path, tensor_path = sidecar_paths(path)
    if not json_path.is_file():
        raise FileNotFoundError(f"{json_path}: no such {kind} file")
    meta = json.loads(json_path.read_text(encoding="utf-8"))
    tensor_path = json_path.with_name(meta.get("tensors", tensor_path.name))
    if not tensor_path.is_file():
        raise FileNotFoundError(f"{tensor_path}: the {kind}'s tensors are missing")
    return load_file(str(tensor_path)), meta
