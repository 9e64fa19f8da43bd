"""GO-masked multi-head attention that never forms an ``n_genes x n_genes`` tensor.

The mask arrives as CSR arrays (``indptr``, ``indices``) over the model's genes, as built by the GO
layer. Two exact implementations of the same masked softmax attention:

``chunked``
    Queries are processed in chunks; for each chunk its mask rows are densified (``chunk x n_genes``
    booleans) and handed to :func:`torch.nn.functional.scaled_dot_product_attention`. It computes every
    score of the chunk, allowed or not: the dense work, bounded memory.
``sparse``
    Only the mask's own work: for every query row, scores against its allowed keys only (SDDMM), a
    softmax over those, and the weighted sum of their values (SpMM); the backward pass recomputes the
    scores from the saved log-sum-exp of each row (as flash attention does), so nothing of size
    ``nnz`` is kept between the passes. On CPU it is a fused numba kernel that sweeps the keys in
    blocks small enough to stay in L2 while every query row with keys in the block is visited (an
    online softmax carries each row across blocks); on other devices the same algorithm runs on
    ``torch.sparse`` CSR products (SDDMM, segment max/sum, SpMM).

The real GO mask (19,264 genes, 8.07 %) is not block-structured, which is why the sparse path works
per row rather than skipping empty tiles (``benchmarks/README.md`` has the figures).

A query row with no allowed key gets a zero output and zero gradients in both implementations: this
is what :func:`~torch.nn.functional.scaled_dot_product_attention` returns for an all-``False`` mask row
(torch 2.13, CPU), and the sparse path reproduces it.
"""

from __future__ import annotations

import math
import warnings

import numba
import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

__all__ = ["ATTENTION_IMPLS", "AUTO_SPARSE_MAX_DENSITY", "SparseMask", "masked_attention", "resolve_impl",
           "sparse_attention"]

#: Values of ``adapter.attention_impl``.
ATTENTION_IMPLS = ("chunked", "sparse", "auto")
#: ``auto`` takes the sparse path on CPU below this mask density. The sparse path's cost grows with the
#: allowed pairs, the chunked one's with all pairs; ``pertadapt bench attention`` on the real GO mask
#: (8.07 %, 3.5x faster) puts the break-even density near 0.29 (benchmarks/README.md).
AUTO_SPARSE_MAX_DENSITY = 0.2


class SparseMask(torch.nn.Module):
    """A boolean ``(n, n)`` attention mask stored as CSR buffers (``True`` = may attend).

    Parameters
    ----------
    indptr
        ``(n + 1,)`` CSR row pointer.
    indices
        ``(nnz,)`` column indices; row ``i`` lists the keys query ``i`` may attend to.

    Notes
    -----
    The buffers are non-persistent: a mask is rebuilt from GO by the builder, never stored in a
    checkpoint.
    """

    def __init__(self, indptr: torch.Tensor, indices: torch.Tensor) -> None:
        super().__init__()
        self.n = int(indptr.numel() - 1)
        self.register_buffer("indptr", indptr.to(torch.long), persistent=False)
        self.register_buffer("indices", indices.to(torch.long), persistent=False)

    @property
    def nnz(self) -> int:
        """Number of allowed (query, key) pairs."""
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        """Allowed pairs over all ``n * n`` pairs."""
        return self.nnz / max(self.n, 1) ** 2

    def rows(self, start: int, stop: int) -> torch.Tensor:
        """Dense boolean rows ``[start, stop)`` of the mask, shape ``(stop - start, n)``."""
        a, b = int(self.indptr[start]), int(self.indptr[stop])
        counts = self.indptr[start + 1: stop + 1] - self.indptr[start:stop]
        row_ids = torch.repeat_interleave(torch.arange(stop - start, device=counts.device), counts)
        dense = torch.zeros(stop - start, self.n, dtype=torch.bool, device=self.indices.device)
        dense[row_ids, self.indices[a:b]] = True
        return dense


def resolve_impl(impl: str, mask: SparseMask | None, device: torch.device) -> str:
    """The implementation ``impl`` stands for: ``chunked`` or ``sparse``.

    Parameters
    ----------
    impl
        One of :data:`ATTENTION_IMPLS`.
    mask
        The mask (``None``: full attention, always ``chunked``).
    device
        Where the attention runs. ``auto`` picks ``sparse`` on CPU when the mask density is below
        :data:`AUTO_SPARSE_MAX_DENSITY`; elsewhere it keeps ``chunked`` (the sparse GPU path has not been
        measured against it yet).

    Returns
    -------
    str
    """
    if impl not in ATTENTION_IMPLS:
        raise ValueError(f"attention_impl={impl!r} is not one of {', '.join(ATTENTION_IMPLS)}")
    if mask is None:
        return "chunked"
    if impl == "auto":
        return "sparse" if device.type == "cpu" and mask.density < AUTO_SPARSE_MAX_DENSITY else "chunked"
    return impl


def _chunk(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)


def masked_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask | None, *,
                     chunk_size: int = 2048, checkpoint_chunks: bool = False, impl: str = "chunked") -> torch.Tensor:
    """Scaled dot-product attention over genes, restricted by a sparse mask.

    Parameters
    ----------
    q, k, v
        ``(batch, heads, n_genes, head_dim)``.
    mask
        Sparse boolean mask over genes, or ``None`` for full attention.
    chunk_size
        Queries per chunk of the chunked path; memory is ``O(batch * heads * chunk_size * n_genes)``.
    checkpoint_chunks
        Chunked path: recompute each chunk in the backward pass (activation checkpointing) to bound memory.
    impl
        ``chunked``, ``sparse`` or ``auto`` (see :func:`resolve_impl`).

    Returns
    -------
    torch.Tensor
        ``(batch, heads, n_genes, head_dim)``.
    """
    if resolve_impl(impl, mask, q.device) == "sparse":
        return sparse_attention(q, k, v, mask)
    n = q.shape[-2]
    outs = []
    for start in range(0, n, chunk_size):
        stop = min(start + chunk_size, n)
        m = None if mask is None else mask.rows(start, stop)
        qc = q[..., start:stop, :]
        if checkpoint_chunks and torch.is_grad_enabled():
            outs.append(checkpoint(_chunk, qc, k, v, m, use_reentrant=False))
        else:
            outs.append(_chunk(qc, k, v, m))
    return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-2)


# --- the sparse path -------------------------------------------------------------------------------------
# Notation per (batch, head) slice t and query row i with allowed keys J(i):
#   s_ij = scale * q_i . k_j,  lse_i = log sum_j exp(s_ij),  p_ij = exp(s_ij - lse_i),  o_i = sum_j p_ij v_j
# and, given do_i:  delta_i = do_i . o_i,  ds_ij = p_ij * (do_i . v_j - delta_i),
#   dq_i = scale * sum_j ds_ij k_j,  dk_j = scale * sum_i ds_ij q_i,  dv_j = sum_i p_ij do_i.


#: LLVM fast-math flags of the CPU kernels: reassociation (vectorised reductions) and FMA contraction, but
#: not ``ninf``/``nnan``, since ``-inf`` marks "no key seen yet".
_FASTMATH = {"reassoc", "contract", "arcp", "nsz"}

@numba.njit(fastmath=_FASTMATH, cache=True, inline="always")
def _row_dots(x: np.ndarray, keys: np.ndarray, indices: np.ndarray, a: int, e: int, scale: float,
              out: np.ndarray) -> None:
    """``out[c] = scale * x . keys[indices[a + c]]`` for ``c < e - a`` (four keys per pass over ``x``)."""
    dim = x.shape[0]
    c = a
    while c + 4 <= e:
        k0, k1, k2, k3 = keys[indices[c]], keys[indices[c + 1]], keys[indices[c + 2]], keys[indices[c + 3]]
        t0 = t1 = t2 = t3 = np.float32(0.0)
        for d in range(dim):
            xd = x[d]
            t0 += xd * k0[d]
            t1 += xd * k1[d]
            t2 += xd * k2[d]
            t3 += xd * k3[d]
        out[c - a], out[c - a + 1], out[c - a + 2], out[c - a + 3] = t0 * scale, t1 * scale, t2 * scale, t3 * scale
        c += 4
    while c < e:
        kc = keys[indices[c]]
        t = np.float32(0.0)
        for d in range(dim):
            t += x[d] * kc[d]
        out[c - a] = t * scale
        c += 1


#: Keys per block of the CPU kernels: the block's k, v (and dk, dv) rows of one head stay in L2 while
#: every query row with keys in the block is visited.
_KEY_BLOCK = 256


@numba.njit(cache=True, inline="always")
def _block_end(indices: np.ndarray, a: int, stop: int, c1: int) -> int:
    """End of row entries ``[a, stop)`` whose key index is below ``c1`` (the row's part of a key block)."""
    e = a
    while e < stop and indices[e] < c1:
        e += 1
    return e


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _cpu_forward(q: np.ndarray, k: np.ndarray, v: np.ndarray, indptr: np.ndarray, indices: np.ndarray,
                 scale: float, out: np.ndarray, lse: np.ndarray) -> None:
    """Fill ``out`` ``(T, N, D)`` and ``lse`` ``(T, N)`` from ``q, k, v`` ``(T, N, D)`` (float32).

    Keys are swept in blocks of :data:`_KEY_BLOCK`; each row keeps a running max, sum and weighted sum
    (online softmax) across the blocks. One thread owns a slice ``t``.
    """
    n_slices, n, dim = q.shape
    for t in numba.prange(n_slices):
        s = np.empty(min(_KEY_BLOCK, n), np.float32)
        m = np.full(n, -np.inf, np.float32)
        total = np.zeros(n, np.float64)
        cursor = indptr[:-1].copy()
        acc = out[t]
        acc[:] = 0.0
        for c1 in range(_KEY_BLOCK, n + _KEY_BLOCK, _KEY_BLOCK):
            for i in range(n):
                a = cursor[i]
                e = _block_end(indices, a, indptr[i + 1], c1)
                if e == a:
                    continue
                cursor[i] = e
                _row_dots(q[t, i], k[t], indices, a, e, scale, s)
                m_new = m[i]
                for c in range(e - a):
                    m_new = max(m_new, s[c])
                ai = acc[i]
                if m_new > m[i]:
                    corr = np.exp(m[i] - m_new)
                    total[i] *= corr
                    for d in range(dim):
                        ai[d] *= corr
                    m[i] = m_new
                block_total = 0.0
                for c in range(e - a):
                    p = np.exp(s[c] - m_new)
                    block_total += p
                    vc = v[t, indices[a + c]]
                    for d in range(dim):
                        ai[d] += p * vc[d]
                total[i] += block_total
        for i in range(n):
            if total[i] > 0.0:
                inv = np.float32(1.0 / total[i])
                for d in range(dim):
                    acc[i, d] *= inv
                lse[t, i] = m[i] + np.log(total[i])
            else:
                lse[t, i] = -np.inf


@numba.njit(parallel=True, fastmath=_FASTMATH, cache=True)
def _cpu_backward(q: np.ndarray, k: np.ndarray, v: np.ndarray, out: np.ndarray, dout: np.ndarray,
                  lse: np.ndarray, indptr: np.ndarray, indices: np.ndarray, scale: float,
                  dq: np.ndarray, dk: np.ndarray, dv: np.ndarray) -> None:
    """Accumulate into zeroed ``dq, dk, dv`` (all ``(T, N, D)``), keys swept in blocks as in the forward.

    Every allowed pair is visited once: with ``lse`` and ``delta`` known, its share of the three
    gradients needs nothing from the other pairs. One thread owns a slice ``t``, so ``dk``/``dv`` need
    no atomics.
    """
    n_slices, n, dim = q.shape
    for t in numba.prange(n_slices):
        delta = np.empty(n, np.float32)
        for i in range(n):
            x = np.float32(0.0)
            for d in range(dim):
                x += dout[t, i, d] * out[t, i, d]
            delta[i] = x
        cursor = indptr[:-1].copy()
        for c1 in range(_KEY_BLOCK, n + _KEY_BLOCK, _KEY_BLOCK):
            for i in range(n):
                a = cursor[i]
                e = _block_end(indices, a, indptr[i + 1], c1)
                if e == a:
                    continue
                cursor[i] = e
                qi, doi, dqi = q[t, i], dout[t, i], dq[t, i]
                li, di = lse[t, i], delta[i]
                for c in range(a, e):
                    j = indices[c]
                    kj, vj, dkj, dvj = k[t, j], v[t, j], dk[t, j], dv[t, j]
                    x = np.float32(0.0)
                    y = np.float32(0.0)
                    for d in range(dim):
                        x += qi[d] * kj[d]
                        y += doi[d] * vj[d]
                    p = np.exp(x * scale - li)
                    ds = p * (y - di) * scale
                    for d in range(dim):
                        dqi[d] += ds * kj[d]
                        dkj[d] += ds * qi[d]
                        dvj[d] += p * doi[d]


def _torch_csr(mask: SparseMask, values: torch.Tensor) -> torch.Tensor:
    """The mask's pattern with ``values`` ``(nnz,)``, as a torch CSR tensor."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "Sparse CSR tensor support is in beta state")
        return torch.sparse_csr_tensor(mask.indptr, mask.indices, values, (mask.n, mask.n), check_invariants=False)


def _torch_scores(mask: SparseMask, x: torch.Tensor, y: torch.Tensor, scale: float) -> torch.Tensor:
    """``(nnz,)`` values ``scale * x_i . y_j`` on the mask's pattern (SDDMM), ``x, y`` ``(N, D)``."""
    pattern = _torch_csr(mask, torch.zeros(mask.nnz, dtype=x.dtype, device=x.device))
    return torch.sparse.sampled_addmm(pattern, x, y.T, beta=0.0, alpha=scale).values()


def _torch_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask,
                   scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``torch.sparse`` version of :func:`_cpu_forward`: returns ``out (T, N, D)`` and ``lse (T, N)``."""
    counts = mask.indptr.diff()
    outs, lses = [], []
    for t in range(q.shape[0]):
        s = _torch_scores(mask, q[t], k[t], scale)
        m = torch.segment_reduce(s, "max", offsets=mask.indptr)
        s = (s - m.repeat_interleave(counts, output_size=mask.nnz)).exp_()
        total = torch.segment_reduce(s, "sum", offsets=mask.indptr)
        acc = _torch_csr(mask, s) @ v[t]
        outs.append(torch.where(total[:, None] > 0, acc / total[:, None], 0.0))
        lses.append(m + total.log())
    return torch.stack(outs), torch.stack(lses)


def _torch_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor, dout: torch.Tensor,
                    lse: torch.Tensor, mask: SparseMask, scale: float) -> tuple[torch.Tensor, ...]:
    """``torch.sparse`` version of :func:`_cpu_backward`: returns ``dq, dk, dv`` ``(T, N, D)``."""
    counts = mask.indptr.diff()
    grads = []
    for t in range(q.shape[0]):
        rep = lse[t].repeat_interleave(counts, output_size=mask.nnz)
        p = (_torch_scores(mask, q[t], k[t], scale) - rep).exp_()
        delta = (dout[t] * out[t]).sum(-1).repeat_interleave(counts, output_size=mask.nnz)
        ds = p * (_torch_scores(mask, dout[t], v[t], 1.0) - delta) * scale
        ds_csr, p_csr = _torch_csr(mask, ds), _torch_csr(mask, p)
        grads.append((ds_csr @ k[t], ds_csr.t() @ q[t], p_csr.t() @ dout[t]))
    return tuple(torch.stack(g) for g in zip(*grads, strict=True))


class _SparseAttention(torch.autograd.Function):
    """Exact masked attention over ``(T, N, D)`` float32 slices; saves ``out`` and ``lse`` only."""

    @staticmethod
    def forward(ctx, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask,
                backend: str) -> torch.Tensor:
        scale = np.float32(1.0 / math.sqrt(q.shape[-1]))
        if backend == "numba":
            out, lse = torch.empty_like(q), q.new_empty(q.shape[:2])
            _set_numba_threads()
            _cpu_forward(q.numpy(), k.numpy(), v.numpy(), mask.indptr.numpy(), mask.indices.numpy(), scale,
                         out.numpy(), lse.numpy())
        else:
            out, lse = _torch_forward(q, k, v, mask, scale)
        ctx.save_for_backward(q, k, v, out, lse)
        ctx.mask, ctx.backend, ctx.scale = mask, backend, scale
        return out

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, dout: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        q, k, v, out, lse = ctx.saved_tensors
        mask, dout = ctx.mask, dout.contiguous()
        if ctx.backend == "numba":
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
            _set_numba_threads()
            _cpu_backward(q.numpy(), k.numpy(), v.numpy(), out.numpy(), dout.numpy(), lse.numpy(),
                          mask.indptr.numpy(), mask.indices.numpy(), ctx.scale, dq.numpy(), dk.numpy(), dv.numpy())
        else:
            dq, dk, dv = _torch_backward(q, k, v, out, dout, lse, mask, ctx.scale)
        return dq, dk, dv, None, None


def _set_numba_threads() -> None:
    """Give the numba kernels as many threads as torch has (``OMP_NUM_THREADS`` / ``torch.set_num_threads``).

    Numba's OpenMP threading layer, launched by its first use, sets the process-wide OpenMP thread count
    to ``NUMBA_NUM_THREADS`` (all cores), which torch shares: torch's count is put back, or every torch op
    after the first sparse attention would run on another number of threads (oversubscribed workers, and
    reductions split differently from a process where the kernels have not run yet).
    """
    n = torch.get_num_threads()
    numba.set_num_threads(max(1, min(n, numba.config.NUMBA_NUM_THREADS)))
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


def sparse_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: SparseMask, *,
                     backend: str | None = None) -> torch.Tensor:
    """The sparse path: exact masked softmax attention doing only the allowed pairs' work.

    Parameters
    ----------
    q, k, v
        ``(batch, heads, n_genes, head_dim)``; computed in float32 and returned in ``q``'s dtype.
    mask
        Sparse boolean mask over genes.
    backend
        ``numba`` (CPU kernel) or ``torch`` (``torch.sparse`` products, any device); default: ``numba``
        on CPU, ``torch`` elsewhere.

    Returns
    -------
    torch.Tensor
        ``(batch, heads, n_genes, head_dim)``, genes in their original order.
    """
    b, h, n, d = q.shape
    if mask.n != n:
        raise ValueError(f"the mask covers {mask.n} genes but the attention has {n}")
    backend = backend or ("numba" if q.device.type == "cpu" else "torch")
    if backend not in ("numba", "torch"):
        raise ValueError(f"sparse attention backend {backend!r} is not one of numba, torch")
    flat = [x.to(torch.float32).reshape(b * h, n, d).contiguous() for x in (q, k, v)]
    out = _SparseAttention.apply(*flat, mask, backend)
    return out.view(b, h, n, d).to(q.dtype)
