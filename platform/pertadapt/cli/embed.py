"""`pertadapt embed`: per-gene backbone embeddings of the cells in an ``.h5ad`` (registered by :mod:`pertadapt.cli.main`)."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import TYPE_CHECKING

import typer

if TYPE_CHECKING:
    from torch import nn

from pertadapt.config.components import BACKBONE_OPTIONS

log = logging.getLogger("pertadapt")

#: Backbones with a checkpoint loader (their block has a ``checkpoint`` key: the published FMs and ``tiny``,
#: whose checkpoints ``pertadapt pretrain`` writes); ``learned`` has nothing to embed with.
PRETRAINED = tuple(n for n in BACKBONE_OPTIONS.names() if "checkpoint" in BACKBONE_OPTIONS.keys(n))


def _load_backbone(name: str, checkpoint: Path, input_mode: str) -> nn.Module:
    """The backbone ``name`` from ``checkpoint`` through the run configs' backbone registry."""
    from pertadapt.config import ConfigError
    from pertadapt.models.backbones import build_backbone

    block = {"checkpoint": str(checkpoint), **({"input_mode": input_mode} if input_mode != "code" else {})}
    try:
        BACKBONE_OPTIONS.check_keys(name, block)
        options = BACKBONE_OPTIONS.options(name)(**block)
    except ConfigError as e:
        raise typer.BadParameter(f"{e} (--input-mode applies to aido_cell only)", param_hint="--input-mode") from e
    return build_backbone(options, genes=None, width=options.hidden_size)


def embed(
    backbone: str = typer.Option(..., "--backbone", help=f"Pretrained backbone: {', '.join(PRETRAINED)}."),
    checkpoint: Path = typer.Option(..., "--checkpoint", exists=True,
                                    help="Checkpoint directory (aido_cell: HF layout; scfoundation: models.ckpt "
                                         "or its directory; tiny: written by pertadapt pretrain)."),
    data: Path = typer.Option(..., "--data", exists=True, dir_okay=False,
                              help="H5AD with raw counts in X or in layers['counts']."),
    out: Path = typer.Option(..., "--out", help="Output .npy: float32 (n_cells, n_genes, d), vocabulary order."),
    batch_size: int = typer.Option(8, "--batch-size", min=1, help="Cells per forward pass."),
    device: str = typer.Option("cpu", "--device", help="torch device, e.g. cpu or cuda."),
    input_mode: str = typer.Option("code", "--input-mode",
                                   help="aido_cell input handling: code (as PertAdapt's reference) or intended."),
) -> None:
    """Embed every cell gene by gene with a pretrained backbone (the two depth tokens dropped).

    Cells get the input PertAdapt feeds the backbone: ``log1p(counts / total · 1e4)`` in vocabulary order
    (genes matched by name, absent ones zero) and the raw total (``obs['total_count']`` or the row sum).
    The array is written to a temporary file beside ``--out`` and renamed when complete. An unreadable,
    mismatching or unsafe checkpoint (anything beyond tensors, e.g. a crafted pickle) and unusable data
    exit with code 1 and a one-line message; nothing is written then.
    """
    import numpy as np
    import torch
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    from pertadapt.data.embed_io import read_counts_for_vocab
    from pertadapt.files import atomic_write

    if backbone not in PRETRAINED:
        raise typer.BadParameter(f"{backbone!r} has no checkpoint loader; use one of {', '.join(PRETRAINED)}",
                                 param_hint="--backbone")
    if out.suffix != ".npy":
        raise typer.BadParameter("the output must be a .npy file", param_hint="--out")
    if out.is_dir():
        raise typer.BadParameter(f"{out} is a directory; give the path of a .npy file", param_hint="--out")
    try:
        model = _load_backbone(backbone, checkpoint, input_mode)
        cells = read_counts_for_vocab(data, model.genes)
    except ValueError as e:  # CheckpointError and DataError name the file and what is wrong
        log.error("%s", e)
        raise typer.Exit(1) from e
    model = model.to(device).eval()
    shape = (cells.n_cells, len(model.genes), model.hidden_size)

    def write(tmp: Path) -> None:
        array = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
        columns = (TextColumn("embedding"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
        with torch.no_grad(), Progress(*columns, transient=True) as progress:
            task = progress.add_task("cells", total=cells.n_cells)
            for start in range(0, cells.n_cells, batch_size):
                stop = min(start + batch_size, cells.n_cells)
                x, total = cells.log1p_batch(start, stop)
                emb = model.encode(torch.from_numpy(x).to(device), torch.from_numpy(total).to(device))
                array[start:stop] = emb.float().cpu().numpy()
                progress.advance(task, stop - start)
        array.flush()
        del array

    atomic_write(out, write)
    log.info("wrote %s: float32 %s (cells, genes, d) from %s via %s", out, shape, cells.source, backbone)


def register(app: typer.Typer) -> None:
    """Add this module's commands to the root app."""
    app.command("embed")(embed)
