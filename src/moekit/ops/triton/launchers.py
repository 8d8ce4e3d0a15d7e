"""Launchers: check shapes/dtypes/devices/contiguity, pick the launch config, launch.

Configs are chosen by shape (no autotuning at run time, so the first call costs one compile per
kernel and the timings are reproducible): a *decode* config when the average rows per expert
is small (each touched expert's weights are then read once: its rows fit one tile, and narrow
column tiles spread the weight read over every SM), the Hopper training config otherwise.
Under the interpreter (``TRITON_INTERPRET=1``) small tiles keep the CPU tests quick.
The launchers that pick a config take ``tiles``, the overrides of ``TritonBackend.Config``
(``moekit.ops.triton_backend.parse_tiles`` of its ``tiles_spec()``): ``"gemm"`` the training
row-GEMM config (gated kernels take half of BN per accumulator), a kind (``"up_gated"``,
``"up"``, ``"rows"``, ``"dgrad"``, optionally prefixed ``"decode_"``) the training / decode
config of that kind (BN per accumulator), ``"dw"`` the weight-grad config and
``"down_combine"`` the fused decode down+combine config.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

from ...activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from ...plan import RoutingPlan
from . import kernels as K
from . import kernels_tma as KT

try:  # host-side tensor descriptors (TMA); absent from Triton before 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

__all__ = [
    "GemmConfig",
    "combine",
    "activation_prescaled",
    "dgrad_mode",
    "down_combine",
    "down_dgrad",
    "dw_up_uses_grouped_mm",
    "dw_uses_grouped_mm",
    "grouped_mm",
    "interpreting",
    "recompute_activation",
    "rows_gemm",
    "rows_on_cublas",
    "small_plan",
    "up_forward",
    "use_pdl",
    "weight_grad",
]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prec(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (no tf32): "fp32 where practical" means exact enough for parity tests
    return "ieee" if dtype == torch.float32 else "tf32"


def _override(tiles: dict | None, key: str) -> GemmConfig | None:
    """The launch-config override ``key`` of ``tiles`` (see the module docstring), or None."""
    v = tiles.get(key) if tiles else None
    return None if v is None else GemmConfig(*v)


def _gemm_config(n_rows: int, n_experts: int, out_cols: int, kind: str, dtype,
                 tiles: dict | None = None) -> GemmConfig:
    """Config for the row-tiled grouped GEMMs. ``kind``: "up_gated", "up", "rows", "dgrad"."""
    if interpreting():
        return GemmConfig(16, 16, 16, 4, 1, 4)
    avg = n_rows / max(1, n_experts)
    regime = "decode_" if avg <= 64 else ""
    o = _override(tiles, f"{regime}{kind}")
    if o is not None:  # one kind exactly as given (BN = columns per accumulator)
        return GemmConfig(o.BLOCK_M, o.BLOCK_N, o.BLOCK_K, o.num_warps, o.num_stages, 1 if regime else 8)
    if avg <= 64:
        # decode / tiny batches: rows of an expert fit one tile; narrow column tiles so that
        # enough programs stream the weights (each weight byte is read once). H100, qwen3
        # decode (CUDA graph): gated BN 32 instead of 16 per accumulator at 64 rows (T=8),
        # 188 -> 178 us, the same at T=1 and T=64.
        bm = 16 if avg <= 16 else (32 if avg <= 32 else 64)
        bn = 32 if n_rows <= 64 or kind == "up_gated" else 64
        return GemmConfig(bm, bn, 128, 4, 4, 1)
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, 4, 3, 8)
    o = _override(tiles, "gemm")
    if o is not None:
        if kind in ("up_gated", "dgrad"):  # two accumulators / a heavy epilogue: half the columns
            return GemmConfig(o.BLOCK_M, max(16, o.BLOCK_N // 2), o.BLOCK_K, o.num_warps, o.num_stages)
        return o
    if kind == "dgrad":
        # one accumulator, but the epilogue holds the gate and up pre-activation tiles too
        return GemmConfig(128, 128, 64, 8, 3, 8)
    if kind == "up_gated":
        # two accumulators (gate and up) of 128x128: one 128x256 tile of the [gate; up] output
        return GemmConfig(128, 128, 64, 8, 3, 8)
    return GemmConfig(128, 256, 64, 8, 3, 8)


def _dw_config(dtype, tiles: dict | None = None) -> tuple[int, int, int, int, int]:
    if interpreting():
        return 16, 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    o = _override(tiles, "dw")
    if o is not None:
        return o.BLOCK_M, o.BLOCK_N, o.BLOCK_K, o.num_warps, o.num_stages
    # H200, bf16, the two dW GEMMs timed alone (benchmarks/dw_ab.py): 128x256x64 w8 s3 against
    # 128x128x64 w8 s4: qwen3 3.59 -> 3.19 ms, olmoe 4.49 -> 3.92, gpt-oss 8.95 -> 8.02
    return 128, 256, 64, 8, 3


def _check(name: str, t: torch.Tensor, dim: int, dtype=None, device=None) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()




def _max_tiles(n_rows: int, n_experts: int, block_m: int) -> int:
    # sum_e ceil(c_e / BM) <= N / BM + (number of non-empty experts)
    return n_rows // block_m + min(n_experts, n_rows)


def _e_p2(n_experts: int) -> int:
    return max(2, triton.next_power_of_2(int(n_experts)))


def _tma_wanted(tiles: dict | None, t: torch.Tensor, n_rows: int, n_experts: int) -> bool:
    """Whether a row GEMM reads its tiles through tensor descriptors: the ``tma`` setting
    (``TritonBackend.Config.tma``) when given; by default (None) at training sizes, in 16-bit
    floats, on GPUs of compute capability 9 or newer."""
    v = tiles.get("tma") if tiles else None
    if TensorDescriptor is None:
        if v == (1,):
            raise RuntimeError("TritonBackend.Config.tma=True needs Triton >= 3.4 "
                               "(triton.tools.tensor_descriptor); pip install -U triton")
        return False
    if v is not None:
        if v == (1,) and t.device.type == "cuda" and _major(t.device) < 9:
            raise ValueError("TritonBackend.Config.tma=True needs a GPU of compute capability >= 9 "
                             f"(TMA); {t.device} has {_major(t.device)}; use tma=None or False")
        return v == (1,)
    return (t.device.type == "cuda" and not interpreting() and t.dtype != torch.float32
            and n_rows / max(1, n_experts) > 64 and _major(t.device) >= 9)


def _persistent(tiles: dict | None, grid: tuple[int], device: torch.device) -> tuple[bool, tuple[int]]:
    """``(persistent, grid)`` of the TMA row GEMM: one program per SM (at most one per tile)
    when ``TritonBackend.Config.persistent`` (the default), else one program per tile."""
    if tiles and tiles.get("persistent") == (0,):
        return False, grid
    return True, (min(grid[0], _num_sms(device)),)


def _aligned(t: torch.Tensor, inner: int) -> bool:
    """A tensor descriptor's requirements on ``t`` with ``inner`` as its contiguous dim: unit
    stride there, 16-byte aligned base and other strides."""
    size = t.element_size()
    return (t.stride(inner) == 1 and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for i, s in enumerate(t.stride()) if i != inner % t.dim()))


def _weight_descriptor(w_EOI: torch.Tensor, block_n: int, block_k: int):
    """``(descriptor, k_contig)`` of a ``[E, O, I]`` weight view for ``kernels_tma._w_tile``, or
    None when neither O nor I is contiguous and aligned."""
    E, O, I = w_EOI.shape
    if _aligned(w_EOI, 2):
        return TensorDescriptor(w_EOI, [E, O, I], list(w_EOI.stride()), [1, block_n, block_k]), True
    if _aligned(w_EOI, 1):
        w_EIO = w_EOI.transpose(1, 2)
        return TensorDescriptor(w_EIO, [E, I, O], list(w_EIO.stride()), [1, block_k, block_n]), False
    return None


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
    cfg = _gemm_config(N, E, F, "up_gated" if gated else "up", x_TD.dtype, tiles)
    num_pid_m = _max_tiles(N, E, cfg.BLOCK_M)
    grid = (num_pid_m * triton.cdiv(F, cfg.BLOCK_N),)
    w_desc = (_weight_descriptor(w_EHD, cfg.BLOCK_N, cfg.BLOCK_K)
              if not (interleaved or pdl) and _tma_wanted(tiles, x_TD, N, E) else None)
    # gated, W [E, 2F, D]: W seen as [E, 2, F, D], the gate and up tiles in one copy and one
    # 128x256 accumulator (H200, bf16, the kernel alone against two 128x128 accumulators:
    # qwen3 1.73 -> 1.62 ms, olmoe 2.19 -> 2.08, gpt-oss 4.25 -> 3.99, mixtral 7.51 -> 6.69)
    one_acc = w_desc is not None and w_desc[1] and gated
    if one_acc:
        s0, s1, _ = w_EHD.stride()
        w_desc = TensorDescriptor(w_EHD, [E, 2, F, D], [s0, F * s1, s1, 1],
                                  [1, 2, cfg.BLOCK_N, cfg.BLOCK_K]), True
    if w_desc is not None:
        KT.up_tma_kernel[grid](
            x_TD, w_desc[0], b_EH if b_EH is not None else x_TD, token_ids_N,
            roww_N if roww_N is not None else x_TD, h, a,
            counts_E, offsets_E,
            E, D, F, num_pid_m,
            x_TD.stride(0), b_EH.stride(0) if b_EH is not None else 0,
            h.stride(0) if store_h else 0, a.stride(0),
            GATED=gated, ACT=K.ACT_CODES[act], HAS_BIAS=b_EH is not None, WOI=roww_N is not None,
            STORE_H=store_h, W_K_CONTIG=w_desc[1], E_P2=_e_p2(E), PREC=_prec(x_TD.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            ONE_ACC=one_acc, ALPHA=float(alpha), LIMIT=float(limit),
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
) -> torch.Tensor:
    """``y[rows of e] = a[rows of e] @ w[e].T (+ b[e])`` for rows sorted by expert; ``w_EOI`` may
    be any strided view (e.g. ``gate_up.transpose(1, 2)`` for the input grad)."""
    _check("a", a_NI, 2)
    _check("w", w_EOI, 3, a_NI.dtype, a_NI.device)
    E, O, I = w_EOI.shape
    N = a_NI.shape[0]
    a_NI = _rows_contig(a_NI)
    y = a_NI.new_empty(N, O)
    if N == 0:
        return y
    cfg = _gemm_config(N, E, O, "rows", a_NI.dtype, tiles)
    num_pid_m = _max_tiles(N, E, cfg.BLOCK_M)
    grid = (num_pid_m * triton.cdiv(O, cfg.BLOCK_N),)
    w_desc = (_weight_descriptor(w_EOI, cfg.BLOCK_N, cfg.BLOCK_K)
              if _tma_wanted(tiles, a_NI, N, E) and _aligned(a_NI, 1) else None)
    if w_desc is not None:
        a_desc = TensorDescriptor(a_NI, [N, I], list(a_NI.stride()), [cfg.BLOCK_M, cfg.BLOCK_K])
        persistent, grid = _persistent(tiles, grid, a_NI.device)
        KT.rows_gemm_tma_kernel[grid](
            a_desc, w_desc[0], b_EO if b_EO is not None else a_NI, y,
            counts_E, offsets_E,
            E, O, I, num_pid_m, grid[0],
            b_EO.stride(0) if b_EO is not None else 0, y.stride(0),
            HAS_BIAS=b_EO is not None, W_K_CONTIG=w_desc[1], E_P2=_e_p2(E), PREC=_prec(a_NI.dtype),
            BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
            PERSISTENT=persistent, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )
        return y
    K.rows_gemm_kernel[grid](
        a_NI, w_EOI, b_EO if b_EO is not None else a_NI, y,
        counts_E, offsets_E,
        E, O, I, num_pid_m,
        a_NI.stride(0), w_EOI.stride(0), w_EOI.stride(1), w_EOI.stride(2),
        b_EO.stride(0) if b_EO is not None else 0, y.stride(0),
        HAS_BIAS=b_EO is not None, E_P2=_e_p2(E), PREC=_prec(a_NI.dtype),
        BLOCK_M=cfg.BLOCK_M, BLOCK_N=cfg.BLOCK_N, BLOCK_K=cfg.BLOCK_K, GROUP_M=cfg.GROUP_M,
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
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
    if interpreting():
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


# programmatic dependent launch needs a Triton with grid-dependency control (newer than the
# oldest one moekit supports)
_HAS_PDL = hasattr(getattr(getattr(triton.language, "extra", None), "cuda", None), "gdc_wait")


@functools.cache
def _major_of(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


def _major(device: torch.device) -> int:
    """Compute capability major of a CUDA device (cached: this is asked on every call)."""
    return _major_of(device.index if device.index is not None else torch.cuda.current_device())


def use_pdl(device: torch.device, enabled: bool = True) -> bool:
    """Whether the decode forward launches :func:`down_combine` as a programmatic dependent of
    the up kernel (it reads the routing and its first weight tiles while the up kernel
    finishes): when ``enabled`` (``TritonBackend.Config.pdl``) on CUDA GPUs of compute
    capability 9 or newer; elsewhere it does nothing."""
    return (enabled and device.type == "cuda" and not interpreting() and _HAS_PDL
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
    if interpreting():
        bd, bf, nw, ns = 16, 16, 4, 1
    elif o is not None:
        bd, bf, nw, ns = o
    else:
        bd, bf, nw, ns = 4, 64, 4, 1
    num_pid_d = triton.cdiv(D, bd)
    inv = inverse_TK.contiguous()
    w = weights_TK.contiguous() if weights_TK is not None else inv
    K.down_combine_kernel[(T * num_pid_d,)](
        a_NF, w_EDF, b_ED if b_ED is not None else a_NF, inv, expert_ids_N, w, out,
        D, F, num_pid_d,
        a_NF.stride(0), w_EDF.stride(0), w_EDF.stride(1), w_EDF.stride(2),
        b_ED.stride(0) if b_ED is not None else 0, out.stride(0),
        K=Kk, K_P2=max(1, triton.next_power_of_2(Kk)), HAS_W=weights_TK is not None,
        HAS_BIAS=b_ED is not None, PDL=pdl, BLOCK_D=bd, BLOCK_F=bf,
        num_warps=nw, num_stages=ns, **({"launch_pdl": True} if pdl else {}),
    )
    return out


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
    cfg = _gemm_config(N, E, F, "dgrad", g_TD.dtype, tiles)
    num_pid_m = _max_tiles(N, E, cfg.BLOCK_M)
    num_pid_n = triton.cdiv(F, cfg.BLOCK_N)
    parts = torch.empty(N, num_pid_n, device=g_TD.device, dtype=torch.float32)
    grid = (num_pid_m * num_pid_n,)
    K.down_dgrad_kernel[grid](
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
    if setting == "grouped_mm" and _grouped_mm is None:
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
        G = grouped_mm(g_TD.index_select(0, token_ids_N), w_EDF, offsets_E)
    else:
        _, G = up_forward(g_TD, w_EDF.transpose(1, 2), None, token_ids_N, None, counts_E, offsets_E,
                          "identity", False, store_h=False, tiles=tiles)
    if interpreting():
        br, bf, bd = 4, 16, 16
    else:
        br, bf, bd = 8, min(256, triton.next_power_of_2(F)), 128
    has_b2 = b_ED is not None and not woi
    K.act_bwd_kernel[(triton.cdiv(N, br),)](
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


_grouped_mm = getattr(torch.nn.functional, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def dw_uses_grouped_mm(n_rows: int, n_experts: int, dim: int, hidden: int, dtype, device,
                       mode: str = "auto") -> bool:
    """Whether the weight grads run as torch grouped_mm (cuBLAS) GEMMs over gathered copies
    instead of ``dw_kernel`` (and the plain row GEMMs, the input grad's rows ``dH @ W_up`` and,
    without a down bias, the forward's down projection, by :func:`grouped_mm` instead of
    ``rows_gemm_kernel``): ``mode`` (``TritonBackend.Config.dw``) = ``auto`` (the default) |
    ``triton`` | ``grouped_mm``.

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
    aligned = dim % 8 == 0 and hidden % 8 == 0
    if mode == "grouped_mm":
        return aligned and dtype in (torch.float32, torch.bfloat16)
    return (device.type == "cuda" and not interpreting() and dtype == torch.bfloat16 and aligned
            and hidden >= 2048 and _major(device) >= 9)


def dw_up_uses_grouped_mm(n_rows: int, n_experts: int, dim: int, hidden: int, dtype, device,
                          mode: str = "auto") -> bool:
    """Whether the up projection's weight grad ``dH[rows].T @ x[tok]`` runs as torch's grouped
    GEMM over a gathered copy of x's rows: as :func:`dw_uses_grouped_mm`, and with ``auto`` also
    at every training size (more than 64 rows per expert) on a Hopper GPU in bf16 (H200, that
    GEMM alone, the copy counted: qwen3 1.90 -> 1.69 ms, olmoe 2.33 -> 2.09; the copy's
    ``[N, D]`` buffer lives only during it). The down projection's (``gout[tok].T @ a``) stays
    on ``dw_kernel`` there, where it is as fast as cuBLAS (qwen3 0.90 against 0.95 ms)."""
    large = dw_uses_grouped_mm(n_rows, n_experts, dim, hidden, dtype, device, mode)
    if large or mode != "auto":
        return large
    return (_grouped_mm is not None and device.type == "cuda" and not interpreting()
            and dtype == torch.bfloat16 and dim % 8 == 0 and hidden % 8 == 0
            and n_rows / max(1, n_experts) > 64 and _major(device) >= 9)


def rows_on_cublas(use_grouped_mm: bool, tiles: dict | None, t: torch.Tensor, n_rows: int,
                   n_experts: int) -> bool:
    """Whether the row GEMMs (the forward's down projection without a down bias, the input
    grad's ``dH @ W_up``, the dgrad's ``gout[tok] @ down``) run on torch's grouped GEMM: where
    the weight grads do (``use_grouped_mm``, large experts) and the Triton row GEMMs do not
    read through tensor descriptors (H200, bf16, the GEMM alone: the descriptor-fed persistent
    row GEMM at 670 TFLOP/s against cuBLAS's 642 at Mixtral's shape, 507 against 497 at
    Qwen3's)."""
    return use_grouped_mm and not _tma_wanted(tiles, t, n_rows, n_experts)


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
    ``use_grouped_mm``: materialise the gathered L and R and run torch's grouped GEMM.
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
    if use_grouped_mm:
        n = l_tok.shape[0] if l_tok is not None else (r_tok.shape[0] if r_tok is not None else l_src.shape[0])
        if n == 0:
            dw = _new_dw(E, O, I, l_src.device, out_dtype, transposed).zero_()
        else:
            dw_scale = scale and scale_dw
            lm = _gather_rows(l_src, l_tok, roww_N if dw_scale and scale_left else None)
            rm = _gather_rows(r_src, r_tok, roww_N if dw_scale and not scale_left else None)
            if transposed:  # dW[e].T = R.T @ L, written contiguous
                dw = _grouped_mm(rm.t(), lm, offs=offsets_E).to(out_dtype).contiguous()
            else:
                dw = _grouped_mm(lm.t(), rm, offs=offsets_E).to(out_dtype).contiguous()
            del lm, rm
            # experts without rows: a library may leave their K=0 groups unwritten. Zero just
            # those (a full masked_fill over dW cost 2 ms and a dW-sized copy at Mixtral's shape)
            per_e = O * I
            if per_e >= 2**31:
                raise ValueError(f"one expert's weight grad has {per_e} elements; at most 2**31 - 1 are supported")
            block = 16 if interpreting() else 1024
            K.zero_empty_experts_kernel[(min(triton.cdiv(per_e, block), 64), E)](
                dw, counts_E, per_e, BLOCK=block, num_warps=4)
            if transposed:
                dw = dw.transpose(1, 2)
    else:
        dw = _dw_triton(l_src, l_tok_arg, l_tok is not None, r_src, r_tok,
                        roww_N if scale_dw else None, scale_left, counts_E, offsets_E, out_dtype,
                        transposed, tiles)
    if db is not None:
        block_o = 16 if interpreting() else min(256, triton.next_power_of_2(O))
        block_r = 16 if interpreting() else 32
        K.bias_grad_kernel[(triton.cdiv(O, block_o), E)](
            l_src, l_tok_arg, roww_N if scale else l_src, db, counts_E, offsets_E, O,
            l_src.stride(0), db.stride(0),
            L_GATHER=l_tok is not None, L_SCALE=scale and scale_left,
            BLOCK_O=block_o, BLOCK_R=block_r, num_warps=4,
        )
    return dw, db


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
    bo, bi, bk, nw, ns = _dw_config(l_src.dtype, tiles)
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
    K.dw_kernel[grid](
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
    K.small_plan_kernel[(1,)](
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
