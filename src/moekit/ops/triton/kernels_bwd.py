"""The backward ``@triton.jit`` kernels of the fused experts: the dgrad step (the GEMM
``gout[tok] @ down[e]`` with the activation backward in its epilogue, or the activation
backward alone over whole rows) and the weight and bias gradients (rows read in sorted order or
gathered by token)."""

from __future__ import annotations

import triton
import triton.language as tl

from .kernels_common import (
    _glu_fwd_bwd,
    _row_tile,
    _rows_mainloop,
    _unary_fwd_bwd,
)


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
    e, rows64, mask_m, cols, mask_n, pid_n = _row_tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E, F,
                                                       E_P2, BLOCK_M, BLOCK_N, GROUP_M)
    if e >= E:
        return
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
