"""Writing files so that a crash never leaves a half-written one: the one place cbscope does it.

Every write goes to a temporary sibling (``NAME.tmp``), is flushed to disk, and is renamed over
the target in one step (``os.replace`` is atomic on POSIX and Windows): a reader sees the old
file or the new one, never a mix. :func:`replace_folder` does the same for a whole folder
written beside its target.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from cbscope.errors import ConfigError


def _fsync(path: Path) -> None:
    with open(path, "rb") as handle:
        os.fsync(handle.fileno())


def atomic_write(path: str | os.PathLike[str], writer: Callable[[Path], None], *,
                 fsync: bool = True) -> Path:
    """Call ``writer(tmp)`` to write a temporary sibling, then rename it to ``path``.

    Args:
        path: The file to write (its folder is made if missing).
        writer: Writes the whole content to the path it is given.
        fsync: Flush the temporary file to disk before the rename (checkpoints want it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        writer(tmp)
        if fsync:
            _fsync(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def atomic_write_text(path: str | os.PathLike[str], text: str, *, fsync: bool = False) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write(path, lambda p: p.write_text(text, encoding="utf-8"), fsync=fsync)


def atomic_write_json(path: str | os.PathLike[str], data: Any, *, indent: int | None = 2,
                      default: Callable[[Any], Any] | None = None) -> Path:
    """Write ``data`` as JSON (with a final newline) atomically."""
    return atomic_write_text(path, json.dumps(data, indent=indent, default=default) + "\n")


def atomic_write_jsonl(path: str | os.PathLike[str], records: Iterable[Any], *,
                       default: Callable[[Any], Any] | None = None) -> Path:
    """Write one JSON document per line atomically."""
    return atomic_write_text(
        path, "".join(json.dumps(record, default=default) + "\n" for record in records)
    )


def replace_folder(written: str | os.PathLike[str], target: str | os.PathLike[str]) -> Path:
    """Move a fully written folder ``written`` to ``target``, replacing what was there.

    The old ``target`` is renamed aside first and removed only once ``written`` is in place, so
    at every moment one complete folder sits at ``target`` (or, for an instant, beside it).
    """
    written, target = Path(written), Path(target)
    if target.exists():
        backup = target.with_name(target.name + ".old")
        shutil.rmtree(backup, ignore_errors=True)
        target.rename(backup)
        written.rename(target)
        shutil.rmtree(backup, ignore_errors=True)
    else:
        written.rename(target)
    return target


def check_output_file(
    path: str | os.PathLike[str], *, suffixes: Iterable[str] | None = None, option: str = "--out"
) -> Path:
    """Check, before any work, that ``path`` can be written as a file; nothing is created.

    Args:
        path: The output file.
        suffixes: Allowed endings (``".json"``; case-insensitive), or None for any.
        option: How the user named it, for the message.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ConfigError: A wrong suffix, an existing folder given as the file, a path below a file,
            or a file or folder this process may not write (the nearest existing folder is
            probed with a temporary file, so root on a read-only mount is caught too).
    """
    out = Path(path).expanduser()
    allowed = [suffix.lower() for suffix in suffixes] if suffixes is not None else None
    if allowed is not None and out.suffix.lower() not in allowed:
        raise ConfigError(f"{option} {out}: use a file ending in {', '.join(allowed)}")
    if out.is_dir():
        raise ConfigError(f"{option} {out} is an existing folder: give a file name inside it")
    if out.exists() and not os.access(out, os.W_OK):
        raise ConfigError(f"{option} {out}: the file is not writable")
    parent = out.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise ConfigError(f"{option} {out}: {parent} is a file, not a folder")
    try:
        probe = tempfile.NamedTemporaryFile(dir=parent, prefix=".cbscope-probe-")  # noqa: SIM115
        probe.close()
    except OSError as err:
        raise ConfigError(
            f"{option} {out}: cannot write into {parent} ({err.strerror or err})"
        ) from err
    return out
