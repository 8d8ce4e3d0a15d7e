"""RoutingPlan: the one description of where every routed row goes, computed once.

Legend: T tokens, K top-k, E experts, N = number of kept routed rows (T*K minus drops).
A routed row is a (token, k) "slot", numbered ``slot = t * K + k``.

The plan sorts slots by expert (stably, so within an expert rows keep token order; with
capacity and ``drop_policy="weight"`` they are in descending weight order instead), gives
per-expert counts and offsets (int32, as grouped GEMMs want them), the inverse permutation
(slot -> row, or -1 when the slot was dropped by capacity), and optionally a padded layout
where every expert's rows start at a multiple of ``pad_to_multiple`` (for kernels that want
aligned groups). With ``num_zero_experts`` Z the ids may also name Z zero-computation
experts ``[E, E + Z)``: their slots get no row (inverse -1, like a dropped slot, not counted
in ``num_dropped``, not counted against a capacity); the caller adds their contribution
(``GroupedExperts`` does; expert parallelism's token exchange marks a slot held by another
rank so).

This module holds the plan's dataclass, :class:`RoutingPlan` (with its host-side agreement
checks), :func:`ids_fingerprint` (which ids tensor a plan was made from) and
:func:`check_plan`; ``plan.py`` builds plans (``make_plan``, ``prepare_plan``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

__all__ = ["RoutingPlan", "check_plan", "ids_fingerprint"]


@dataclass
class RoutingPlan:
    num_tokens: int
    top_k: int
    num_experts: int
    sorted_slots_N: torch.Tensor  # int64 [N]: slot id (t*K+k) of each row, in expert order
    token_ids_N: torch.Tensor  # int64 [N]: token of each row (sorted_slots_N // K)
    expert_ids_N: torch.Tensor  # int64 [N]: expert of each row (non-decreasing)
    counts_E: torch.Tensor  # int32 [E]: kept rows per expert
    offsets_E: torch.Tensor  # int32 [E]: end offset of each expert's rows (cumsum of counts)
    inverse_TK: torch.Tensor  # int64 [T, K]: row of each slot, -1 if dropped
    num_dropped: torch.Tensor  # int64 []: slots dropped by capacity (0 when dropless)
    capacity: int | None = None  # rows each expert keeps at most; None when dropless
    pad_to_multiple: int = 1
    padded_rows_N: torch.Tensor | None = None  # int64 [N]: row position in the padded layout
    padded_offsets_E: torch.Tensor | None = None  # int32 [E]: end offsets, padded layout
    num_padded_rows: int | None = None  # upper bound on padded rows (static: N + E*(m-1))
    ids_key: tuple | None = None  # ids_fingerprint of the topk_ids it was made from (None: unknown)

    @property
    def num_rows(self) -> int:
        return self.sorted_slots_N.shape[0]

    @property
    def starts_E(self) -> torch.Tensor:
        return self.offsets_E - self.counts_E

    @property
    def kept_TK(self) -> torch.Tensor:
        return self.inverse_TK >= 0

    @property
    def dropless(self) -> bool:
        return self.capacity is None

    # ------------------------------------------------------------------ agreement checks
    # Cheap host-side checks (shapes and metadata only: no device synchronisation) that the
    # tensors a stage is given agree with the plan; each raises a ValueError saying what differs.
    def record_ids(self, topk_ids_TK: torch.Tensor) -> RoutingPlan:
        """Remember which ``topk_ids_TK`` the plan was made from (see :meth:`check_ids`)."""
        self.ids_key = ids_fingerprint(topk_ids_TK)
        return self

    def check_tokens(self, num_tokens: int, what: str) -> None:
        if num_tokens != self.num_tokens:
            raise ValueError(
                f"{what} has {num_tokens} tokens but the routing plan was made for T={self.num_tokens} "
                "tokens; pass the tensors the plan was made for, or make a new plan"
            )

    def check_rows(self, num_rows: int, what: str) -> None:
        def msg() -> str:
            return (
                f"{what} has {num_rows} rows but the routing plan routes N={self.num_rows} rows "
                f"(T={self.num_tokens} tokens x K={self.top_k}, minus drops); pass one row per routed "
                "slot in the plan's order (the output of permute / expert_up)"
            )

        if torch.compiler.is_compiling():  # N is data-dependent there: a deferred runtime assert
            torch._check(num_rows == self.num_rows, lambda: "the rows disagree with the routing plan's N")
        elif num_rows != self.num_rows:
            raise ValueError(msg())

    def check_experts(self, num_experts: int, what: str) -> None:
        if num_experts != self.num_experts:
            raise ValueError(
                f"{what} has {num_experts} experts but the routing plan was made for "
                f"E={self.num_experts} experts"
            )

    def check_ids(self, topk_ids_TK: torch.Tensor, what: str = "topk_ids") -> None:
        """``topk_ids_TK`` is the tensor the plan was made from, unchanged since (when the plan
        recorded it; a plan of another maker is checked for its shape only)."""
        shape = tuple(topk_ids_TK.shape)
        if shape != (self.num_tokens, self.top_k):
            raise ValueError(
                f"{what} has shape {shape} but the routing plan was made from topk_ids of shape "
                f"[T={self.num_tokens}, K={self.top_k}]"
            )
        key = ids_fingerprint(topk_ids_TK)
        if key is None or self.ids_key is None or key == self.ids_key:
            return
        if key[:-1] == self.ids_key[:-1]:
            raise ValueError(
                f"{what} was modified in place after the routing plan was made from it; make the "
                "plan again (make_plan) from the current ids"
            )
        raise ValueError(
            f"{what} is not the tensor the routing plan was made from: pass the topk_ids the plan "
            "was made from, or leave plan=None to make the plan from these ids"
        )


def ids_fingerprint(ids: torch.Tensor) -> tuple | None:
    """Which tensor ``ids`` is and whether it changed: (address, shape, strides, dtype, device,
    version counter), read from the tensor's metadata (no device sync). None under
    torch.compile and for tensors without storage: the check is then skipped."""
    if torch.compiler.is_compiling():
        return None
    try:
        version = None if ids.is_inference() else ids._version
        return (ids.data_ptr(), tuple(ids.shape), ids.stride(), ids.dtype, ids.device, version)
    except (RuntimeError, NotImplementedError, AttributeError):  # e.g. a tensor subclass
        return None


def check_plan(plan: object, what: str) -> RoutingPlan:
    """``plan`` is a RoutingPlan (else a TypeError naming ``what``)."""
    if not isinstance(plan, RoutingPlan):
        raise TypeError(f"{what}: plan must be a RoutingPlan (from make_plan), got {type(plan).__name__}")
    return plan

