"""The triton backend's grouped linear layer (the staged path: ``expert_up`` / ``expert_down``,
and the transformers experts function with a family's own gate).

Forward: ``rows_gemm`` (``y[rows of e] = x[rows of e] @ w[e].T + b[e]``). Backward: dX by
``rows_gemm`` on the transposed weight view (no copy), dW by the weight-grad launcher
(``dw_kernel``, or torch grouped_mm where ``TritonBackend.Config.dw`` chooses it) and the bias
grad by its segment-sum kernel, both deterministic.
"""

from __future__ import annotations

import torch

from ...routing_plan import RoutingPlan
from ..triton_settings import parse_tiles
from . import weight_grads as W
from .custom_ops import rows_gemm_op, weight_grad_op

__all__ = ["GroupedLinear", "triton_grouped_linear"]


class GroupedLinear(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_NI, w_EOI, bias_EO, counts_E, offsets_E, cublas, rows_cublas, tiles):
        ctx.save_for_backward(x_NI, w_EOI, counts_E, offsets_E)
        ctx.has_bias, ctx.cublas, ctx.tiles = bias_EO is not None, cublas, tiles
        ctx.rows_cublas = rows_cublas
        ctx.bias_dtype = None if bias_EO is None else bias_EO.dtype
        return rows_gemm_op(x_NI, w_EOI, bias_EO, counts_E, offsets_E, tiles)

    @staticmethod
    def backward(ctx, g_NO):
        x_NI, w_EOI, counts_E, offsets_E = ctx.saved_tensors
        need = ctx.needs_input_grad
        g_NO = g_NO.to(x_NI.dtype).contiguous()
        dx = dw = db = None
        if need[0]:
            if ctx.rows_cublas:
                dx = W.grouped_mm(g_NO, w_EOI, offsets_E)
            else:
                dx = rows_gemm_op(g_NO, w_EOI.transpose(1, 2), None, counts_E, offsets_E, ctx.tiles)
        if need[1] or need[2]:
            dw, db = weight_grad_op(g_NO, None, x_NI, None, None, False, counts_E, offsets_E,
                                    ctx.has_bias, ctx.cublas, ctx.tiles)
            dw = dw.to(w_EOI.dtype)
            db = db.to(ctx.bias_dtype) if ctx.has_bias else None
        return dx, dw if need[1] else None, db if need[2] else None, None, None, None, None, None


def triton_grouped_linear(
    x_NI: torch.Tensor,
    w_EOI: torch.Tensor,
    plan: RoutingPlan,
    bias_EO: torch.Tensor | None = None,
    *,
    config=None,
    tiles: str | None = None,
) -> torch.Tensor:
    """``y[rows of e] = x[rows of e] @ w[e].T (+ bias[e])`` for the plan's rows (sorted by
    expert) in the Triton kernels, differentiable in x, w and the bias. ``config``: a
    ``TritonBackend.Config`` (its ``dw`` and tiles are used; default settings when None)."""
    from ..triton_backend import TritonBackend

    s = TritonBackend.Config() if config is None else config
    if x_NI.dim() != 2 or w_EOI.dim() != 3 or x_NI.shape[1] != w_EOI.shape[2]:
        raise ValueError(
            f"grouped_linear: x must be [N, I] and w [E, O, I]; got {tuple(x_NI.shape)} and "
            f"{tuple(w_EOI.shape)}"
        )
    if bias_EO is not None and tuple(bias_EO.shape) != tuple(w_EOI.shape[:2]):
        raise ValueError(f"grouped_linear: bias must be [E, O]={tuple(w_EOI.shape[:2])}, got {tuple(bias_EO.shape)}")
    E, O, I = w_EOI.shape
    cublas = W.dw_uses_grouped_mm(x_NI.shape[0], E, I, O, x_NI.dtype, x_NI.device, s.dw)
    tiles = s.tiles_spec() if tiles is None else tiles
    rows_cublas = W.rows_on_cublas(cublas, parse_tiles(tiles), x_NI, x_NI.shape[0], E)
    return GroupedLinear.apply(x_NI, w_EOI, bias_EO, plan.counts_E, plan.offsets_E, cublas,
                               rows_cublas, tiles)
