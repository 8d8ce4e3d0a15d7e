"""Launchers of the forward kernels: check shapes/dtypes/devices/contiguity, pick the launch
config (``launch_config``), launch. The up projection (token gather + GEMM + activation), the
row GEMM on sorted rows (Triton, or on Hopper the Gluon ping-pong kernel of
``kernels_gluon_rows`` where ``gluon_rules`` says so), the combine and the row gather. The
decode launchers are in ``decode``, the backward's in ``backward`` and ``weight_grads``.
"""

from __future__ import annotations

import torch
import triton

from ...activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from . import kernels as K
from . import kernels_tma as KT
from . import launch_config as C
from .gluon_rules import gluon_rows_wanted
from .launch_config import (
    _DTYPES,
    TensorDescriptor,
    _aligned,
    _check,
    _e_p2,
    _max_tiles,
    _num_sms,
    _persistent,
    _prec,
    _rows_contig,
    _tma_wanted,
    _weight_descriptor,
)

__all__ = ["combine", "gather_rows", "rows_gemm", "up_forward"]


# ----------------------------------------------------------------------------- forward
def up_forward(
    x_TD: torch.Tensor,
    w_EHD: torch.Tensor,
    b_EH: torch.Tensor | None,
    token_ids_N: torch.Tensor,
    roww_N: torch.Tensor | None,
    counts_E: torch.Tensor,
    offsets_E: torch.Tensor,
    act: str,
    gated: bool,
    store_h: bool = True,
    pdl: bool = False,
    interleaved: bool = False,
    tiles: dict | None = None,
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Up projection with the token gather in its prologue and the activation in its epilogue:
    returns ``(h_NH pre-activation, a_NF activated)`` (``h`` is empty when ``store_h`` is False).
    ``pdl``: the next kernel is :func:`down_combine` launched as its programmatic dependent.
    ``interleaved``: gate and up rows of ``w_EHD`` (and of the bias) alternate; ``h`` keeps
    that order. ``alpha``, ``limit``: the ``gpt_oss`` activation's constants."""
    _check("x", x_TD, 2)
    _check("gate_up_proj", w_EHD, 3, x_TD.dtype, x_TD.device)
    if x_TD.dtype not in _DTYPES:
        raise TypeError(f"triton experts support {_DTYPES}, got {x_TD.dtype}")
    E, H, D = w_EHD.shape
    F = H // 2 if gated else H
    N = token_ids_N.shape[0]
    x_TD = _rows_contig(x_TD)
    h = x_TD.new_empty((N, H) if store_h else (0, H))
    a = x_TD.new_empty(N, F)
    if N == 0:
        return h, a
    cfg = C._gemm_config(N, E, F, "up_gated" if gated else "up", x_TD.dtype, tiles)
    num_pid_m = _max_tiles(N, E, cfg.BLOCK_M)
    grid = (num_pid_m * triton.cdiv(F, cfg.BLOCK_N),)
    # gated, W [E, 2F, D]: the gate and up tiles in one copy and one 128x256 accumulator (H200,
    # bf16, the kernel alone against two 128x128 accumulators: qwen3 1.73 -> 1.62 ms, olmoe
    # 2.19 -> 2.08, gpt-oss 4.25 -> 3.99, mixtral 7.51 -> 6.69)
    w_desc = (_weight_descriptor(w_EHD, cfg.BLOCK_N, cfg.BLOCK_K, halves=gated)
              if not (interleaved or pdl) and _tma_wanted(tiles, x_TD, N, E) else None)
    one_acc = w_desc is not None and w_desc[1] and gated
    if w_desc is not None:
        # x's rows gathered once into a temporary, so that its tiles too come through a
        # descriptor (large experts; H200, bf16, benchmarks/gather_ab.py, the gather plus the
        # TMA row GEMM against the gather in the prologue: mixtral 6.79 -> 6.16 ms, gpt-oss
        # 4.08 -> 3.68, deepseek-64e 6.87 -> 6.69, qwen3 1.45 -> 1.57; in the layer, fwd+bwd:
        # mixtral 28.33 -> 27.92, deepseek-64e 31.87 -> 31.56, gpt-oss 17.69 -> 17.37)
        x_src = x_TD
        if C._gather_x(tiles, F, D, x_TD):
            xg = gather_rows(x_TD, token_ids_N)
            x_src = TensorDescriptor(xg, [N, D], [D, 1], [cfg.BLOCK_M, cfg.BLOCK_K])
        KT.up_tma_kernel[grid](
            x_src, w_desc[0], b_EH if b_EH is not None else x_TD, token_ids_N,
            roww_N if roww_N is not None else x_TD, h, a,
            counts_E, offsets_E,
            E, D, F, num_pid_m,
            x_TD.stride(0), b_EH.stride(0) if b_EH is not None else 0,
            h.stride(0) if store_h else 0, a.stride(0),
            GATED=gated, ACT=K.ACT_CODES[act], HAS_BIAS=b_EH is not None, WOI=roww_N is not None,
            STORE_H=store_h, W_K_CONTIG=w_desc[1], E_P2=_e_p2(E), PREC=_prec(x_TD.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            ONE_ACC=one_acc, X_DESC=x_src is not x_TD, ALPHA=float(alpha), LIMIT=float(limit),
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return h, a
    K.up_kernel[grid](
        x_TD, w_EHD, b_EH if b_EH is not None else x_TD, token_ids_N,
        roww_N if roww_N is not None else x_TD, h, a,
        counts_E, offsets_E,
        E, D, F, num_pid_m,
        x_TD.stride(0), w_EHD.stride(0), w_EHD.stride(1), w_EHD.stride(2),
        b_EH.stride(0) if b_EH is not None else 0,
        h.stride(0) if store_h else 0, a.stride(0),
        GATED=gated, ACT=K.ACT_CODES[act], HAS_BIAS=b_EH is not None, WOI=roww_N is not None,
        STORE_H=store_h, E_P2=_e_p2(E), PREC=_prec(x_TD.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        PDL=pdl, INTERLEAVED=interleaved, ALPHA=float(alpha), LIMIT=float(limit),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return h, a


def rows_gemm(
    a_NI: torch.Tensor,
    w_EOI: torch.Tensor,
    b_EO: torch.Tensor | None,
    counts_E: torch.Tensor,
    offsets_E: torch.Tensor,
    tiles: dict | None = None,
    out_rows_N: torch.Tensor | None = None,
) -> torch.Tensor:
    """``y[rows of e] = a[rows of e] @ w[e].T (+ b[e])`` for rows sorted by expert; ``w_EOI`` may
    be any strided view (e.g. ``gate_up.transpose(1, 2)`` for the input grad). ``out_rows_N``
    (a permutation of the N rows): row n is written at row ``out_rows_N[n]`` of y (a top-1
    dropless plan's slots, back in their order without a combine pass)."""
    _check("a", a_NI, 2)
    _check("w", w_EOI, 3, a_NI.dtype, a_NI.device)
    E, O, I = w_EOI.shape
    N = a_NI.shape[0]
    a_NI = _rows_contig(a_NI)
    if N == 0:
        return a_NI.new_empty(0, O)
    if b_EO is None and out_rows_N is None and gluon_rows_wanted(tiles, a_NI, w_EOI):
        from .kernels_gluon_rows import rows_gemm_ws

        return rows_gemm_ws(a_NI, w_EOI, counts_E, offsets_E, _num_sms(a_NI.device))
    y = a_NI.new_empty(N, O)
    cfg = C._gemm_config(N, E, O, "rows", a_NI.dtype, tiles)
    num_pid_m = _max_tiles(N, E, cfg.BLOCK_M)
    grid = (num_pid_m * triton.cdiv(O, cfg.BLOCK_N),)
    w_desc = (_weight_descriptor(w_EOI, cfg.BLOCK_N, cfg.BLOCK_K)
              if _tma_wanted(tiles, a_NI, N, E) and _aligned(a_NI, 1) else None)
    if w_desc is not None:
        a_desc = TensorDescriptor(a_NI, [N, I], list(a_NI.stride()), [cfg.BLOCK_M, cfg.BLOCK_K])
        persistent, grid = _persistent(tiles, grid, a_NI.device)
        KT.rows_gemm_tma_kernel[grid](
            a_desc, w_desc[0], b_EO if b_EO is not None else a_NI, y,
            out_rows_N if out_rows_N is not None else counts_E, counts_E, offsets_E,
            E, O, I, num_pid_m, grid[0],
            b_EO.stride(0) if b_EO is not None else 0, y.stride(0),
            HAS_BIAS=b_EO is not None, W_K_CONTIG=w_desc[1], E_P2=_e_p2(E), PREC=_prec(a_NI.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            PERSISTENT=persistent, SCATTER=out_rows_N is not None, num_warps=cfg.num_warps,
            num_stages=cfg.num_stages,
        )
        return y
    K.rows_gemm_kernel[grid](
        a_NI, w_EOI, b_EO if b_EO is not None else a_NI, y,
        out_rows_N if out_rows_N is not None else counts_E, counts_E, offsets_E,
        E, O, I, num_pid_m,
        a_NI.stride(0), w_EOI.stride(0), w_EOI.stride(1), w_EOI.stride(2),
        b_EO.stride(0) if b_EO is not None else 0, y.stride(0),
        HAS_BIAS=b_EO is not None, E_P2=_e_p2(E), PREC=_prec(a_NI.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        SCATTER=out_rows_N is not None, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    return y


def combine(
    y_ND: torch.Tensor,
    inverse_TK: torch.Tensor,
    weights_TK: torch.Tensor | None,
    dot_with_TD: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``out[t] = sum_k w[t,k] y[inv[t,k]]`` (fixed k order, no atomics) and, with
    ``dot_with_TD``, ``dot[t,k] = <y[inv[t,k]], dot_with[t]>`` (else an empty tensor)."""
    _check("y", y_ND, 2)
    T, Kk = inverse_TK.shape
    D = y_ND.shape[1]
    y_ND = _rows_contig(y_ND)
    out = y_ND.new_empty(T, D, dtype=out_dtype or y_ND.dtype)
    if T == 0 or D == 0 or Kk == 0:
        dot = y_ND.new_zeros((T, Kk) if dot_with_TD is not None else (0,), dtype=torch.float32)
        out.zero_()
        return out, dot
    if C.interpreting():
        block_d, block_t = 16, 16
    elif T <= 64:  # decode: spread the few tokens' columns over many programs
        block_d, block_t = min(256, triton.next_power_of_2(D)), 2
    else:
        block_d = min(1024, triton.next_power_of_2(D))
        block_t = max(1, 4096 // block_d)
    num_pid_d = triton.cdiv(D, block_d)
    has_dot = dot_with_TD is not None
    if has_dot:
        dot_with_TD = _rows_contig(dot_with_TD)
        parts = torch.empty(T, Kk, num_pid_d, device=y_ND.device, dtype=torch.float32)
    else:
        parts = out
    inv = inverse_TK.contiguous()
    w = weights_TK.contiguous() if weights_TK is not None else out
    grid = (triton.cdiv(T, block_t) * num_pid_d,)
    K.combine_kernel[grid](
        y_ND, inv, w, dot_with_TD if has_dot else y_ND, out, parts,
        T, D, num_pid_d,
        y_ND.stride(0), dot_with_TD.stride(0) if has_dot else 0, out.stride(0),
        K=Kk, HAS_W=weights_TK is not None, HAS_DOT=has_dot,
        BLOCK_T=block_t, BLOCK_D=block_d, num_warps=4,
    )
    dot = parts.sum(-1) if has_dot else y_ND.new_zeros(0, dtype=torch.float32)
    return out, dot


def gather_rows(src_TD: torch.Tensor, idx_N: torch.Tensor, w_N: torch.Tensor | None = None) -> torch.Tensor:
    """``out[n] = src[idx[n]] (* w[n])``, ``[N, D]`` in one pass."""
    _check("src", src_TD, 2)
    N, D = idx_N.shape[0], src_TD.shape[1]
    src_TD = _rows_contig(src_TD)
    out = src_TD.new_empty(N, D)
    if N == 0 or D == 0:
        return out
    block_d = 16 if C.interpreting() else min(1024, triton.next_power_of_2(D))
    block_n = 16 if C.interpreting() else max(1, 4096 // block_d)
    num_pid_d = triton.cdiv(D, block_d)
    K.gather_rows_kernel[(triton.cdiv(N, block_n) * num_pid_d,)](
        src_TD, idx_N.contiguous(), w_N.contiguous() if w_N is not None else src_TD, out,
        N, D, num_pid_d, src_TD.stride(0), out.stride(0),
        HAS_W=w_N is not None, BLOCK_N=block_n, BLOCK_D=block_d, num_warps=4,
    )
    return out
