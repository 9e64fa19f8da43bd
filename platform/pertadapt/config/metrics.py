"""The metric registry: every per-perturbation metric's name, direction, display name and family, in one place.

Evaluation reports each registered metric per condition and as ``<split>_<metric>`` /
``<split>_<subgroup>_<metric>`` means (:mod:`pertadapt.eval.metrics`); model selection
(``eval.select_metric``, ``eval.select_mode``), the sweep's progress table, the report's tables ("best" per
column), its paired tests ("better" / "worse") and its plots read the direction from here.

The built-in metrics are computed together by :func:`pertadapt.eval.metrics.perturbation_metrics` and its
neighbours; a metric added with :func:`register_metric` brings its own ``compute`` function, which evaluation
calls for every non-control perturbation. A name is looked up with or without a split, subgroup or
``truth_`` prefix (``test_combo_seen0_truth_mse_de`` is ``mse_de``); an unknown name is a
:class:`~pertadapt.config.errors.ConfigError` listing the known ones.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from pertadapt.config.errors import ConfigError, check_choice

__all__ = ["DIRECTIONS", "FAMILIES", "MetricSpec", "base_metric", "default_report_metrics", "is_metric_name",
           "lower_is_better", "metric_names", "metric_spec", "register_metric", "registered_metrics",
           "select_mode", "truth_metric_names", "SUBGROUPS", "TRUTH_PREFIX", "VOCAB_PREFIX"]

#: ``lower``: smaller is better (errors); ``higher``: larger is better (correlations, accuracies).
DIRECTIONS = ("lower", "higher")
#: Where a metric comes from.
FAMILIES = ("gears", "cell-eval", "systema", "custom")
#: GEARS test subgroups (``data.splits``), in the paper's column order; metrics are also reported as
#: ``<split>_<subgroup>_<metric>``.
SUBGROUPS = ("combo_seen0", "combo_seen1", "combo_seen2", "unseen_single")
_SPLITS = ("train", "val", "test")
TRUTH_PREFIX = "truth_"
#: Prefix of a ``model.gene_space: vocabulary`` run's metrics over every gene of the file, zero-filled ones
#: included (the reference's numbers; the unprefixed names are over the measured genes).
VOCAB_PREFIX = "vocab_"

#: ``(pred, truth, ctrl, de) -> value`` of one non-control perturbation: ``(n_genes,)`` float64 predicted mean,
#: observed (or noise-free) mean and control mean, and the gene indices ranked by DE (the first 20 are the DE set).
Compute = Callable[[Any, Any, Any, Any], float]


@dataclass(frozen=True)
class MetricSpec:
    """One per-perturbation metric.

    Attributes
    ----------
    name
        Per-condition name (``mse_de``): the column of a run's per-condition table, the suffix of the flat names.
    direction
        ``lower`` or ``higher`` is better.
    display
        Human-readable name for tables and plots.
    family
        One of :data:`FAMILIES`.
    report
        Shown by the report when no ``--metric`` is given (``key``: always; ``present``: when the trials have
        it; ``no``: only on request), in registration order.
    truth
        Also scored against a simulator's noise-free truth (``<split>_truth_<name>``).
    report_truth
        The report also shows ``truth_<name>`` by default when the trials have it.
    compute
        For an added metric: its value on one perturbation (see :data:`Compute`); ``None`` for the built-in
        metrics, which evaluation computes itself.
    """

    name: str
    direction: str
    display: str
    family: str
    report: str = "no"
    truth: bool = False
    report_truth: bool = False
    compute: Compute | None = None

    def __post_init__(self) -> None:
        if not self.name.isidentifier() or self.name != self.name.lower():
            raise ConfigError(f"metric name {self.name!r}: expected a lower-case identifier (e.g. mse_de)")
        for what, value, options in (("direction", self.direction, DIRECTIONS), ("family", self.family, FAMILIES),
                                     ("report", self.report, ("key", "present", "no"))):
            check_choice(f"metric {self.name!r}: {what}", value, options)

    @property
    def lower_is_better(self) -> bool:
        """Whether smaller values are better."""
        return self.direction == "lower"

    @property
    def mode(self) -> str:
        """``min`` or ``max``: how a search or a model selection optimises it."""
        return "min" if self.lower_is_better else "max"


_REGISTRY: dict[str, MetricSpec] = {}


def register_metric(spec: MetricSpec, *, replace: bool = False) -> MetricSpec:
    """Add ``spec`` to the registry (every process that builds configs or evaluates must register it).

    Raises
    ------
    ConfigError
        A name already registered (unless ``replace``), or one that a prefix would make ambiguous.
    """
    if spec.name in _REGISTRY and not replace:
        raise ConfigError(f"metric {spec.name!r} is already registered")
    if spec.name.startswith((TRUTH_PREFIX, VOCAB_PREFIX, *(f"{s}_" for s in (*_SPLITS, *SUBGROUPS)))):
        raise ConfigError(f"metric {spec.name!r}: a name may not start with a split, a subgroup, {TRUTH_PREFIX!r} "
                          f"or {VOCAB_PREFIX!r}")
    _REGISTRY[spec.name] = spec
    return spec


def registered_metrics() -> tuple[MetricSpec, ...]:
    """Every registered metric, in registration order."""
    return tuple(_REGISTRY.values())


def metric_names() -> tuple[str, ...]:
    """Every registered metric's name, in registration order."""
    return tuple(_REGISTRY)


def truth_metric_names() -> tuple[str, ...]:
    """The metrics also scored against a simulator's noise-free truth."""
    return tuple(m.name for m in _REGISTRY.values() if m.truth)


def _strip(name: str, split: str | None) -> str | None:
    """``name`` without its split (``split``, or any when ``None``), subgroup, ``truth_`` and ``vocab_`` prefixes; ``None``
    when ``split`` is given and ``name`` lacks it."""
    rest = name
    splits = _SPLITS if split is None else (split,)
    for s in splits:
        if rest.startswith(f"{s}_"):
            rest = rest[len(s) + 1:]
            break
    else:
        if split is not None:
            return None
    for group in SUBGROUPS:
        if rest.startswith(f"{group}_"):
            rest = rest[len(group) + 1:]
            break
    return rest.removeprefix(TRUTH_PREFIX).removeprefix(VOCAB_PREFIX)


def base_metric(name: str) -> str | None:
    """The registered metric behind a per-condition or flat name (``test_combo_seen0_truth_mse_de`` →
    ``mse_de``); ``None`` when there is none."""
    if name in _REGISTRY:
        return name
    rest = _strip(name, None)
    return rest if rest in _REGISTRY else None


def metric_spec(name: str) -> MetricSpec:
    """The registered metric behind ``name`` (see :func:`base_metric`).

    Raises
    ------
    ConfigError
        An unknown metric, listing the known ones.
    """
    found = base_metric(name)
    if found is None:
        raise ConfigError(f"unknown metric {name!r}; known: {', '.join(_REGISTRY)} (also as <split>_<metric>, "
                          f"<split>_<subgroup>_<metric>, <split>_truth_<metric> and <split>_vocab_<metric>)")
    return _REGISTRY[found]


def lower_is_better(name: str) -> bool:
    """Whether smaller values of the metric behind ``name`` are better (:class:`ConfigError` when unknown)."""
    return metric_spec(name).lower_is_better


def select_mode(name: str) -> str:
    """``min`` or ``max`` for the metric behind ``name`` (:class:`ConfigError` when unknown)."""
    return metric_spec(name).mode


def is_metric_name(name: str, split: str) -> bool:
    """Whether ``name`` is ``<split>_<metric>``, ``<split>_<subgroup>_<metric>``, ``<split>_truth_<metric>`` or
    ``<split>_vocab_<metric>`` (also per subgroup) for a registered metric."""
    rest = _strip(name, split)
    return rest is not None and rest in _REGISTRY


def default_report_metrics(present: set[str] | frozenset[str] = frozenset()) -> list[str]:
    """The report's metrics without ``--metric`` (per-condition names): the ``key`` ones, the ``present`` ones
    whose ``test_<name>`` column is in ``present``, then ``truth_<name>`` of those with ``report_truth`` whose
    ``test_truth_<name>`` column is there."""
    specs = _REGISTRY.values()
    key = [m.name for m in specs if m.report == "key"]
    extra = [m.name for m in specs if m.report == "present" and f"test_{m.name}" in present]
    truth = [f"{TRUTH_PREFIX}{m.name}" for m in specs if m.report_truth and f"test_{TRUTH_PREFIX}{m.name}" in present]
    return [*key, *extra, *truth]


def _builtin(name: str, direction: str, display: str, family: str, report: str = "no", *, truth: bool = False,
             report_truth: bool = False) -> None:
    register_metric(MetricSpec(name, direction, display, family, report, truth, report_truth))


# GEARS compute_metrics / deeper_analysis / non_dropout_analysis (pertadapt.eval.metrics); the report's
# default metrics first, the headline one first of all
_builtin("mse_de", "lower", "MSE (top-20 DE)", "gears", "key", truth=True, report_truth=True)
_builtin("mse", "lower", "MSE", "gears", "key", truth=True)
_builtin("pearson_delta", "higher", "PearsonΔ", "gears", "key", truth=True)
_builtin("pearson_delta_de", "higher", "PearsonΔ (top-20 DE)", "gears", "key", truth=True, report_truth=True)
_builtin("pearson", "higher", "Pearson", "gears")
_builtin("pearson_de", "higher", "Pearson (top-20 DE)", "gears")
_builtin("frac_correct_direction_all", "higher", "Correct direction (all genes)", "gears")
_builtin("frac_correct_direction_20", "higher", "Correct direction (top-20 DE)", "gears", truth=True)
_builtin("frac_correct_direction_50", "higher", "Correct direction (top-50 DE)", "gears")
_builtin("frac_correct_direction_100", "higher", "Correct direction (top-100 DE)", "gears")
_builtin("frac_correct_direction_200", "higher", "Correct direction (top-200 DE)", "gears")
_builtin("mse_top20_de_non_dropout", "lower", "MSE (top-20 non-dropout DE)", "gears")
_builtin("pearson_delta_top20_de_non_dropout", "higher", "PearsonΔ (top-20 non-dropout DE)", "gears")
_builtin("pearson_top200_hvg", "higher", "Pearson (top-200 HVG)", "gears")
_builtin("pearson_delta_top200_hvg", "higher", "PearsonΔ (top-200 HVG)", "gears")
_builtin("mse_top200_hvg", "lower", "MSE (top-200 HVG)", "gears")
# cell-eval / Virtual Cell Challenge
_builtin("mae", "lower", "MAE", "cell-eval")
_builtin("de_overlap_20", "higher", "DE overlap (top 20)", "cell-eval")
_builtin("pds_l1", "higher", "Perturbation discrimination (L1)", "cell-eval")
# Systema: beyond systematic variation
_builtin("systema_pearson_delta", "higher", "Systema PearsonΔ", "systema", "present")
_builtin("centroid_accuracy", "higher", "Centroid accuracy", "systema", "present")
_builtin("systema_pearson_delta_de", "higher", "Systema PearsonΔ (top-20 DE)", "systema")
