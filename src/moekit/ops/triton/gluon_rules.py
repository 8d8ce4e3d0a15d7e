"""Where the Gluon kernels (warp-specialized, Hopper) run: the ``gluon`` setting
(``TritonBackend.Config.gluon``: None = auto, True, False) and the shapes its auto rule takes.
``gluon_wanted``: the weight grads over gathered copies (``kernels_gluon``);
``gluon_gather_wanted``: the weight grads with one operand gathered in the kernel (the same);
``gluon_rows_wanted``: the plain row GEMMs (``kernels_gluon_rows``)."""

from __future__ import annotations

import functools

import torch

from . import launch_config as C
from .launch_config import _aligned, _major

__all__ = ["GLUON_GATHER_MAX_DIM", "GLUON_MIN_ROWS_PER_EXPERT", "GLUON_ROWS_MAX_DIM",
           "gluon_gather_wanted", "gluon_rows_wanted", "gluon_wanted"]


@functools.cache
def _gluon_import_error() -> str | None:
    try:
        from . import kernels_gluon  # noqa: F401
    except ImportError as e:  # Triton < 3.5 has no triton.experimental.gluon (or not its Hopper parts)
        return f"triton.experimental.gluon could not be imported ({e}); pip install -U triton"
    return None


def _gluon_unavailable(t: torch.Tensor) -> str | None:
    """Why the Gluon kernels cannot run on tensors like ``t`` (None: they can)."""
    if t.device.type != "cuda" or C.interpreting():
        return f"it runs on CUDA GPUs only (not under TRITON_INTERPRET); got a {t.device.type} tensor"
    if t.dtype not in (torch.bfloat16, torch.float16):
        return f"it needs bfloat16 or float16 operands, got {t.dtype}"
    if _major(t.device) != 9:
        return (f"it needs a GPU of compute capability 9 (Hopper's wgmma); {t.device} has "
                f"{_major(t.device)}")
    return _gluon_import_error()


def _gluon_can_run(v, t: torch.Tensor) -> bool:
    """Whether the Gluon kernels can run on tensors like ``t``; raises where the setting ``v``
    asks for them (True) and they cannot."""
    why = _gluon_unavailable(t)
    if why is not None and v == (1,):
        raise RuntimeError(f"TritonBackend.Config.gluon=True, but the Gluon kernels cannot run: "
                           f"{why}; use gluon=None (auto) or False")
    return why is None


# ``gluon=None`` (auto) takes the Gluon weight-grad kernel from this many rows per expert on: it
# was faster than cuBLAS at every shape measured, all at 1024-2048 rows per expert (H200, bf16,
# 1.03-1.13x, ``benchmarks/results/H200-s10-dw-ab.json``); with fewer rows each output tile has
# fewer row blocks to hide its epilogue behind, and that was not measured
GLUON_MIN_ROWS_PER_EXPERT = 1024


def gluon_wanted(tiles: dict | None, l_NO: torch.Tensor, r_NI: torch.Tensor,
                 n_experts: int) -> bool:
    """Whether a weight grad over gathered copies (``dW[e] = l[rows].T @ r[rows]``, ``n_experts``
    experts) runs on the warp-specialized Gluon kernel (``kernels_gluon``) instead of torch's
    grouped GEMM: never with the ``gluon`` setting (``TritonBackend.Config.gluon``) False; on a
    Hopper GPU in bf16/fp16 wherever both operands suit TMA (contiguous, 16-byte aligned, O and I
    multiples of 8) with True, and with None (auto) there from
    :data:`GLUON_MIN_ROWS_PER_EXPERT` rows per expert on. True where the kernel cannot run at
    all raises."""
    v = tiles.get("gluon") if tiles else None
    if v == (0,) or not _gluon_can_run(v, l_NO):
        return False
    if v is None and l_NO.shape[0] < GLUON_MIN_ROWS_PER_EXPERT * n_experts:
        return False
    return all(t.dtype == l_NO.dtype and t.is_contiguous() and t.data_ptr() % 16 == 0
               and t.shape[1] % 8 == 0 for t in (l_NO, r_NI))


# ``gluon=None`` (auto) gathers in the Gluon weight-grad kernel only where both widths are at most
# this (fine-grained experts). H200, bf16, the layer's forward+backward, in-kernel gather on / off
# (5 alternated rounds, best): Qwen3 7.09 / 7.39 ms (peak 1.63 / 2.13 GiB above the inputs), OLMoE
# 9.16 / 9.27; but GPT-OSS 17.53 / 17.29, Mixtral 28.44 / 27.36, DeepSeek-64e 31.16 / 30.64
GLUON_GATHER_MAX_DIM = 2048


def gluon_gather_wanted(tiles: dict | None, gathered: torch.Tensor, other: torch.Tensor,
                        n_rows: int, n_experts: int) -> bool:
    """Whether a weight grad with one operand gathered by token and neither scaled by the
    routing weight (``dW[e] = L[rows].T @ R[rows]``, the forward's down projection's
    ``gout[tok].T @ a`` and the up projection's ``dH.T @ x[tok]``) runs on the Gluon kernel with
    the gather in its loader (``kernels_gluon``, ``cp.async``; no gathered copy) instead of
    ``dw_kernel`` or a gathered copy: never with the ``gluon`` setting False; on a Hopper GPU in
    bf16/fp16 wherever both operands suit its copies (rows contiguous and 16-byte aligned,
    widths multiples of 8) with True, and with
    None (auto) there from :data:`GLUON_MIN_ROWS_PER_EXPERT` rows per expert on, with both
    widths at most :data:`GLUON_GATHER_MAX_DIM`, when no weight-grad tile was given
    (``dw_tile``). H200, bf16, that GEMM alone
    (``benchmarks/dw_ab.py --gluon``, ``benchmarks/results/H200-s12-dw-ab.json``): the down
    projection's at Qwen3 0.750 ms against 0.892 on ``dw_kernel``, OLMoE 0.987 / 1.059; the up
    projection's 1.519 against 1.540 over a gathered copy (the copy counted), OLMoE 1.923 /
    1.970. True where the kernel cannot run at all raises."""
    v = tiles.get("gluon") if tiles else None
    if v == (0,) or not _gluon_can_run(v, gathered):
        return False
    if v is None and (n_rows < GLUON_MIN_ROWS_PER_EXPERT * n_experts or "dw" in (tiles or {})
                      or max(gathered.shape[1], other.shape[1]) > GLUON_GATHER_MAX_DIM):
        return False
    return other.dtype == gathered.dtype and all(
        _aligned(t, 1) and t.shape[1] % 8 == 0 for t in (gathered, other))


# ``gluon=None`` (auto) runs a plain row GEMM (no bias, no scatter) on the Gluon ping-pong kernel
# where the weight's I dim is contiguous (the forward's down projection) and its output width and
# reduction are both at most this: fine-grained experts, whose short main loops leave the
# epilogue most to hide. H200, bf16, the GEMM alone (``benchmarks/gemm_ab.py --gluon``,
# ``benchmarks/results/H200-s11-gemm-ab-gluon.json``): Qwen3's down projection 0.722 against
# 0.790 ms (0.407 / 0.420 at 512 rows per expert), OLMoE's 0.915 against 0.958; the input grad
# (the weight O-contiguous) no faster (1.441 / 1.480, 0.815 / 0.796, 1.825 / 1.831 ms), Mixtral's
# GEMMs 11% slower. Below 1024 rows per expert it is not taken: no faster in a Qwen3-sized model's
# training step at 512 (34.68 against 34.27 ms, medians of 25 steps), and 9-21% slower at decode
# sizes (T = 8 and 64: 3126 / 3905 GB/s against 3942 / 4273 in session 10's run)
GLUON_ROWS_MAX_DIM = 2048


def gluon_rows_wanted(tiles: dict | None, a_NI: torch.Tensor, w_EOI: torch.Tensor) -> bool:
    """Whether ``y[rows of e] = a[rows of e] @ w[e].T`` (no bias) runs on the Gluon ping-pong
    kernel (``kernels_gluon_rows``) instead of the Triton row GEMM: never with the ``gluon``
    setting False; on a Hopper GPU in bf16/fp16 wherever the operands suit TMA (a's rows
    contiguous, w's I or O dim contiguous, 16-byte aligned, O a multiple of 8) with True, and
    with None (auto) there where w's I dim is contiguous, O and I are both at most
    :data:`GLUON_ROWS_MAX_DIM`, there are at least :data:`GLUON_MIN_ROWS_PER_EXPERT` rows per
    expert and no Triton row-GEMM tile was given (``kind_tiles["rows"]`` or ``gemm_tile``: a
    tile asked for is a tile used). True where the kernel cannot run at all raises."""
    v = tiles.get("gluon") if tiles else None
    if v == (0,) or not _gluon_can_run(v, a_NI):
        return False
    E, O, I = w_EOI.shape
    if v is None and (max(O, I) > GLUON_ROWS_MAX_DIM or not _aligned(w_EOI, 2)
                      or a_NI.shape[0] < GLUON_MIN_ROWS_PER_EXPERT * E
                      or any(k in (tiles or {}) for k in ("rows", "gemm"))):
        return False
    return (w_EOI.dtype == a_NI.dtype and O % 8 == 0 and _aligned(a_NI, 1)
            and (_aligned(w_EOI, 2) or _aligned(w_EOI, 1)))
