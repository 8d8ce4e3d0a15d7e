"""The ``@triton.jit`` kernels of the fused experts (the bottom layer: no shape checks here).

Legend: T tokens, D model dim, F expert hidden dim, H = 2F (gated) or F, E experts, K top-k,
N routed rows in expert order (the RoutingPlan's rows).

Row tiles follow the plan's sorted-by-expert layout: program ``m`` of a grouped GEMM finds its
expert from the running count of ``ceil(count_e / BLOCK_M)`` tiles (computed in the kernel) and
covers rows ``[start_e + local * BLOCK_M, ...)`` of that expert only, so a tile never
mixes experts and an expert's weights are read once per row tile (once in all for decode, where
an expert's rows fit one tile). Programs past the last real tile exit at once (the grid is a
static upper bound so that no host sync is needed).

All row/token offsets are widened to int64 before they are multiplied by strides: T*K*D can
pass 2**31 at real shapes.

Activation codes (``ACT``): 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 gpt_oss (gated only),
4 relu2 (non-gated only in moekit, but the code is generic), 5 identity (forward only: the
up kernel as a plain gather GEMM).
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "gpt_oss": 3, "relu2": 4, "identity": 5}
GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


# ----------------------------------------------------------------------------- activations
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp -> inf or 0)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _unary_fwd(h, ACT: tl.constexpr):
    """act(h) for the unary activations (fp32 in, fp32 out)."""
    if ACT == 0:
        out = h * _sigmoid(h)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (1.0 + _tanh(inner))
    elif ACT == 5:  # identity: the up kernel as a plain gather GEMM
        out = h
    else:  # relu2
        r = tl.maximum(h, 0.0)
        out = r * r
    return out


@triton.jit
def _unary_fwd_bwd(h, ACT: tl.constexpr):
    """(act(h), act'(h)) for the unary activations."""
    if ACT == 0:
        s = _sigmoid(h)
        out = h * s
        d = s * (1.0 + h * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = h * cdf
        d = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = _tanh(inner)
        out = 0.5 * h * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * h * h
        )
    else:  # relu2
        r = tl.maximum(h, 0.0)
        out = r * r
        d = 2.0 * r
    return out, d


@triton.jit
def _glu_fwd(g, u, ACT: tl.constexpr, ALPHA, LIMIT):
    if ACT == 3:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = (uc + 1.0) * (gc * _sigmoid(ALPHA * gc))
    else:
        out = _unary_fwd(g, ACT) * u
    return out


@triton.jit
def _glu_fwd_bwd(g, u, dout, ACT: tl.constexpr, ALPHA, LIMIT):
    """(glu(g, u), d/dg, d/du) given the upstream gradient ``dout``."""
    if ACT == 3:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        s = _sigmoid(ALPHA * gc)
        glu = gc * s
        out = (uc + 1.0) * glu
        dglu = s + gc * ALPHA * s * (1.0 - s)
        dg = tl.where(g <= LIMIT, dout * (uc + 1.0) * dglu, 0.0)
        du = tl.where((u >= -LIMIT) & (u <= LIMIT), dout * glu, 0.0)
    else:
        a, da = _unary_fwd_bwd(g, ACT)
        out = a * u
        dg = dout * u * da
        du = dout * a
    return out, dg, du


# ----------------------------------------------------------------------------- tile schedule
@triton.jit
def _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert ``e`` and first row of row-tile ``pid_m`` (``e == E`` when past the last tile).

    The tile schedule is computed in the kernel from the per-expert counts (one vector load of
    E ints, a cumulative sum and a compare per program): no extra launches, no host sync."""
    es = tl.arange(0, E_P2)
    cnt = tl.load(COUNTS + es, mask=es < E, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    prev = tl.sum(tl.where(es < e, tiles, 0), 0)
    e_safe = tl.minimum(e, E - 1)
    end = tl.load(OFFSETS + e_safe)
    start = end - tl.load(COUNTS + e_safe)
    row0 = start + (pid_m - prev) * BLOCK_M
    return e, row0, end


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    group_id = pid // in_group
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _row_tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E, n_cols, E_P2: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of a row-tiled grouped GEMM: ``(e, rows64, mask_m, cols, mask_n)``
    (``e == E``: past the last tile, the caller returns)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, rows.to(tl.int64), rows < row_end, cols, cols < n_cols


@triton.jit
def _rows_mainloop(a_ptrs, w_ptrs, mask_m, mask_n, n_k, w_step, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc[BLOCK_M, BLOCK_N] = sum over k of A[:, k] W[k, :]`` (fp32), walking ``a_ptrs``
    (row tile, contiguous in k) and ``w_ptrs`` (``w_step`` per k block) over ``n_k``."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        mk = (k0 + ks) < n_k
        at = tl.load(a_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(at, wt, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        w_ptrs += w_step
    return acc


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
    e, rows64, mask_m, hcols, mask_h = _row_tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E, 2 * F,
                                                 E_P2, BLOCK_M, 2 * BLOCK_N, GROUP_M)
    if e >= E:
        return
    _, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
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
    e, rows64, mask_m, cols, mask_n = _row_tile(num_pid_m, tl.cdiv(F, BLOCK_N), COUNTS, OFFSETS, E, F,
                                                E_P2, BLOCK_M, BLOCK_N, GROUP_M)
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
    A, W, B, Y,
    COUNTS, OFFSETS,
    E, O, I, num_pid_m,
    stride_an, stride_we, stride_wo, stride_wi, stride_be, stride_yn,
    HAS_BIAS: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    """``y[rows of e] = a[rows of e] @ W[e].T (+ b[e])`` with ``W[e]`` read as ``[O, I]`` through
    strides (the down projection: ``W = down [E, D, F]``; the input-grad of the up projection:
    ``W = gate_up`` seen as ``[E, D, H]``)."""
    e, rows64, mask_m, cols, mask_n = _row_tile(num_pid_m, tl.cdiv(O, BLOCK_N), COUNTS, OFFSETS, E, O,
                                                E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    a_ptrs = A + rows64[:, None] * stride_an + ks[None, :]
    w_ptrs = W + e64 * stride_we + cols[None, :].to(tl.int64) * stride_wo + ks[:, None] * stride_wi
    acc = _rows_mainloop(a_ptrs, w_ptrs, mask_m, mask_n, I, BLOCK_K * stride_wi, PREC,
                         BLOCK_M, BLOCK_N, BLOCK_K)
    _rows_epilogue(acc, e64, rows64, mask_m, cols, mask_n, B, Y, stride_be, stride_yn, HAS_BIAS)


@triton.jit
def _rows_epilogue(acc, e64, rows64, mask_m, cols, mask_n, B, Y, stride_be, stride_yn,
                   HAS_BIAS: tl.constexpr):
    """A row GEMM's epilogue: ``Y[rows, cols] = acc (+ B[e, cols])``."""
    if HAS_BIAS:
        b = tl.load(B + e64 * stride_be + cols, mask=mask_n, other=0.0).to(tl.float32)
        acc = acc + b[None, :]
    y_ptrs = Y + rows64[:, None] * stride_yn + cols[None, :]
    tl.store(y_ptrs, acc.to(Y.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


# ----------------------------------------------------------------------------- combine / gather-sum
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
    pid = tl.program_id(0)
    pid_t = pid // num_pid_d
    pid_d = pid % num_pid_d
    ts = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = ts < T
    ts64 = ts.to(tl.int64)
    ds = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = ds < Dm
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


# ----------------------------------------------------------------------------- decode: down + combine
@triton.jit
def down_combine_kernel(
    A, W, B, INV, EIDS, WTS, OUT,
    Dm, F, num_pid_d,
    stride_an, stride_we, stride_wd, stride_wf, stride_be, stride_ot,
    K: tl.constexpr, K_P2: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Decode: ``out[t] = sum_k w[t,k] * (a[inv[t,k]] @ down[e_k].T + b[e_k])`` for one token
    and one block of output columns, the down projection and the combine in one kernel (no
    [N, D] rows buffer, one launch less). The program's ``K * BLOCK_D`` weight rows (slot k,
    column d) are streamed together as one ``[K * BLOCK_D, BLOCK_F]`` tile per step, the next
    step's tiles requested before the current ones are used, so that enough bytes are in flight
    to stream the weights with about one program per SM; the per-slot sums are added in a
    fixed order (deterministic). Each token reads its own experts' weights: the path for very
    few tokens. ``PDL``: launched as a programmatic dependent of the up kernel; the routing
    and the first weight tile are read before waiting for it (only ``A`` is its output)."""
    pid = tl.program_id(0)
    t64 = (pid // num_pid_d).to(tl.int64)
    js = tl.arange(0, K_P2 * BLOCK_D)  # row j = slot k, column d
    k_j = js // BLOCK_D
    d_j = (pid % num_pid_d) * BLOCK_D + js % BLOCK_D
    r_j = tl.load(INV + t64 * K + k_j, mask=k_j < K, other=-1)
    ok = (r_j >= 0) & (d_j < Dm)
    r64 = tl.where(r_j >= 0, r_j, 0).to(tl.int64)
    e64 = tl.load(EIDS + r64, mask=ok, other=0).to(tl.int64)
    fs = tl.arange(0, BLOCK_F)
    w_ptrs = W + (e64 * stride_we + d_j.to(tl.int64) * stride_wd)[:, None] + fs[None, :] * stride_wf
    a_ptrs = A + r64[:, None] * stride_an + fs[None, :]
    acc = tl.zeros((K_P2 * BLOCK_D,), dtype=tl.float32)
    wt = tl.load(w_ptrs, mask=ok[:, None] & (fs < F)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    at = tl.load(a_ptrs, mask=ok[:, None] & (fs < F)[None, :], other=0.0)
    for f0 in range(0, F, BLOCK_F):
        # the next step's tiles are requested before this step's are used
        mf = (f0 + BLOCK_F + fs) < F
        w_ptrs += BLOCK_F * stride_wf
        a_ptrs += BLOCK_F
        w_nxt = tl.load(w_ptrs, mask=ok[:, None] & mf[None, :], other=0.0)
        a_nxt = tl.load(a_ptrs, mask=ok[:, None] & mf[None, :], other=0.0)
        acc += tl.sum(wt.to(tl.float32) * at.to(tl.float32), axis=1)
        wt = w_nxt
        at = a_nxt
    if HAS_BIAS:
        acc += tl.load(B + e64 * stride_be + d_j, mask=ok, other=0.0).to(tl.float32)
    if HAS_W:
        acc = acc * tl.load(WTS + t64 * K + k_j, mask=ok, other=0.0).to(tl.float32)
    out = tl.sum(tl.reshape(acc, (K_P2, BLOCK_D)), axis=0)
    ds = (pid % num_pid_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    tl.store(OUT + t64 * stride_ot + ds, out.to(OUT.dtype.element_ty), mask=ds < Dm)


# ----------------------------------------------------------------------------- backward: down dgrad + activation
@triton.jit
def _act_bwd_tile(acc, ROWW, HPRE, DH, A_OUT, rows64, c0, mask_rows, F,
                  stride_hn, stride_dhn, stride_an, GATED: tl.constexpr, ACT: tl.constexpr,
                  WOI: tl.constexpr, STORE_A: tl.constexpr, INTERLEAVED: tl.constexpr,
                  BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, ALPHA, LIMIT,
                  SCALE_A: tl.constexpr = False):
    """The dgrad epilogue on the tile (``rows64`` x columns ``c0 .. c0 + BLOCK_N``) of ``G``
    (fp32 ``acc``): ``dA = w_row * G`` (``G`` when the weight is on the input), the
    activation's derivative from the pre-activation ``HPRE`` -> ``DH`` (gate columns ``c``
    and up columns ``F + c``, or with ``INTERLEAVED`` the ``2 * BLOCK_N`` consecutive columns
    from ``2 * c0``, read and written whole and taken apart in registers; the tile of h is
    read before dH is written, so ``DH`` may be ``HPRE``), with ``STORE_A`` the activation
    -> ``A_OUT`` (``SCALE_A``: times the row's routing weight, the down projection's weight-grad
    operand as it is). Returns the activation (fp32) and the tile's mask. (Addresses are formed
    where they are used: pointer tiles made up front stay live through the epilogue and cost
    registers.)"""
    cols = c0 + tl.arange(0, BLOCK_N)
    mask = mask_rows[:, None] & (cols < F)[None, :]
    if WOI:
        da = acc
    else:
        rw = tl.load(ROWW + rows64, mask=mask_rows, other=0.0)
        da = acc * rw[:, None]
    if INTERLEAVED:
        hcols = 2 * c0 + tl.arange(0, 2 * BLOCK_N)
        mask_h = mask_rows[:, None] & (hcols < 2 * F)[None, :]
        hv = tl.load(HPRE + rows64[:, None] * stride_hn + hcols[None, :], mask=mask_h, other=0.0)
        hg, hu = tl.split(tl.reshape(hv.to(tl.float32), (BLOCK_M, BLOCK_N, 2)))
        a, dg, du = _glu_fwd_bwd(hg, hu, da, ACT, ALPHA, LIMIT)
        dh = tl.reshape(tl.join(dg, du), (BLOCK_M, 2 * BLOCK_N))
        tl.store(DH + rows64[:, None] * stride_dhn + hcols[None, :], dh.to(DH.dtype.element_ty),
                 mask=mask_h)
    else:
        h_ptrs = HPRE + rows64[:, None] * stride_hn + cols[None, :]
        hg = tl.load(h_ptrs, mask=mask, other=0.0).to(tl.float32)
        dh_ptrs = DH + rows64[:, None] * stride_dhn + cols[None, :]
        if GATED:
            hu = tl.load(h_ptrs + F, mask=mask, other=0.0).to(tl.float32)
            a, dg, du = _glu_fwd_bwd(hg, hu, da, ACT, ALPHA, LIMIT)
            tl.store(dh_ptrs, dg.to(DH.dtype.element_ty), mask=mask)
            tl.store(dh_ptrs + F, du.to(DH.dtype.element_ty), mask=mask)
        else:
            a, dact = _unary_fwd_bwd(hg, ACT)
            tl.store(dh_ptrs, (da * dact).to(DH.dtype.element_ty), mask=mask)
    if STORE_A:
        a_out = a * rw[:, None] if SCALE_A else a
        tl.store(A_OUT + rows64[:, None] * stride_an + cols[None, :],
                 a_out.to(A_OUT.dtype.element_ty), mask=mask)
    return a, mask


@triton.jit
def down_dgrad_kernel(
    G, W, B2, TOK, ROWW, HPRE, DH, A_OUT, DWT,
    COUNTS, OFFSETS,
    E, D, F, num_pid_m, num_pid_n,
    stride_gt, stride_we, stride_wd, stride_wf, stride_be, stride_hn, stride_dhn, stride_an,
    GATED: tl.constexpr, ACT: tl.constexpr, WOI: tl.constexpr, HAS_B2: tl.constexpr,
    STORE_A: tl.constexpr, E_P2: tl.constexpr, PREC: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
    INTERLEAVED: tl.constexpr = False, ALPHA=1.702, LIMIT=7.0,
):
    """``G = gout[tok] @ down[e]`` (rows gathered by token, no permuted copy of the output
    grad), then the epilogue: ``dA = w_row * G`` (``G`` when the weight is on the input), the
    activation's derivative from the saved pre-activation -> ``dH`` (gate and up columns),
    with ``STORE_A`` the activation itself recomputed from it -> ``A_OUT`` (when the forward
    did not keep it), and,
    when the weight is on the output, the routing-weight gradient's partial
    ``<G, act(h)>`` over this column block (+ ``<gout, b_down[e]>`` in block 0) into
    ``DWT[row, pid_n]``."""
    e, rows64, mask_m, cols, mask_n = _row_tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E, F,
                                                E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
    _, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    tok = tl.load(TOK + rows64, mask=mask_m, other=0).to(tl.int64)
    ks = tl.arange(0, BLOCK_K)
    e64 = e.to(tl.int64)
    g_ptrs = G + tok[:, None] * stride_gt + ks[None, :]
    w_ptrs = W + e64 * stride_we + ks[:, None].to(tl.int64) * stride_wd + cols[None, :] * stride_wf
    acc = _rows_mainloop(g_ptrs, w_ptrs, mask_m, mask_n, D, BLOCK_K * stride_wd, PREC,
                         BLOCK_M, BLOCK_N, BLOCK_K)
    a, out_mask = _act_bwd_tile(acc, ROWW, HPRE, DH, A_OUT, rows64, pid_n * BLOCK_N, mask_m, F,
                                stride_hn, stride_dhn, stride_an, GATED, ACT, WOI, STORE_A,
                                INTERLEAVED, BLOCK_M, BLOCK_N, ALPHA, LIMIT)
    if not WOI:
        part = tl.sum(tl.where(out_mask, acc * a, 0.0), axis=1)
        if HAS_B2:  # noqa: SIM102 - a constexpr branch around a run-time one
            if pid_n == 0:
                bacc = tl.zeros((BLOCK_M,), dtype=tl.float32)
                for k0 in range(0, D, BLOCK_K):
                    mk = (k0 + ks) < D
                    gt = tl.load(G + tok[:, None] * stride_gt + (k0 + ks)[None, :],
                                 mask=mask_m[:, None] & mk[None, :], other=0.0).to(tl.float32)
                    bt = tl.load(B2 + e64 * stride_be + k0 + ks, mask=mk, other=0.0).to(tl.float32)
                    bacc += tl.sum(gt * bt[None, :], axis=1)
                part += bacc
        tl.store(DWT + rows64 * num_pid_n + pid_n, part, mask=mask_m)


@triton.jit
def act_bwd_kernel(
    G, HPRE, DH, A_OUT, ROWW, DWT, GOUT, TOK, EXP, B2,
    N, F, D,
    stride_g, stride_hn, stride_dhn, stride_an, stride_gt, stride_be,
    GATED: tl.constexpr, ACT: tl.constexpr, WOI: tl.constexpr, HAS_B2: tl.constexpr,
    STORE_A: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_F: tl.constexpr, BLOCK_D: tl.constexpr,
    INTERLEAVED: tl.constexpr = False, ALPHA=1.702, LIMIT=7.0,
):
    """``down_dgrad_kernel``'s epilogue as a pass of its own over whole rows, after the GEMM
    ``G = gout[tok] @ down[e]`` ran as a plain gather GEMM (``up_kernel`` with the identity):
    ``dA = w_row * G`` (``G`` when the weight is on the input), the activation's derivative
    from the saved pre-activation -> ``dH`` (may be ``HPRE`` itself: each program reads a
    tile before it writes it), with ``STORE_A`` the activation -> ``A_OUT`` (times the row's
    routing weight when the weight is on the output), and (weight on the output) the routing-weight grad ``<G, act(h)> (+ <gout, b_down[e]>)`` of each row, whole
    (a program owns its rows' full width, so there are no partials)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    mask_r = rows < N
    rows64 = rows.to(tl.int64)
    part = tl.zeros((BLOCK_R,), dtype=tl.float32)
    for f0 in range(0, F, BLOCK_F):
        fs = f0 + tl.arange(0, BLOCK_F)
        m2 = mask_r[:, None] & (fs < F)[None, :]
        acc = tl.load(G + rows64[:, None] * stride_g + fs[None, :], mask=m2, other=0.0).to(tl.float32)
        a, _ = _act_bwd_tile(acc, ROWW, HPRE, DH, A_OUT, rows64, f0, mask_r, F,
                             stride_hn, stride_dhn, stride_an, GATED, ACT, WOI, STORE_A,
                             INTERLEAVED, BLOCK_R, BLOCK_F, ALPHA, LIMIT, not WOI)
        if not WOI:
            part += tl.sum(tl.where(m2, acc * a, 0.0), axis=1)
    if not WOI:
        if HAS_B2:
            tok = tl.load(TOK + rows64, mask=mask_r, other=0).to(tl.int64)
            e64 = tl.load(EXP + rows64, mask=mask_r, other=0).to(tl.int64)
            for d0 in range(0, D, BLOCK_D):
                ds = d0 + tl.arange(0, BLOCK_D)
                md = mask_r[:, None] & (ds < D)[None, :]
                gt = tl.load(GOUT + tok[:, None] * stride_gt + ds[None, :], mask=md, other=0.0)
                bt = tl.load(B2 + e64[:, None] * stride_be + ds[None, :], mask=md, other=0.0)
                part += tl.sum(gt.to(tl.float32) * bt.to(tl.float32), axis=1)
        tl.store(DWT + rows64, part, mask=mask_r)


@triton.jit
def _source_rows(TOK, rows64, mask, GATHER: tl.constexpr):
    """Rows to read for sorted rows ``rows64``: the rows themselves, or (``GATHER``) their
    tokens ``TOK[rows]`` (int64)."""
    if GATHER:
        return tl.load(TOK + rows64, mask=mask, other=0).to(tl.int64)
    return rows64


# ----------------------------------------------------------------------------- backward: weight grads
@triton.jit
def dw_kernel(
    L, R, LTOK, RTOK, ROWW, DW,
    COUNTS, OFFSETS,
    O, I,
    stride_l, stride_r, stride_we, stride_wo, stride_wi,
    L_GATHER: tl.constexpr, R_GATHER: tl.constexpr, L_SCALE: tl.constexpr, R_SCALE: tl.constexpr,
    PREC: tl.constexpr,
    BLOCK_O: tl.constexpr, BLOCK_I: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """``dW[e] = L[rows of e].T @ R[rows of e]`` (``[O, I]``, at any strides: a weight stored
    transposed gets its grad in its own layout).

    ``L``/``R`` rows are read directly (sorted row r) or gathered by token (``L[tok[r]]``),
    optionally scaled by the row's routing weight, so neither the permuted output grad nor the
    permuted input ever exists in memory. Experts with no rows get zeros.
    """
    e = tl.program_id(1)
    pid = tl.program_id(0)
    num_pid_i = tl.cdiv(I, BLOCK_I)
    pid_o = pid // num_pid_i
    pid_i = pid % num_pid_i
    e64 = e.to(tl.int64)
    end = tl.load(OFFSETS + e)
    start = end - tl.load(COUNTS + e)
    os_ = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    is_ = pid_i * BLOCK_I + tl.arange(0, BLOCK_I)
    mask_o = os_ < O
    mask_i = is_ < I
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_O, BLOCK_I), dtype=tl.float32)
    # the source rows of each block are loaded one iteration ahead, so that no data load waits
    # on an index load of its own iteration (H200, bf16, 128x256 tiles: dW 11-13% faster at
    # Qwen3's and OLMoE's shapes than with the index loads in their own iteration)
    rows = start + ks
    lrow_next = _source_rows(LTOK, rows.to(tl.int64), rows < end, L_GATHER)
    rrow_next = _source_rows(RTOK, rows.to(tl.int64), rows < end, R_GATHER)
    for r0 in range(start, end, BLOCK_K):
        rows = r0 + ks
        mr = rows < end
        rows64 = rows.to(tl.int64)
        lrow, rrow = lrow_next, rrow_next
        nxt = rows + BLOCK_K
        lrow_next = _source_rows(LTOK, nxt.to(tl.int64), nxt < end, L_GATHER)
        rrow_next = _source_rows(RTOK, nxt.to(tl.int64), nxt < end, R_GATHER)
        lt = tl.load(L + lrow[:, None] * stride_l + os_[None, :], mask=mr[:, None] & mask_o[None, :], other=0.0)
        rt = tl.load(R + rrow[:, None] * stride_r + is_[None, :], mask=mr[:, None] & mask_i[None, :], other=0.0)
        if L_SCALE or R_SCALE:
            rw = tl.load(ROWW + rows64, mask=mr, other=0.0)
            if L_SCALE:
                lt = (lt.to(tl.float32) * rw[:, None]).to(L.dtype.element_ty)
            if R_SCALE:
                rt = (rt.to(tl.float32) * rw[:, None]).to(R.dtype.element_ty)
        acc = tl.dot(tl.trans(lt), rt, acc, input_precision=PREC)
    dw_ptrs = (DW + e64 * stride_we + os_[:, None].to(tl.int64) * stride_wo
               + is_[None, :].to(tl.int64) * stride_wi)
    tl.store(dw_ptrs, acc.to(DW.dtype.element_ty), mask=mask_o[:, None] & mask_i[None, :])


@triton.jit
def bias_grad_kernel(
    L, LTOK, ROWW, DB, COUNTS, OFFSETS, O, stride_l, stride_be,
    L_GATHER: tl.constexpr, L_SCALE: tl.constexpr, BLOCK_O: tl.constexpr, BLOCK_R: tl.constexpr,
):
    """``dB[e] = sum over rows of e of L[row]`` (gathered by token / scaled by the routing
    weight like ``dw_kernel``'s L), a fixed-order segment sum in fp32."""
    pid_o = tl.program_id(0)
    e = tl.program_id(1)
    end = tl.load(OFFSETS + e)
    start = end - tl.load(COUNTS + e)
    os_ = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
    mask_o = os_ < O
    rs = tl.arange(0, BLOCK_R)
    acc = tl.zeros((BLOCK_O,), dtype=tl.float32)
    for r0 in range(start, end, BLOCK_R):
        rows = r0 + rs
        mr = rows < end
        rows64 = rows.to(tl.int64)
        lrow = _source_rows(LTOK, rows64, mr, L_GATHER)
        lt = tl.load(L + lrow[:, None] * stride_l + os_[None, :], mask=mr[:, None] & mask_o[None, :],
                     other=0.0).to(tl.float32)
        if L_SCALE:
            lt = lt * tl.load(ROWW + rows64, mask=mr, other=0.0)[:, None]
        acc += tl.sum(lt, axis=0)
    tl.store(DB + e.to(tl.int64) * stride_be + os_, acc.to(DB.dtype.element_ty), mask=mask_o)


@triton.jit
def zero_empty_experts_kernel(DW, COUNTS, per_expert, BLOCK: tl.constexpr):
    """``DW[e] = 0`` for the experts with no rows (and nothing else is touched): after a
    library grouped GEMM that may leave the K=0 groups unwritten. A small fixed grid per
    expert strides over its elements, so that the common case (no empty expert) costs a few
    hundred programs that exit at once, not one per block of dW."""
    e = tl.program_id(1)
    if tl.load(COUNTS + e) != 0:
        return
    zero = tl.zeros((BLOCK,), dtype=DW.dtype.element_ty)
    base = DW + e.to(tl.int64) * per_expert
    for start in range(tl.program_id(0) * BLOCK, per_expert, tl.num_programs(0) * BLOCK):
        offs = start + tl.arange(0, BLOCK)
        tl.store(base + offs, zero, mask=offs < per_expert)


# ----------------------------------------------------------------------------- decode: the routing plan
@triton.jit
def small_plan_kernel(
    IDS, COUNTS, OFFSETS, SORTED, TOKS, EXPS, INV, DROPPED, VALID,
    n, E, K,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, E_CHUNK: tl.constexpr,
):
    """A dropless RoutingPlan of ``n = T*K <= BLOCK`` slots in one program (decode sizes, where
    the plan's dozen small torch ops cost more host time than the experts' kernels).

    Slot ``i``'s row is the number of slots with a smaller expert id plus the earlier slots
    with the same id: a stable counting sort by comparisons (``n * n`` of them, in chunks),
    identical to ``make_plan``'s stable sort. Ids outside ``[0, E)`` clear ``VALID`` (the
    caller asserts it) and are left out of every output, so nothing is written out of bounds."""
    i = tl.arange(0, BLOCK)
    mi = i < n
    ids64 = tl.load(IDS + i, mask=mi, other=0).to(tl.int64)
    ok = (ids64 >= 0) & (ids64 < E)
    ids = ids64.to(tl.int32)
    tl.store(VALID, (tl.sum((mi & ~ok).to(tl.int32), 0) == 0).to(tl.int32))
    tl.store(DROPPED, tl.zeros((), dtype=tl.int64))
    key = tl.where(mi & ok, ids, E)  # invalid and padding slots sort last
    row = tl.zeros((BLOCK,), dtype=tl.int32)
    for j0 in range(0, n, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        idj = tl.load(IDS + j, mask=j < n, other=0).to(tl.int64)
        kj = tl.where((j < n) & (idj >= 0) & (idj < E), idj, E).to(tl.int32)
        before = (kj[None, :] < key[:, None]) | ((kj[None, :] == key[:, None]) & (j[None, :] < i[:, None]))
        row += tl.sum(before.to(tl.int32), 1)
    keep = mi & ok
    row64 = row.to(tl.int64)
    tl.store(INV + i, tl.where(keep, row64, -1), mask=mi)
    tl.store(SORTED + row64, i.to(tl.int64), mask=keep)
    tl.store(TOKS + row64, (i // K).to(tl.int64), mask=keep)
    tl.store(EXPS + row64, ids64, mask=keep)
    total = 0
    for e0 in range(0, E, E_CHUNK):
        es = e0 + tl.arange(0, E_CHUNK)
        c = tl.sum(((key[None, :] == es[:, None]) & keep[None, :]).to(tl.int32), 1)
        tl.store(COUNTS + es, c, mask=es < E)
        tl.store(OFFSETS + es, tl.cumsum(c, 0) + total, mask=es < E)
        total += tl.sum(c, 0)
