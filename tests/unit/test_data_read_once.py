"""Data read once: backed reads load no layer they do not use; one node hashes a dataset and fetches an
object-store file once, however many processes ask at the same time."""

from __future__ import annotations

import os
import subprocess
import sys
import time
import tracemalloc
import uuid
import warnings
from pathlib import Path

import numpy as np
import pytest
import scipy.sparse as sp

from pertadapt import remote
from pertadapt.data.dataset import read_perturb_data
from pertadapt.data.io import DataError, read_h5ad, read_h5ad_lazy, write_h5ad_atomic
from pertadapt.files import node_sha256_file, sha256_file

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def with_counts(demo_h5ad: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    """The demo data (tiled) with a dense float64 ``layers['counts']`` of 32 MB; returns its path and the layer's
    bytes."""
    adata = read_h5ad(demo_h5ad)
    reps = -(-32_000_000 // (adata.n_obs * adata.n_vars * 8))
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Observation names are not unique")
        big = adata[np.tile(np.arange(adata.n_obs), reps)].copy()
    big.obs_names_make_unique()
    big.layers["counts"] = np.ones(big.shape, dtype=np.float64)
    path = tmp_path_factory.mktemp("counts") / "with_counts.h5ad"
    write_h5ad_atomic(big, path)
    return path, big.layers["counts"].nbytes


def _peak_bytes(fn) -> tuple[object, int]:
    tracemalloc.start()
    try:
        out = fn()
        return out, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def test_backed_reads_leave_the_counts_layer_on_disk(with_counts: tuple[Path, int]) -> None:
    path, counts_bytes = with_counts
    data, backed_peak = _peak_bytes(lambda: read_perturb_data(path, backed=True))
    assert not sp.issparse(data.X)  # rows stay in the file
    assert backed_peak < counts_bytes / 2, (backed_peak, counts_bytes)
    _, anndata_backed_peak = _peak_bytes(lambda: read_h5ad(path, backed=True))  # anndata's backed='r'
    assert anndata_backed_peak > counts_bytes  # what data.backed used to cost: the layer in memory
    full = read_perturb_data(path)
    cells = np.array([5, 0, 5, 17])
    np.testing.assert_array_equal(data.rows(cells).toarray(), full.rows(cells).toarray())
    np.testing.assert_array_equal(data.total_count, full.total_count)
    assert data.genes == full.genes
    assert data.conditions == full.conditions
    for c in full.de_idx:
        np.testing.assert_array_equal(data.de_idx[c], full.de_idx[c])
    meta, X = read_h5ad_lazy(path)
    assert len(meta.layers) == 0
    assert X.shape == (meta.n_obs, meta.n_vars)


def test_a_lazy_read_of_a_file_that_is_no_h5ad_names_the_file(tmp_path: Path) -> None:
    bad = tmp_path / "bad.h5ad"
    bad.write_text("not hdf5")
    with pytest.raises(DataError, match=r"bad\.h5ad: not a readable \.h5ad"):
        read_h5ad_lazy(bad)
    with pytest.raises(DataError, match="no such file"):
        read_h5ad_lazy(tmp_path / "absent.h5ad")


def test_a_node_hashes_a_file_once_and_again_when_it_changes(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch,
                                                             caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "cache"))
    f = tmp_path / "d.bin"
    f.write_bytes(b"a" * 1000)
    with caplog.at_level("INFO", logger="pertadapt.files"):
        assert node_sha256_file(f) == sha256_file(f)
        assert node_sha256_file(f) == sha256_file(f)
        assert sum("hashing" in r.message for r in caplog.records) == 1
        f.write_bytes(b"b" * 1001)
        assert node_sha256_file(f) == sha256_file(f)
        assert sum("hashing" in r.message for r in caplog.records) == 2


_WORKER = """
import logging, sys, time
from pertadapt import remote
from pertadapt.files import node_sha256_file
logging.basicConfig(level=logging.INFO, stream=sys.stderr, format="%(name)s %(message)s")
while time.time() < float(sys.argv[2]):
    time.sleep(0.005)
local = remote.localize(sys.argv[1])
print(local, node_sha256_file(local))
"""


def test_two_workers_of_a_node_fetch_and_hash_one_object_once(s3_store: str, tmp_path: Path) -> None:
    uri = remote.join(s3_store, f"t-{uuid.uuid4().hex[:10]}", "data.h5ad")
    payload = os.urandom(24 << 20)
    remote.write_bytes(uri, payload)
    env = {**os.environ, "PERTADAPT_CACHE": str(tmp_path / "node"),
           "PYTHONPATH": os.pathsep.join([str(REPO / "platform"), os.environ.get("PYTHONPATH", "")])}
    start = time.time() + 3  # both processes are up and ask at the same moment
    procs = [subprocess.Popen([sys.executable, "-c", _WORKER, uri, str(start)], env=env, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [e for _, e in outs]
    logs = "".join(e for _, e in outs)
    assert logs.count("fetching ") == 1, logs
    assert logs.count("hashing ") == 1, logs
    results = {o.strip() for o, _ in outs}
    assert len(results) == 1  # one copy, one hash
    local, digest = results.pop().split()
    assert Path(local).read_bytes() == payload
    assert digest == sha256_file(local)
