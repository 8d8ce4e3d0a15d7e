"""Dispatch (permute) and combine (unpermute) over a RoutingPlan, scatter-free both ways.

``permute`` gathers each routed row's token; its backward sums each token's K row gradients
by a gather over ``inverse_TK`` (no atomics, fixed order). ``unpermute`` gathers each slot's
row back into ``[T, K, D]`` (zeros for dropped slots) and sums over K with the routing
weights in one batched matmul (fixed order, deterministic); its backward is a gather by
``sorted_slots_N``.
"""

from __future__ import annotations

import torch

from ..routing_plan import RoutingPlan, check_plan

__all__ = [
    "check_expert_down",
    "check_expert_up",
    "check_given_plan",
    "check_permute",
    "check_unpermute",
    "gather_slots",
    "permute",
    "row_weights",
    "unpermute",
]


# ---------------------------------------------------------------------------- argument checks
# Host-side and metadata-only (shapes, dtypes, devices): no device synchronisation.
def _check_2d(t: object, name: str, what: str, legend: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
    if t.dim() != 2:
        raise ValueError(f"{what}: {name} must be 2-D {legend}, got shape {tuple(t.shape)}")
    if not t.is_floating_point():
        raise TypeError(f"{what}: {name} must be a floating tensor, got {t.dtype}")


def _check_weights(topk_weights_TK, plan: RoutingPlan, like: torch.Tensor, what: str) -> None:
    if topk_weights_TK is None:
        return
    if not isinstance(topk_weights_TK, torch.Tensor):
        raise TypeError(f"{what}: topk_weights must be a tensor, got {type(topk_weights_TK).__name__}")
    if tuple(topk_weights_TK.shape) != (plan.num_tokens, plan.top_k):
        raise ValueError(
            f"{what}: topk_weights has shape {tuple(topk_weights_TK.shape)} but the routing plan "
            f"is for [T={plan.num_tokens}, K={plan.top_k}]"
        )
    if not topk_weights_TK.is_floating_point():
        raise TypeError(f"{what}: topk_weights must be a floating tensor, got {topk_weights_TK.dtype}")
    if topk_weights_TK.device != like.device:
        raise ValueError(f"{what}: topk_weights is on {topk_weights_TK.device} but the input is on {like.device}")


def _check_same_device(a: torch.Tensor, plan: RoutingPlan, what: str) -> None:
    if a.device != plan.sorted_slots_N.device:
        raise ValueError(f"{what}: the input is on {a.device} but the routing plan is on {plan.sorted_slots_N.device}")


def _check_grouped_linear(x_NI, w_EOI, plan, bias_EO, what: str) -> None:
    check_plan(plan, what)
    _check_2d(x_NI, "the input", what, "[N, in]")
    if not isinstance(w_EOI, torch.Tensor) or w_EOI.dim() != 3:
        raise ValueError(
            f"{what}: the expert weights must be a 3-D tensor [E, out, in], got "
            f"{tuple(w_EOI.shape) if isinstance(w_EOI, torch.Tensor) else type(w_EOI).__name__}"
        )
    plan.check_rows(x_NI.shape[0], f"{what}: the input")
    plan.check_experts(w_EOI.shape[0], f"{what}: the weight")
    E, O, I = w_EOI.shape
    if x_NI.shape[1] != I:
        raise ValueError(f"{what}: the input has {x_NI.shape[1]} features but the weight [E, out, in] is {tuple(w_EOI.shape)}")
    if w_EOI.dtype != x_NI.dtype and not torch.is_autocast_enabled(x_NI.device.type):
        raise TypeError(f"{what}: the weight has dtype {w_EOI.dtype} but the input has {x_NI.dtype}; cast one of them")
    if w_EOI.device != x_NI.device:
        raise ValueError(f"{what}: the weight is on {w_EOI.device} but the input is on {x_NI.device}")
    _check_same_device(x_NI, plan, what)
    if bias_EO is not None and tuple(bias_EO.shape) != (E, O):
        raise ValueError(f"{what}: the bias must be [E, out]=({E}, {O}), got {tuple(bias_EO.shape)}")


def check_expert_up(x_ND, w_up_EHD, plan, bias_EH, gated: bool) -> None:
    """The arguments of ``expert_up`` agree with each other and with the plan."""
    _check_grouped_linear(x_ND, w_up_EHD, plan, bias_EH, "expert_up")
    if gated and w_up_EHD.shape[1] % 2:
        raise ValueError(
            f"expert_up: a gated activation needs an even number of up rows (2F), got {w_up_EHD.shape[1]}"
        )


def check_expert_down(h_NF, w_down_EDF, plan, bias_ED) -> None:
    """The arguments of ``expert_down`` agree with each other and with the plan."""
    _check_grouped_linear(h_NF, w_down_EDF, plan, bias_ED, "expert_down")


def check_given_plan(plan, topk_ids_TK: torch.Tensor, num_experts: int, what: str = "moe_experts") -> None:
    """A plan passed in (``plan=``) was made from ``topk_ids_TK`` for ``num_experts`` experts;
    nothing to check when ``plan`` is None (it is made from the ids)."""
    if plan is None:
        return
    check_plan(plan, what)
    plan.check_ids(topk_ids_TK, f"{what}: topk_ids")
    plan.check_experts(num_experts, f"{what}: the expert weights")
    _check_same_device(topk_ids_TK, plan, what)


def gather_slots(y_ND: torch.Tensor, inverse_TK: torch.Tensor, *, every_slot: bool = False
                 ) -> torch.Tensor:
    """``out[t, k] = y_ND[inverse_TK[t, k]]``, zero where the slot was dropped (-1).
    ``every_slot``: the caller knows that no slot was dropped (a plan with a row per slot):
    one gather, no zero row appended."""
    if y_ND.dim() != 2 or inverse_TK.dim() != 2:
        raise ValueError(
            f"gather_slots takes y [N, D] and inverse [T, K], got {tuple(y_ND.shape)} and {tuple(inverse_TK.shape)}"
        )
    T, K = inverse_TK.shape
    N, D = y_ND.shape
    # a host check on CPU only (on a GPU it would sync)
    on_cpu = inverse_TK.device.type == "cpu" and not torch.compiler.is_compiling()
    if on_cpu and inverse_TK.numel() and int(inverse_TK.max()) >= N:
        raise ValueError(f"gather_slots: inverse points at row {int(inverse_TK.max())} of y's {N} rows")
    if every_slot:
        return y_ND.index_select(0, inverse_TK.reshape(-1)).view(T, K, D)
    y_pad = torch.cat([y_ND, y_ND.new_zeros(1, D)])
    idx = torch.where(inverse_TK < 0, N, inverse_TK).reshape(-1)
    return y_pad.index_select(0, idx).view(T, K, D)


def _every_slot(plan: RoutingPlan) -> bool:
    """The plan has a row per slot (no drops, no zero experts): known on the host."""
    return not torch.compiler.is_compiling() and plan.num_rows == plan.num_tokens * plan.top_k


class _Permute(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD, token_ids_N, inverse_TK, every_slot):
        ctx.save_for_backward(inverse_TK)
        ctx.every_slot = every_slot
        return x_TD.index_select(0, token_ids_N)

    @staticmethod
    def backward(ctx, g_ND):
        (inverse_TK,) = ctx.saved_tensors
        g = gather_slots(g_ND.contiguous(), inverse_TK, every_slot=ctx.every_slot)
        return g.sum(1), None, None, None


class _GatherSlots(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_ND, inverse_TK, sorted_slots_N, every_slot):
        ctx.save_for_backward(sorted_slots_N)
        return gather_slots(y_ND, inverse_TK, every_slot=every_slot)

    @staticmethod
    def backward(ctx, g_TKD):
        (sorted_slots_N,) = ctx.saved_tensors
        T, K, D = g_TKD.shape
        return g_TKD.reshape(T * K, D).index_select(0, sorted_slots_N), None, None, None


def row_weights(topk_weights_TK: torch.Tensor, plan: RoutingPlan) -> torch.Tensor:
    """The routing weight of each routed row, ``[N]``."""
    return topk_weights_TK.reshape(-1).index_select(0, plan.sorted_slots_N)


def _check_stage(t, plan: RoutingPlan, topk_weights_TK, what: str, name: str, legend: str) -> None:
    check_plan(plan, what)
    _check_2d(t, name, what, legend)
    # permute takes one row per token, unpermute one per routed row
    (plan.check_tokens if what == "permute" else plan.check_rows)(t.shape[0], f"{what}: {name}")
    _check_same_device(t, plan, what)
    _check_weights(topk_weights_TK, plan, t, what)


def check_permute(x_TD, plan: RoutingPlan, topk_weights_TK=None) -> None:
    """The arguments of ``permute`` agree with each other and with the plan."""
    _check_stage(x_TD, plan, topk_weights_TK, "permute", "x", "[T, D]")


def check_unpermute(y_ND, plan: RoutingPlan, topk_weights_TK=None) -> None:
    """The arguments of ``unpermute`` agree with each other and with the plan."""
    _check_stage(y_ND, plan, topk_weights_TK, "unpermute", "the expert output", "[N, D]")


def permute(
    x_TD: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Rows of ``x_TD`` in expert order, ``[N, D]``; scaled by their routing weight when
    ``topk_weights_TK`` is given (routing weight on the expert input, as Llama 4 does)."""
    check_permute(x_TD, plan, topk_weights_TK)
    x_ND = _Permute.apply(x_TD, plan.token_ids_N, plan.inverse_TK, _every_slot(plan))
    if topk_weights_TK is not None:
        x_ND = x_ND * row_weights(topk_weights_TK, plan).to(x_ND.dtype).unsqueeze(-1)
    return x_ND


def unpermute(
    y_ND: torch.Tensor, plan: RoutingPlan, topk_weights_TK: torch.Tensor | None = None
) -> torch.Tensor:
    """Combine: ``out[t] = sum_k w[t, k] * y_ND[row(t, k)]`` (``w = 1`` when ``topk_weights_TK``
    is None), summed over k in a fixed order; dropped slots contribute zero."""
    check_unpermute(y_ND, plan, topk_weights_TK)
    rows_TKD = _GatherSlots.apply(y_ND, plan.inverse_TK, plan.sorted_slots_N, _every_slot(plan))
    if topk_weights_TK is None:
        return rows_TKD.sum(1)
    w_T1K = topk_weights_TK.to(y_ND.dtype).unsqueeze(1)
    return torch.bmm(w_T1K, rows_TKD).squeeze(1)
