"""Benchmarks behind ``pertadapt bench``: one module per measured thing, one shared measurement helper.

:mod:`~pertadapt.bench.measure` (peak memory, CPU time, one measured call) is used by every benchmark;
:mod:`~pertadapt.bench.go` (GO graph + mask), :mod:`~pertadapt.bench.data` (``data prepare``),
:mod:`~pertadapt.bench.baselines`, :mod:`~pertadapt.bench.train` (the adapter, its GO-masked attention
and the frozen-FM embedding cache), :mod:`~pertadapt.bench.sweep` (where a sweep's time goes) and
:mod:`~pertadapt.bench.quality` (the full model against the baselines). The package sits below ``cli``
and above ``sweep``; the CLI (:mod:`pertadapt.cli.bench`) only parses options and prints.
"""
