"""`pertadapt` commands of the simulate area (registered by :mod:`pertadapt.cli.main`)."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import typer

log = logging.getLogger("pertadapt")


def parse_overrides(pairs: list[str]) -> dict[str, object]:
    """Turn ``key=value`` strings into typed simulator overrides.

    Parameters
    ----------
    pairs
        ``key=value`` items; ``key`` is a :class:`pertadapt.data.simulate.SimParams` field, the value
        is converted to that field's type (tuples as as many comma-separated floats as the default has,
        e.g. ``gi_mix=0.2,0.2,0.2,0.2,0.2``).

    Returns
    -------
    dict
        Field name -> converted value.

    Raises
    ------
    ValueError
        On a malformed item, an unknown key or an unconvertible value (the message names the key).
    """
    from pertadapt.data.simulate import SimParams

    defaults = {f.name: f.default for f in dataclasses.fields(SimParams)}
    out: dict[str, object] = {}
    for item in pairs:
        key, sep, raw = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--set {item!r}: expected key=value")
        if key not in defaults:
            raise ValueError(f"{key}: unknown simulator parameter; valid: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if isinstance(default, tuple):
            out[key] = _numbers(key, raw, len(default))
            continue
        try:
            out[key] = type(default)(raw.strip())
        except ValueError as e:
            raise ValueError(f"{key}: cannot read {raw!r} as {type(default).__name__}") from e
    return out


def _numbers(key: str, raw: str, n: int) -> tuple[float, ...]:
    """``raw`` as ``n`` comma-separated floats; ``ValueError`` naming ``key`` otherwise."""
    try:
        values = tuple(float(x) for x in raw.split(","))
    except ValueError:
        values = ()
    if len(values) != n:
        raise ValueError(f"{key}: expected {n} comma-separated numbers, got {raw!r}")
    return values


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""

    @app.command("simulate")
    def simulate_cmd(
        preset: str = typer.Option("demo", "--preset", help="Simulator preset (demo, benchmark, norman_like, replogle_like)."),
        seed: int = typer.Option(0, "--seed", min=0, help="Seed of every random draw (same seed = identical file)."),
        out: Path = typer.Option(..., "--out", help="Output .h5ad (written atomically)."),
        overrides: list[str] = typer.Option([], "--set", help="Override a simulator parameter: key=value (repeatable)."),
        vocab: Path | None = typer.Option(
            None, "--vocab", help="Gene vocabulary (one symbol per line, e.g. the FM's 19,264 genes): write the "
            "data in its layout, the other genes zero-filled and flagged var['measured']=False."),
    ) -> None:
        """Simulate a Perturb-seq screen with known ground truth and write it ready for training.

        Every mistake here is an option error (exit 2, nothing written): a bad preset, ``--set`` item
        or parameter value, an ``--out`` that is a directory, or a ``--vocab`` that is unreadable or lacks
        a perturbed gene.
        """
        from pertadapt.cli.data import OPTION_ERROR, exit_on_error, fail
        from pertadapt.data.io import check_output_path, write_h5ad_atomic
        from pertadapt.data.simulate import simulate
        from pertadapt.go import GeneListError, read_gene_list

        with exit_on_error():
            check_output_path(out)
        try:
            vocabulary = None if vocab is None else read_gene_list(vocab)
        except GeneListError as e:
            raise fail(f"--vocab: {e}", OPTION_ERROR) from e
        try:
            adata = simulate(preset, seed, vocabulary=vocabulary, **parse_overrides(overrides))
        except ValueError as e:
            raise fail(f"simulate: {e}" + (f" (--vocab {vocab})" if vocab is not None else ""), OPTION_ERROR) from e
        with exit_on_error():
            write_h5ad_atomic(adata, out)
        log.info("wrote %s (%d cells x %d genes)", out, adata.n_obs, adata.n_vars)
