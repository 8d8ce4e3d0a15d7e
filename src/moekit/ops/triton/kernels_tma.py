"""Grouped GEMMs that read their tiles through tensor descriptors (TMA on Hopper and newer;
plain loads under the interpreter): ``rows_gemm_kernel``, ``up_kernel`` and ``dw_kernel`` of
``kernels`` with the same tile schedule and epilogues, but the operand tiles of sorted rows and
of weights fetched by the copy engine, so that the warps spend no instructions on their
addresses and masks. A token-gathered operand (``x[tok]``) stays a pointer load.

A descriptor covers a whole tensor, so a row tile that runs past its expert's last row reads
the next expert's rows (its results are masked at the store), and a tile past the tensor's end
reads zeros. The weight descriptor is 3-D, ``[E, O, I]`` when I is contiguous (``W_K_CONTIG``),
else ``[E, I, O]`` (a transposed view, e.g. ``gate_up`` seen as ``[E, D, H]``): the tile is
loaded in memory order and transposed in shared memory for the MMA.

``PERSISTENT`` (the row GEMM): one program per SM walks the real tiles (their number computed
in the kernel from the counts) in one flattened loop over tiles and k, so that the next tile's
loads are in flight during this tile's epilogue (H200, bf16, the row GEMM alone: mixtral 3.54
-> 2.82 ms, gpt-oss 2.00 -> 1.78, deepseek-64e 3.55 -> 3.34, qwen3 0.81 -> 0.79).
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels import _rows_epilogue, _up_epilogue
from .kernels_common import _find_tile, _swizzle


@triton.jit
def _w_tile(W_DESC, e, n0, k0, W_K_CONTIG: tl.constexpr, BLOCK_N: tl.constexpr,
            BLOCK_K: tl.constexpr):
    """The ``[BLOCK_K, BLOCK_N]`` tile ``W[e][n0:, k0:].T`` of a 3-D weight descriptor."""
    if W_K_CONTIG:
        return tl.trans(tl.reshape(W_DESC.load([e, n0, k0]), (BLOCK_N, BLOCK_K)))
    return tl.reshape(W_DESC.load([e, k0, n0]), (BLOCK_K, BLOCK_N))


@triton.jit
def _num_row_tiles(COUNTS, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """The real number of row tiles, ``sum_e ceil(count_e / BLOCK_M)``."""
    es = tl.arange(0, E_P2)
    cnt = tl.load(COUNTS + es, mask=es < E, other=0)
    return tl.sum((cnt + BLOCK_M - 1) // BLOCK_M, 0)


@triton.jit
def _rows_tile(A_DESC, W_DESC, B, Y, OUT_ROWS, e, row0, row_end, pid_n, O, I, stride_be, stride_yn,
               HAS_BIAS: tl.constexpr, W_K_CONTIG: tl.constexpr, PREC: tl.constexpr,
               BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
               SCATTER: tl.constexpr):
    n0 = pid_n * BLOCK_N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for kt in range(tl.cdiv(I, BLOCK_K)):
        at = A_DESC.load([row0, kt * BLOCK_K])
        wt = _w_tile(W_DESC, e, n0, kt * BLOCK_K, W_K_CONTIG, BLOCK_N, BLOCK_K)
        acc = tl.dot(at, wt, acc, input_precision=PREC)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = n0 + tl.arange(0, BLOCK_N)
    _rows_epilogue(acc, e.to(tl.int64), rows.to(tl.int64), rows < row_end, cols, cols < O, B, Y,
                   OUT_ROWS, stride_be, stride_yn, HAS_BIAS, SCATTER)


@triton.jit
def rows_gemm_tma_kernel(
    A_DESC, W_DESC, B, Y, OUT_ROWS,
    COUNTS, OFFSETS,
    E, O, I, num_pid_m, num_programs,
    stride_be, stride_yn,
    HAS_BIAS: tl.constexpr, W_K_CONTIG: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PERSISTENT: tl.constexpr, SCATTER: tl.constexpr = False,
):
    """``y[rows of e] = a[rows of e] @ W[e].T (+ b[e])``, ``a`` and ``W`` through descriptors.
    ``num_pid_m``: the grid's bound on row tiles (one program per tile); ``num_programs``: the
    persistent grid; ``SCATTER``: as ``rows_gemm_kernel``'s."""
    num_pid_n = tl.cdiv(O, BLOCK_N)
    if PERSISTENT:
        num_pid_m = _num_row_tiles(COUNTS, E, E_P2, BLOCK_M)
        for tile in tl.range(tl.program_id(0), num_pid_m * num_pid_n, num_programs, flatten=True):
            pid_m, pid_n = _swizzle(tile, num_pid_m, num_pid_n, GROUP_M)
            e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
            _rows_tile(A_DESC, W_DESC, B, Y, OUT_ROWS, e, row0, row_end, pid_n, O, I, stride_be,
                       stride_yn, HAS_BIAS, W_K_CONTIG, PREC, BLOCK_M, BLOCK_N, BLOCK_K, SCATTER)
    else:
        pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
        e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
        if e < E:
            _rows_tile(A_DESC, W_DESC, B, Y, OUT_ROWS, e, row0, row_end, pid_n, O, I, stride_be,
                       stride_yn, HAS_BIAS, W_K_CONTIG, PREC, BLOCK_M, BLOCK_N, BLOCK_K, SCATTER)


@triton.jit
def _x_tile(X, x_ptrs, row0, k0, mask_m, ks, D, X_DESC: tl.constexpr):
    """The up projection's ``[BLOCK_M, BLOCK_K]`` tile of x's rows at ``k0``: through the
    descriptor of the gathered rows (``X_DESC``), else gathered by token (``x_ptrs``)."""
    if X_DESC:
        xt = X.load([row0, k0])
    else:
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & ((k0 + ks) < D)[None, :], other=0.0)
    return xt


@triton.jit
def up_tma_kernel(
    X, W_DESC, B, TOK, ROWW, H_OUT, A_OUT,
    COUNTS, OFFSETS,
    E, D, F, num_pid_m,
    stride_xt, stride_be, stride_hn, stride_an,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WOI: tl.constexpr,
    STORE_H: tl.constexpr, W_K_CONTIG: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    ONE_ACC: tl.constexpr = False, X_DESC: tl.constexpr = False, ALPHA=1.702, LIMIT=7.0,
):
    """``up_kernel`` (gate rows first; W ``[E, H, D]``, or a transposed view of ``[E, D, H]``)
    with the weight tiles through a descriptor; the token gather of x stays a pointer load, or
    (``X_DESC``) ``X`` is a descriptor over x's rows gathered beforehand in the plan's order.
    ``ONE_ACC`` (gated, W_DESC over W seen as ``[E, 2, F, D]``): one accumulator for the gate
    and up columns. One program per tile: as a persistent kernel it was 15-20% slower at every
    training shape (H200, bf16: qwen3 2.04 against 1.68 ms)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, tl.cdiv(F, BLOCK_N), GROUP_M)
    e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    if e >= E:
        return
    rows = row0 + tl.arange(0, BLOCK_M)
    rows64 = rows.to(tl.int64)
    mask_m = rows < row_end
    n0 = pid_n * BLOCK_N
    ks = tl.arange(0, BLOCK_K)
    if X_DESC:
        x_ptrs = TOK  # unused (the tiles come through the descriptor): only stepped
    else:
        tok = tl.load(TOK + rows64, mask=mask_m, other=0).to(tl.int64)
        x_ptrs = X + tok[:, None] * stride_xt + ks[None, :]
    if ONE_ACC:
        # W seen as [E, 2, F, D]: the gate and up tiles come in one copy and feed one
        # [BLOCK_M, 2 * BLOCK_N] MMA (x's tile read once per k step, not once per accumulator)
        acc = tl.zeros((BLOCK_M, 2 * BLOCK_N), dtype=tl.float32)
        for kt in range(tl.cdiv(D, BLOCK_K)):
            k0 = kt * BLOCK_K
            xt = _x_tile(X, x_ptrs, row0, k0, mask_m, ks, D, X_DESC)
            wt = tl.reshape(W_DESC.load([e, 0, n0, k0]), (2 * BLOCK_N, BLOCK_K))
            acc = tl.dot(xt, tl.trans(wt), acc, input_precision=PREC)
            x_ptrs += BLOCK_K
        acc_g, acc_u = tl.split(tl.permute(tl.reshape(acc, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        if GATED:
            acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for kt in range(tl.cdiv(D, BLOCK_K)):
            k0 = kt * BLOCK_K
            xt = _x_tile(X, x_ptrs, row0, k0, mask_m, ks, D, X_DESC)
            acc_g = tl.dot(xt, _w_tile(W_DESC, e, n0, k0, W_K_CONTIG, BLOCK_N, BLOCK_K), acc_g,
                           input_precision=PREC)
            if GATED:
                acc_u = tl.dot(xt, _w_tile(W_DESC, e, F + n0, k0, W_K_CONTIG, BLOCK_N, BLOCK_K), acc_u,
                               input_precision=PREC)
            x_ptrs += BLOCK_K
        if not GATED:
            acc_u = acc_g
    cols = n0 + tl.arange(0, BLOCK_N)
    _up_epilogue(acc_g, acc_u, e.to(tl.int64), rows64, mask_m, cols, cols < F, B, ROWW, H_OUT,
                 A_OUT, F, stride_be, stride_hn, stride_an, GATED, ACT, HAS_BIAS, WOI, STORE_H,
                 ALPHA, LIMIT)


@triton.jit
def _dw_step(acc, st, gt, L_SORTED: tl.constexpr, PREC: tl.constexpr):
    """``acc += L.T @ R`` for one block of rows: ``st`` the sorted operand's tile, ``gt`` the
    gathered one's; ``L_SORTED`` says which of them is L."""
    if L_SORTED:
        acc = tl.dot(tl.trans(st), gt, acc, input_precision=PREC)
    else:
        acc = tl.dot(tl.trans(gt), st, acc, input_precision=PREC)
    return acc


@triton.jit
def dw_tma_kernel(
    G, S_DESC, TOK, DW,
    COUNTS, OFFSETS,
    O, I,
    stride_g, stride_we, stride_wo, stride_wi,
    L_SORTED: tl.constexpr, PREC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[e] = L[rows of e].T @ R[rows of e]`` where one operand is read in sorted row order
    through the descriptor ``S_DESC`` and the other is gathered by token (``G[TOK[row]]``):
    ``L_SORTED`` says which is which. Whole blocks of an expert's rows go straight from the
    copy engine to the MMA; its last, partial block is masked in registers (the descriptor
    would read the next expert's rows there). The gathered rows' tokens are loaded one block
    ahead, as in ``dw_kernel``."""
    e = tl.program_id(1)
    pid = tl.program_id(0)
    num_pid_i = tl.cdiv(I, BLOCK_I)
    o0 = (pid // num_pid_i) * BLOCK_O
    i0 = (pid % num_pid_i) * BLOCK_I
    end = tl.load(OFFSETS + e)
    start = end - tl.load(COUNTS + e)
    os_ = o0 + tl.arange(0, BLOCK_O)
    is_ = i0 + tl.arange(0, BLOCK_I)
    mask_o = os_ < O
    mask_i = is_ < I
    ks = tl.arange(0, BLOCK_K)
    if L_SORTED:
        g_cols, g_mask, s_col0 = is_, mask_i, o0
    else:
        g_cols, g_mask, s_col0 = os_, mask_o, i0
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    n_full = (end - start) // BLOCK_K
    rows = start + ks
    tok_next = tl.load(TOK + rows.to(tl.int64), mask=rows < end, other=0).to(tl.int64)
    for b in range(n_full):
        r0 = start + b * BLOCK_K
        tok = tok_next
        nxt = r0 + BLOCK_K + ks
        tok_next = tl.load(TOK + nxt.to(tl.int64), mask=nxt < end, other=0).to(tl.int64)
        gt = tl.load(G + tok[:, None] * stride_g + g_cols[None, :], mask=g_mask[None, :], other=0.0)
        acc = _dw_step(acc, S_DESC.load([r0, s_col0]), gt, L_SORTED, PREC)
    r0 = start + n_full * BLOCK_K
    if r0 < end:
        mr = (r0 + ks) < end
        gt = tl.load(G + tok_next[:, None] * stride_g + g_cols[None, :],
                     mask=mr[:, None] & g_mask[None, :], other=0.0)
        acc = _dw_step(acc, tl.where(mr[:, None], S_DESC.load([r0, s_col0]), 0.0), gt, L_SORTED,
                       PREC)
    dw_ptrs = (DW + e.to(tl.int64) * stride_we + os_[:, None].to(tl.int64) * stride_wo
               + is_[None, :].to(tl.int64) * stride_wi)
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_o[:, None] & mask_i[None, :])
