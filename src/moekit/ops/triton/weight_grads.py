"""Launchers of the weight gradients (``dW[e] = L[rows].T @ R[rows]``, Triton, or over gathered
copies by the warp-specialized Gluon kernel on Hopper or torch's grouped GEMM, or by the Gluon
kernel gathering one operand's rows itself) and the rules that send a GEMM to gathered copies
(``dw_uses_grouped_mm``, ``dw_up_uses_grouped_mm``, ``rows_on_cublas``);
``gluon_rules.gluon_wanted`` sends those to Gluon, ``gluon_rules.gluon_gather_wanted`` decides
the in-kernel gather, ahead of both."""

from __future__ import annotations

import torch
import triton

from . import kernels_bwd as KB
from . import kernels_tma as KT
from . import launch_config as C
from .gluon_rules import gluon_gather_wanted, gluon_wanted
from .launch_config import (
    TensorDescriptor,
    _aligned,
    _major,
    _num_sms,
    _prec,
    _rows_contig,
    _tma_wanted,
)

__all__ = ["dw_up_uses_grouped_mm", "dw_uses_grouped_mm", "grouped_mm", "rows_on_cublas",
           "weight_grad"]


_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def dw_uses_grouped_mm(n_rows: int, n_experts: int, dim: int, hidden: int, dtype, device,
                       mode: str = "auto") -> bool:
    """Whether the weight grads run over gathered copies (by the Gluon kernel where
    :func:`gluon_wanted`, else by torch grouped_mm, cuBLAS) instead of ``dw_kernel`` (and the
    plain row GEMMs, the input grad's rows ``dH @ W_up`` and, without a down bias, the
    forward's down projection, by :func:`grouped_mm` instead of ``rows_gemm_kernel``):
    ``mode`` (``TritonBackend.Config.dw``) = ``auto`` (the default) | ``triton`` |
    ``grouped_mm``.

    ``auto`` uses cuBLAS on a Hopper GPU in bf16 for large experts (``F >= 2048``: GPT-OSS,
    Mixtral, DeepSeek), where cuBLAS's grouped GEMM is faster than ``dw_kernel`` (about 330
    TFLOP/s there) at the price of a gathered [N, D] copy (measured on an H100, 2026-11-23:
    fwd+bwd mixtral 34.8 vs 41.5 ms, deepseek-64e 39.8 vs 42.2, gpt-oss 24.6 vs 24.8, same
    peak memory). The fine-grained shapes
    (Qwen3, OLMoE) are best with the gather-in-prologue kernel (no copy, less memory)."""
    if mode not in ("auto", "triton", "grouped_mm"):
        raise ValueError(f"dw={mode!r}; allowed: 'auto', 'triton', 'grouped_mm'")
    if _grouped_mm is None or mode == "triton":
        return False
    if mode == "grouped_mm":
        return dim % 8 == 0 and hidden % 8 == 0 and dtype in (torch.float32, torch.bfloat16)
    return hidden >= 2048 and _cublas_on_hopper(dim, hidden, dtype, device)


def _cublas_on_hopper(dim: int, hidden: int, dtype, device) -> bool:
    """Where ``auto`` may send a GEMM to torch's grouped GEMM: bf16, dims divisible by 8, on a
    CUDA GPU of compute capability 9 or newer (not under the interpreter)."""
    return (_grouped_mm is not None and device.type == "cuda" and not C.interpreting()
            and dtype == torch.bfloat16 and dim % 8 == 0 and hidden % 8 == 0
            and _major(device) >= 9)


def dw_up_uses_grouped_mm(n_rows: int, n_experts: int, dim: int, hidden: int, dtype, device,
                          mode: str = "auto") -> bool:
    """Whether the up projection's weight grad ``dH[rows].T @ x[tok]`` runs as torch's grouped
    GEMM over a gathered copy of x's rows: as :func:`dw_uses_grouped_mm`, and with ``auto`` also
    at every training size (more than 64 rows per expert) on a Hopper GPU in bf16 (H200, that
    GEMM alone, the copy counted: qwen3 1.90 -> 1.69 ms, olmoe 2.33 -> 2.09; the copy's
    ``[N, D]`` buffer lives only during it). The down projection's (``gout[tok].T @ a``) stays
    on ``dw_kernel`` there, where it is as fast as cuBLAS (qwen3 0.90 against 0.95 ms)."""
    if dw_uses_grouped_mm(n_rows, n_experts, dim, hidden, dtype, device, mode):
        return True
    return (mode == "auto" and n_rows / max(1, n_experts) > 64
            and _cublas_on_hopper(dim, hidden, dtype, device))


def rows_on_cublas(use_grouped_mm: bool, tiles: dict | None, t: torch.Tensor, n_rows: int,
                   n_experts: int) -> bool:
    """Whether the row GEMMs (the forward's down projection without a down bias, the input
    grad's ``dH @ W_up``, the dgrad's ``gout[tok] @ down``) run on torch's grouped GEMM: where
    the weight grads do (``use_grouped_mm``, large experts) and the Triton row GEMMs do not
    read through tensor descriptors (H200, bf16, the GEMM alone: the descriptor-fed persistent
    row GEMM at 670 TFLOP/s against cuBLAS's 642 at Mixtral's shape, 507 against 497 at
    Qwen3's)."""
    return use_grouped_mm and not _tma_wanted(tiles, t, n_rows, n_experts)


def _dw_gluon(lm: torch.Tensor, rm: torch.Tensor, counts_E: torch.Tensor, offsets_E: torch.Tensor,
              transposed: bool, l_tok: torch.Tensor | None = None,
              r_tok: torch.Tensor | None = None) -> torch.Tensor:
    """``lm[rows].T @ rm[rows]`` per expert by the Gluon kernel (zeros for experts without
    rows); ``transposed``: laid out as the transpose of a contiguous ``[E, I, O]``. ``l_tok``
    (or ``r_tok``): that operand's rows are gathered by token in the kernel, which gathers its
    left operand: with ``r_tok`` it computes ``(rm[tok].T @ lm).T``."""
    from .kernels_gluon import weight_grad_ws

    counts, offsets = counts_E.to(torch.int32), offsets_E.to(torch.int32)
    sms = _num_sms(lm.device)
    if r_tok is not None:
        return weight_grad_ws(rm, lm, counts, offsets, sms, l_tok=r_tok,
                              out_transposed=not transposed).transpose(1, 2)
    if transposed and l_tok is None:
        return weight_grad_ws(rm, lm, counts, offsets, sms).transpose(1, 2)
    return weight_grad_ws(lm, rm, counts, offsets, sms, l_tok=l_tok, out_transposed=transposed)


def grouped_mm(a_NI: torch.Tensor, w_EIO: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """``y[rows of e] = a[rows of e] @ w[e]`` (``[N, O]``) by torch's grouped GEMM (cuBLAS on a
    GPU), for rows sorted by expert; used where :func:`dw_uses_grouped_mm` says so."""
    if a_NI.shape[0] == 0:
        return a_NI.new_empty(0, w_EIO.shape[2])
    return _grouped_mm(_rows_contig(a_NI), w_EIO, offs=offsets_E)


def _gather_rows(src: torch.Tensor, tok: torch.Tensor | None, roww_N: torch.Tensor | None):
    m = src if tok is None else src.index_select(0, tok)
    if roww_N is not None:
        # in place on our own copy: computed in fp32 and rounded once, with no fp32 [N, D]
        # temporaries (two of them cost 1.4 GiB of peak memory at GPT-OSS's shape)
        m = m.clone() if tok is None else m
        m.mul_(roww_N[:, None])
    return m.contiguous()


def weight_grad(
    l_src: torch.Tensor,
    l_tok: torch.Tensor | None,
    r_src: torch.Tensor,
    r_tok: torch.Tensor | None,
    roww_N: torch.Tensor | None,
    scale_left: bool,
    counts_E: torch.Tensor,
    offsets_E: torch.Tensor,
    out_dtype: torch.dtype,
    with_bias: bool,
    use_grouped_mm: bool = False,
    transposed: bool = False,
    scale_dw: bool = True,
    tiles: dict | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``dW[e] = L[rows of e].T @ R[rows of e]`` ``[E, O, I]`` with rows of L/R read directly or
    gathered by token (``*_tok``), the routing weight applied to L or R; and ``dB[e] = sum L``.
    ``use_grouped_mm``: materialise the gathered L and R and run torch's grouped GEMM (or the
    Gluon kernel over them). Where :func:`gluon_gather_wanted` says so (one operand gathered,
    no routing weight applied to the grad) the Gluon kernel gathers the rows itself instead.
    ``transposed``: dW is laid out as the transpose of a contiguous ``[E, I, O]`` (the layout
    of a weight stored ``(in, out)``, as transformers' GPT-OSS experts are), so that it reaches
    the parameter without a copy. ``scale_dw=False``: the routing weight scales only the bias
    grad (the other dW operand already carries it)."""
    E = counts_E.shape[0]
    O, I = l_src.shape[1], r_src.shape[1]
    l_src, r_src = _rows_contig(l_src), _rows_contig(r_src)
    db = torch.empty(E, O, device=l_src.device, dtype=out_dtype) if with_bias else None
    if E == 0 or O == 0 or I == 0:
        if db is not None:
            db.zero_()
        return _new_dw(E, O, I, l_src.device, out_dtype, transposed).zero_(), db
    scale = roww_N is not None
    l_tok_arg = l_tok if l_tok is not None else counts_E
    n = l_tok.shape[0] if l_tok is not None else (r_tok.shape[0] if r_tok is not None else l_src.shape[0])
    if ((l_tok is None) != (r_tok is None) and not (scale and scale_dw)
            and gluon_gather_wanted(tiles, l_src if l_tok is not None else r_src,
                                    r_src if l_tok is not None else l_src, n, E)):
        dw = _dw_gluon(l_src, r_src, counts_E, offsets_E, transposed, l_tok, r_tok).to(out_dtype)
    elif use_grouped_mm:
        if n == 0:
            dw = _new_dw(E, O, I, l_src.device, out_dtype, transposed).zero_()
        else:
            dw_scale = scale and scale_dw
            lm = _gather_rows(l_src, l_tok, roww_N if dw_scale and scale_left else None)
            rm = _gather_rows(r_src, r_tok, roww_N if dw_scale and not scale_left else None)
            if gluon_wanted(tiles, lm, rm, E):
                dw = _dw_gluon(lm, rm, counts_E, offsets_E, transposed).to(out_dtype)
            else:
                dw = _dw_cublas(lm, rm, counts_E, offsets_E, out_dtype, transposed)
            del lm, rm
    else:
        dw = _dw_triton(l_src, l_tok_arg, l_tok is not None, r_src, r_tok,
                        roww_N if scale_dw else None, scale_left, counts_E, offsets_E, out_dtype,
                        transposed, tiles)
    return dw, _bias_grad(db, l_src, l_tok_arg, l_tok, roww_N, scale_left, counts_E, offsets_E)


def _dw_cublas(lm, rm, counts_E, offsets_E, out_dtype, transposed):
    """``lm[rows].T @ rm[rows]`` per expert by torch's grouped GEMM (``transposed``: written as
    a contiguous ``[E, I, O]`` and returned transposed)."""
    E, O, I = counts_E.shape[0], lm.shape[1], rm.shape[1]
    if transposed:  # dW[e].T = R.T @ L, written contiguous
        dw = _grouped_mm(rm.t(), lm, offs=offsets_E).to(out_dtype).contiguous()
    else:
        dw = _grouped_mm(lm.t(), rm, offs=offsets_E).to(out_dtype).contiguous()
    # experts without rows: a library may leave their K=0 groups unwritten. Zero just those (a
    # full masked_fill over dW cost 2 ms and a dW-sized copy at Mixtral's shape)
    per_e = O * I
    if per_e >= 2**31:
        raise ValueError(f"one expert's weight grad has {per_e} elements; at most 2**31 - 1 are supported")
    block = 16 if C.interpreting() else 1024
    KB.zero_empty_experts_kernel[(min(triton.cdiv(per_e, block), 64), E)](
        dw, counts_E, per_e, BLOCK=block, num_warps=4)
    return dw.transpose(1, 2) if transposed else dw


def _bias_grad(db, l_src, l_tok_arg, l_tok, roww_N, scale_left, counts_E, offsets_E):
    """Fill ``db[e] = sum of L's rows of e`` (scaled by the routing weight where L carries it);
    ``db`` None: no bias."""
    if db is not None:
        E, O = db.shape
        block_o = 16 if C.interpreting() else min(256, triton.next_power_of_2(O))
        block_r = 16 if C.interpreting() else 32
        scale_l = roww_N is not None and scale_left
        KB.bias_grad_kernel[(triton.cdiv(O, block_o), E)](
            l_src, l_tok_arg, roww_N if roww_N is not None else l_src, db, counts_E, offsets_E, O,
            l_src.stride(0), db.stride(0),
            L_GATHER=l_tok is not None, L_SCALE=scale_l,
            BLOCK_O=block_o, BLOCK_R=block_r, num_warps=4,
        )
    return db


def _new_dw(E: int, O: int, I: int, device, dtype, transposed: bool) -> torch.Tensor:
    """An uninitialised ``[E, O, I]`` weight grad, laid out as the transpose of a contiguous
    ``[E, I, O]`` when ``transposed``."""
    if transposed:
        return torch.empty(E, I, O, device=device, dtype=dtype).transpose(1, 2)
    return torch.empty(E, O, I, device=device, dtype=dtype)


def _dw_triton(l_src, l_tok_arg, l_gather, r_src, r_tok, roww_N, scale_left, counts_E, offsets_E,
               out_dtype, transposed=False, tiles=None):
    E = counts_E.shape[0]
    O, I = l_src.shape[1], r_src.shape[1]
    dw = _new_dw(E, O, I, l_src.device, out_dtype, transposed)
    bo, bi, bk, nw, ns = C._dw_config(l_src.dtype, tiles)
    scale = roww_N is not None
    grid = (triton.cdiv(O, bo) * triton.cdiv(I, bi), E)
    # one operand in sorted order, the other gathered by token, neither scaled: the sorted one
    # through a descriptor
    r_gather = r_tok is not None
    sorted_src = r_src if l_gather else l_src
    if (l_gather != r_gather and not scale and _aligned(sorted_src, 1)
            and _tma_wanted(tiles, sorted_src, sorted_src.shape[0], E)):
        block = [bk, bi if l_gather else bo]
        KT.dw_tma_kernel[grid](
            l_src if l_gather else r_src,
            TensorDescriptor(sorted_src, list(sorted_src.shape), list(sorted_src.stride()), block),
            l_tok_arg if l_gather else r_tok, dw,
            counts_E, offsets_E,
            O, I,
            (l_src if l_gather else r_src).stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
            L_SORTED=not l_gather, PREC=_prec(l_src.dtype),
            BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk, num_warps=nw, num_stages=ns,
        )
        return dw
    KB.dw_kernel[grid](
        l_src, r_src, l_tok_arg, r_tok if r_tok is not None else counts_E,
        roww_N if scale else l_src, dw,
        counts_E, offsets_E,
        O, I,
        l_src.stride(0), r_src.stride(0), dw.stride(0), dw.stride(1), dw.stride(2),
        L_GATHER=l_gather, R_GATHER=r_tok is not None,
        L_SCALE=scale and scale_left, R_SCALE=scale and not scale_left,
        PREC=_prec(l_src.dtype),
        BLOCK_O=bo, BLOCK_I=bi, BLOCK_K=bk, num_warps=nw, num_stages=ns,
    )
    return dw
