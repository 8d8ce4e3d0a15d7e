"""Launchers of the decode kernels (``kernels_decode``; inference at a token or a few): the fused
down projection + combine, and the routing plan in one launch. Checks, launch config, launch,
as in ``launchers``.
"""

from __future__ import annotations

import torch
import triton

from ...routing_plan import RoutingPlan
from . import kernels_decode as KD
from . import launch_config as C
from .launch_config import _check, _major, _rows_contig

__all__ = ["SMALL_PLAN_MAX_SLOTS", "down_combine", "small_plan", "use_pdl"]


# programmatic dependent launch needs a Triton with grid-dependency control (newer than the
# oldest one moekit supports)
_HAS_PDL = hasattr(getattr(getattr(triton.language, "extra", None), "cuda", None), "gdc_wait")


def use_pdl(device: torch.device, enabled: bool = True) -> bool:
    """Whether the decode forward launches :func:`down_combine` as a programmatic dependent of
    the up kernel (it reads the routing and its first weight tiles while the up kernel
    finishes): when ``enabled`` (``TritonBackend.Config.pdl``) on CUDA GPUs of compute
    capability 9 or newer; elsewhere it does nothing."""
    return (enabled and device.type == "cuda" and not C.interpreting() and _HAS_PDL
            and _major(device) >= 9)


def down_combine(
    a_NF: torch.Tensor,
    w_EDF: torch.Tensor,
    b_ED: torch.Tensor | None,
    inverse_TK: torch.Tensor,
    expert_ids_N: torch.Tensor,
    weights_TK: torch.Tensor | None,
    pdl: bool = False,
    tiles: dict | None = None,
) -> torch.Tensor:
    """``out[t] = sum_k w[t,k] (a[inv[t,k]] @ w[e_k].T + b[e_k])`` (``w = 1`` when
    ``weights_TK`` is None) in one kernel: the decode forward's down projection and combine.
    ``pdl``: launched as a programmatic dependent of the up kernel that wrote ``a_NF``."""
    _check("a", a_NF, 2)
    _check("down_proj", w_EDF, 3, a_NF.dtype, a_NF.device)
    _, D, F = w_EDF.shape
    if a_NF.shape[1] != F:
        raise ValueError(f"a has {a_NF.shape[1]} columns, down_proj expects F={F}")
    T, Kk = inverse_TK.shape
    a_NF = _rows_contig(a_NF)
    out = a_NF.new_empty(T, D)
    if T == 0 or D == 0:
        return out
    o = tiles.get("down_combine") if tiles else None
    if C.interpreting():
        bd, bf, nw, ns = 16, 16, 4, 1
    elif o is not None:
        bd, bf, nw, ns = o
    else:  # H200, qwen3 decode T=1 (CUDA graph, plan given): 4x64 w4 26.1 us, 4x128 w8 24.0 us
        bd, bf, nw, ns = 4, 128, 8, 1
    num_pid_d = triton.cdiv(D, bd)
    inv = inverse_TK.contiguous()
    w = weights_TK.contiguous() if weights_TK is not None else inv
    KD.down_combine_kernel[(T * num_pid_d,)](
        a_NF, w_EDF, b_ED if b_ED is not None else a_NF, inv, expert_ids_N, w, out,
        D, F, num_pid_d,
        a_NF.stride(0), w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2),
        b_ED.stride(0) if b_ED is not None else 0, out.stride(0),
        K=Kk, K_P2=max(1, triton.next_power_of_2(Kk)), HAS_W=weights_TK is not None,
        HAS_BIAS=b_ED is not None, PDL=pdl, BLOCK_D=bd, BLOCK_F=bf,
        num_warps=nw, num_stages=ns, **({"launch_pdl": True} if pdl else {}),
    )
    return out


# ----------------------------------------------------------------------------- decode: the routing plan
SMALL_PLAN_MAX_SLOTS = 1024


def small_plan(topk_ids_TK: torch.Tensor, num_experts: int) -> RoutingPlan:
    """The dropless :class:`RoutingPlan` of ``T*K <= SMALL_PLAN_MAX_SLOTS`` slots from one
    kernel launch (``TritonBackend.make_plan`` uses it on CUDA at decode sizes: the same plan
    as ``make_plan``, a fraction of the host time). Ids outside ``[0, num_experts)`` fail a device-side assert, as in
    ``make_plan``."""
    T, Kk = topk_ids_TK.shape
    n = T * Kk
    if not 0 < n <= SMALL_PLAN_MAX_SLOTS:
        raise ValueError(f"small_plan takes 1..{SMALL_PLAN_MAX_SLOTS} slots, got T*K={n}")
    dev = topk_ids_TK.device
    ids = topk_ids_TK.reshape(-1)
    ce = torch.empty(2 * num_experts + 1, dtype=torch.int32, device=dev)
    rows = torch.empty(4 * n + 1, dtype=torch.int64, device=dev)
    sorted_slots, token_ids, expert_ids, inverse = rows[:4 * n].view(4, n).unbind(0)
    block = max(16, triton.next_power_of_2(n))
    KD.small_plan_kernel[(1,)](
        ids, ce[:num_experts], ce[num_experts:2 * num_experts], sorted_slots, token_ids,
        expert_ids, inverse, rows[4 * n:], ce[2 * num_experts:],
        n, num_experts, Kk,
        BLOCK=block, CHUNK=max(1, min(block, 8192 // block)),
        E_CHUNK=max(1, min(triton.next_power_of_2(num_experts), 8192 // block)),
        num_warps=4 if block <= 256 else 8,
    )
    torch._assert_async(ce[2 * num_experts], "topk_ids out of [0, num_experts)")
    return RoutingPlan(
        num_tokens=T, top_k=Kk, num_experts=num_experts, sorted_slots_N=sorted_slots,
        token_ids_N=token_ids, expert_ids_N=expert_ids, counts_E=ce[:num_experts],
        offsets_E=ce[num_experts:2 * num_experts], inverse_TK=inverse.view(T, Kk),
        num_dropped=rows[4 * n], capacity=None,
    )
