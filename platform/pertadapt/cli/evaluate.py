"""`pertadapt eval` and `pertadapt baselines` (registered by :mod:`pertadapt.cli.main`).

``SPLIT.json`` needs the keys ``train``, ``val``, ``test`` (condition lists) and ``subgroups``
(subgroup name -> test conditions), as written by the data layer's split. Metrics are computed on the
``test`` conditions; predictions of train/val conditions are allowed (the GI metrics use predicted
singles) and otherwise ignored.
"""

from __future__ import annotations

import json
import logging
import math
from pathlib import Path
from typing import Annotated

import numpy as np
import typer

log = logging.getLogger("pertadapt")

#: Genes with the highest control mean used for the GI metrics (stand-in for GEARS's unshipped
#: ``genes_with_hi_mean.npy``; bounds the O(n²) distance correlation).
GI_GENES = 1000


def _read_split(path: Path) -> dict:
    doc = json.loads(path.read_text())
    missing = [k for k in ("train", "val", "test", "subgroups") if k not in doc]
    if missing:
        raise ValueError(f"{path}: key(s) {', '.join(missing)} missing")
    return doc


def _jsonable(value: object) -> object:
    """Non-finite floats -> ``None`` so that the output is strict JSON."""
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _evaluate(data: object, split: dict, conditions: list[str], matrix: np.ndarray, *, gi: bool) -> dict:
    """Metrics of predicted condition means on the split's test conditions (``metrics.json`` layout)."""
    from pertadapt.data.conditions import condition_genes
    from pertadapt.eval import gi_metrics, score_predictions

    known = set(split["train"]) | set(split["val"]) | set(split["test"])
    outside = [c for c in conditions if c not in known]
    if outside:
        raise ValueError(f"{len(outside)} predicted condition(s) are not in the split, first {outside[0]!r}")
    pred = dict(zip(conditions, matrix, strict=True))
    unpredicted = [c for c in split["test"] if c not in pred]
    if unpredicted:
        raise ValueError(f"{len(unpredicted)} test condition(s) have no prediction, first {unpredicted[0]!r}")
    metrics = score_predictions({c: pred[c] for c in split["test"]}, data, subgroups=split["subgroups"],
                                reference_conditions=split["train"])
    doc = metrics.to_dict()
    doubles = [c for c in split["test"] if len(condition_genes(c)) == 2]
    if gi and doubles:
        result = gi_metrics(pred, data.condition_means, data.ctrl_mean, doubles,
                            gene_idx=np.argsort(data.ctrl_mean)[-GI_GENES:])
        doc["gi"] = {"overall": result.overall, "per_double": result.per_double}
    return _jsonable(doc)


def _write_json(path: Path, doc: dict) -> None:
    from pertadapt.files import atomic_write_text

    atomic_write_text(path, json.dumps(doc, indent=1, allow_nan=False) + "\n")


def eval_command(
    pred: Annotated[Path, typer.Option("--pred", help="Predictions: obs['condition'], X per cell or per condition.")],
    data: Annotated[Path, typer.Option("--data", help="Prepared dataset (.h5ad) with the uns DE keys.")],
    split: Annotated[Path, typer.Option("--split", help="SPLIT.json with train/val/test/subgroups.")],
    out: Annotated[Path, typer.Option("--out", help="Output metrics.json.")],
    gi: Annotated[bool, typer.Option("--gi/--no-gi", help="Also genetic-interaction metrics of test doubles "
                                     "(Theil-Sen, about 2 s per prediction and double).")] = False,
) -> None:
    """GEARS-compatible metrics (overall, per subgroup, per perturbation) of a prediction file."""
    from pertadapt.data.dataset import read_perturb_data
    from pertadapt.data.summaries import read_predictions

    try:
        doc_split = _read_split(split)
        dataset = read_perturb_data(data, for_training=False)
        conditions, matrix = read_predictions(pred, list(dataset.genes))
        doc = _evaluate(dataset, doc_split, conditions, matrix, gi=gi)
    except ValueError as e:
        log.error("eval: %s", e)
        raise typer.Exit(1) from e
    _write_json(out, doc)
    log.info("eval: %d test perturbations, mse_de %.4g -> %s", len(doc["per_perturbation"]),
             doc["overall"].get("mse_de", float("nan")), out)


def baselines_command(
    data: Annotated[Path, typer.Argument(help="Prepared dataset (.h5ad).")],
    split: Annotated[Path, typer.Option("--split", help="SPLIT.json with train/val/test/subgroups.")],
    out: Annotated[Path, typer.Option("--out", help="Output directory.")],
    linear_k: Annotated[int, typer.Option("--linear-k", help="PCs of baseline_linear.")] = 10,
    linear_ridge: Annotated[float, typer.Option("--linear-ridge", help="Ridge penalty of baseline_linear.")] = 0.1,
    gi: Annotated[bool, typer.Option("--gi/--no-gi", help="Also genetic-interaction metrics of test doubles.")] = False,
) -> None:
    """Fit every baseline on the training conditions; write DIR/<name>.h5ad and DIR/<name>.metrics.json."""
    from pertadapt.baselines import baseline_options, fit_baseline
    from pertadapt.data.dataset import read_perturb_data
    from pertadapt.data.keys import CONTROL
    from pertadapt.data.summaries import write_predictions

    try:
        doc_split = _read_split(split)
        dataset = read_perturb_data(data, for_training=False)
        genes = list(dataset.genes)
        by_name = dataset.condition_means
        absent = [c for c in doc_split["train"] if c not in by_name]
        if absent:
            raise ValueError(f"{len(absent)} training condition(s) have no cells, first {absent[0]!r}")
        train = {c: by_name[c] for c in doc_split["train"]}
        targets = sorted({*doc_split["train"], *doc_split["val"], *doc_split["test"]} - {CONTROL})
        for options in baseline_options({"baseline_linear": {"k": linear_k, "ridge": linear_ridge}}):
            name = options.name
            model = fit_baseline(options, train, dataset.ctrl_mean, gene_names=genes)
            predicted = model.predict(targets)
            matrix = np.stack([predicted[c] for c in targets])
            write_predictions(out / f"{name}.h5ad", targets, matrix, genes)
            doc = _evaluate(dataset, doc_split, targets, matrix, gi=gi)
            _write_json(out / f"{name}.metrics.json", doc)
            log.info("%s: test mse_de %.4g, pearson_delta %.4g", name, doc["overall"].get("mse_de", float("nan")),
                     doc["overall"].get("pearson_delta", float("nan")))
    except ValueError as e:
        log.error("baselines: %s", e)
        raise typer.Exit(1) from e


def register(app: typer.Typer) -> None:
    """Add ``eval`` and ``baselines`` to the root app."""
    app.command("eval")(eval_command)
    app.command("baselines")(baselines_command)
