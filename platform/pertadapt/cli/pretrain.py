"""``pertadapt pretrain``: masked-expression pretraining of an FM (registered by :mod:`pertadapt.cli.main`)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from pertadapt.config.errors import ConfigError
from pertadapt.config.pretrain import load_pretrain_config

log = logging.getLogger("pertadapt")


def _pretrain(config: Path = typer.Argument(..., help="Pretrain config YAML (may use base:), e.g. "
                                            "configs/pretrain_demo.yaml."),
              overrides: list[str] = typer.Argument(None, help="Dotted key=value overrides, e.g. steps=100."),
              out: Path = typer.Option(..., "--out", help="Output directory: the checkpoint (the architecture's "
                                       "layout) and the model card."),
              json_out: Path = typer.Option(None, "--json", help="Write the figures (held-out masked MSE, mean "
                                            "predictor, edge AUROC pretrained and random, steps, seconds) here."),
              resume: bool = typer.Option(False, "--resume", help="Continue the interrupted pretraining in OUT.")) -> None:
    """Pretrain an FM on the cells of an .h5ad (default: its control cells) by masked-value regression.

    One process (engine.name=torch), or engine.workers DeepSpeed workers under Ray Train on this node.
    """
    cfg = load_pretrain_config(config, list(overrides or []))
    if out.exists() and not out.is_dir():
        raise ConfigError(f"--out: {out} exists and is not a directory")
    if json_out is not None and json_out.is_dir():
        raise ConfigError(f"--json: {json_out} is a directory; give the path of a .json file")
    from pertadapt.data.presets import data_file_for

    data_file_for(cfg)  # a data.path that is not there fails now, before torch and the data stack are imported
    from pertadapt.files import atomic_write_json
    from pertadapt.train.worker import launch_pretrain

    summary = launch_pretrain(cfg, out, resume=resume)
    if json_out is not None:
        atomic_write_json(json_out, summary)
        log.info("wrote %s", json_out)


def register(app: typer.Typer) -> None:
    """Add ``pretrain`` to the root app."""
    app.command("pretrain")(_pretrain)
