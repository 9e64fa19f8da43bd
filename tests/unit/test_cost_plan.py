"""The cost plan (train/cost.py): FLOPs and memory traced on meta tensors agree with real CPU runs of the same
modules; activation checkpointing changes memory, not outputs; the sweep prints, stores and enforces the plan."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from fixtures.disks import small_tmpfs
from pertadapt.config.load import load_run_config
from pertadapt.models.backbones.registry import build_backbone
from pertadapt.train import cost

N, P, B = 96, 12, 4
TINY = ["backbone.name=tiny", "backbone.hidden_size=16", "backbone.layers=2", "backbone.heads=2",
        "model.hidden_size=16", "model.head_hidden=32", "adapter.heads=2", "adapter.ffn_dim=16",
        "adapter.attention_mask=none", "adapter.chunk_size=32", f"optim.micro_batch_size={B}"]


def _cfg(*extra: str):
    return load_run_config("platform/pertadapt/resources/configs/demo.yaml", [*TINY, *extra])


def _real_flops(model: torch.nn.Module, perturbation: torch.nn.Module, batch, *, train: bool) -> int:
    """FlopCounterMode on a real CPU forward (+ backward) of the whole model, attention on its math path and
    ``nn.TransformerEncoderLayer`` off its fused CPU fast path (neither is counted by FlopCounterMode)."""
    model.perturbation = perturbation
    model.train(train)
    counter = FlopCounterMode(display=False)
    fastpath = torch.backends.mha.get_fastpath_enabled()
    torch.backends.mha.set_fastpath_enabled(False)
    try:
        with counter, sdpa_kernel(SDPBackend.MATH), torch.set_grad_enabled(train):
            out = model(dataclasses.replace(batch, x_ctrl=torch.rand_like(batch.x_ctrl)))
            if train:
                out.sum().backward()
    finally:
        torch.backends.mha.set_fastpath_enabled(fastpath)
    return counter.get_total_flops()


@pytest.mark.parametrize("extra", [(), ("backbone.finetune=full",),
                                   ("backbone.finetune=full", "backbone.activation_checkpointing=true"),
                                   ("backbone.name=learned",)])
def test_plan_flops_equal_flop_counter_on_a_real_run(extra: tuple[str, ...]) -> None:
    cfg = _cfg(*extra)
    meta_model, meta_pert, meta_batch = cost.model_step(cfg, N, P, cached=False)
    planned_train = sum(cost.step_flops(m, meta_batch, train=True) for m in (meta_model, meta_pert))
    planned_eval = sum(cost.step_flops(m, meta_batch, train=False) for m in (meta_model, meta_pert))
    model, pert, batch = cost.model_step(cfg, N, P, cached=False, device="cpu")
    assert planned_train > planned_eval > 0
    assert _real_flops(model, pert, batch, train=True) == planned_train
    assert _real_flops(model, pert, batch, train=False) == planned_eval


def test_fused_attention_recompute_formula_matches_torch() -> None:
    """The stated recompute term is torch's fused-kernel backward count minus the math path's four products."""
    from torch.utils.flop_counter import sdpa_backward_flop_count

    q = torch.zeros(2, 3, 40, 8, device="meta", requires_grad=True)
    with cost._FusedAttention() as mode:
        torch.nn.functional.scaled_dot_product_attention(q, q, q)
    math_backward = 4 * 2 * 2 * 3 * 40 * 40 * 8
    assert mode.recompute_flops == sdpa_backward_flop_count(q.shape, q.shape, q.shape, q.shape) - math_backward


@pytest.mark.parametrize("name", ["tiny", "aido_cell", "scfoundation"])
def test_activation_checkpointing_keeps_outputs_and_grads_and_saves_less(name: str) -> None:
    genes = [f"G{i}" for i in range(40)]
    results = []
    for on in (False, True):
        opts = load_run_config("platform/pertadapt/resources/configs/demo.yaml", [
            f"backbone.name={name}", "backbone.hidden_size=16", "backbone.layers=3", "backbone.heads=2",
            "backbone.finetune=full", f"backbone.activation_checkpointing={str(on).lower()}",
            *(["backbone.random_init=true"] if name != "tiny" else [])]).backbone
        torch.manual_seed(0)
        fm = build_backbone(opts, genes=genes, width=16)
        x = torch.rand(3, 40) * (torch.rand(3, 40) > 0.3)
        with cost._saved_bytes_counter() as saved:
            extra = cost.checkpointed_input_bytes(fm)
            out = fm.encode(x, torch.full((3,), 1e4))
        out.square().sum().backward()
        results.append((out.detach(), [p.grad.clone() for p in fm.parameters() if p.grad is not None],
                        saved[0], extra[0]))
    (out0, g0, s0, e0), (out1, g1, s1, e1) = results
    torch.testing.assert_close(out1, out0)
    assert len(g0) == len(g1)
    assert all(torch.allclose(a, b, atol=1e-6) for a, b in zip(g0, g1, strict=True))
    assert e0 == 0
    assert e1 > 0
    assert s1 + e1 < s0 / 2


def test_checkpointing_lets_a_100m_fm_fine_tune_on_one_80gb_gpu() -> None:
    """AIDO.Cell-100M sizes, 19,264 genes, micro-batch 8: full fine-tuning fits 80 GB only with checkpointing."""
    from pertadapt.data.header import DataHeader

    conds = {"ctrl": 11_000, **{f"G{i}+ctrl": 340 for i in range(20)}, **{f"G{i}+G{i + 1}": 340 for i in range(10)}}
    header = DataHeader(sum(conds.values()), 19_264, 19_264, conds)
    base = ["backbone.name=aido_cell", "backbone.random_init=true", "backbone.hidden_size=640",
            "backbone.layers=18", "backbone.heads=20", "optim.micro_batch_size=8", "optim.epochs=1"]
    peaks = {}
    for ft in ("last_k", "lora", "full"):
        for on in ("false", "true"):
            cfg = load_run_config("platform/pertadapt/resources/configs/paper.yaml",
                                  [*base, f"backbone.finetune={ft}", f"backbone.activation_checkpointing={on}"])
            peaks[ft, on] = cost.trial_cost(cfg, header).peak_gb_per_worker
    assert peaks["full", "false"] > 80
    assert all(peaks[ft, "true"] < 80 for ft in ("last_k", "lora", "full"))
    assert all(peaks[ft, "true"] < peaks[ft, "false"] for ft in ("last_k", "lora", "full"))


#: The plan's peak memory per worker is within this factor of a small CPU run's measured peak RSS growth
#: (VmHWM after a reset, less VmRSS before the step)
#: (the allocator reuses what autograd frees during the backward pass, so the measured peak runs lower).
MEMORY_FACTOR = 3.0

_MEASURE = textwrap.dedent("""
    import json, sys, torch
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from pertadapt.config.load import load_run_config
    from pertadapt.train import cost
    cfg = load_run_config("platform/pertadapt/resources/configs/demo.yaml", json.loads(sys.argv[1]))
    n, p = int(sys.argv[2]), int(sys.argv[3])
    torch.set_num_threads(1)

    def step(n_genes):
        model, pert, batch = cost.model_step(cfg, n_genes, p, cached=False, device="cpu")
        model.perturbation = pert
        opt = torch.optim.Adam([q for q in model.parameters() if q.requires_grad])
        model.train()
        model(batch).sum().backward()
        opt.step()

    def status_kb(key):
        with open("/proc/self/status") as fh:
            return next(int(line.split()[1]) for line in fh if line.startswith(key + ":"))

    step(64)  # a small step first: lazy set-up (libraries, the GO graph cache) is not counted as the step's memory
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")  # Linux: the peak resident set (VmHWM) starts again from the current one
    before = status_kb("VmRSS")
    step(n)
    print(json.dumps((status_kb("VmHWM") - before) * 1024))
""")


_PLAN = textwrap.dedent("""
    import json, sys
    from pertadapt.config.load import load_run_config
    from pertadapt.train import cost
    cfg = load_run_config("platform/pertadapt/resources/configs/demo.yaml", json.loads(sys.argv[1]))
    model, pert, batch = cost.model_step(cfg, int(sys.argv[2]), int(sys.argv[3]), cached=False)
    saved = sum(cost.saved_bytes(m, batch)[0] for m in (model, pert))
    params = sum(q.numel() * 4 for m in (model, pert) for q in m.parameters())
    trainable = sum(q.numel() * 4 for m in (model, pert) for q in m.parameters() if q.requires_grad)
    print(json.dumps(params + 3 * trainable + saved))
""")


def test_plan_memory_is_within_a_stated_factor_of_a_measured_cpu_run() -> None:
    overrides = [*TINY, "backbone.name=learned", "model.hidden_size=64", "adapter.heads=4", "adapter.ffn_dim=64",
                 "adapter.chunk_size=512", "adapter.attention_impl=chunked",
                 "optim.micro_batch_size=16"]  # chunked: no numba kernel to compile inside the measured run
    n, p = 2500, 12
    # both in fresh interpreters: the plan's trace must not see a grad mode, dtype or backend another test left
    planned, measured = (json.loads(subprocess.run([sys.executable, "-c", script, json.dumps(overrides), str(n),
                                                    str(p)], capture_output=True, text=True, check=True
                                                   ).stdout.strip().splitlines()[-1]) for script in (_PLAN, _MEASURE))
    assert measured / MEMORY_FACTOR < planned < measured * MEMORY_FACTOR, (planned, measured)


# --- the sweep command -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def demo_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from pertadapt.data.simulate import simulate

    path = tmp_path_factory.mktemp("data") / "demo.h5ad"
    simulate("demo", seed=0).write_h5ad(path)
    return path


def _sweep(tmp: Path, data: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pertadapt.cli", "sweep", "ablations/demo.yaml", "--out",
                           str(tmp / "plan"), "--dry-run", *args, f"data.path={data}"],
                          capture_output=True, text=True)


def test_dry_run_writes_each_trials_cost_and_the_total(tmp_path: Path, demo_file: Path) -> None:
    res = _sweep(tmp_path, demo_file, "--naive", "--tflops", "10")
    assert res.returncode == 0, res.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    keys = {"train_tflop", "eval_tflop", "cache_gb", "peak_gb_per_worker", "gpu_hours"}
    full = next(t for t in plan["trials"] if t["arm"] == "fm=pretrained+pa+am+ladapt")
    assert keys <= set(full["cost"])
    assert keys <= set(full["cost_naive"])
    assert keys <= set(plan["cost"])
    assert full["cost"]["train_tflop"] > 0
    assert full["cost"]["cache_gb"] > 0
    assert full["cost_naive"]["cache_gb"] == 0
    hours = sum(full["cost"][k] for k in ("train_tflop", "eval_tflop", "cache_tflop")) / 10 / 3600
    assert full["cost"]["gpu_hours"] == pytest.approx(hours, rel=1e-3)
    assert plan["cost"]["train_tflop"] == pytest.approx(sum(t["cost"]["train_tflop"] for t in plan["trials"]), rel=1e-3)
    # one table for the pretrained FM (its weights are the checkpoint's, whatever the seed) and one per seed for
    # the random FM (its weights are the seed's: its table key hashes them)
    assert plan["cost"]["cache_gb"] == pytest.approx(3 * full["cost"]["cache_gb"], rel=1e-3)
    seeds = sorted(sorted({k.rsplit("/", 1)[1] for k in c["trials"]}) for c in plan["caches"])
    assert seeds == [["seed1"], ["seed1", "seed2"], ["seed2"]]
    assert any("fm=pretrained+pa+am+ladapt/seed1" in c["trials"] and "fm=pretrained+pa+am+ladapt/seed2" in c["trials"]
               for c in plan["caches"])
    assert full["cost"]["cache_bytes"] == plan["caches"][0]["bytes"] > 0
    assert "naive train TFLOP" in res.stdout
    assert "naive/plan FLOPs" in res.stdout
    assert "sweep total" in res.stdout


def test_a_trial_above_the_gpu_memory_is_refused_naming_it(tmp_path: Path, demo_file: Path) -> None:
    res = _sweep(tmp_path, demo_file, "--gpu-memory-gb", "0.00001")
    assert res.returncode == 2
    assert "trial none/seed1: needs" in res.stderr
    assert "--gpu-memory-gb" in res.stderr
    assert not (tmp_path / "plan" / "plan.json").exists()


def test_header_reads_dimensions_without_x(tmp_path: Path) -> None:
    import anndata as ad
    import pandas as pd
    import scipy.sparse as sp

    from pertadapt.data.header import read_header

    obs = pd.DataFrame({"condition": pd.Categorical(["ctrl"] * 5 + ["A+ctrl"] * 3 + ["A+B"] * 2)})
    var = pd.DataFrame({"measured": np.array([True, False, True, True])}, index=list("ABCD"))
    x = sp.random(10, 4, density=0.5, format="csr", dtype=np.float32, random_state=0)
    ad.AnnData(x, obs=obs, var=var).write_h5ad(tmp_path / "d.h5ad")
    h = read_header(tmp_path / "d.h5ad")
    assert (h.n_cells, h.n_genes, h.n_measured, h.n_controls) == (10, 4, 3, 5)
    assert h.cells_per_condition == {"ctrl": 5, "A+ctrl": 3, "A+B": 2}
    assert h.nnz_per_cell == 2


@pytest.fixture
def tiny_disk(tmp_path: Path):
    """A 64 KiB tmpfs (the demo's tables need megabytes); unmounted afterwards."""
    with small_tmpfs(tmp_path, "64k") as disk:
        yield disk


def test_dry_run_flags_every_table_that_does_not_fit_and_a_run_is_refused_before_any_trial(
        tmp_path: Path, demo_file: Path, tiny_disk: Path) -> None:
    import os

    env = {**os.environ, "PERTADAPT_CACHE": str(tiny_disk / "cache")}
    args = [sys.executable, "-m", "pertadapt.cli", "sweep", "ablations/demo.yaml", "--out", str(tmp_path / "plan"),
            f"data.path={demo_file}"]
    dry = subprocess.run([*args, "--dry-run"], capture_output=True, text=True, env=env)
    assert dry.returncode == 0, dry.stderr
    plan = json.loads((tmp_path / "plan" / "plan.json").read_text())
    caches = plan["caches"]
    assert len(caches) == 3  # the pretrained FM's (both seeds) and the random FM's of each seed
    assert not any(c["fits"] for c in caches)
    assert caches[0]["free_bytes"] < caches[0]["bytes"]
    assert caches[1]["cumulative_bytes"] == caches[0]["bytes"] + caches[1]["bytes"]
    assert "backbone.cache_dtype=bfloat16" in caches[0]["ways_out"]
    flagged = {t["key"] for t in plan["trials"] if t["cache_fits"] is False}
    assert flagged == {k for c in caches for k in c["trials"]}
    assert all(t["cache_fits"] is None for t in plan["trials"] if t["cost"]["cache_bytes"] == 0)  # no table
    assert "cache fits" in dry.stdout
    assert " NO " in dry.stdout
    assert "a run is refused" in dry.stdout
    (tmp_path / "plan" / "plan.json").unlink()
    run = subprocess.run(args, capture_output=True, text=True, env=env)
    assert run.returncode == 2, run.stderr
    assert "backbone.embedding_cache: the table of trial(s) fm=pretrained/seed1" in run.stderr
    assert "Ways out: backbone.cache_dtype=bfloat16" in run.stderr
    assert not (tmp_path / "plan" / "plan.json").exists()  # refused before anything was written or started
    assert not (tiny_disk / "cache" / "pretrained").exists()  # nor pretrained
    fits = subprocess.run([*args, "--dry-run"], capture_output=True, text=True)  # the default cache: it fits
    assert fits.returncode == 0, fits.stderr
    assert all(c["fits"] for c in json.loads((tmp_path / "plan" / "plan.json").read_text())["caches"])


def test_the_plan_trains_the_cells_the_loop_trains() -> None:
    """Whole steps of ``optim.batch_size`` (the last partial step dropped), at most ``optim.max_steps_per_epoch``."""
    from pertadapt.data.header import DataHeader

    conds = {"ctrl": 400, **{f"G{i}+ctrl": 50 for i in range(20)}}
    header = DataHeader(sum(conds.values()), 240, 240, conds)
    free, capped = (load_run_config("configs/demo.yaml", ["optim.batch_size=32", *extra])
                    for extra in ([], ["optim.max_steps_per_epoch=2"]))
    n = 1234
    assert cost.trained_cells(free, n) == 32 * (n // 32) == 1216
    assert cost.trained_cells(capped, n) == 64
    assert cost.trained_cells(capped, 40) == 32
    ratio = cost.trial_cost(capped, header).train_tflop / cost.trial_cost(free, header).train_tflop
    split = split_cells(free, header)
    assert ratio == pytest.approx(64 / cost.trained_cells(free, split), rel=1e-3)


def split_cells(cfg, header) -> int:
    from pertadapt.data.splits import split_conditions

    split = split_conditions(list(header.cells_per_condition), cfg.data.split, seed=cfg.split_seed,
                             train_gene_frac=cfg.data.train_gene_frac,
                             combo_seen2_train_frac=cfg.data.combo_seen2_train_frac)
    return sum(header.cells_per_condition[c] for c in split.train)
