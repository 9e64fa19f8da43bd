"""The configuration error type (its own module so that every config module can raise it)."""

from __future__ import annotations

__all__ = ["ConfigError"]


class ConfigError(ValueError):
    """A configuration problem; the message names the file (when known) and the key path."""
