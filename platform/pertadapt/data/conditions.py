"""GEARS condition names: parsing raw perturbation labels and canonicalising condition names.

A GEARS condition name is ``ctrl`` (control cells), ``A+ctrl`` (gene ``A`` perturbed alone) or
``A+B`` (genes ``A`` and ``B`` together). ``A+B`` and ``B+A`` denote the same condition, as do
``A+ctrl`` and ``ctrl+A``; :func:`canonical_condition` maps every spelling onto one name (genes of a
double in sorted order, singles as ``A+ctrl``).
"""

from __future__ import annotations

import logging
from collections import defaultdict
from collections.abc import Iterable

from pertadapt.data.keys import CONTROL, SEP

__all__ = [
    "ConditionError",
    "canonical_condition",
    "condition_genes",
    "is_control",
    "parse_condition",
    "unify_spellings",
]

log = logging.getLogger(__name__)


class ConditionError(ValueError):
    """A condition name or raw perturbation label that cannot be read; the message names it."""


def is_control(name: str) -> bool:
    """Whether ``name`` is the GEARS control condition ``ctrl``.

    Parameters
    ----------
    name
        A GEARS condition name.

    Returns
    -------
    bool
        ``True`` only for exactly ``ctrl``.
    """
    return name == CONTROL


def _genes_of(parts: Iterable[str], label: str, control_labels: frozenset[str]) -> tuple[str, ...]:
    genes = []
    for raw in parts:
        part = raw.strip()
        if not part:
            raise ConditionError(f"condition {label!r}: empty gene name")
        if part not in control_labels:
            genes.append(part)
    if len(genes) > 2:
        raise ConditionError(f"condition {label!r}: {len(genes)} genes; at most two are supported")
    if len(genes) == 2 and genes[0] == genes[1]:
        raise ConditionError(f"condition {label!r}: gene {genes[0]!r} is repeated")
    return tuple(genes)


def condition_genes(name: str) -> tuple[str, ...]:
    """The perturbed genes of a GEARS condition name, in the order written.

    Parameters
    ----------
    name
        ``ctrl``, ``A+ctrl``, ``ctrl+A`` or ``A+B``.

    Returns
    -------
    tuple of str
        ``()`` for ``ctrl``, ``(A,)`` for a single, ``(A, B)`` for a double.

    Raises
    ------
    ConditionError
        On an empty gene name, more than two genes or a repeated gene; the message names ``name``.
    """
    if is_control(name):
        return ()
    genes = _genes_of(name.split(SEP), name, frozenset({CONTROL}))
    if not genes:
        raise ConditionError(f"condition {name!r}: no gene besides {CONTROL!r}")
    return genes


def _from_genes(genes: tuple[str, ...]) -> str:
    if not genes:
        return CONTROL
    if len(genes) == 1:
        return f"{genes[0]}{SEP}{CONTROL}"
    return SEP.join(sorted(genes))


def canonical_condition(name: str) -> str:
    """The canonical spelling of a GEARS condition name.

    Parameters
    ----------
    name
        ``ctrl``, ``A+ctrl``, ``ctrl+A``, ``A+B`` or ``B+A``.

    Returns
    -------
    str
        ``ctrl``, ``A+ctrl`` or ``A+B`` with ``A < B`` (string order).

    Raises
    ------
    ConditionError
        As :func:`condition_genes`.
    """
    return _from_genes(condition_genes(name))


def parse_condition(label: str, *, control_labels: Iterable[str] = (CONTROL,), delimiter: str = SEP) -> str:
    """Convert a raw perturbation label (layout (b), e.g. a ``gene`` column) to a canonical GEARS name.

    Parts equal to a control label are ignored, so ``A_non-targeting`` becomes ``A+ctrl`` and a label
    made only of control labels becomes ``ctrl``.

    Parameters
    ----------
    label
        The raw label, e.g. ``non-targeting``, ``KLF1``, ``KLF1_CEBPA`` or ``KLF1|CEBPA``.
    control_labels
        Labels (whole label or one part of it) that mean "no gene perturbed".
    delimiter
        Separator between the genes of a combination in ``label``.

    Returns
    -------
    str
        The canonical GEARS condition name (see :func:`canonical_condition`).

    Raises
    ------
    ConditionError
        On an empty label or gene, more than two genes, or a repeated gene; the message names ``label``.
    """
    controls = frozenset(control_labels) | {CONTROL}
    text = str(label).strip()
    if not text:
        raise ConditionError(f"condition {label!r}: empty perturbation label")
    if text in controls:
        return CONTROL
    return _from_genes(_genes_of(text.split(delimiter), text, controls))


def unify_spellings(names: Iterable[str]) -> dict[str, str]:
    """Map every spelling to one name per condition, keeping spellings that are already unique.

    A condition written one way only keeps that spelling (so data from GEARS's published files is
    unchanged); a condition written several ways (``A+B`` and ``B+A``) maps all of them to
    :func:`canonical_condition` and logs a warning naming them.

    Parameters
    ----------
    names
        Condition names; duplicates are fine.

    Returns
    -------
    dict of str to str
        Spelling -> unified name, one entry per distinct spelling (``ctrl`` included).

    Raises
    ------
    ConditionError
        As :func:`condition_genes`.
    """
    by_key: dict[str, set[str]] = defaultdict(set)
    for name in names:
        by_key[canonical_condition(str(name))].add(str(name))
    mapping = {}
    for key, spellings in by_key.items():
        if len(spellings) > 1:
            log.warning("conditions %s are one condition; using %r", " and ".join(sorted(spellings)), key)
        for spelling in spellings:
            mapping[spelling] = key if len(spellings) > 1 else spelling
    return mapping
