"""The configuration error type and the two checks that raise it (their own module so that every config module
can use them)."""

from __future__ import annotations

__all__ = ["ConfigError", "check", "check_choice"]


class ConfigError(ValueError):
    """A configuration problem; the message names the file (when known) and the key path."""


def check_choice(path: str, value: object, options: tuple[str, ...]) -> None:
    """Refuse ``value`` at key ``path`` unless it is one of ``options`` (the message lists them)."""
    if value not in options:
        raise ConfigError(f"{path}: {value!r} is not one of {', '.join(options)}")


def check(path: str, ok: bool, expected: str, value: object) -> None:
    """Refuse ``value`` at key ``path`` unless ``ok``, saying what was ``expected``."""
    if not ok:
        raise ConfigError(f"{path}: expected {expected}, got {value!r}")
