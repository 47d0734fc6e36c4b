"""The attack registry: name -> :class:`~cbscope.attacks.protocol.Attack`.

An attack module registers its attack when it is imported::

    @register_attack
    class MyAttack(GenerationAttack):
        name = "my_attack"
        ...

Importing :mod:`cbscope.attacks` imports every module of the package (its ``__init__`` walks the
package folder), so a new built-in attack is one new module and nothing else; an attack defined
elsewhere is registered by importing its module before the evaluation.
"""

from __future__ import annotations

import dataclasses
import re

from cbscope.attacks.protocol import Attack
from cbscope.errors import ConfigError

__all__ = [
    "attack_names",
    "default_attack_names",
    "get_attack",
    "register_attack",
    "registered_attacks",
    "unregister_attack",
]

_REGISTRY: dict[str, Attack] = {}
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")


def register_attack(cls: type[Attack]) -> type[Attack]:
    """Class decorator: add an attack to the registry (its module's import registers it).

    Raises:
        ValueError: A malformed name, or a name another attack class holds.
        TypeError: Options that are not a dataclass.
    """
    name = cls.name
    if not _NAME.match(name or ""):
        raise ValueError(f"attack name {name!r} must be lower-case letters, digits and '_'")
    if not dataclasses.is_dataclass(cls.Options):
        raise TypeError(f"attack {name!r}: Options must be a dataclass, not {cls.Options!r}")
    known = _REGISTRY.get(name)
    same = known is not None and (type(known).__module__, type(known).__qualname__) == (
        cls.__module__,
        cls.__qualname__,
    )
    if known is not None and not same:
        raise ValueError(f"attack {name!r} is already registered by {type(known).__module__}")
    _REGISTRY[name] = cls()
    return cls


def unregister_attack(name: str) -> None:
    """Remove an attack from the registry (a no-op for unknown names)."""
    _REGISTRY.pop(name, None)


def registered_attacks() -> dict[str, Attack]:
    """Every registered attack, in report order (``order``, then name)."""
    return dict(sorted(_REGISTRY.items(), key=lambda item: (item[1].order, item[0])))


def attack_names() -> tuple[str, ...]:
    """Names of every registered attack, in report order."""
    return tuple(registered_attacks())


def default_attack_names() -> tuple[str, ...]:
    """Names of the attacks run when none are named (``in_default``), in report order."""
    return tuple(name for name, attack in registered_attacks().items() if attack.in_default)


def get_attack(name: str) -> Attack:
    """The attack called ``name``.

    Raises:
        ConfigError: No attack has that name (the message lists them).
    """
    attacks = registered_attacks()
    if name not in attacks:
        raise ConfigError(f"unknown attacks ['{name}']; choose from {','.join(attacks)}")
    return attacks[name]
