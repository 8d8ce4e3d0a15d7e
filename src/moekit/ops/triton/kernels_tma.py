"""Row-tiled grouped GEMMs that read their tiles through tensor descriptors (TMA on Hopper and
newer; plain loads under the interpreter): ``rows_gemm_kernel`` and ``up_kernel`` of
``kernels`` with the same tile schedule and epilogues, but their operand tiles fetched by the
copy engine, so that the warps spend no instructions on addresses and masks.

A descriptor covers a whole tensor, so a row tile that runs past its expert's last row reads
the next expert's rows (its results are masked at the store), and a tile past the tensor's end
reads zeros. The weight descriptor is 3-D, ``[E, O, I]`` when I is contiguous (``W_K_CONTIG``),
else ``[E, I, O]`` (a transposed view, e.g. ``gate_up`` seen as ``[E, D, H]``): the tile is
loaded in memory order and transposed in shared memory for the MMA.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _find_tile, _rows_epilogue, _swizzle, _up_epilogue


@triton.jit
def _w_tile(W_DESC, e, n0, k0, W_K_CONTIG: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile ``W[e][n0:, k0:].T`` of a 3-D weight descriptor."""
    if W_K_CONTIG:
        return tl.trans(tl.reshape(W_DESC.load([e, n0, k0]), (BLOCK_N, BLOCK_K)))
    return tl.reshape(W_DESC.load([e, k0, n0]), (BLOCK_K, BLOCK_N))


@triton.jit
def _tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E, n_cols, E_P2: tl.constexpr,
          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """``(e, row0, rows64, mask_m, n0, cols, mask_n)`` of this program (``e == E``: none)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    n0 = pid_n * BLOCK_N
    cols = n0 + tl.arange(0, BLOCK_N)
    return e, row0, rows.to(tl.int64), rows < row_end, n0, cols, cols < n_cols


@triton.jit
def rows_gemm_tma_kernel(
    A_DESC, W_DESC, B, Y,
    COUNTS, OFFSETS,
    E, O, I, num_pid_m,
    stride_be, stride_yn,
    HAS_BIAS: tl.constexpr, W_K_CONTIG: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y[rows of e] = a[rows of e] @ W[e].T (+ b[e])``, ``a`` and ``W`` through descriptors."""
    e, row0, rows64, mask_m, n0, cols, mask_n = _tile(num_pid_m, tl.cdiv(O, BLOCK_N), COUNTS,
                                                      OFFSETS, E, O, E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, I, BLOCK_K):
        at = A_DESC.load([row0, k0])
        wt = _w_tile(W_DESC, e, n0, k0, W_K_CONTIG, BLOCK_N, BLOCK_K)
        acc = tl.dot(at, wt, acc, input_precision=PREC)
    _rows_epilogue(acc, e.to(tl.int64), rows64, mask_m, cols, mask_n, B, Y, stride_be, stride_yn,
                   HAS_BIAS)


@triton.jit
def up_tma_kernel(
    X, W_DESC, B, TOK, ROWW, H_OUT, A_OUT,
    COUNTS, OFFSETS,
    E, D, F, num_pid_m,
    stride_xt, stride_be, stride_hn, stride_an,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WOI: tl.constexpr,
    STORE_H: tl.constexpr, W_K_CONTIG: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ALPHA=1.702, LIMIT=7.0,
):
    """``up_kernel`` (gate rows first; W ``[E, H, D]``, or a transposed view of ``[E, D, H]``)
    with the weight tiles through a descriptor; the token gather of x stays a pointer load."""
    e, row0, rows64, mask_m, n0, cols, mask_n = _tile(num_pid_m, tl.cdiv(F, BLOCK_N), COUNTS,
                                                      OFFSETS, E, F, E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    tok = tl.load(TOK + rows64, mask=mask_m, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    x_ptrs = X + tok[:, None] * stride_xt + ks[None, :]
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & ((k0 + ks) < D)[None, :], other=0.0)
        acc_g = tl.dot(xt, _w_tile(W_DESC, e, n0, k0, W_K_CONTIG, BLOCK_N, BLOCK_K), acc_g,
                       input_precision=PREC)
        if GATED:
            acc_u = tl.dot(xt, _w_tile(W_DESC, e, F + n0, k0, W_K_CONTIG, BLOCK_N, BLOCK_K), acc_u,
                           input_precision=PREC)
        x_ptrs += BLOCK_K
    if not GATED:
        acc_u = acc_g
    _up_epilogue(acc_g, acc_u, e.to(tl.int64), rows64, mask_m, cols, mask_n, B, ROWW, H_OUT,
                 A_OUT, F, stride_be, stride_hn, stride_an, GATED, ACT, HAS_BIAS, WOI, STORE_H,
                 ALPHA, LIMIT)


@triton.jit
def rows_gemm_tma_persistent_kernel(
    A_DESC, W_DESC, B, Y,
    COUNTS, OFFSETS,
    E, O, I, num_programs,
    stride_be, stride_yn,
    HAS_BIAS: tl.constexpr, W_K_CONTIG: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``rows_gemm_tma_kernel`` as a persistent kernel: ``num_programs`` programs walk the real
    tiles (their number computed here from the counts), one flattened loop over tiles and k so
    that the next tile's loads are in flight during this tile's epilogue."""
    es = tl.arange(0, E_P2)
    cnt = tl.load(COUNTS + es, mask=es < E, other=0)
    num_pid_m = tl.sum((cnt + BLOCK_M - 1) // BLOCK_M, 0)
    num_pid_n = tl.cdiv(O, BLOCK_N)
    k_tiles = tl.cdiv(I, BLOCK_K)
    for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=True):
        pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
        e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
        n0 = pid_n * BLOCK_N
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(k_tiles):
            k0 = kt * BLOCK_K
            at = A_DESC.load([row0, k0])
            wt = _w_tile(W_DESC, e, n0, k0, W_K_CONTIG, BLOCK_N, BLOCK_K)
            acc = tl.dot(at, wt, acc, input_precision=PREC)
        rows = row0 + tl.arange(0, BLOCK_M)
        cols = n0 + tl.arange(0, BLOCK_N)
        _rows_epilogue(acc, e.to(tl.int64), rows.to(tl.int64), rows < row_end, cols, cols < O, B, Y,
                       stride_be, stride_yn, HAS_BIAS)
