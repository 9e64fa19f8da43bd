"""AnnData key names shared by every data function (the GEARS/PertAdapt processed layout).

Every reader and writer in :mod:`pertadapt.data` uses these constants instead of string literals.
"""

from __future__ import annotations

__all__ = [
    "CELL_TYPE",
    "CONDITION",
    "CONDITION_NAME",
    "CONTROL",
    "CONTROL_FLAG",
    "COUNTS_LAYER",
    "DE_KEY",
    "DOSE_VAL",
    "GENE_NAME",
    "MEASURED",
    "NON_DROPOUT_KEY",
    "NON_ZERO_KEY",
    "SEP",
    "TOP_NON_DROPOUT_DE_KEY",
    "TOP_NON_ZERO_DE_KEY",
    "TOTAL_COUNT",
]

#: ``obs`` column with GEARS condition names: ``A+ctrl`` (single), ``A+B`` (double), ``ctrl``.
CONDITION = "condition"
#: ``obs`` column with the cell type (one value for a single-cell-line screen).
CELL_TYPE = "cell_type"
#: ``obs`` column with the raw UMI total of each cell (before normalisation).
TOTAL_COUNT = "total_count"
#: ``obs`` column ``{cell_type}_{condition}_{dose_val}``; every ``uns`` DE dict is keyed by it.
CONDITION_NAME = "condition_name"
#: ``obs`` column ``'1+1'`` for conditions containing ``+`` (singles too), ``'1'`` for ctrl.
DOSE_VAL = "dose_val"
#: ``obs`` column, 1 for control cells and 0 otherwise.
CONTROL_FLAG = "control"
#: ``var`` column with HGNC gene symbols.
GENE_NAME = "gene_name"
#: ``var`` column, bool: ``True`` for genes the dataset measured, ``False`` for vocabulary genes that
#: ``pertadapt data prepare --vocab`` zero-filled. A file without it has every gene measured.
MEASURED = "measured"
#: Layer holding raw integer counts.
COUNTS_LAYER = "counts"
#: Control label in ``obs['condition']``.
CONTROL = "ctrl"
#: Separator between the two genes of a condition.
SEP = "+"
#: ``uns`` dict: condition_name -> all genes ranked by |t| against control (gene IDs = var_names).
DE_KEY = "rank_genes_groups_cov_all"
#: ``uns`` dict: condition_name -> sorted indices of genes with non-zero mean in that condition.
NON_ZERO_KEY = "non_zeros_gene_idx"
#: ``uns`` dict: condition_name -> sorted indices of non-dropout genes.
NON_DROPOUT_KEY = "non_dropout_gene_idx"
#: ``uns`` dict: condition_name -> first 20 ranked genes that are non-dropout.
TOP_NON_DROPOUT_DE_KEY = "top_non_dropout_de_20"
#: ``uns`` dict: condition_name -> first 20 ranked genes that are non-zero.
TOP_NON_ZERO_DE_KEY = "top_non_zero_de_20"
