"""``pertadapt bench``: the same subcommands and options as before the benchmarks moved into ``pertadapt.bench``."""

from __future__ import annotations

import os
import subprocess
import sys

import typer.main

from pertadapt.bench.measure import cpu_seconds, measure, peak_rss_bytes, peak_rss_mib
from pertadapt.cli.bench import bench

#: Every ``pertadapt bench`` subcommand, in ``--help`` order, with its options and arguments.
COMMANDS = {
    "go": ["--n-genes"],
    "data": ["--density", "--n-cells", "--n-genes"],
    "baselines": ["--n-conditions", "--n-genes"],
    "adapter": ["--attention-impl", "--chunk-size", "--device", "--json", "--n-genes"],
    "attention": ["--chunk-size", "--d", "--device", "--heads", "--json", "--n-genes"],
    "sweep": ["--from", "--json", "--naive", "--naive-from", "--out", "ABLATION", "OVERRIDES"],
    "cache": ["--device", "--heads", "--hidden-size", "--json", "--layers", "--n-genes", "--pool", "--repeats",
              "--steps"],
    "quality": ["--config", "--controls", "--epochs", "--json", "--out", "--seeds", "--steps", "OVERRIDES"],
}


def test_bench_help_lists_the_same_subcommands_in_the_same_order() -> None:
    res = subprocess.run([sys.executable, "-m", "pertadapt.cli", "bench", "--help"], capture_output=True, text=True,
                         env={**os.environ, "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    listed = [line.split()[1] for line in res.stdout.splitlines()
              if line.startswith("│ ") and len(line.split()) > 2 and line.split()[1] in COMMANDS]
    assert listed == list(COMMANDS)


def test_each_bench_subcommand_keeps_its_options() -> None:
    group = typer.main.get_command(bench)
    got = {name: sorted(o for p in cmd.params for o in (p.opts if p.param_type_name == "option" else [p.name.upper()]))
           for name, cmd in group.commands.items()}
    assert got == COMMANDS


def test_the_shared_measurement_helpers() -> None:
    assert peak_rss_bytes() > 10 * 2**20
    assert peak_rss_mib() == peak_rss_bytes() / 2**20
    c0 = cpu_seconds()
    big, seconds, peak_mib = measure(lambda: bytearray(b"x" * 64 * 2**20), "cpu")  # 64 MiB, touched
    assert len(big) == 64 * 2**20
    assert seconds > 0
    assert peak_mib >= 60  # the resident-set high-water mark was reset before the call
    assert cpu_seconds() >= c0
