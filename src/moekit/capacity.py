"""Capacity rules: how many routed rows an expert keeps.

:data:`DROP_POLICIES` (which rows a full expert drops: the earliest positions are kept, or
the highest routing weights), :func:`capacity_for` (the rows each expert keeps for a
``capacity_factor``) and :func:`sequence_capacity_keep` (a per-sequence capacity, Switch
Transformers' ``expert_capacity``). ``plan.make_plan`` applies the first two.
"""

from __future__ import annotations

import math

import torch

__all__ = ["DROP_POLICIES", "capacity_for", "sequence_capacity_keep"]

DROP_POLICIES = ("position", "weight")


def sequence_capacity_keep(
    topk_ids_TK: torch.Tensor, num_sequences: int, num_experts: int, capacity: int
) -> torch.Tensor:
    """bool ``[T, K]``: whether each routed slot is within its expert's ``capacity`` in its
    sequence (the T tokens are ``num_sequences`` sequences of equal length, in order); slots
    count in token order, then k order, so the earliest positions are kept (Switch
    Transformers' ``expert_capacity``)."""
    T, K = topk_ids_TK.shape
    onehot = torch.nn.functional.one_hot(
        topk_ids_TK.reshape(num_sequences, -1).to(torch.int64), num_experts
    )  # [B, S*K, E]
    rank = (onehot.cumsum(dim=1) * onehot).sum(dim=-1)  # 1-based rank within (sequence, expert)
    return (rank <= capacity).reshape(T, K)


def capacity_for(num_tokens: int, top_k: int, num_experts: int, capacity_factor: float) -> int:
    """Rows each expert may keep: ``ceil(capacity_factor * T * K / E)``."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)
