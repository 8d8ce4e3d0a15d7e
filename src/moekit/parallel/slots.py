"""The extended slot tables of expert parallelism (:class:`Slots`): how a rank numbers every
(chunk, rank, local expert) so that the rows it sends, sorted by extended slot, are contiguous
per chunk and, within a chunk, per destination rank (the row exchange, ``rows.py``), and the
token exchange's destinations (``tokens.py``)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .placement import Placement

__all__ = ["Slots"]


@dataclass(frozen=True)
class Slots:
    """The extended slot space of one rank for ``C`` chunks: numbered chunk by chunk, then rank
    by rank, then the rank's slots of the chunk's group (a shared rank: one slot per chunk),
    so that the sender's rows sorted by slot are contiguous per chunk and, within a chunk,
    per rank."""

    num_slots: int
    ext_table: torch.Tensor  # [E, Rmax] the extended slot of each replica of each expert
    shared_ext: torch.Tensor  # [C, n_shared] each chunk's slot on each shared rank
    starts: list  # [C][W] first extended slot of (chunk, rank)
    counts: list  # [C][W] slots of (chunk, rank)
    groups: list  # [C] (lo, hi): this rank's local slots in each chunk
    shared_slots: tuple  # the extended slots of the shared ranks
    dest: torch.Tensor  # [Q] the destination (chunk c, rank r) = c*W + r of each slot
    destinations: torch.Tensor  # [C*W] 0, 1, ..., C*W - 1
    local: torch.Tensor  # int32 [Q] each slot's local expert within its destination's group
    group_size: torch.Tensor  # int32 [C*W + 1] each destination's slots (then a 0)
    recv_base: list  # [C] [W*(hi-lo), 1]: this rank's experts of the chunk's group, per sender

    @staticmethod
    def build(p: Placement, rank: int, C: int, dev: torch.device) -> Slots:
        W = p.world_size
        first = [sum(len(s) for s in p.slots[:r]) for r in range(W)]  # global slot of (r, 0)
        ext_of_slot = [0] * p.num_slots
        shared = [[0] * len(p.shared_ranks) for _ in range(C)]
        starts = [[0] * W for _ in range(C)]
        counts = [[0] * W for _ in range(C)]
        shared_slots: list[int] = []
        q = 0
        for c in range(C):
            for r in range(W):
                starts[c][r] = q
                if r in p.shared_ranks:
                    shared[c][p.shared_ranks.index(r)] = q
                    counts[c][r] = 1
                    shared_slots.append(q)
                    q += 1
                    continue
                L = len(p.slots[r])
                lo, hi = L * c // C, L * (c + 1) // C
                for j in range(lo, hi):
                    ext_of_slot[first[r] + j] = q
                    q += 1
                counts[c][r] = hi - lo
        L = len(p.slots[rank])
        groups = [(L * c // C, L * (c + 1) // C) for c in range(C)]
        ext = torch.tensor(ext_of_slot, dtype=torch.long)
        dest = [c * W + r for c in range(C) for r in range(W) for _ in range(counts[c][r])]
        local = [j for c in range(C) for r in range(W) for j in range(counts[c][r])]
        sizes = [counts[c][r] for c in range(C) for r in range(W)] + [0]

        def put(v, dtype=torch.long):
            return torch.tensor(v, dtype=dtype).to(dev)

        return Slots(
            num_slots=q, ext_table=ext[p.replica_table()].to(dev),
            shared_ext=put(shared).view(C, len(p.shared_ranks)),
            starts=starts, counts=counts, groups=groups, shared_slots=tuple(shared_slots),
            dest=put(dest), destinations=torch.arange(C * W, device=dev),
            local=put(local, torch.int32), group_size=put(sizes, torch.int32),
            recv_base=[torch.arange(hi - lo, device=dev).repeat(W).view(-1, 1) for lo, hi in groups],
        )
