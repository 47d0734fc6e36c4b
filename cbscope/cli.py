"""The ``cbscope`` command line (also ``python -m cbscope``).

Each feature registers its commands from a module in :mod:`cbscope.commands`, so the CLI stays a
thin layer over the Python API.
"""

from __future__ import annotations

import importlib
import logging

import typer

COMMAND_MODULES = ("demo", "organism", "train", "trace", "explain", "evaluate", "app", "generalise",
                   "info")

app = typer.Typer(
    name="cbscope",
    help="Circuit breakers you can train, trace and attack.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


def _register_all() -> None:
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(f"cbscope.commands.{name}")
        except ModuleNotFoundError as err:
            if err.name == f"cbscope.commands.{name}":
                continue
            raise
        module.register(app)


_register_all()


def main() -> None:
    """Entry point of the ``cbscope`` script."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    app()


if __name__ == "__main__":
    main()
