"""Every user-facing cbscope error, under one base class.

A :class:`CbscopeError` is a mistake in what the user asked for (a bad option, a malformed
file, a model that cannot be found), never a bug: its message is one sentence that names the
input and says what to do. The CLI prints it on one line and exits with code 2; the app shows
it as a sentence. Both catch the base class, never names. Each error also derives from the
builtin it refines (``ValueError``, ``RuntimeError``, ``FileNotFoundError``), so code that
catches those keeps working.

This module imports nothing from cbscope, so every module can import it.
"""

from __future__ import annotations


class CbscopeError(Exception):
    """Base class of every user-facing cbscope error."""


class ConfigError(CbscopeError, ValueError):
    """An invalid configuration value (names the field and the allowed values)."""


class DatasetError(CbscopeError, ValueError):
    """A malformed dataset file; the message names the file, the line and the field."""


class PromptError(CbscopeError, ValueError):
    """An empty or over-long prompt, or a malformed conversation."""


class LayerError(CbscopeError, ValueError):
    """A layer outside the model (or an unparsable layer list)."""


class ModelSpecError(CbscopeError, ValueError):
    """A model spec that cannot be resolved; the message lists every route tried."""


class AdapterMismatchError(CbscopeError, ValueError):
    """An adapter that does not fit the base model it is loaded onto."""


class GeneraliseError(CbscopeError, ValueError):
    """Bad arguments of a generalisation matrix (mode, category, source, options)."""


class ExplainError(CbscopeError, ValueError):
    """Bad arguments of an explanation (no adapter, a bad threshold or position)."""


class TemplateError(CbscopeError, ValueError):
    """A template without its slot, or with other slots."""


class ResumeError(CbscopeError, RuntimeError):
    """A checkpoint that cannot be resumed with this config or these data."""


class NonFiniteLossError(CbscopeError, RuntimeError):
    """The training loss became NaN or infinite."""


class ExportError(CbscopeError, RuntimeError):
    """A figure cannot be exported (PNG/SVG need Chrome or Chromium for kaleido)."""


class MissingFileError(CbscopeError, FileNotFoundError):
    """A file or folder the user named (or a default data file) does not exist."""


#: What the CLI reports in one line (exit 2) and the app shows as a sentence: every cbscope
#: error, and a file that does not exist. Defined here once; ``cbscope.commands`` re-exports it.
USER_ERRORS: tuple[type[Exception], ...] = (CbscopeError, FileNotFoundError)
