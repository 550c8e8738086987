"""Errors whose message is written for the user.

Every error the core raises on purpose derives from ``TinyGPTError``; its message says what is
wrong and what to do about it. The CLI prints it without a traceback and the app shows it in
``st.error``; anything else that escapes is a bug.
"""


class TinyGPTError(Exception):
    """Base class: the message is meant to be shown to a person as it is."""


class ConfigError(TinyGPTError, ValueError):
    """A model or training setting is out of range or inconsistent."""


class DataError(TinyGPTError, ValueError):
    """A corpus cannot be read, decoded or split for the chosen context."""


class TokenizerError(TinyGPTError, ValueError):
    """Text cannot be tokenized (unknown symbols) or a tokenizer file is invalid."""


class RunError(TinyGPTError):
    """A run folder is missing, broken or cannot be written."""


class ExportError(TinyGPTError):
    """A run cannot be exported in the requested format."""


class JobError(TinyGPTError):
    """A background job cannot be started or found."""
