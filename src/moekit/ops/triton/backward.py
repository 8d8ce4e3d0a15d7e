"""Launchers of the backward's first step (``down_dgrad``: the GEMM ``gout[tok] @ down[e]``
and the activation backward, fused or split) and the rules that pick its mode
(``dgrad_mode``, ``recompute_activation``, ``activation_prescaled``)."""

from __future__ import annotations

import torch
import triton

from ...activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from . import kernels as K
from . import kernels_bwd as KB
from . import launch_config as C
from . import weight_grads as W
from .launch_config import _e_p2, _max_tiles, _prec, _rows_contig
from .launchers import up_forward

__all__ = ["activation_prescaled", "dgrad_mode", "down_dgrad", "recompute_activation"]


# ----------------------------------------------------------------------------- backward
def down_dgrad(
    g_TD: torch.Tensor,
    w_EDF: torch.Tensor,
    b_ED: torch.Tensor | None,
    token_ids_N: torch.Tensor,
    roww_N: torch.Tensor,
    h_NH: torch.Tensor,
    counts_E: torch.Tensor,
    offsets_E: torch.Tensor,
    act: str,
    gated: bool,
    woi: bool,
    store_a: bool = True,
    out: torch.Tensor | None = None,
    expert_ids_N: torch.Tensor | None = None,
    interleaved: bool = False,
    mode: str = "fused",
    tiles: dict | None = None,
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Returns ``(dH_NH, a_NF, dwt_N)``: the pre-activation grad, the activation recomputed
    from ``h`` (for the down projection's weight grad; empty unless ``store_a``; unless ``mode``
    is ``fused`` and when the weight is on the output, already times the row's routing weight:
    :func:`activation_prescaled`) and (weight on the output) the routing-weight grad of each
    row (fp32; zeros when ``woi``).

    ``out`` receives dH; it may be ``h_NH`` itself (every program reads its tile of h before it
    writes the same tile of dH, and no other program touches that tile), which saves an
    [N, H] buffer in the backward. ``mode`` (:func:`dgrad_mode` decides): ``fused`` (one
    kernel), ``split`` (the GEMM and the epilogue as two kernels) or ``grouped_mm`` (split,
    the GEMM as torch's grouped GEMM over a gathered copy of the output grad's rows); split,
    ``expert_ids_N`` is needed for the down bias's term. ``interleaved``: h and dH hold gate and
    up columns alternately (``up_forward``'s layout)."""
    if mode not in _DGRAD_MODES[1:]:
        raise ValueError(f"down_dgrad mode={mode!r}; allowed: {_DGRAD_MODES[1:]}")
    if mode != "fused":
        return _down_dgrad_split(g_TD, w_EDF, b_ED, token_ids_N, roww_N, h_NH, counts_E, offsets_E,
                                 act, gated, woi, store_a, out, expert_ids_N, interleaved, tiles,
                                 alpha, limit, mode == "grouped_mm")
    E, D, F = w_EDF.shape
    N, H = h_NH.shape
    g_TD = _rows_contig(g_TD)
    if out is None:
        dh = h_NH.new_empty(N, H)
    else:
        if out.shape != h_NH.shape or out.dtype != h_NH.dtype or out.stride() != h_NH.stride():
            raise ValueError(
                f"down_dgrad out must match h (shape {tuple(h_NH.shape)}, dtype {h_NH.dtype}, "
                f"strides {h_NH.stride()}); got {tuple(out.shape)}, {out.dtype}, {out.stride()}"
            )
        dh = out
    a = h_NH.new_empty(N if store_a else 0, F)
    if N == 0:
        return dh, a, torch.zeros(0, device=g_TD.device, dtype=torch.float32)
    cfg = C._gemm_config(N, E, F, "dgrad", g_TD.dtype, tiles)
    num_pid_m = _max_tiles(N, E, cfg.BLOCK_M)
    num_pid_n = triton.cdiv(F, cfg.BLOCK_N)
    parts = torch.empty(N, num_pid_n, device=g_TD.device, dtype=torch.float32)
    grid = (num_pid_m * num_pid_n,)
    KB.down_dgrad_kernel[grid](
        g_TD, w_EDF, b_ED if b_ED is not None else g_TD, token_ids_N, roww_N, h_NH, dh, a, parts,
        counts_E, offsets_E,
        E, D, F, num_pid_m, num_pid_n,
        g_TD.stride(0), w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2),
        b_ED.stride(0) if b_ED is not None else 0, h_NH.stride(0), dh.stride(0), a.stride(0),
        GATED=gated, ACT=K.ACT_CODES[act], WOI=woi, HAS_B2=b_ED is not None, STORE_A=store_a,
        E_P2=_e_p2(E), PREC=_prec(g_TD.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        INTERLEAVED=interleaved, ALPHA=float(alpha), LIMIT=float(limit),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )
    dwt = torch.zeros(N, device=g_TD.device, dtype=torch.float32) if woi else parts.sum(-1)
    return dh, a, dwt


_DGRAD_MODES = ("auto", "fused", "split", "grouped_mm")


def dgrad_mode(hidden: int, use_grouped_mm: bool, setting: str = "auto",
               rows_cublas: bool | None = None) -> str:
    """How the backward's first step runs (``setting``, ``TritonBackend.Config.dgrad`` =
    ``auto``, the default, | ``fused`` | ``split`` | ``grouped_mm``):

    * ``fused``: ``down_dgrad_kernel``, the GEMM ``G = gout[tok] @ down[e]`` with the activation
      backward in its epilogue (which holds two pre-activation tiles beside the accumulator,
      so it runs with half-width tiles: ~245 TFLOP/s);
    * ``split``: the GEMM as a plain gather GEMM with the forward's wide tiles (``up_kernel``,
      identity activation, 256 columns) into an ``[N, F]`` buffer, then ``act_bwd_kernel`` over
      whole rows (H100, fwd+bwd: qwen3 9.76 -> 9.53 ms, mixtral 33.40 -> 30.84);
    * ``grouped_mm``: split, with the GEMM as torch's grouped GEMM (cuBLAS) over a gathered copy
      of the output grad's rows (H200, gpt-oss fwd+bwd 19.24 ms against 21.44 fused and 19.32
      split; deepseek-64e 33.64, 35.61, 34.05).

    ``auto``: where the weight grads use cuBLAS (``use_grouped_mm``, large experts)
    ``grouped_mm`` if the row GEMMs do too (``rows_cublas``, :func:`rows_on_cublas`; default:
    ``use_grouped_mm``), else ``split``; for smaller experts ``split`` when the wide tile
    divides ``F``, else ``fused``. The peak memory
    is the same for all three: the ``[N, F]`` buffer (and the gathered copy) live only during
    this step."""
    if setting not in _DGRAD_MODES:
        raise ValueError(f"dgrad={setting!r}; allowed: {_DGRAD_MODES}")
    if setting == "grouped_mm" and W._grouped_mm is None:
        raise ValueError("dgrad='grouped_mm' needs torch's grouped_mm (torch >= 2.8)")
    if setting != "auto":
        return setting
    if use_grouped_mm:
        return "grouped_mm" if rows_cublas is None or rows_cublas else "split"
    return "split" if hidden % 256 == 0 else "fused"


def _down_dgrad_split(g_TD, w_EDF, b_ED, token_ids_N, roww_N, h_NH, counts_E, offsets_E, act, gated,
                      woi, store_a, out, expert_ids_N, interleaved, tiles=None,
                      alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT, use_grouped_mm=False):
    _, D, F = w_EDF.shape
    N, H = h_NH.shape
    if b_ED is not None and not woi and expert_ids_N is None:
        raise ValueError("down_dgrad (split) needs expert_ids_N for the down bias's term")
    if out is not None and (out.shape != h_NH.shape or out.dtype != h_NH.dtype
                            or out.stride() != h_NH.stride()):
        raise ValueError(
            f"down_dgrad out must match h (shape {tuple(h_NH.shape)}, dtype {h_NH.dtype}, "
            f"strides {h_NH.stride()}); got {tuple(out.shape)}, {out.dtype}, {out.stride()}"
        )
    dh = h_NH.new_empty(N, H) if out is None else out
    a = h_NH.new_empty(N if store_a else 0, F)
    dwt = torch.zeros(N, device=g_TD.device, dtype=torch.float32)
    if N == 0:
        return dh, a, dwt
    g_TD = _rows_contig(g_TD)
    if use_grouped_mm:  # the rows gathered once, then cuBLAS
        G = W.grouped_mm(g_TD.index_select(0, token_ids_N), w_EDF, offsets_E)
    else:
        _, G = up_forward(g_TD, w_EDF.transpose(1, 2), None, token_ids_N, None, counts_E, offsets_E,
                          "identity", False, store_h=False, tiles=tiles)
    if C.interpreting():
        br, bf, bd = 4, 16, 16
    else:
        br, bf, bd = 8, min(256, triton.next_power_of_2(F)), 128
    has_b2 = b_ED is not None and not woi
    KB.act_bwd_kernel[(triton.cdiv(N, br),)](
        G, h_NH, dh, a, roww_N, dwt, g_TD, token_ids_N,
        expert_ids_N if has_b2 else token_ids_N, b_ED if has_b2 else g_TD,
        N, F, D,
        G.stride(0), h_NH.stride(0), dh.stride(0), a.stride(0), g_TD.stride(0),
        b_ED.stride(0) if has_b2 else 0,
        GATED=gated, ACT=K.ACT_CODES[act], WOI=woi, HAS_B2=has_b2, STORE_A=store_a,
        BLOCK_R=br, BLOCK_F=bf, BLOCK_D=bd, INTERLEAVED=interleaved, ALPHA=float(alpha),
        LIMIT=float(limit), num_warps=4,
    )
    return dh, a, dwt


def activation_prescaled(mode: str, woi: bool) -> bool:
    """Whether the activation that :func:`down_dgrad` recomputes comes back already times the
    row's routing weight (the split passes store it so, at no cost, so that the down
    projection's weight grad reads both operands as they are)."""
    return mode != "fused" and not woi


def recompute_activation(dgrad: str, setting: bool | None = None) -> bool:
    """Whether the forward drops the activated rows ``a`` (keeping only the pre-activation ``h``)
    and the backward's dgrad step recomputes them: ``setting``
    (``TritonBackend.Config.recompute_act``) = ``None`` (the default) | ``True`` | ``False``.
    ``None``: wherever the dgrad is split (``dgrad``, :func:`dgrad_mode`, not ``fused``), whose
    row-wise pass stores the recomputed activation, already times the routing weight, for the
    price of one write of ``[N, F]``: a third of the saved activations gone from the forward to
    the end of the backward, and the down projection's weight grad reads its operands as they
    are. The fused dgrad kernel pays for the store in its epilogue (H100, qwen3 shape: 2.36 vs
    1.69 ms per call), so there ``None`` keeps ``a``."""
    return dgrad != "fused" if setting is None else bool(setting)
