"""Errors raised by the GO layer; each message names the offending file, line or gene."""

from __future__ import annotations

__all__ = ["GOError", "GOFormatError", "GOOptionError", "GOSourceUnavailable", "GeneListError"]


class GOError(ValueError):
    """Any problem with GO input data or parameters."""


class GOOptionError(GOError):
    """A bad parameter (source, aspects, threshold, top_k, mask kind): a configuration mistake, not bad data."""


class GOFormatError(GOError):
    """A malformed OBO or GAF file; the message holds ``path:line``."""

    def __init__(self, path: str, line: int, problem: str) -> None:
        super().__init__(f"{path}:{line}: {problem}")
        self.path = path
        self.line = line


class GOSourceUnavailable(GOError):
    """A GO source cannot be obtained here (e.g. ``apt-get`` is missing)."""


class GeneListError(GOError):
    """A bad gene list: duplicates, unknown symbols or no overlap with GO."""
