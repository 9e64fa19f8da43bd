"""Simulator presets and parameters, and where a preset's data file lives: light (numpy only).

Kept apart from :mod:`pertadapt.data.simulate` so that planning a sweep (``--dry-run``) can name every
trial's data file without importing the simulator or reading anything.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np

from pertadapt.config.schema import ConfigError, RunConfig
from pertadapt.files import cache_dir, sha256_bytes
from pertadapt.remote import StorageError, is_uri, localize

__all__ = ["GI_TYPES", "MODALITIES", "PRESETS", "DataFile", "SimParams", "data_file_for"]

#: Genetic-interaction types of doubles, in the order of :attr:`SimParams.gi_mix`.
GI_TYPES = ("additive", "synergy", "buffering", "epistasis", "neomorphic")
#: Perturbation modalities: CRISPR interference (knock-down) or activation (over-expression).
MODALITIES = ("crispri", "crispra")

@dataclass(frozen=True)
class SimParams:
    """Parameters of one simulated screen (see the module docstring for the model).

    Sizes: ``n_genes`` measured genes, ``n_singles`` single and ``n_doubles`` double perturbations,
    ``cells_per_condition`` cells per perturbation and ``n_control`` control cells.
    """

    n_genes: int = 240
    n_singles: int = 24
    n_doubles: int = 12
    cells_per_condition: int = 40
    n_control: int = 400
    modality: str = "crispra"
    #: 0 = network edges independent of GO, 1 = edges only between GO-similar genes.
    go_signal: float = 0.8
    #: Fraction of the genes drawn in blocks from GO terms (so GO neighbourhoods exist in the panel).
    module_frac: float = 0.6
    mean_out_degree: float = 1.5
    p_activation: float = 0.6
    #: Upper bound of each gene's summed absolute incoming weight (< 1: unique steady state).
    weight_scale: float = 0.95
    #: Saturation ``S`` of the downstream log fold changes.
    max_log_fc: float = 3.0
    #: CRISPRi knock-down efficiency range (fraction of the target's mRNA removed).
    kd_efficiency: tuple[float, float] = (0.6, 0.95)
    #: CRISPRa log fold-change range of the target.
    activation_log_fc: tuple[float, float] = (1.0, 3.0)
    #: Proportions of :data:`GI_TYPES` among the doubles.
    gi_mix: tuple[float, float, float, float, float] = (0.3, 0.2, 0.2, 0.15, 0.15)
    n_neomorphic_genes: int = 10
    #: Probability that a perturbed cell does not respond (incomplete knock-down).
    nonresponder_frac: float = 0.1
    library_median: float = 8000.0
    library_log_sd: float = 0.35
    #: Median over genes of the baseline mean UMI per cell at the median library size.
    gene_mean_median: float = 0.5
    gene_mean_log10_sd: float = 0.6
    dispersion_asymptote: float = 0.1
    n_batches: int = 1
    batch_sd: float = 0.0
    cell_type: str = "K562"
    #: Sd of each gene's intrinsic cell-to-cell fluctuation (log scale), propagated through the network
    #: so that co-expression among a condition's cells reflects its edges; 0 = cells of a condition
    #: differ only by library size, batch and counting noise.
    cell_noise_sd: float = 0.0
    #: Sd of each cell's activity of each shared program (log scale), 0 = no programs. A program is a
    #: continuous cell state (cell cycle, stress): it loads on a share ``program_frac`` of the genes (weights
    #: ``U(0.5, 1)``, positive with probability ``p_activation``), and each cell draws its activity
    #: ``N(0, program_sd^2)``, added to those genes' inputs and propagated through the network like
    #: ``cell_noise_sd``, so whole gene sets rise and fall together across cells.
    program_sd: float = 0.0
    n_programs: int = 3
    program_frac: float = 0.3

    def __post_init__(self) -> None:
        for name in ("n_genes", "cells_per_condition", "n_control", "n_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}: expected a positive integer, got {getattr(self, name)!r}")
        for name in ("n_singles", "n_doubles", "n_neomorphic_genes"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative integer, got {getattr(self, name)!r}")
        if self.n_singles + self.n_doubles < 1:
            raise ValueError("n_singles / n_doubles: at least one perturbation is needed")
        if self.n_singles > self.n_genes:
            raise ValueError(f"n_singles: {self.n_singles} perturbed genes but only n_genes={self.n_genes} genes")
        max_pairs = self.n_singles * (self.n_singles - 1) // 2
        if self.n_doubles > max_pairs:
            raise ValueError(f"n_doubles: {self.n_doubles} doubles but only {max_pairs} pairs of "
                             f"n_singles={self.n_singles} genes exist")
        if self.n_neomorphic_genes > self.n_genes:
            raise ValueError(f"n_neomorphic_genes: {self.n_neomorphic_genes} > n_genes={self.n_genes}")
        if self.modality not in MODALITIES:
            raise ValueError(f"modality: {self.modality!r} is not one of {', '.join(MODALITIES)}")
        if self.n_programs < 1:
            raise ValueError(f"n_programs: expected a positive integer, got {self.n_programs!r}")
        for name in ("go_signal", "module_frac", "p_activation", "nonresponder_frac", "program_frac"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name}: expected a probability in [0, 1], got {value!r}")
        if self.nonresponder_frac == 1.0:
            raise ValueError("nonresponder_frac: 1 leaves no responding cell")
        if not 0.0 < self.weight_scale < 1.0:
            raise ValueError(f"weight_scale: expected a value in (0, 1), got {self.weight_scale!r}")
        lo, hi = self.kd_efficiency
        if not 0.0 <= lo <= hi < 1.0:
            raise ValueError(f"kd_efficiency: expected 0 <= low <= high < 1, got {self.kd_efficiency!r}")
        lo, hi = self.activation_log_fc
        if not 0.0 <= lo <= hi:
            raise ValueError(f"activation_log_fc: expected 0 <= low <= high, got {self.activation_log_fc!r}")
        if len(self.gi_mix) != len(GI_TYPES) or min(self.gi_mix) < 0 or not np.isclose(sum(self.gi_mix), 1.0):
            raise ValueError(f"gi_mix: expected {len(GI_TYPES)} probabilities ({', '.join(GI_TYPES)}) "
                             f"in [0, 1] summing to 1, got {self.gi_mix!r}")
        for name in ("mean_out_degree", "max_log_fc", "library_median", "gene_mean_median",
                     "dispersion_asymptote"):
            if not getattr(self, name) > 0:
                raise ValueError(f"{name}: expected a positive number, got {getattr(self, name)!r}")
        for name in ("library_log_sd", "gene_mean_log10_sd", "batch_sd", "cell_noise_sd", "program_sd"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name}: expected a non-negative number, got {getattr(self, name)!r}")


#: Named parameter sets. ``demo`` feeds ``make demo``; the others are generated on demand.
PRESETS: dict[str, SimParams] = {
    # Small: ~2 s to generate, trainable in minutes on 2 CPU cores, non-empty GEARS test groups.
    # Control cells carry the network (cell_noise_sd 0.5: edge co-expression AUROC 0.65).
    "demo": SimParams(cell_noise_sd=0.5, program_sd=0.75),
    # Held-out quality benchmark (GEARS simulation split).
    "benchmark": SimParams(n_genes=2000, n_singles=160, n_doubles=110, cells_per_condition=50,
                           n_control=2000, n_batches=2, batch_sd=0.1, cell_noise_sd=0.5),
    # Norman et al. 2019 (K562 CRISPRa, GEARS processing): 5,045 genes, 105 singles, 131 doubles,
    # ~91k cells of which ~11k controls.
    "norman_like": SimParams(n_genes=5045, n_singles=105, n_doubles=131, cells_per_condition=335,
                             n_control=11000, library_median=13000.0, gene_mean_median=0.5,
                             n_batches=2, batch_sd=0.1),
    # Replogle et al. 2022 K562 essential screen (CRISPRi, GEARS processing): ~5,000 genes,
    # ~1,090 single knock-downs, no doubles, ~160k cells.
    "replogle_like": SimParams(n_genes=5000, n_singles=1090, n_doubles=0, cells_per_condition=140,
                               n_control=10000, modality="crispri", library_median=11000.0,
                               gene_mean_median=0.5, n_batches=2, batch_sd=0.1),
}


class DataFile(NamedTuple):
    """Where a run's ``.h5ad`` is, and whether it still has to be simulated."""

    path: Path
    to_simulate: bool


def data_file_for(cfg: RunConfig) -> DataFile:
    """Where the run's ``.h5ad`` is, and whether it still has to be simulated (no data is read or made).

    ``data.path`` must exist (a URI on an object store is read from a node-local copy, fetched here); without
    one, the simulator preset's cache file is named by the preset's parameters, seed and the package version,
    so a changed simulator never reuses a stale file.
    """
    if cfg.data.path is not None and is_uri(cfg.data.path):
        try:
            return DataFile(localize(cfg.data.path), False)
        except (FileNotFoundError, StorageError) as e:
            raise ConfigError(f"data.path: {e}") from e
    if cfg.data.path is not None:
        p = Path(cfg.data.path)
        if not p.is_file():
            raise ConfigError(f"data.path: {'not a file' if p.exists() else 'file not found'}: {p}")
        return DataFile(p, False)
    from pertadapt import __version__

    preset = cfg.data.simulate_preset
    if preset not in PRESETS:
        raise ConfigError(f"data.simulate_preset: {preset!r} is not one of {', '.join(PRESETS)}")
    key = sha256_bytes(f"{PRESETS[preset]!r}|{__version__}")[:10]
    out = cache_dir() / "simulated" / f"{preset}_seed{cfg.data.simulate_seed}_{key}.h5ad"
    return DataFile(out, not out.is_file())
