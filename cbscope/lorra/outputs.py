"""The files of a LoRRA run: what a run folder holds, its staging folder, the final outputs.

A run never writes into its ``--out`` folder directly. It works in a *staging* folder beside
it, ``OUT.partial``: checkpoints, ``metrics.jsonl``, and at the end the adapter,
``lorra_config.json`` and ``train_info.json``. Only a finished run's staging folder is swapped in
for ``OUT``, in one rename (:func:`cbscope.io.replace_folder`). So a failing or killed run leaves
``OUT`` as it was, byte for byte, and an interrupted run's checkpoints wait in ``OUT.partial``
for ``--resume``.

:func:`inspect_folder` says what a folder holds: nothing, a finished cbscope run, an unfinished
one (checkpoints, no adapter), or files that are not a cbscope run's (named, so the user can
decide).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from cbscope.io import atomic_write_text, replace_folder
from cbscope.lorra.checkpoint import CHECKPOINT_DIR
from cbscope.lorra.config import CONFIG_FILE
from cbscope.pair import ADAPTER_CONFIG, ADAPTER_META, ADAPTER_WEIGHTS

if TYPE_CHECKING:
    from cbscope.lorra.loop import TrainResult

METRICS_FILE = "metrics.jsonl"
INFO_FILE = "train_info.json"
MERGED_DIR = "merged"
STAGING_SUFFIX = ".partial"
_ADAPTER_STAGING = ".adapter-staging"
#: Every file and folder a run writes into its folder.
RUN_FILES = frozenset({ADAPTER_CONFIG, ADAPTER_WEIGHTS, ADAPTER_META, CONFIG_FILE, METRICS_FILE,
                       INFO_FILE})
RUN_DIRS = frozenset({CHECKPOINT_DIR, MERGED_DIR, _ADAPTER_STAGING,
                      # the temporary folders of an interrupted merge or adapter save
                      MERGED_DIR + ".tmp", MERGED_DIR + ".old", _ADAPTER_STAGING + ".saving"})
_CHECKPOINT_FILE = re.compile(r"^step-\d+\.(json|safetensors)(\.tmp)?$")

ABSENT, EMPTY, FILE, FOREIGN, FINISHED, UNFINISHED = (
    "absent", "empty", "file", "foreign", "finished", "unfinished")


def staging_dir(out: str | os.PathLike[str]) -> Path:
    """The staging folder of a run whose output folder is ``out``: ``OUT.partial`` beside it."""
    out = Path(out)
    return out.with_name(out.name + STAGING_SUFFIX)


@dataclass
class FolderState:
    """What a folder holds.

    Attributes:
        path: The folder.
        kind: ``absent``, ``file`` (a file, not a folder), ``empty``, ``foreign`` (holds
            entries that are not a cbscope run's), ``finished`` (a cbscope run with its adapter)
            or ``unfinished`` (a cbscope run's files without an adapter).
        foreign: The entries that are not a run's (relative paths; at most 8 are listed).
        summary: A finished run's ``train_info.json`` summary (``{}`` if unreadable).
    """

    path: Path
    kind: str
    foreign: list[str] = field(default_factory=list)
    summary: dict[str, Any] = field(default_factory=dict)

    def describe_foreign(self) -> str:
        """``"notes.txt, checkpoints/x"`` (with ``and N more``)."""
        shown = ", ".join(self.foreign[:8])
        return shown + (f" and {len(self.foreign) - 8} more" if len(self.foreign) > 8 else "")


def _foreign_entries(folder: Path) -> list[str]:
    foreign = []
    for entry in sorted(folder.iterdir()):
        name = entry.name
        if entry.is_dir() and name in RUN_DIRS:
            if name == CHECKPOINT_DIR:
                foreign += [f"{name}/{e.name}" for e in sorted(entry.iterdir())
                            if not (e.is_file() and _CHECKPOINT_FILE.match(e.name))]
            continue
        if entry.is_file() and (name in RUN_FILES or name.endswith(".tmp") and
                                name[:-4] in RUN_FILES):
            continue
        foreign.append(name + ("/" if entry.is_dir() else ""))
    return foreign


def inspect_folder(path: str | os.PathLike[str]) -> FolderState:
    """What ``path`` holds (see :class:`FolderState`); reads, never writes."""
    path = Path(path)
    if not path.exists():
        return FolderState(path, ABSENT)
    if not path.is_dir():
        return FolderState(path, FILE)
    if not any(path.iterdir()):
        return FolderState(path, EMPTY)
    foreign = _foreign_entries(path)
    if foreign:
        return FolderState(path, FOREIGN, foreign)
    if (path / ADAPTER_WEIGHTS).is_file():
        try:
            summary = json.loads((path / INFO_FILE).read_text(encoding="utf-8")).get("summary", {})
        except (OSError, ValueError, AttributeError):
            summary = {}
        return FolderState(path, FINISHED, summary=summary if isinstance(summary, dict) else {})
    return FolderState(path, UNFINISHED)


def write_metrics(path: Path, rows: Sequence[dict[str, Any]], *, truncate_after: int | None = None) -> None:
    """Append ``rows`` to ``metrics.jsonl``, or keep only its lines up to step ``truncate_after``."""
    if truncate_after is not None:
        kept = []
        if path.is_file():
            kept = [line for line in path.read_text().splitlines()
                    if line.strip() and json.loads(line)["step"] <= truncate_after]
        atomic_write_text(path, "".join(line + "\n" for line in kept))
        return
    with path.open("a") as handle:
        for row in rows:
            handle.write(json.dumps(row) + "\n")


def save_outputs(result: TrainResult, folder: str | os.PathLike[str] | None = None, *,
                 merge: bool = False) -> Path:
    """Save the peft adapter, ``lorra_config.json`` and ``train_info.json`` into ``folder``
    (default: ``result.out_dir``), and a merged model into ``folder/merged`` with ``merge``."""
    out = Path(folder) if folder is not None else result.out_dir
    if out is None:
        raise ValueError("no folder to save the outputs in")
    out.mkdir(parents=True, exist_ok=True)
    staging = out / _ADAPTER_STAGING
    result.pair.save_adapter(staging, extra={"lorra": result.info.get("summary", {})})
    for item in staging.iterdir():
        os.replace(item, out / item.name)
    shutil.rmtree(staging, ignore_errors=True)
    result.config.save(out)
    atomic_write_text(out / INFO_FILE, json.dumps(result.info, indent=2, default=str) + "\n")
    if merge:
        merge_adapter(result.pair.resolved.path, out, out / MERGED_DIR, dtype=result.pair.dtype)
    return out


def publish(result: TrainResult, work: Path, out: Path, *, merge: bool = False) -> Path:
    """Write a finished run's outputs into its staging folder ``work`` and swap it in for ``out``.

    The checkpoints are removed first unless the config keeps them.
    """
    save_outputs(result, work, merge=merge)
    if not result.config.keep_checkpoints:
        shutil.rmtree(work / CHECKPOINT_DIR, ignore_errors=True)
    return replace_folder(work, out)


def merge_adapter(base: str | os.PathLike[str], adapter: str | os.PathLike[str],
                  out: str | os.PathLike[str], *, dtype: torch.dtype = torch.float32) -> Path:
    """Load base + adapter with plain transformers/peft, merge, and save an HF model folder."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(str(base), dtype=dtype)
    merged = PeftModel.from_pretrained(model, str(adapter)).merge_and_unload()
    out = Path(out)
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    merged.save_pretrained(tmp)
    AutoTokenizer.from_pretrained(str(base)).save_pretrained(tmp)
    for extra in ("world.json",):
        if (Path(base) / extra).is_file():
            shutil.copy(Path(base) / extra, tmp / extra)
    replace_folder(tmp, out)
    return out
