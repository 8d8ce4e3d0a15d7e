"""Expert placement: which rank holds which experts (and how many copies of each).

A :class:`Placement` lists, for every rank of the expert-parallel group, the *logical*
expert id held by each of its local *slots*. Slots are numbered globally in rank order
(rank 0's slots first), so the rows a rank sends to another rank are contiguous once they
are sorted by global slot id. An expert may appear in several slots (a *redundant* expert,
replicated on several ranks): its tokens are split between the replicas and the replicas'
gradients are summed in the backward pass, so the replicas stay identical.

Ranks listed in ``shared_ranks`` hold no routed experts: they compute the *external* shared
experts for every token instead.

Constructors:

* :func:`contiguous` — expert ``e`` on the rank that owns the contiguous block containing it;
  an even split when ``E`` divides by the number of expert ranks, otherwise the first
  ``E % W`` ranks take one expert more (an uneven split).
* :func:`redundant` — from measured ``tokens_per_expert``: replicate the hottest experts
  (``num_redundant`` extra slots), then pack the replicas on the ranks so that the expected
  per-rank load is as even as possible (greedy longest-first, as DeepSeek's EPLB does).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = ["Placement", "contiguous", "redundant", "assign_contiguous"]


@dataclass(frozen=True)
class Placement:
    num_experts: int
    slots: tuple[tuple[int, ...], ...]  # per rank: the logical expert id of each local slot
    shared_ranks: tuple[int, ...] = ()  # ranks that compute the external shared experts

    def __post_init__(self) -> None:
        E, W = self.num_experts, len(self.slots)
        if W < 1:
            raise ValueError("Placement needs at least one rank")
        seen = set()
        for r, s in enumerate(self.slots):
            for e in s:
                if not (isinstance(e, int) and 0 <= e < E):
                    raise ValueError(f"Placement: rank {r} holds expert {e!r}; experts are 0..{E - 1}")
                seen.add(e)
        missing = sorted(set(range(E)) - seen)
        if missing:
            raise ValueError(f"Placement: experts {missing} are on no rank")
        for r in self.shared_ranks:
            if not 0 <= r < W:
                raise ValueError(f"Placement: shared rank {r} is not in 0..{W - 1}")
            if self.slots[r]:
                raise ValueError(f"Placement: shared rank {r} must hold no routed experts")
        if len(set(self.shared_ranks)) != len(self.shared_ranks):
            raise ValueError("Placement: shared_ranks has duplicates")

    # ------------------------------------------------------------------ views
    @property
    def world_size(self) -> int:
        return len(self.slots)

    @property
    def num_slots(self) -> int:
        return sum(len(s) for s in self.slots)

    @property
    def slot_counts(self) -> list[int]:
        return [len(s) for s in self.slots]

    @property
    def slot_starts(self) -> list[int]:
        out, acc = [], 0
        for s in self.slots:
            out.append(acc)
            acc += len(s)
        return out

    @property
    def slot_experts(self) -> list[int]:
        """Logical expert of each global slot."""
        return [e for s in self.slots for e in s]

    @property
    def num_redundant(self) -> int:
        return self.num_slots - self.num_experts

    def replicas(self, expert: int) -> list[int]:
        """Global slot ids that hold ``expert`` (in slot order)."""
        return [i for i, e in enumerate(self.slot_experts) if e == expert]

    def replica_table(self) -> torch.Tensor:
        """int64 [E, R]: the global slots of each expert, padded by repeating (R = most replicas)."""
        reps = [self.replicas(e) for e in range(self.num_experts)]
        R = max(len(r) for r in reps)
        return torch.tensor([[r[i % len(r)] for i in range(R)] for r in reps], dtype=torch.int64)

    def num_replicas(self) -> torch.Tensor:
        return torch.tensor([len(self.replicas(e)) for e in range(self.num_experts)], dtype=torch.int64)

    def local_experts(self, rank: int) -> tuple[int, ...]:
        return self.slots[rank]

    def describe(self) -> str:
        return json.dumps({"E": self.num_experts, "slots": self.slots, "shared": self.shared_ranks})

    def digest(self) -> str:
        return hashlib.sha256(self.describe().encode()).hexdigest()[:16]


def assign_contiguous(num_experts: int, world_size: int, rank: int) -> tuple[int, int]:
    """(first expert, number of experts) of ``rank`` in the contiguous split: the first
    ``E % W`` ranks take one expert more."""
    per, rest = divmod(num_experts, world_size)
    if rank < rest:
        return rank * (per + 1), per + 1
    return rest * (per + 1) + (rank - rest) * per, per


def _expert_ranks(world_size: int, num_shared_ranks: int) -> list[int]:
    if not isinstance(num_shared_ranks, int) or not 0 <= num_shared_ranks < world_size:
        raise ValueError(
            f"num_shared_ranks={num_shared_ranks!r}; it must be an integer in [0, {world_size - 1}] "
            "(at least one rank must hold routed experts)"
        )
    return list(range(num_shared_ranks, world_size))


def contiguous(num_experts: int, world_size: int, *, num_shared_ranks: int = 0) -> Placement:
    """Contiguous blocks of experts over the expert ranks (ranks ``num_shared_ranks..W-1``);
    even when ``E`` divides by their number, else the first ``E % W`` take one more. With
    ``num_shared_ranks > 0`` the first ranks compute the external shared experts instead."""
    if num_experts < 1 or world_size < 1:
        raise ValueError(f"contiguous: num_experts={num_experts}, world_size={world_size} must be >= 1")
    ranks = _expert_ranks(world_size, num_shared_ranks)
    slots: list[tuple[int, ...]] = [() for _ in range(world_size)]
    for i, r in enumerate(ranks):
        start, n = assign_contiguous(num_experts, len(ranks), i)
        slots[r] = tuple(range(start, start + n))
    return Placement(num_experts, tuple(slots), tuple(range(num_shared_ranks)))


def redundant(
    tokens_per_expert: torch.Tensor | Sequence[float],
    world_size: int,
    num_redundant: int,
    *,
    num_shared_ranks: int = 0,
) -> Placement:
    """Replicate the hottest experts and pack the replicas for an even expected load.

    1. ``num_redundant`` times, add a replica to the expert of the highest load per replica
       (``load / replicas``), never more replicas than expert ranks.
    2. Slot budget per rank: ``(E + num_redundant)`` split as evenly as possible. Replicas are
       placed longest-first on the least-loaded rank with a free slot that does not already
       hold that expert. Each rank's slots are then sorted by expert id.

    Deterministic: ties break by expert id and rank. ``tokens_per_expert`` must be the
    *global* counts (identical on every rank; all-reduce the per-rank counts first).
    """
    load = torch.as_tensor(tokens_per_expert, dtype=torch.float64).flatten().tolist()
    E = len(load)
    ranks = _expert_ranks(world_size, num_shared_ranks)
    W = len(ranks)
    if not isinstance(num_redundant, int) or num_redundant < 0:
        raise ValueError(f"num_redundant={num_redundant!r}; it must be an integer >= 0")
    if num_redundant > E * (W - 1):
        raise ValueError(
            f"num_redundant={num_redundant} is more than E*(W-1)={E * (W - 1)}: an expert can have "
            "at most one replica per expert rank"
        )
    if any(x < 0 for x in load):
        raise ValueError("tokens_per_expert must be >= 0")
    nrep = [1] * E
    for _ in range(num_redundant):
        best = max(
            (e for e in range(E) if nrep[e] < W), key=lambda e: (load[e] / nrep[e], -e)
        )
        nrep[best] += 1
    S = E + num_redundant
    per, rest = divmod(S, W)
    budget = [per + (i < rest) for i in range(W)]
    items = sorted(
        ((load[e] / nrep[e], e) for e in range(E) for _ in range(nrep[e])), key=lambda t: (-t[0], t[1])
    )
    held: list[list[int]] = [[] for _ in range(W)]
    rload = [0.0] * W
    for w, e in items:
        cands = [i for i in range(W) if len(held[i]) < budget[i] and e not in held[i]]
        if not cands:  # pragma: no cover - the budget always leaves room (nrep <= W)
            cands = [i for i in range(W) if len(held[i]) < budget[i]]
        i = min(cands, key=lambda i: (rload[i], len(held[i]), i))
        held[i].append(e)
        rload[i] += w
    slots: list[tuple[int, ...]] = [() for _ in range(world_size)]
    for i, r in enumerate(ranks):
        slots[r] = tuple(sorted(held[i]))
    return Placement(E, tuple(slots), tuple(range(num_shared_ranks)))
