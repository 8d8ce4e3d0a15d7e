"""The ``grouped_mm`` backend: torch's grouped GEMM, forward and backward, on CUDA and CPU.

torch's grouped GEMM wants 16-byte aligned strides and, on CPU, contiguous gradients; this
wrapper pads odd inner dims with zeros (only where needed: real model dims are aligned) and
computes both gradients itself, also as grouped GEMMs, so the same code runs everywhere.
The bias gradient is a segment sum over each expert's rows (deterministic).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["grouped_linear_mm", "grouped_mm_available"]

_grouped_mm = getattr(F, "grouped_mm", None) or getattr(torch, "_grouped_mm", None)


def grouped_mm_available(device: torch.device, dtype: torch.dtype | None = None) -> bool:
    """torch's grouped GEMM runs float32/bfloat16/float16 on CPU and bfloat16 on CUDA (SM>=80);
    under torch.compile bfloat16 only (its meta function, which tracing runs, takes no other)."""
    if _grouped_mm is None:
        return False
    if device.type == "cpu":
        if torch.compiler.is_compiling():
            return dtype in (None, torch.bfloat16)
        return dtype in (None, torch.float32, torch.bfloat16, torch.float16)
    if device.type == "cuda":
        return dtype in (None, torch.bfloat16) and torch.cuda.get_device_capability(device)[0] >= 8
    return False


def _align(n: int, dtype: torch.dtype) -> int:
    m = max(1, 16 // torch.empty((), dtype=dtype).element_size())
    return (n + m - 1) // m * m


def _pad_last(t: torch.Tensor, n: int) -> torch.Tensor:
    return t if t.shape[-1] == n else F.pad(t, (0, n - t.shape[-1]))


class _GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EOI, offsets_E):
        N, I = x_NI.shape
        O = w_EOI.shape[1]
        Ip, Op = _align(I, x_NI.dtype), _align(O, x_NI.dtype)
        ctx.save_for_backward(x_NI, w_EOI, offsets_E)
        if N == 0:
            return x_NI.new_zeros(0, O)
        x = _pad_last(x_NI, Ip).contiguous()
        w = _pad_last(w_EOI, Ip)
        if Op != O:
            w = F.pad(w, (0, 0, 0, Op - O))
        y = _grouped_mm(x, w.transpose(-2, -1), offs=offsets_E)
        return y[:, :O] if Op != O else y

    @staticmethod
    def backward(ctx, g_NO):
        x_NI, w_EOI, offsets_E = ctx.saved_tensors
        N, I = x_NI.shape
        O = w_EOI.shape[1]
        if N == 0:
            return x_NI.new_zeros(0, I), torch.zeros_like(w_EOI), None
        Ip, Op = _align(I, x_NI.dtype), _align(O, x_NI.dtype)
        g = _pad_last(g_NO.to(x_NI.dtype), Op).contiguous()
        dx = dw = None
        if ctx.needs_input_grad[0]:
            w = _pad_last(w_EOI, Ip)
            if Op != O:
                w = F.pad(w, (0, 0, 0, Op - O))
            dx = _grouped_mm(g, w.contiguous(), offs=offsets_E)[:, :I]
        if ctx.needs_input_grad[1]:
            x = _pad_last(x_NI, Ip).contiguous()
            dw = _grouped_mm(g.transpose(0, 1), x, offs=offsets_E)[:, :O, :I]
        return dx, dw, None


class _SegmentBias(torch.autograd.Function):
    """``y + bias[expert of each row]`` with a deterministic segment-sum gradient."""

    @staticmethod
    def forward(ctx, y_NO, bias_EO, expert_ids_N, counts_E):
        ctx.save_for_backward(counts_E)
        ctx.bias_dtype = bias_EO.dtype
        return y_NO + bias_EO.index_select(0, expert_ids_N).to(y_NO.dtype)

    @staticmethod
    def backward(ctx, g_NO):
        (counts_E,) = ctx.saved_tensors
        db = torch.segment_reduce(g_NO.float(), "sum", lengths=counts_E.to(torch.int64), axis=0)
        return g_NO, db.to(ctx.bias_dtype), None, None


def add_expert_bias(y_NO, bias_EO, expert_ids_N, counts_E):
    return _SegmentBias.apply(y_NO, bias_EO, expert_ids_N, counts_E)


def grouped_linear_mm(
    x_NI: torch.Tensor,
    w_EOI: torch.Tensor,
    offsets_E: torch.Tensor,
    *,
    bias_EO: torch.Tensor | None = None,
    expert_ids_N: torch.Tensor | None = None,
    counts_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x[rows of e] @ w[e].T (+ bias[e])`` as one grouped GEMM; rows sorted by expert and
    ``offsets_E`` the int32 end offsets (last == N)."""
    y = _GroupedLinear.apply(x_NI, w_EOI, offsets_E)
    if bias_EO is not None:
        y = add_expert_bias(y, bias_EO, expert_ids_N, counts_E)
    return y
