"""The permute and unpermute stages on the Triton kernels (``TritonBackend.permute`` and
``.unpermute``; the plain PyTorch ones are in ``moekit.ops.stages``): one pass each way. The
unpermute is the fused path's combine (a weighted sum over k in a fixed order); its backward
gathers the output grad by token scaled by the routing weight, and the routing-weight grad is
the combine kernel's dot. Expert parallelism's sender runs them around the exchanges.
"""

from __future__ import annotations

import torch

from . import launchers as L
from .custom_ops import combine_op

__all__ = ["permute", "unpermute"]


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, w_TK, token_ids_N, sorted_slots_N, inverse_TK):
        roww = None if w_TK is None else w_TK.reshape(-1).float().index_select(0, sorted_slots_N)
        ctx.save_for_backward(x_TD if w_TK is not None else None, w_TK, inverse_TK)
        return L.gather_rows(x_TD, token_ids_N, roww)

    @staticmethod
    def backward(ctx, g_ND):
        x_TD, w_TK, inverse_TK = ctx.saved_tensors
        g_ND = g_ND.contiguous()
        want_w = w_TK is not None and ctx.needs_input_grad[1]
        dx, dot = combine_op(g_ND, inverse_TK, w_TK, x_TD if want_w else None)
        return dx, (dot.to(w_TK.dtype) if want_w else None), None, None, None


class _Unpermute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, w_TK, token_ids_N, sorted_slots_N, inverse_TK):
        ctx.save_for_backward(y_ND if w_TK is not None else None, w_TK, token_ids_N,
                              sorted_slots_N, inverse_TK)
        return combine_op(y_ND, inverse_TK, w_TK, None)[0]

    @staticmethod
    def backward(ctx, g_TD):
        y_ND, w_TK, token_ids_N, sorted_slots_N, inverse_TK = ctx.saved_tensors
        g_TD = g_TD.contiguous()
        roww = None if w_TK is None else w_TK.reshape(-1).float().index_select(0, sorted_slots_N)
        dy = L.gather_rows(g_TD, token_ids_N, roww) if ctx.needs_input_grad[0] else None
        dw = None
        if w_TK is not None and ctx.needs_input_grad[1]:
            dw = combine_op(y_ND, inverse_TK, None, g_TD)[1].to(w_TK.dtype)
        return dy, dw, None, None, None


def permute(x_TD, plan, topk_weights_TK=None) -> torch.Tensor:
    """``moekit.ops.stages.permute`` (arguments already checked) in one gather pass."""
    return _Permute.apply(x_TD, topk_weights_TK, plan.token_ids_N, plan.sorted_slots_N,
                          plan.inverse_TK)


def unpermute(y_ND, plan, topk_weights_TK=None) -> torch.Tensor:
    """``moekit.ops.stages.unpermute`` (arguments already checked) as the combine kernel."""
    return _Unpermute.apply(y_ND, topk_weights_TK, plan.token_ids_N, plan.sorted_slots_N,
                            plan.inverse_TK)
