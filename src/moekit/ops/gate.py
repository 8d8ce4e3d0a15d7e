"""The router's gate matmul in float32 for bfloat16 inputs, on tensor cores.

``logits = x @ W.T (+ b)`` with ``router_dtype=float32`` means: upcast x and W, multiply in
fp32. When x and W are bfloat16 the upcast is exact and so is every product (8 + 8 mantissa
bits fit fp32's 24), so a bf16 tensor-core GEMM that accumulates and returns fp32 computes the
same thing (up to the summation order) at ~10x the speed of an fp32 GEMM on an H100.

Backward: the fp32 logit gradient ``G`` is split into two bf16 terms ``G = hi + lo + r`` with
``|r| <= 2**-16 |G|`` (hi keeps its top 8 mantissa bits, lo the next 8), and each grad is the sum
of two bf16 GEMMs with fp32 accumulation; the results are then rounded to the bf16 dtype of
x and W, whose own rounding (``2**-9``) is far larger than the split's.
"""

from __future__ import annotations

import torch

__all__ = ["fp32_gate_applies", "fp32_gate_logits"]

_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")  # torch.mm(a, b, out_dtype=...): CUDA only


def _mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """``a @ b`` accumulated and returned in fp32 (exact products for bf16 inputs)."""
    if a.is_cuda and _MM_OUT_DTYPE:
        return torch.mm(a, b, out_dtype=torch.float32)
    return torch.mm(a.float(), b.float())


def _split(g: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    hi = g.to(dtype)
    return hi, (g - hi.float()).to(dtype)


class _Fp32Gate(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_ED, b_E):
        ctx.save_for_backward(x_TD, w_ED)
        ctx.bias_dtype = None if b_E is None else b_E.dtype
        logits = _mm_f32(x_TD, w_ED.t())
        return logits if b_E is None else logits + b_E.float()

    @staticmethod
    def backward(ctx, g_TE):
        x_TD, w_ED = ctx.saved_tensors
        need = ctx.needs_input_grad
        hi, lo = _split(g_TE.float(), x_TD.dtype)
        dx = dw = db = None
        if need[0]:
            dx = (_mm_f32(hi, w_ED) + _mm_f32(lo, w_ED)).to(x_TD.dtype)
        if need[1]:
            dw = (_mm_f32(hi.t(), x_TD) + _mm_f32(lo.t(), x_TD)).to(w_ED.dtype)
        if ctx.bias_dtype is not None and need[2]:
            db = g_TE.float().sum(0).to(ctx.bias_dtype)
        return dx, dw, db


def fp32_gate_applies(x_TD: torch.Tensor, weight: torch.Tensor) -> bool:
    """Whether :func:`fp32_gate_logits` runs (bf16 x and gate weight on a CUDA device with
    ``torch.mm(..., out_dtype=)``); elsewhere the caller upcasts and runs an fp32 GEMM."""
    return (x_TD.is_cuda and _MM_OUT_DTYPE and x_TD.dtype == torch.bfloat16
            and weight.dtype == torch.bfloat16)


def fp32_gate_logits(
    x_TD: torch.Tensor, weight_ED: torch.Tensor, bias_E: torch.Tensor | None = None
) -> torch.Tensor:
    """fp32 ``x @ W.T + b`` for bf16 ``x``/``W`` (see the module docstring); differentiable in
    all three (the bias grad is summed in fp32)."""
    return _Fp32Gate.apply(x_TD, weight_ED, bias_E)
