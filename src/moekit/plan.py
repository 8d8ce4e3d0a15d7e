"""make_plan: builds the RoutingPlan of a batch's top-k ids, once.

Legend: T tokens, K top-k, E experts, N = number of kept routed rows (T*K minus drops).
The plan itself, what its fields mean and its agreement checks are in ``routing_plan.py``
(:class:`RoutingPlan`, :func:`ids_fingerprint`, :func:`check_plan`); the capacity rules are
in ``capacity.py`` (:data:`DROP_POLICIES`, :func:`capacity_for`,
:func:`sequence_capacity_keep`). This module holds :func:`make_plan` (a stable sort by
expert, int32 counts/offsets with an overflow guard, the inverse permutation, capacity drops
by position or weight, padding to a multiple, zero-computation experts),
:func:`prepare_plan` / :class:`PreparedPlan` (the same plan in two steps, for expert
parallelism) and :func:`count_per_expert`; it re-exports the names of the other two modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .capacity import DROP_POLICIES, capacity_for, sequence_capacity_keep
from .routing_plan import RoutingPlan, check_plan, ids_fingerprint

__all__ = [
    "DROP_POLICIES",
    "RoutingPlan",
    "capacity_for",
    "sequence_capacity_keep",
    "check_plan",
    "count_per_expert",
    "ids_fingerprint",
    "make_plan",
    "prepare_plan",
    "PreparedPlan",
]

_INT32_MAX = 2**31 - 1


def count_per_expert(
    ids: torch.Tensor, num_experts: int, weights: torch.Tensor | None = None,
    dtype: torch.dtype = torch.int64,
) -> torch.Tensor:
    """``[E]`` occurrences of each expert id in ``ids`` (in ``dtype``), or the sum of ``weights``
    per id (their dtype). Unlike ``torch.bincount`` on CUDA this never syncs with the host
    (bincount reads the largest id back to size its output) and is deterministic for integer
    counts."""
    ids = ids.reshape(-1)
    if ids.dtype != torch.int64:
        ids = ids.to(torch.int64)
    src = torch.ones_like(ids, dtype=dtype) if weights is None else weights.reshape(-1)
    out = torch.zeros(num_experts, dtype=src.dtype, device=ids.device)
    return out.scatter_add_(0, ids, src)


def _argsort(ids: torch.Tensor, n_ids: int) -> torch.Tensor:
    """Stable argsort of ids in ``[0, n_ids)``. On an accelerator, many int64 ids are sorted
    as int32: the same order, half the radix passes (65536 ids on an H200: 138 -> 84 us)."""
    if (ids.dtype == torch.int64 and ids.device.type != "cpu" and ids.numel() >= 4096
            and n_ids <= _INT32_MAX):
        ids = ids.to(torch.int32)
    return torch.argsort(ids, stable=True)


def make_plan(
    topk_ids_TK: torch.Tensor,
    num_experts: int,
    *,
    capacity_factor: float | None = None,
    drop_policy: str = "position",
    topk_weights_TK: torch.Tensor | None = None,
    pad_to_multiple: int = 1,
    capacity: int | None = None,
    num_zero_experts: int = 0,
    num_real_slots: int | None = None,
    check_ids: bool = True,
) -> RoutingPlan:
    """Build the plan for ``topk_ids_TK`` ([T, K] expert ids in [0, E), or [0, E + Z) with
    ``num_zero_experts`` Z: slots of the zero-computation experts ``[E, E + Z)`` get no row).

    ``capacity_factor=None`` is dropless. Otherwise each expert keeps at most
    ``capacity_for(T, K, E, capacity_factor)`` rows; with ``drop_policy="position"`` the earliest
    tokens are kept (GShard), with ``"weight"`` the rows of highest routing weight (needs
    ``topk_weights_TK``). Dropped slots get zero expert output. ``capacity`` gives the rows per
    expert directly instead of ``capacity_factor`` (expert parallelism: a rank's received rows
    are dropped by the capacity of the whole layer's batch). ``num_real_slots``: with zero
    experts, how many slots name a real expert, when the caller knows it (expert parallelism's
    counts exchange does): the plan then needs no host sync (on CUDA, cutting the zero experts'
    slots otherwise reads their number back). ``check_ids=False`` skips the range check of
    the ids (a device-side assert on accelerators: four small kernels), for ids the caller
    built from checked ones (expert parallelism's slot tables).
    """
    if topk_ids_TK.dim() != 2:
        raise ValueError(f"topk_ids must be [T, K], got shape {tuple(topk_ids_TK.shape)}")
    if topk_ids_TK.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"topk_ids must be int32 or int64, got {topk_ids_TK.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts <= 0:
        raise ValueError(f"num_experts={num_experts!r}; it must be a positive integer")
    if not isinstance(pad_to_multiple, int) or pad_to_multiple < 1:
        raise ValueError(f"pad_to_multiple={pad_to_multiple!r}; it must be an integer >= 1")
    if drop_policy not in DROP_POLICIES:
        raise ValueError(f"drop_policy={drop_policy!r} is unknown; allowed: {DROP_POLICIES}")
    if isinstance(num_zero_experts, bool) or not isinstance(num_zero_experts, int) or num_zero_experts < 0:
        raise ValueError(f"num_zero_experts={num_zero_experts!r}; it must be an integer >= 0")
    if num_real_slots is not None and (isinstance(num_real_slots, bool) or not isinstance(num_real_slots, int)
                                       or not 0 <= num_real_slots <= topk_ids_TK.numel()):
        raise ValueError(f"num_real_slots={num_real_slots!r}; it must be an integer in [0, T*K="
                         f"{topk_ids_TK.numel()}]")
    T, K = topk_ids_TK.shape
    if T * K + num_experts * pad_to_multiple > _INT32_MAX:
        raise ValueError(
            f"T*K={T * K} routed rows overflow the int32 offsets grouped GEMMs use; "
            "split the batch into chunks of fewer tokens"
        )
    if capacity_factor is not None:
        if capacity is not None:
            raise ValueError("make_plan: pass capacity_factor or capacity, not both")
        if not (isinstance(capacity_factor, (int, float)) and not isinstance(capacity_factor, bool)
                and 0 < capacity_factor < math.inf):
            raise ValueError(f"capacity_factor={capacity_factor!r}; it must be a finite number > 0 (or None)")
        capacity = capacity_for(T, K, num_experts, capacity_factor)
    elif capacity is not None and (isinstance(capacity, bool) or not isinstance(capacity, int)
                                   or capacity < 0):
        raise ValueError(f"capacity={capacity!r}; it must be an integer >= 0 (or None)")
    device = topk_ids_TK.device
    if device.type == "meta":
        raise ValueError("topk_ids are on the meta device (no values): a routing plan needs real ids")
    keys = flat = topk_ids_TK.reshape(-1)
    if flat.dtype != torch.int64:
        flat = flat.to(torch.int64)
    n_ids = num_experts + num_zero_experts
    if check_ids and flat.numel() > 0 and not torch.compiler.is_compiling():
        if flat.device.type == "cpu":
            lo, hi = int(flat.min()), int(flat.max())
            if lo < 0 or hi >= n_ids:
                raise ValueError(
                    f"topk_ids must lie in [0, {n_ids}); found values in [{lo}, {hi}]"
                )
        else:  # no host sync on accelerators: a device-side check
            torch._assert_async(
                (flat.min() >= 0) & (flat.max() < n_ids), "topk_ids out of [0, num_experts)"
            )

    if capacity is not None and drop_policy == "weight":
        if topk_weights_TK is None or topk_weights_TK.shape != topk_ids_TK.shape:
            raise ValueError('drop_policy="weight" needs topk_weights of the same shape as topk_ids')
        # sort by expert, then by descending weight within each expert (stable)
        by_weight = torch.argsort(-topk_weights_TK.reshape(-1).float(), stable=True)
        order = by_weight[torch.argsort(flat[by_weight], stable=True)]
    else:
        order = _argsort(keys, n_ids)
    sorted_experts = flat.index_select(0, order)
    # (few ops, each a launch on an accelerator: the counts made in the plan's int32 at once)
    counts_all = count_per_expert(flat, n_ids, dtype=torch.int32)
    if num_zero_experts:  # the zero experts' slots sort last: no rows for them
        n_real = int((flat < num_experts).sum()) if num_real_slots is None else num_real_slots
        order, sorted_experts = order[:n_real], sorted_experts[:n_real]
        counts_all = counts_all[:num_experts]

    if capacity is None:
        counts = counts_all
        num_dropped = torch.zeros((), dtype=torch.int64, device=device)
    else:
        starts_all = torch.cumsum(counts_all, 0) - counts_all
        # (the zero experts' slots sorted last and were cut: the kept order is a prefix)
        rank = torch.arange(order.numel(), device=device) - starts_all[sorted_experts]
        keep_sorted = rank < capacity
        order = order[keep_sorted]
        sorted_experts = sorted_experts[keep_sorted]
        counts = counts_all.clamp(max=capacity)
        num_dropped = counts_all.sum() - counts.sum()

    N = order.numel()
    rows = torch.arange(N, dtype=torch.int64, device=device)
    if capacity is None and not num_zero_experts:  # every slot has a row: no -1 to fill in
        inverse = torch.empty(T * K, dtype=torch.int64, device=device).scatter_(0, order, rows)
    else:
        inverse = torch.full((T * K,), -1, dtype=torch.int64, device=device)
        inverse[order] = rows
    offsets = torch.cumsum(counts, 0, dtype=torch.int32)
    plan = RoutingPlan(
        num_tokens=T,
        top_k=K,
        num_experts=num_experts,
        sorted_slots_N=order,
        token_ids_N=torch.div(order, K, rounding_mode="floor") if K > 1 else order,
        expert_ids_N=sorted_experts,
        counts_E=counts,
        offsets_E=offsets,
        inverse_TK=inverse.view(T, K),
        num_dropped=num_dropped,
        capacity=capacity,
        pad_to_multiple=pad_to_multiple,
    )
    if pad_to_multiple > 1:
        padded_counts = (counts + pad_to_multiple - 1) // pad_to_multiple * pad_to_multiple
        padded_offsets = torch.cumsum(padded_counts, 0)
        padded_starts = padded_offsets - padded_counts
        row_rank = torch.arange(N, device=device) - (offsets - counts)[sorted_experts]
        plan.padded_rows_N = padded_starts[sorted_experts] + row_rank
        plan.padded_offsets_E = padded_offsets.to(torch.int32)
        plan.num_padded_rows = N + num_experts * (pad_to_multiple - 1)
    return plan.record_ids(topk_ids_TK)


@dataclass
class PreparedPlan:
    """:func:`prepare_plan`'s plan before its cut (a row per slot, the zero experts' last)."""

    plan: RoutingPlan  # every slot's row, the zero experts' included (inverse: -1 for them)

    def finish(self, num_real_slots: int) -> RoutingPlan:
        """``make_plan(..., num_real_slots=num_real_slots)``'s plan, of views (no device op)."""
        p, n = self.plan, num_real_slots
        return RoutingPlan(
            num_tokens=p.num_tokens, top_k=p.top_k, num_experts=p.num_experts,
            sorted_slots_N=p.sorted_slots_N[:n], token_ids_N=p.token_ids_N[:n],
            expert_ids_N=p.expert_ids_N[:n], counts_E=p.counts_E, offsets_E=p.offsets_E,
            inverse_TK=p.inverse_TK, num_dropped=p.num_dropped, ids_key=p.ids_key,
        )


def prepare_plan(topk_ids_TK: torch.Tensor, num_experts: int, *,
                 num_zero_experts: int = 1) -> PreparedPlan:
    """``make_plan(topk_ids_TK, num_experts, num_zero_experts=Z, check_ids=False)`` (dropless)
    in two steps, for a caller that learns the number of real slots later (expert
    parallelism's token exchange, from its counts exchange): the device work is queued now,
    and ``finish(num_real_slots)`` cuts the plan to its rows without a device op or a host
    sync. The plan includes every zero expert's slot until then (``plan.num_rows`` = T*K)."""
    plan = make_plan(topk_ids_TK, num_experts, num_zero_experts=num_zero_experts,
                     num_real_slots=topk_ids_TK.numel(), check_ids=False)
    plan.inverse_TK.masked_fill_(topk_ids_TK >= num_experts, -1)  # the zero experts' slots
    return PreparedPlan(plan)
