"""The plan of a sweep: every run with its coordinates, what varies, its resources and its config hash.

Trials with the same config hash (a trial's identity: :func:`~pertadapt.config.load.config_hash`) are one
run: the first in plan order is the entry of ``trials``, the others are listed in its ``aliases`` (their
key, coordinates, levels and varying values) and reported under their own names from that run's results
(:func:`~pertadapt.sweep.ablation.shared_runs`). E.g. an FM-off row planned under two backbone sets runs
once per dataset and seed. :func:`plan_names` lists every name of a plan.

Built without Ray or data (``pertadapt sweep --dry-run`` prints it and writes ``plan.json``); a sweep
directory keeps the plan it was started with, so a re-run can tell a resume of the same grid from a
different grid that would mix results (refused unless ``--overwrite``).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pertadapt.config.load import config_hash, config_to_dict
from pertadapt.config.schema import ConfigError
from pertadapt.files import atomic_write_json
from pertadapt.report.results import PLAN_FILE
from pertadapt.sweep.ablation import Ablation, Trial, shared_runs
from pertadapt.sweep.results import flatten, varying_keys
from pertadapt.sweep.search_space import SearchSpace

__all__ = ["ALIAS_FIELDS", "COST_KEYS", "DEFAULT_GPU_MEMORY_GB", "PLAN_FILE", "add_costs", "build_plan",
           "check_memory", "check_search_space", "check_tables_fit", "diff_plans", "local_cpus", "plan_names",
           "read_plan", "table_space", "trial_cpus", "write_plan"]

#: GPU memory a trial's worker must fit unless told otherwise (one 80 GB H100/A100).
DEFAULT_GPU_MEMORY_GB = 80.0
#: What an alias entry of a run keeps of its own plan entry (the rest is the run's).
ALIAS_FIELDS = ("key", "index", "arm", "seed", "dataset", "backbone", "levels", "varying")
#: Logical CPUs of a Tune function trial that only drives Ray Train workers (``{"CPU": 0}`` is refused).
DRIVER_CPUS = 0.01


def trial_cpus(trial: Trial) -> float:
    """Logical CPUs one trial holds: its Ray Train workers plus the driver, or one CPU in-process."""
    cfg = trial.config
    if cfg.uses_ray_train:
        return DRIVER_CPUS + cfg.engine.workers * cfg.engine.cpus_per_worker
    return 1.0


def check_search_space(ablation: Ablation, space: SearchSpace) -> None:
    """Arms are enumerated, never sampled: a sampled key that an arm sets is a config error."""
    for dim in space.dims:
        setters = sorted({t.arm for t in ablation.trials if dim.key in t.overrides})
        if setters:
            raise ConfigError(f"{space.path}: params.{dim.key}: set by arm(s) {', '.join(setters)} of "
                              f"{ablation.path}; an arm's toggles are enumerated, not sampled")


def build_plan(ablation: Ablation, space: SearchSpace | None, data_paths: Mapping[str, str],
               max_concurrent: int) -> dict[str, Any]:
    """The JSON-able plan of a sweep.

    Parameters
    ----------
    ablation
        The validated grid.
    space
        Optional search space.
    data_paths
        trial key → the data file it reads.
    max_concurrent
        How many trials run at once.
    """
    flats = {t.key: flatten(config_to_dict(t.config)) for t in ablation.trials}
    varying = varying_keys(list(flats.values()))
    trials = []
    for t in ablation.trials:
        cfg = t.config
        trials.append({
            "key": t.key, "arm": t.arm, "seed": t.seed, "dataset": t.dataset, "backbone": t.backbone,
            "levels": t.levels, "is_baseline": cfg.is_baseline,
            "varying": {k: flats[t.key].get(k) for k in varying},
            "workers": cfg.engine.workers if cfg.uses_ray_train else 1,
            "cpus_per_worker": cfg.engine.cpus_per_worker if cfg.uses_ray_train else 1.0,
            "gpus_per_worker": 0.0 if cfg.is_baseline else cfg.engine.gpus, "placement": cfg.engine.placement,
            "accelerator_type": cfg.engine.accelerator_type,
            "cpus": trial_cpus(t), "data_path": data_paths[t.key],
            "config_hash": config_hash(t.run_config(data_paths[t.key])),
        })
    trials = _merge_shared(trials)
    search = None
    if space is not None:
        search = {"path": str(space.path), "metric": space.metric, "mode": space.mode,
                  "num_samples": space.num_samples, "scheduler": space.scheduler,
                  "dims": [{"key": d.key, "kind": d.kind, "low": d.low, "high": d.high, "values": list(d.values)}
                           for d in space.dims]}
    return {"name": ablation.name, "ablation": str(ablation.path), "reference_arm": ablation.reference_arm,
            "factors": {f: list(lv) for f, lv in ablation.factors.items()}, "search": search,
            "max_concurrent_trials": max_concurrent, "trials": trials}


#: The per-trial cost fields of a plan (``trials[i].cost``) and of its total (``cost``).
COST_KEYS = ("train_tflop", "eval_tflop", "cache_tflop", "cache_gb", "peak_gb_per_worker", "gpu_hours")


def _cache_identity(cfg: Any, path: Path) -> tuple:
    """What tells two trials' embedding tables apart before they are built: the data, the backbone block (its
    storage dtype in), the gene space, the control pool and, for a random-init FM, the seed its weights come from."""
    b = cfg.backbone
    return (str(path), repr(b), cfg.model.gene_space, cfg.data.control_pool, cfg.data.control_pool_seed,
            cfg.seed if b.weights_are_random else None)


def add_costs(plan: dict[str, Any], ablation: Ablation, data_files: Mapping[str, Path], *, tflops: float | None = None,
              naive: bool = False, cache_root: Path | None = None) -> None:
    """Put each trial's cost at its data's real dimensions into ``plan`` (:mod:`pertadapt.train.cost`), and
    whether the sweep's embedding tables fit their disk.

    ``trials[i].cost`` (and ``cost_naive`` with ``naive``: the same trial on the reference's path) holds
    :data:`COST_KEYS` and ``cache_bytes``, or is ``None`` while the trial's data file does not exist yet (a
    simulated dataset made on the first run); ``plan['cost']`` (``plan['cost_naive']``) is the sweep's total
    (each distinct embedding table once: :func:`_cache_identity`; the largest peak), with ``trials_without_cost``
    counting those. A trial's own cost includes building the cache it uses. ``plan['caches']`` lists the
    distinct tables (:func:`table_space`) and ``trials[i].cache_fits`` says whether the trial's table fits
    (``None``: no table).

    Parameters
    ----------
    plan
        From :func:`build_plan`; changed in place.
    ablation
        The grid the plan was built from.
    data_files
        trial key → the data file as read on this machine (its header only).
    tflops
        Sustained TFLOP/s of one GPU (default :data:`pertadapt.train.cost.DEFAULT_TFLOPS`).
    naive
        Also plan the reference's path.
    cache_root
        Folder the tables would be built in (default ``$PERTADAPT_CACHE/fm_embeddings``, as the sweep's driver
        builds them).
    """
    from pertadapt.data.header import read_header
    from pertadapt.files import cache_dir
    from pertadapt.train.cost import DEFAULT_TFLOPS, trial_cost
    from pertadapt.train.embed_cache import CACHE_SUBDIR

    tflops = DEFAULT_TFLOPS if tflops is None else tflops
    plan["tflops"] = tflops
    headers: dict[Path, Any] = {}
    by_key = {t.key: t for t in ablation.trials}
    tables: dict[tuple, dict[str, Any]] = {}
    for kind, is_naive in (("cost", False), ("cost_naive", True)) if naive else (("cost", False),):
        total = dict.fromkeys(COST_KEYS, 0.0)
        missing = 0
        caches: set[tuple] = set()
        for entry in plan["trials"]:
            path = Path(data_files[entry["key"]])
            if not path.is_file():
                entry[kind], missing = None, missing + 1
                continue
            if path not in headers:
                headers[path] = read_header(path)
            cfg = by_key[entry["key"]].config
            cost = trial_cost(cfg, headers[path], tflops=tflops, naive=is_naive).as_dict()
            entry[kind] = cost
            for k in ("train_tflop", "eval_tflop"):
                total[k] += cost[k]
            cache = _cache_identity(cfg, path)
            if cost["cache_bytes"] and cache not in caches:
                caches.add(cache)
                total["cache_tflop"] += cost["cache_tflop"]
                total["cache_gb"] += cost["cache_gb"]
            if kind == "cost" and cost["cache_bytes"]:
                tables.setdefault(cache, {"bytes": cost["cache_bytes"], "backbone": entry["backbone"],
                                          "dtype": cfg.backbone.cache_dtype, "trials": []})["trials"].append(entry["key"])
            total["peak_gb_per_worker"] = max(total["peak_gb_per_worker"], cost["peak_gb_per_worker"])
        total["gpu_hours"] = (total["train_tflop"] + total["eval_tflop"] + total["cache_tflop"]) / tflops / 3600
        plan[kind] = {**{k: float(f"{v:.4g}") for k, v in total.items()}, "trials_without_cost": missing}
    plan["caches"] = table_space(list(tables.values()), cache_root or cache_dir() / CACHE_SUBDIR)
    fits = {k: c["fits"] for c in plan["caches"] for k in c["trials"]}
    for entry in plan["trials"]:
        entry["cache_fits"] = fits.get(entry["key"])


def table_space(tables: list[dict[str, Any]], directory: Path) -> list[dict[str, Any]]:
    """Whether each of the sweep's embedding tables fits the free space of ``directory``, where they are all
    built (:func:`pertadapt.train.embed_cache.check_cache_space`'s disk), in plan order.

    Each table (``bytes``, ``backbone``, ``dtype``, ``trials``) gets ``directory``, ``free_bytes``,
    ``cumulative_bytes`` (it and the tables before it) and ``fits`` (the cumulative bytes fit); one that does
    not also gets ``ways_out``. A table already stored there (a resumed sweep) is counted as to be built:
    the build itself checks the exact free space before it writes anything.
    """
    from pertadapt.train.embed_cache import CACHE_DTYPES, free_bytes

    free = free_bytes(directory)
    out, cumulative = [], 0
    for t in tables:
        cumulative += t["bytes"]
        entry = {**t, "directory": str(directory), "free_bytes": free, "cumulative_bytes": cumulative,
                 "fits": cumulative <= free}
        if not entry["fits"]:
            half = t["bytes"] * 2 // CACHE_DTYPES[t["dtype"]][0].itemsize
            entry["ways_out"] = (f"backbone.cache_dtype=bfloat16 ({half} bytes), a smaller data.control_pool, "
                                 "PERTADAPT_CACHE (or --storage on a path) on a larger disk, or "
                                 "backbone.embedding_cache=off (the backbone recomputed every step)")
        out.append(entry)
    return out


def check_tables_fit(plan: Mapping[str, Any]) -> None:
    """Refuse a sweep whose embedding tables do not fit their disk (:func:`table_space`), before any trial.

    Raises
    ------
    ConfigError
        Naming each table that does not fit: its trials, bytes, the free bytes and the ways out.
    """
    short = [c for c in plan.get("caches", []) if not c["fits"]]
    if short:
        raise ConfigError("backbone.embedding_cache: " + "; ".join(
            f"the table of trial(s) {', '.join(c['trials'])} needs {c['bytes']} bytes ({c['cumulative_bytes']} with "
            f"the tables before it) but {c['directory']} has {c['free_bytes']} bytes free" for c in short)
            + f". Ways out: {short[0]['ways_out']}")


def check_memory(plan: Mapping[str, Any], gpu_memory_gb: float | None = None) -> None:
    """Refuse a trial whose planned peak memory per worker exceeds one GPU's ``gpu_memory_gb`` (default
    :data:`DEFAULT_GPU_MEMORY_GB`).

    Raises
    ------
    ConfigError
        Naming the first such trial's key, its need and the knobs that lower it.
    """
    gpu_memory_gb = DEFAULT_GPU_MEMORY_GB if gpu_memory_gb is None else gpu_memory_gb
    for t in plan["trials"]:
        cost = t.get("cost")
        if cost and cost["peak_gb_per_worker"] > gpu_memory_gb:
            raise ConfigError(f"trial {t['key']}: needs {cost['peak_gb_per_worker']:.3g} GB per worker by the plan, "
                              f"more than --gpu-memory-gb {gpu_memory_gb:g}; lower optim.micro_batch_size or set "
                              "backbone.activation_checkpointing=true")


def _merge_shared(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per run: the entries with one config hash become the first's ``aliases``; each entry keeps its
    ``index``, its position in plan order."""
    by_key = {e["key"]: {**e, "index": i} for i, e in enumerate(entries)}
    runs = shared_runs((e["key"], e["config_hash"]) for e in entries)
    return [{**by_key[run], "aliases": [{f: by_key[k][f] for f in ALIAS_FIELDS} for k in names[1:]]}
            for run, names in runs.items()]


def plan_names(plan: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Every trial name of a plan, in plan order → its entry (an alias: its run's entry with its own
    :data:`ALIAS_FIELDS`), with ``run``: the key of the run that gives its results."""
    out = [{**t, **{f: own[f] for f in ALIAS_FIELDS if f in own}, "run": t["key"]}
           for t in plan.get("trials", []) for own in (t, *t.get("aliases", []))]
    return {e["key"]: e for e in sorted(out, key=lambda e: e.get("index", 0))}


def local_cpus(plan: Mapping[str, Any]) -> int:
    """Logical CPUs of a local Ray cluster that holds ``max_concurrent_trials`` of the largest trial."""
    largest = max(t["cpus"] for t in plan["trials"])
    return math.ceil(plan["max_concurrent_trials"] * largest) + 1


def diff_plans(old: Mapping[str, Any], new: Mapping[str, Any]) -> list[str]:
    """What differs between two plans, one line per difference (empty: the same sweep)."""
    out = []
    if old.get("name") != new.get("name"):
        out.append(f"name: {old.get('name')!r} → {new.get('name')!r}")
    a, b = plan_names(old), plan_names(new)
    out += [f"trial {k} removed" for k in sorted(set(a) - set(b))]
    out += [f"trial {k} added" for k in sorted(set(b) - set(a))]
    for k in sorted(set(a) & set(b)):
        if a[k]["config_hash"] != b[k]["config_hash"]:
            changed = sorted(n for n in set(a[k]["varying"]) | set(b[k]["varying"])
                             if a[k]["varying"].get(n) != b[k]["varying"].get(n))
            what = ", ".join(f"{n}: {a[k]['varying'].get(n)!r} → {b[k]['varying'].get(n)!r}" for n in changed)
            out.append(f"trial {k}: config changed ({what or 'a shared setting changed'})")
        elif a[k]["run"] != b[k]["run"]:
            out.append(f"trial {k}: runs as {a[k]['run']!r} → {b[k]['run']!r}")
    if json.dumps(old.get("search"), sort_keys=True) != json.dumps(new.get("search"), sort_keys=True):
        out.append("search space changed")
    return out


def write_plan(sweep_dir: Path, plan: Mapping[str, Any]) -> Path:
    """Write ``sweep_dir/plan.json`` atomically."""
    path = sweep_dir / PLAN_FILE
    atomic_write_json(path, plan)
    return path


def read_plan(sweep_dir: Path) -> dict[str, Any] | None:
    """The plan a sweep directory was started with, or ``None`` when it holds no sweep."""
    path = sweep_dir / PLAN_FILE
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: not valid JSON ({e}); the directory does not hold a readable sweep") from e
