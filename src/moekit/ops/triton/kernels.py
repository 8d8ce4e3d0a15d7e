"""The forward ``@triton.jit`` kernels of the fused experts (the bottom layer: no shape checks
here): the up projection (token gather + GEMM + activation), the row GEMM on sorted rows, the
combine and the row gather. The decode kernels are in ``kernels_decode``, the backward's in
``kernels_bwd``, the shared pieces in ``kernels_common``, the descriptor-fed variants in
``kernels_tma``.

Legend: T tokens, D model dim, F expert hidden dim, H = 2F (gated) or F, E experts, K top-k,
N routed rows in expert order (the RoutingPlan's rows). All row/token offsets are widened to
int64 before they are multiplied by strides: T*K*D can pass 2**31 at real shapes.
"""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import (  # noqa: F401 - ACT_CODES: the launchers read it from here
    ACT_CODES,
    _find_tile,
    _glu_fwd,
    _row_tile,
    _rows_mainloop,
    _unary_fwd,
)


# ----------------------------------------------------------------------------- forward: up
@triton.jit
def _up_interleaved(X, W, B, TOK, ROWW, H_OUT, A_OUT, COUNTS, OFFSETS, E, D, F, num_pid_m,
                    stride_xt, stride_we, stride_wh, stride_wd, stride_be, stride_hn, stride_an,
                    ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WOI: tl.constexpr,
                    STORE_H: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
                    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
                    GROUP_M: tl.constexpr, ALPHA, LIMIT):
    """``up_kernel`` on interleaved gate/up rows (``gate0, up0, gate1, ...``, GPT-OSS): one
    accumulator over ``2 * BLOCK_N`` consecutive rows of W (so the weight tile is read as one
    contiguous block whether W is ``[E, 2F, D]`` or a transposed ``[E, D, 2F]`` view), h stored
    as it comes out, and the gate and up columns taken apart in registers for the GLU."""
    num_pid_n = tl.cdiv(F, BLOCK_N)
    e, rows64, mask_m, hcols, mask_h, pid_n = _row_tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E,
                                                        2 * F, E_P2, BLOCK_M, 2 * BLOCK_N, GROUP_M)
    if e >= E:
        return
    tok = tl.load(TOK + rows64, mask=mask_m, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    x_ptrs = X + tok[:, None] * stride_xt + ks[None, :]
    w_ptrs = W + e64 * stride_we + hcols[None, :].to(tl.int64) * stride_wh + ks[:, None] * stride_wd
    acc = _rows_mainloop(x_ptrs, w_ptrs, mask_m, mask_h, D, BLOCK_K * stride_wd, PREC,
                         BLOCK_M, 2 * BLOCK_N, BLOCK_K)
    if WOI:
        rw = tl.load(ROWW + rows64, mask=mask_m, other=0.0)
        acc = acc * rw[:, None]
    if HAS_BIAS:
        acc = acc + tl.load(B + e64 * stride_be + hcols, mask=mask_h, other=0.0).to(tl.float32)[None, :]
    if STORE_H:
        tl.store(H_OUT + rows64[:, None] * stride_hn + hcols[None, :],
                 acc.to(H_OUT.dtype.element_ty), mask=mask_m[:, None] & mask_h[None, :])
    g, u = tl.split(tl.reshape(acc, (BLOCK_M, BLOCK_N, 2)))
    act = _glu_fwd(g, u, ACT, ALPHA, LIMIT)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(A_OUT + rows64[:, None] * stride_an + cols[None, :], act.to(A_OUT.dtype.element_ty),
             mask=mask_m[:, None] & (cols < F)[None, :])


@triton.jit
def up_kernel(
    X, W, B, TOK, ROWW, H_OUT, A_OUT,
    COUNTS, OFFSETS,
    E, D, F, num_pid_m,
    stride_xt, stride_we, stride_wh, stride_wd, stride_be,
    stride_hn, stride_an,
    GATED: tl.constexpr, ACT: tl.constexpr, HAS_BIAS: tl.constexpr, WOI: tl.constexpr,
    STORE_H: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    PDL: tl.constexpr = False, INTERLEAVED: tl.constexpr = False, ALPHA=1.702, LIMIT=7.0,
):
    """``h = x[tok] @ W[e].T (* w_row if WOI) + b``; stores h (pre-activation) and act(h).

    Gated: the program computes gate columns ``n`` and up columns ``F + n`` together, so the
    GLU is applied in the epilogue. The token gather happens in the prologue (``x[tok]``):
    no permuted copy of x exists. ``PDL``: let the next kernel (launched as a programmatic
    dependent, ``down_combine_kernel``) start while this one runs. ``INTERLEAVED``: gate and up
    rows of W (and of the bias, and columns of h) alternate (``_up_interleaved``). ``ALPHA``,
    ``LIMIT``: the clamped GLU's constants (``ACT == 3``).
    """
    if PDL:
        tl.extra.cuda.gdc_launch_dependents()
    if INTERLEAVED:
        _up_interleaved(X, W, B, TOK, ROWW, H_OUT, A_OUT, COUNTS, OFFSETS, E, D, F, num_pid_m,
                        stride_xt, stride_we, stride_wh, stride_wd, stride_be, stride_hn,
                        stride_an, ACT, HAS_BIAS, WOI, STORE_H, E_P2, PREC, BLOCK_M, BLOCK_N,
                        BLOCK_K, GROUP_M, ALPHA, LIMIT)
        return
    e, rows64, mask_m, cols, mask_n, _ = _row_tile(num_pid_m, tl.cdiv(F, BLOCK_N), COUNTS, OFFSETS,
                                                   E, F, E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    tok = tl.load(TOK + rows64, mask=mask_m, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    x_ptrs = X + tok[:, None] * stride_xt + ks[None, :]
    wg_ptrs = W + e64 * stride_we + cols[None, :].to(tl.int64) * stride_wh + ks[:, None] * stride_wd
    acc_g = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    if GATED:
        wu_ptrs = wg_ptrs + F * stride_wh
        acc_u = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        mk = (k0 + ks) < D
        xt = tl.load(x_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        wg = tl.load(wg_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc_g = tl.dot(xt, wg, acc_g, input_precision=PREC)
        if GATED:
            wu = tl.load(wu_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
            acc_u = tl.dot(xt, wu, acc_u, input_precision=PREC)
            wu_ptrs += BLOCK_K * stride_wd
        x_ptrs += BLOCK_K
        wg_ptrs += BLOCK_K * stride_wd
    if not GATED:
        acc_u = acc_g
    _up_epilogue(acc_g, acc_u, e64, rows64, mask_m, cols, mask_n, B, ROWW,
                 H_OUT, A_OUT, F, stride_be, stride_hn, stride_an, GATED, ACT, HAS_BIAS, WOI,
                 STORE_H, ALPHA, LIMIT)


@triton.jit
def _up_epilogue(acc_g, acc_u, e64, rows64, mask_m, cols, mask_n, B, ROWW, H_OUT, A_OUT, F,
                 stride_be, stride_hn, stride_an, GATED: tl.constexpr, ACT: tl.constexpr,
                 HAS_BIAS: tl.constexpr, WOI: tl.constexpr, STORE_H: tl.constexpr, ALPHA, LIMIT):
    """The up projection's epilogue on its fp32 gate (and, ``GATED``, up) accumulators: routing
    weight (``WOI``), bias, store of h (``STORE_H``) and of the activation."""
    if WOI:
        rw = tl.load(ROWW + rows64, mask=mask_m, other=0.0)
        acc_g = acc_g * rw[:, None]
        if GATED:
            acc_u = acc_u * rw[:, None]
    if HAS_BIAS:
        bg = tl.load(B + e64 * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)
        acc_g = acc_g + bg[None, :]
        if GATED:
            bu = tl.load(B + e64 * stride_be + F + cols, mask=mask_n, other=0.0).to(tl.float32)
            acc_u = acc_u + bu[None, :]
    out_mask = mask_m[:, None] & mask_n[None, :]
    if STORE_H:
        h_ptrs = H_OUT + rows64[:, None] * stride_hn + cols[None, :]
        tl.store(h_ptrs, acc_g.to(H_OUT.dtype.element_ty), mask=out_mask)
        if GATED:
            tl.store(h_ptrs + F, acc_u.to(H_OUT.dtype.element_ty), mask=out_mask)
    if GATED:
        act = _glu_fwd(acc_g, acc_u, ACT, ALPHA, LIMIT)
    else:
        act = _unary_fwd(acc_g, ACT)
    a_ptrs = A_OUT + rows64[:, None] * stride_an + cols[None, :]
    tl.store(a_ptrs, act.to(A_OUT.dtype.element_ty), mask=out_mask)


# ----------------------------------------------------------------------------- grouped GEMM on sorted rows
@triton.jit
def rows_gemm_kernel(
    A, W, B, Y, OUT_ROWS,
    COUNTS, OFFSETS,
    E, O, I, num_pid_m,
    stride_an, stride_we, stride_wo, stride_wi, stride_be, stride_yn,
    HAS_BIAS: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    SCATTER: tl.constexpr = False,
):
    """``y[rows of e] = a[rows of e] @ W[e].T (+ b[e])`` with ``W[e]`` read as ``[O, I]`` through
    strides (the down projection: ``W = down [E, D, F]``; the input-grad of the up projection:
    ``W = gate_up`` seen as ``[E, D, H]``). ``SCATTER``: row ``n`` is stored at row
    ``OUT_ROWS[n]`` of y."""
    e, rows64, mask_m, cols, mask_n, _ = _row_tile(num_pid_m, tl.cdiv(O, BLOCK_N), COUNTS, OFFSETS,
                                                   E, O, E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    a_ptrs = A + rows64[:, None] * stride_an + ks[None, :]
    w_ptrs = W + e64 * stride_we + cols[None, :].to(tl.int64) * stride_wo + ks[:, None] * stride_wi
    acc = _rows_mainloop(a_ptrs, w_ptrs, mask_m, mask_n, I, BLOCK_K * stride_wi, PREC,
                         BLOCK_M, BLOCK_N, BLOCK_K)
    _rows_epilogue(acc, e64, rows64, mask_m, cols, mask_n, B, Y, OUT_ROWS, stride_be, stride_yn,
                   HAS_BIAS, SCATTER)


@triton.jit
def _rows_epilogue(acc, e64, rows64, mask_m, cols, mask_n, B, Y, OUT_ROWS, stride_be, stride_yn,
                   HAS_BIAS: tl.constexpr, SCATTER: tl.constexpr):
    """A row GEMM's epilogue: ``Y[rows, cols] = acc (+ B[e, cols])``; ``SCATTER``: at rows
    ``OUT_ROWS[rows]`` (one row per routed slot, back in the slots' order, with no combine pass)."""
    if HAS_BIAS:
        b = tl.load(B + e64 * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    if SCATTER:
        rows64 = tl.load(OUT_ROWS + rows64, mask=mask_m, other=0).to(tl.int64)
    y_ptrs = Y + rows64[:, None] * stride_yn + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- combine / gather-sum
@triton.jit
def _row_block(num_pid_d, N, Dm, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr):
    """This program's block of a row-wise kernel over ``[N, Dm]``: its rows (int64) and their
    mask, its columns and their mask, and its column-block index."""
    pid = tl.program_id(0)
    pid_d = pid % num_pid_d
    ns = (pid // num_pid_d) * BLOCK_N + tl.arange(0, BLOCK_N)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    return ns.to(tl.int64), ns < N, ds, ds < Dm, pid_d


@triton.jit
def combine_kernel(
    Y, INV, WTS, X, OUT, DOT,
    T, Dm, num_pid_d,
    stride_yn, stride_xt, stride_ot,
    K: tl.constexpr, HAS_W: tl.constexpr, HAS_DOT: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[t] = sum_k w[t,k] * y[inv[t,k]]`` over k in order 0..K-1 (fp32; dropped slots,
    ``inv = -1``, add nothing). With ``HAS_DOT`` also the partial dots
    ``dot[t, k, pid_d] = <y[inv[t,k]], x[t]>`` over this program's D block (summed on the host
    side in a fixed order: the routing-weight gradient when the weight is on the input).
    The k loop is unrolled (``K`` is a compile-time constant) so that the K row loads of a
    token are in flight together: at decode sizes the kernel is one memory latency, not K."""
    ts64, mask_t, ds, mask_d, pid_d = _row_block(num_pid_d, T, Dm, BLOCK_T, BLOCK_D)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    if HAS_DOT:
        xt = tl.load(X + ts64[:, None] * stride_xt + ds[None, :],
                     mask=mask_t[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
    for k in tl.static_range(K):
        r = tl.load(INV + ts64 * K + k, mask=mask_t, other=-1)
        ok = r >= 0
        v = tl.load(Y + r.to(tl.int64)[:, None] * stride_yn + ds[None, :],
                    mask=ok[:, None] & mask_d[None, :], other=0.0).to(tl.float32)
        if HAS_W:
            w = tl.load(WTS + ts64 * K + k, mask=mask_t, other=0.0).to(tl.float32)
            acc += w[:, None] * v
        else:
            acc += v
        if HAS_DOT:
            dt = tl.sum(v * xt, axis=1)
            tl.store(DOT + (ts64 * K + k) * num_pid_d + pid_d, dt, mask=mask_t)
    tl.store(OUT + ts64[:, None] * stride_ot + ds[None, :], acc.to(OUT.dtype.element_ty),
             mask=mask_t[:, None] & mask_d[None, :])


# ----------------------------------------------------------------------------- row gather
@triton.jit
def gather_rows_kernel(
    SRC, IDX, W, OUT,
    N, Dm, num_pid_d,
    stride_s, stride_o,
    HAS_W: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """``out[n] = src[idx[n]] (* w[n])`` (the weight in fp32, rounded once): the permute of
    rows by token and the scaled output grad of the combine, in one pass."""
    ns64, mask_n, ds, mask_d, _ = _row_block(num_pid_d, N, Dm, BLOCK_N, BLOCK_D)
    mask = mask_n[:, None] & mask_d[None, :]
    src = tl.load(IDX + ns64, mask=mask_n, other=0).to(tl.int64)
    v = tl.load(SRC + src[:, None] * stride_s + ds[None, :], mask=mask, other=0.0)
    if HAS_W:
        w = tl.load(W + ns64, mask=mask_n, other=0.0).to(tl.float32)
        v = (v.to(tl.float32) * w[:, None]).to(OUT.dtype.element_ty)
    tl.store(OUT + ns64[:, None] * stride_o + ds[None, :], v, mask=mask)
