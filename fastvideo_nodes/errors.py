"""User-facing errors.

Every error a person can fix by changing an input is a `FastVideoError` whose message names the
input, says what was wrong and what would be right. The CLI prints the message without a traceback;
ComfyUI shows it in the node's error box.
"""


class FastVideoError(ValueError):
    """A problem with what the user gave us (a file, a size, a setting)."""


class ModelFileError(FastVideoError):
    """A model file is missing, unreadable, of the wrong kind, or not supported yet."""


class CancelledError(FastVideoError):
    """Generation was cancelled by the user."""
