"""One exception hierarchy: every error names the file or key it is about and the reason.

The CLI turns any ``DynresError`` into one clear line and a non-zero exit; anything else is a bug.
"""

from __future__ import annotations


class DynresError(Exception):
    """Base class. ``subject`` is the file, key or URL the error is about (may be empty)."""

    def __init__(self, subject: object, reason: str):
        self.subject = str(subject) if subject is not None else ""
        self.reason = reason
        super().__init__(f"{self.subject}: {reason}" if self.subject else reason)


class BadImageError(DynresError):
    """An input image is unreadable: empty, truncated, corrupt, not an image, too many pixels."""


class StoreError(DynresError):
    """A store is missing, incomplete, from a newer format version, or inconsistent."""


class KeyNotFoundError(StoreError, KeyError):
    """A read asked for a key the store does not hold."""

    def __str__(self) -> str:  # KeyError would repr() the message otherwise
        return Exception.__str__(self)


class ChecksumError(StoreError):
    """A stored file's bytes no longer match the manifest's sha256."""


class ConfigError(DynresError):
    """A configuration file or flag combination is invalid."""


class CheckpointError(DynresError):
    """A model checkpoint is missing, unsafe to load, or inconsistent with its metadata."""


class BackendError(DynresError):
    """A kernel backend is missing, failed to build, or produced wrong results."""
