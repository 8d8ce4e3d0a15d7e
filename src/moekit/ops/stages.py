"""Dispatch (permute) and combine (unpermute) over a RoutingPlan, scatter-free both ways.

``permute`` gathers each routed row's token; its backward sums each token's K row gradients
by a gather over ``inverse_TK`` (no atomics, fixed order). ``unpermute`` gathers each slot's
row back into ``[T, K, D]`` (zeros for dropped slots) and sums over K with the routing
weights in one batched matmul (fixed order, deterministic); its backward is a gather by
``sorted_slots_N``.
"""

from __future__ import annotations

import torch

from ..plan import RoutingPlan

__all__ = ["permute", "unpermute", "gather_slots", "row_weights"]


def gather_slots(y_ND: torch.Tensor, inverse_TK: torch.Tensor) -> torch.Tensor:
    """``out[t, k] = y_ND[inverse_TK[t, k]]``, zero where the slot was dropped (-1)."""
    T, K = inverse_TK.shape
    N, D = y_ND.shape
    y_pad = torch.cat([y_ND, y_ND.new_zeros(1, D)])
    idx = torch.where(inverse_TK < 0, N, inverse_TK).reshape(-1)
    return y_pad.index_select(0, idx).view(T, K, D)


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_ids_N, inverse_TK):
        ctx.save_for_backward(inverse_TK)
        return x_TD.index_select(0, token_ids_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inverse_TK,) = ctx.saved_tensors
        return gather_slots(g_ND.contiguous(), inverse_TK).sum(1), None, None


class _GatherSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, inverse_TK, sorted_slots_N):
        ctx.save_for_backward(sorted_slots_N)
        return gather_slots(y_ND, inverse_TK)

    @staticmethod
    def backward(ctx, g_TKD):
        (sorted_slots_N,) = ctx.saved_tensors
        T, K, D = g_TKD.shape
        return g_TKD.reshape(T * K, D).index_select(0, sorted_slots_N), None, None


def row_weights(topk_weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """The routing weight of each routed row, ``[N]``."""
    return topk_weights_TK.reshape(-1).index_select(0, plan.sorted_slots_N)


def permute(
    x_TD: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of ``x_TD`` in expert order, ``[N, D]``; scaled by their routing weight when
    ``topk_weights_TK`` is given (routing weight on the expert input, as Llama 4 does)."""
    x_ND = _Permute.apply(x_TD, plan.token_ids_N, plan.inverse_TK)
    if topk_weights_TK is not None:
        x_ND = x_ND * row_weights(topk_weights_TK, plan).to(x_ND.dtype).unsqueeze(-1)
    return x_ND


def unpermute(
    y_ND: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine: ``out[t] = sum_k w[t, k] * y_ND[row(t, k)]`` (``w = 1`` when ``topk_weights_TK``
    is None), summed over k in a fixed order; dropped slots contribute zero."""
    rows_TKD = _GatherSlots.apply(y_ND, plan.inverse_TK, plan.sorted_slots_N)
    if topk_weights_TK is None:
        return rows_TKD.sum(1)
    w_T1K = topk_weights_TK.to(y_ND.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, rows_TKD).squeeze(1)
