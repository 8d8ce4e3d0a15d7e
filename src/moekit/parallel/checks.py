"""Fail together: a bad input on one rank of an expert-parallel layer raises on every rank.

An expert-parallel layer runs collectives, so a rank that raises on its own input would leave
the others waiting in the next collective until the process group's timeout. The layer
(``MoE.forward_with_routing``) therefore checks its input and routes it first, then calls
:func:`raise_on_every_rank` before the first collective of the experts: one all-gather of four
integers per rank (status, model dim, top-k, dtype). When a rank failed, it raises its own
error and every other rank a :class:`RankInputError` (a ValueError) naming that rank and its
problem (the messages travel by one more all-gather, on that failure path only); when the
ranks disagree on the dim, the top-k or the dtype, every rank raises a RankInputError.
"""

from __future__ import annotations

import torch
import torch.distributed as dist

__all__ = ["RankInputError", "raise_on_every_rank"]

_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


class RankInputError(ValueError):
    """An input problem on one or more ranks of an expert-parallel group, raised on all of them."""


def _exchange_device(group) -> torch.device:
    backend = str(dist.get_backend(group)).lower()
    if "nccl" in backend and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def raise_on_every_rank(
    group, error: BaseException | None, x: torch.Tensor | None, top_k: int | None
) -> None:
    """Raise on every rank of ``group`` if ``error`` is set on any rank, or if the ranks'
    inputs disagree (``x``'s last dim and dtype, ``top_k``); return quietly otherwise.
    Every rank of the group must call it (it runs one all-gather)."""
    ok = error is None
    D = x.shape[-1] if ok and isinstance(x, torch.Tensor) and x.dim() else -1
    dt = _DTYPES.index(x.dtype) if ok and isinstance(x, torch.Tensor) and x.dtype in _DTYPES else -1
    mine = torch.tensor([int(ok), D, -1 if top_k is None else int(top_k), dt], dtype=torch.int64,
                        device=_exchange_device(group))
    W = dist.get_world_size(group)
    gathered = [torch.empty_like(mine) for _ in range(W)]
    dist.all_gather(gathered, mine, group=group)
    rows = [g.tolist() for g in gathered]

    failed = [r for r, row in enumerate(rows) if row[0] == 0]
    if failed:
        msgs: list[str | None] = [None] * W
        mine_msg = None if ok else f"{type(error).__name__}: {error}"
        dist.all_gather_object(msgs, mine_msg, group=group)
        if not ok:
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
