"""Names from one place: every closed name list of the schema equals the registry that implements it."""

from __future__ import annotations

import numpy as np
import pytest

from pertadapt.baselines import BASELINES
from pertadapt.config import schema
from pertadapt.config.metrics import metric_names
from pertadapt.eval import compute_metrics, top_variable_genes
from pertadapt.go.annotations import SOURCES
from pertadapt.go.similarity import MASK_KINDS, PERT_VOCABULARIES
from pertadapt.models.losses import LOSSES
from pertadapt.train.embed_cache import CACHE_DTYPES
from pertadapt.train.engine import CLIPPERS, ENGINES


@pytest.mark.parametrize(("names", "registry"), [
    (schema.BASELINE_MODELS, BASELINES),
    (schema.LOSSES, LOSSES),
    (schema.ENGINES, ENGINES),
    (schema.MASKS, MASK_KINDS),
    (schema.GO_SOURCES, SOURCES),
    (schema.CACHE_DTYPES, CACHE_DTYPES),
    (schema.CLIP_MODES, CLIPPERS),
    (schema.PERT_GRAPH_GENES, PERT_VOCABULARIES),
], ids=["baselines", "losses", "engines", "masks", "go_sources", "cache_dtypes", "clip_modes", "pert_graph_genes"])
def test_schema_names_equal_registry(names: tuple[str, ...], registry: object) -> None:
    assert set(names) == set(registry)


def test_models_are_pertadapt_plus_the_baselines() -> None:
    assert set(schema.MODELS) == {"pertadapt", *BASELINES}


def test_metric_vocabulary_is_what_compute_metrics_reports() -> None:
    rng = np.random.default_rng(0)
    n = 250
    ctrl = rng.normal(size=n)
    conds = ["A+ctrl", "B+ctrl", "A+B"]
    truth = {c: ctrl + rng.normal(size=n) for c in conds}
    pred = {c: ctrl + rng.normal(size=n) for c in conds}
    de = {c: np.argsort(-np.abs(truth[c] - ctrl)) for c in conds}
    hvg = top_variable_genes(np.stack([ctrl, *truth.values()]))
    m = compute_metrics(pred, truth, ctrl, de, non_dropout_de_idx={c: de[c][:20] for c in conds}, hvg_idx=hvg,
                        gene_names=[f"G{i}" for i in range(n)], perturbed_mean=ctrl + 0.5)
    assert set(m.overall) == set(metric_names())


@pytest.mark.parametrize(("name", "ok"), [
    ("val_mse_de", True), ("val_combo_seen0_pearson_delta", True), ("val_truth_mse_de", True),
    ("test_mse_de", False), ("val_mse_dee", False), ("val_combo_seen9_mse", False), ("mse_de", False),
])
def test_metric_names(name: str, ok: bool) -> None:
    assert schema.is_metric_name(name, "val") is ok
