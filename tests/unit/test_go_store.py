"""The GO mask / graph cache: which parameters key a cached file, and atomic, complete writes."""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

import numpy as np
import pytest

from pertadapt.go import GOAnnotations, build_go_mask, cached_gene_graph, cached_go_mask
from pertadapt.go.store import cache_key


def _ann(aliases: dict[str, tuple[str, ...]] | None = None) -> GOAnnotations:
    rng = np.random.default_rng(3)
    table = {f"G{i}": frozenset(f"GO:{t}" for t in rng.choice(30, size=rng.integers(1, 6), replace=False))
             for i in range(80)}
    return GOAnnotations(MappingProxyType(table), "test", MappingProxyType({"go_release": "test"}),
                         ("BP", "MF", "CC"), False, symbols=frozenset(table),
                         aliases=MappingProxyType(aliases or {}))


GENES = [f"G{i}" for i in range(80)]


def _masks(root: Path) -> list[str]:
    return sorted(p.name for p in (root / "go" / "built").glob("mask-*.json"))


def test_go_mask_cache_ignores_seed(tmp_path: Path) -> None:
    ann = _ann()
    m0 = cached_go_mask(ann, GENES, kind="go", seed=0, cache_dir=tmp_path)
    m1 = cached_go_mask(ann, GENES, kind="go", seed=1, cache_dir=tmp_path)
    assert len(_masks(tmp_path)) == 1
    assert m0.sha256 == m1.sha256 == build_go_mask(ann, GENES).sha256
    cached_go_mask(ann, GENES, kind="none", seed=0, cache_dir=tmp_path)
    cached_go_mask(ann, GENES, kind="none", seed=5, cache_dir=tmp_path)
    assert len(_masks(tmp_path)) == 2


def test_random_mask_cache_keeps_seed(tmp_path: Path) -> None:
    ann = _ann()
    r0 = cached_go_mask(ann, GENES, kind="random_degree_matched", seed=0, cache_dir=tmp_path)
    r1 = cached_go_mask(ann, GENES, kind="random_degree_matched", seed=1, cache_dir=tmp_path)
    assert len(_masks(tmp_path)) == 2
    assert r0.sha256 != r1.sha256
    again = cached_go_mask(ann, GENES, kind="random_degree_matched", seed=1, cache_dir=tmp_path)
    assert again.sha256 == r1.sha256
    assert len(_masks(tmp_path)) == 2
    names = [p.name for p in (tmp_path / "go" / "built").iterdir()]
    assert len(names) == 4  # one .npz + one .json per mask, no temporary files left
    assert not any(n.startswith(".") for n in names)


def test_cache_key_follows_symbol_resolution(tmp_path: Path) -> None:
    genes = [*GENES[:10], "OLD_G0"]
    plain, aliased = _ann(), _ann({"OLD_G0": ("G0",)})
    assert plain.sha256() == aliased.sha256()  # same term sets ...
    assert cache_key(plain, genes, kind="go") != cache_key(aliased, genes, kind="go")  # ... other resolution
    m_plain = cached_go_mask(plain, genes, cache_dir=tmp_path)
    m_alias = cached_go_mask(aliased, genes, cache_dir=tmp_path)
    assert m_plain.degrees()[-1] == 1  # unknown: only the diagonal
    assert m_alias.degrees()[-1] == m_alias.degrees()[0]  # the alias has G0's row
    g = cached_gene_graph(aliased, genes, top_k=3, cache_dir=tmp_path)
    assert cached_gene_graph(aliased, genes, top_k=3, cache_dir=tmp_path).sha256 == g.sha256
    assert cached_gene_graph(aliased, genes, top_k=4, cache_dir=tmp_path).sha256 != g.sha256


def test_cache_dir_from_environment(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PERTADAPT_CACHE", str(tmp_path / "env"))
    cached_go_mask(_ann(), GENES)
    assert len(_masks(tmp_path / "env")) == 1


def test_damaged_files_are_refused_naming_the_file(tmp_path: Path) -> None:
    from pertadapt.go import GOError, load_gene_graph, load_go_mask, save_go_mask

    ann = _ann()
    save_go_mask(build_go_mask(ann, GENES), tmp_path / "m")
    npz, js = tmp_path / "m.npz", tmp_path / "m.json"
    good = npz.read_bytes()
    npz.write_bytes(good[: len(good) // 2])
    with pytest.raises(GOError, match="m.npz: missing or unreadable arrays indptr, indices"):
        load_go_mask(tmp_path / "m")
    npz.write_bytes(good)
    assert load_go_mask(tmp_path / "m").n == len(GENES)
    with pytest.raises(GOError, match="not a gene graph"):
        load_gene_graph(tmp_path / "m")
    js.write_text("{not json")
    with pytest.raises(GOError, match="m.json: not a GO mask JSON file"):
        load_go_mask(tmp_path / "m")
