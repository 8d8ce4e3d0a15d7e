"""``rebalance``: re-place the experts of an expert-parallel MoE from measured loads, moving
their weights (and optimizer state) to their new ranks."""

from __future__ import annotations

import torch
import torch.distributed as dist

from ..moe import MoE
from . import placement as placement_mod
from .apply import _check_same
from .ep import ExpertParallel
from .placement import Placement

__all__ = ["rebalance"]


@torch.no_grad()
def rebalance(
    moe: MoE,
    tokens_per_expert: torch.Tensor | None = None,
    *,
    num_redundant: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Placement:
    """Re-place the experts of an expert-parallel ``moe`` from measured loads: replicate the
    hottest ones (``num_redundant`` extra slots; default: as many as now) and move/copy
    their weights to their new ranks (one all-to-all per weight tensor). ``tokens_per_expert``
    are global counts; default: ``moe.tokens_per_expert`` summed over the group. Returns the
    new placement.

    The parameters are new tensors. With ``optimizer``, its per-parameter state moves with
    the weights (each state tensor shaped like the parameter, e.g. Adam's moments, goes where
    its expert's rows go, a new replica copying its source's; scalar state such as ``step``
    is kept) and its param groups point at the new parameters; experts' parameters the
    optimizer does not hold are left to the caller. Without it, rebuild the optimizer."""
    ep, experts = moe.dispatch, moe.experts
    if not isinstance(ep, ExpertParallel):
        raise ValueError("rebalance needs an expert-parallel MoE (call apply_ep first)")
    group, W, me = ep.group, ep.world_size, ep.rank
    if tokens_per_expert is None:
        tokens_per_expert = moe.tokens_per_expert.detach().clone().float()
        dist.all_reduce(tokens_per_expert, group=group)
    old = ep.placement
    R = old.num_redundant if num_redundant is None else num_redundant
    new = placement_mod.redundant(
        tokens_per_expert.cpu(), W, R, num_shared_ranks=len(old.shared_ranks)
    )
    _check_same(group, {"placement": new.describe()}, "rebalance")
    # source of each expert: the rank holding its first replica now
    src_of = {}
    for r in range(W):
        for i, e in enumerate(old.slots[r]):
            src_of.setdefault(e, (r, i))
    # rows I send to each rank (in that rank's new slot order) / receive from each rank
    send_idx = []
    send_splits = []
    for r in range(W):
        idx = [src_of[e][1] for e in new.slots[r] if src_of[e][0] == me]
        send_idx += idx
        send_splits.append(len(idx))
    recv_order = []  # for each src: my new slot positions it fills, in order
    recv_splits = []
    for s in range(W):
        pos = [j for j, e in enumerate(new.slots[me]) if src_of[e][0] == s]
        recv_order += pos
        recv_splits.append(len(pos))

    def move(t: torch.Tensor) -> torch.Tensor:
        """Slot rows of ``t`` (``[old local slots, ...]``) -> ``[new local slots, ...]``."""
        sidx = torch.tensor(send_idx, dtype=torch.long, device=t.device)
        out = t.new_empty((sum(recv_splits),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.detach().index_select(0, sidx).contiguous(), recv_splits,
                               send_splits, group=group)
        local = torch.empty_like(out)
        local[torch.tensor(recv_order, dtype=torch.long, device=t.device)] = out
        return local

    names = experts.weight_names()
    old_params = [getattr(experts, name) for name in names]
    held = _optimizer_index(optimizer, old_params)
    # every rank runs the same collectives: whether a parameter's state moves must agree
    _check_same(group, {"optimizer state": [sorted(held[i][1]) if i in held else None
                                            for i in range(len(names))]}, "rebalance")
    new_states = {i: {k: move(v) if k in moved else v for k, v in optimizer.state[old_params[i]].items()}
                  for i, (_, moved) in held.items()}
    ep.set_placement(new, experts, tensors=[move(p) for p in old_params])
    for i, (group_params, _) in held.items():
        p_old, p_new = old_params[i], getattr(experts, names[i])
        group_params[[q is p_old for q in group_params].index(True)] = p_new
        optimizer.state.pop(p_old, None)
        optimizer.state[p_new] = new_states[i]
    return new


def _optimizer_index(optimizer, params) -> dict[int, tuple[list, set[str]]]:
    """For each of ``params`` the optimizer holds: (its param group's list, the state keys
    whose tensors are shaped like the parameter and move with its rows). Raises on state it
    cannot move (a tensor of another shape)."""
    if optimizer is None:
        return {}
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    out = {}
    for i, p in enumerate(params):
        lists = [g["params"] for g in optimizer.param_groups if any(q is p for q in g["params"])]
        if not lists:
            continue
        moved = set()
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                moved.add(k)
            elif isinstance(v, torch.Tensor) and v.dim() > 0:
                raise ValueError(
                    f"rebalance cannot move optimizer state {k!r} of shape {tuple(v.shape)} for an "
                    f"expert parameter of shape {tuple(p.shape)}: only state shaped like the "
                    "parameter (moved with its rows) or scalar state (kept) is supported"
                )
        out[i] = (lists[0], moved)
    return out
