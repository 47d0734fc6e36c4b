"""An attack's options are a dataclass; this module reads them from JSON and describes them.

* :func:`options_from_dict`: a ``{field: value}`` mapping (e.g. from ``cbscope eval
  --attack-options``) -> the dataclass, every value type-checked and every number finite, so a
  typo or a ``"10"`` for an int is a one-line :class:`~cbscope.errors.ConfigError`, not a
  traceback halfway through an evaluation;
* :func:`check_finite`: no NaN or infinity in any float field;
* :func:`describe_options`: one line per field (name, type, default, the docstring's words), for
  ``cbscope eval --help``.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import re
import types
import typing
from collections.abc import Mapping
from typing import Any, Union

from cbscope.errors import ConfigError

__all__ = ["NoOptions", "check_finite", "describe_options", "field_docs", "options_from_dict"]


@dataclasses.dataclass(frozen=True)
class NoOptions:
    """The options of an attack that has none."""


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _type_name(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is list:
        (inner,) = typing.get_args(tp) or (Any,)
        return f"list[{_type_name(inner)}]"
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _check_value(where: str, tp: Any, value: Any) -> Any:
    """``value`` as type ``tp`` (ints accepted for floats), else a :class:`ConfigError`."""
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        errors = []
        for option in typing.get_args(tp):
            try:
                return _check_value(where, option, value)
            except ConfigError as err:
                errors.append(err)
        raise ConfigError(f"{where} must be {_type_name(tp)}, not {value!r}")
    if tp is type(None):
        if value is None:
            return None
        raise ConfigError(f"{where} must be null, not {value!r}")
    if origin in (list, tuple) or tp in (list, tuple):
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where} must be a list ({_type_name(tp)}), not {value!r}")
        (inner,) = typing.get_args(tp)[:1] or (Any,)
        return [_check_value(f"{where}[{i}]", inner, v) for i, v in enumerate(value)]
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            if not math.isfinite(value):
                raise ConfigError(f"{where} must be a finite number, not {value!r}")
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    elif isinstance(value, tp):
        return value
    raise ConfigError(f"{where} must be {_type_name(tp)}, not {value!r}")


def options_from_dict(cls: type, values: Mapping[str, Any] | None, *, owner: str = "") -> Any:
    """Build the options dataclass ``cls`` from ``values`` (missing fields keep their defaults).

    Args:
        cls: The options dataclass.
        values: ``{field: value}`` (JSON types; ints are accepted for floats).
        owner: Name used in messages (the attack's).

    Raises:
        ConfigError: An unknown field, a value of the wrong type, or a non-finite number.
    """
    label = owner or cls.__name__
    if values is None:
        return cls()
    if not isinstance(values, Mapping):
        raise ConfigError(f"options of {label} must be a JSON object, not {values!r}")
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = sorted(set(values) - set(names))
    if unknown:
        allowed = ", ".join(names) if names else "none"
        raise ConfigError(f"unknown options {unknown} for {label}; its options: {allowed}")
    hints = _hints(cls)
    checked = {k: _check_value(f"{label}.{k}", hints[k], v) for k, v in values.items()}
    return cls(**checked)


def check_finite(options: Any, *, owner: str = "") -> None:
    """Raise :class:`ConfigError` if a float (or list-of-float) field is NaN or infinite."""
    if not dataclasses.is_dataclass(options):
        return
    label = owner or type(options).__name__
    for f in dataclasses.fields(options):
        value = getattr(options, f.name)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if isinstance(v, float) and not math.isfinite(v):
                raise ConfigError(f"{label}.{f.name} must be finite, not {value!r}")


def field_docs(cls: type) -> dict[str, str]:
    """``{field: description}`` from the ``Attributes:`` section of a Google-style docstring."""
    lines = inspect.cleandoc(cls.__doc__ or "").splitlines()
    names = {f.name for f in dataclasses.fields(cls)}
    docs: dict[str, str] = {}
    inside, current = False, None
    for line in lines:
        if not line.startswith(" "):
            inside, current = line.strip() == "Attributes:", None
            continue
        entry = re.match(r"^ {4}(\w+)(?: \([^)]*\))?:\s*(.*)$", line)
        if inside and entry and entry.group(1) in names:
            current = entry.group(1)
            docs[current] = entry.group(2).strip()
        elif inside and current and line.startswith("     "):
            docs[current] += " " + line.strip()
    return {name: _plain(text) for name, text in docs.items()}


def _plain(text: str) -> str:
    """Docstring markup (``code``, :func:`name`) as plain text."""
    text = re.sub(r":\w+:`~?([^`]*)`", r"\1", text)
    return re.sub(r"``([^`]*)``", r"\1", text)


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def describe_options(cls: type) -> list[str]:
    """One line per field: ``name (type, default value): description``."""
    hints = _hints(cls)
    docs = field_docs(cls)
    lines = []
    for f in dataclasses.fields(cls):
        text = f"{f.name} ({_type_name(hints[f.name])}, default {_default(f)!r})"
        if docs.get(f.name):
            text += f": {docs[f.name]}"
        lines.append(text)
    return lines
