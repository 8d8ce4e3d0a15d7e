"""Fail together: a bad input on one rank of an expert-parallel layer raises on every rank.

An expert-parallel layer runs collectives, so a rank that raises on its own input would leave
the others waiting in the next collective until the process group's timeout. The layer
(``MoE.forward_with_routing``) therefore checks its input and routes it first; the four
integers of every rank (status, model dim, top-k, dtype) then travel with the first collective
of the expert-parallel layer, its counts exchange (``ExpertParallel``; a rank that failed joins
that exchange with zero counts), or, where another collective comes first (a tensor-parallel
region), by :func:`raise_on_every_rank`'s own all-gather. When a rank failed, it raises its own
error and every other rank a :class:`RankInputError` (a ValueError) naming that rank and its
problem (the messages travel by one more all-gather, on that failure path only); when the
ranks disagree on the dim, the top-k or the dtype, every rank raises a RankInputError.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["RankInputError", "exchange_device", "raise_from_rows", "raise_on_every_rank", "status_row"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class RankInputError(ValueError):
    """An input problem on one or more ranks of an expert-parallel group, raised on all of them."""


def exchange_device(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def status_row(error: BaseException | None, x: torch.Tensor | None, top_k: int | None) -> list[int]:
    """This rank's four integers: ok, the input's model dim, top-k, dtype code (-1 unknown)."""
    ok = error is None
    D = x.shape[-1] if ok and isinstance(x, torch.Tensor) and x.dim() else -1
    dt = _DTYPES.index(x.dtype) if ok and isinstance(x, torch.Tensor) and x.dtype in _DTYPES else -1
    return [int(ok), D, -1 if top_k is None else int(top_k), dt]


def raise_from_rows(group, rows: list[list[int]], error: BaseException | None) -> None:
    """Given every rank's :func:`status_row` (rank order; every rank holds the same), raise on
    every rank if one failed (its own error there, a :class:`RankInputError` naming it
    elsewhere: the messages travel by one more all-gather, on this failure path only) or if
    the ranks disagree on the dim, top-k or dtype. Every rank of ``group`` must call it."""
    W = len(rows)
    failed = [r for r, row in enumerate(rows) if row[0] == 0]
    if failed:
        msgs: list[str | None] = [None] * W
        mine_msg = None if error is None else f"{type(error).__name__}: {error}"
        dist.all_gather_object(msgs, mine_msg, group=group)
        if error is not None:
            raise error  # this rank's own problem, as it was raised
        first = failed[0]
        raise RankInputError(
            f"expert parallelism: rank {first} of the group failed on its input, so every rank "
            f"stops here instead of waiting in a collective: {msgs[first]}"
        )
    for i, what in ((1, "model dim D of the input"), (2, "top_k"), (3, "input dtype")):
        values = [row[i] for row in rows]
        if len(set(values)) > 1:
            shown = values if i != 3 else [str(_DTYPES[v]) if v >= 0 else "?" for v in values]
            raise RankInputError(
                f"expert parallelism: the ranks disagree on the {what}: {shown} (rank order); "
                "every rank must run the same layer on inputs of the same dim and dtype"
            )


def raise_on_every_rank(
    group, error: BaseException | None, x: torch.Tensor | None, top_k: int | None
) -> None:
    """Raise on every rank of ``group`` if ``error`` is set on any rank, or if the ranks'
    inputs disagree (``x``'s last dim and dtype, ``top_k``); return quietly otherwise.
    Every rank of the group must call it (it runs one all-gather of its own; the
    expert-parallel layer folds the same four integers into its counts exchange instead)."""
    mine = torch.tensor(status_row(error, x, top_k), dtype=torch.int64,
                        device=exchange_device(group))
    W = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(gathered, mine, group=group)
    raise_from_rows(group, [g.tolist() for g in gathered], error)
