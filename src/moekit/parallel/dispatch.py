"""Dispatchers: how routed rows travel to the ranks holding their experts and back.

A dispatcher has a small interface (:class:`Dispatcher`):

* ``exchange_counts(counts_CP)`` — every rank's rows per (chunk, global slot), gathered on
  every rank as a host ``[W, C, P]`` int64 tensor (one collective, one host sync per
  forward). From it each rank derives the send and receive split sizes.
* ``dispatch(x_ND, layout)`` — rows sorted by global slot go out, ``[R, D]`` rows come in
  (sender-major: all of rank 0's rows, then rank 1's, ...).
* ``combine(y_RD, layout)`` — the inverse exchange, ``[N, D]`` back in the sender's order.

Both return ``(tensor, handle)``; with ``async_op=True`` the caller must call
``handle.wait()`` before reading the tensor (the chunked pipeline issues chunk i+1's
exchange before computing chunk i). Both are autograd-aware: the backward of a dispatch is
a combine of the gradients and vice versa.

:class:`AllToAllDispatcher` uses ``torch.distributed.all_to_all_single`` (NCCL or gloo).
Another transport (DeepEP's NVLink/RDMA kernels, say) implements the same three methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = ["AllToAllDispatcher", "Dispatcher", "Layout"]


@dataclass
class Layout:
    """Split sizes of one exchange: ``send[r]`` rows go to rank r, ``recv[r]`` come from r."""

    send: list[int]
    recv: list[int]

    @property
    def num_send(self) -> int:
        return sum(self.send)

    @property
    def num_recv(self) -> int:
        return sum(self.recv)


class _Done:
    def wait(self) -> None:
        return None


class Dispatcher(ABC):
    group: object

    @abstractmethod
    def exchange_counts(self, counts_CP: torch.Tensor) -> torch.Tensor: ...

    @abstractmethod
    def dispatch(self, x_ND: torch.Tensor, layout: Layout, *, async_op: bool = False): ...

    @abstractmethod
    def combine(self, y_RD: torch.Tensor, layout: Layout, *, async_op: bool = False): ...


def _a2a(x: torch.Tensor, out_rows: int, out_splits, in_splits, group, async_op: bool):
    x = x.contiguous()
    out = x.new_empty((out_rows,) + tuple(x.shape[1:]))
    work = dist.all_to_all_single(
        out, x, output_split_sizes=list(out_splits), input_split_sizes=list(in_splits),
        group=group, async_op=async_op,
    )
    return out, (work if async_op else _Done())


class _AllToAll(torch.autograd.Function):
    """all_to_all_single with an autograd backward (the reverse exchange).

    ``anchor`` is an empty tensor that requires grad: it makes the output require grad on
    every rank whenever grad mode is on, so every rank runs the backward exchange even when
    its own rows need no gradient (T=0, or inputs that do not require grad) — otherwise the
    ranks that do would wait forever for it.
    """

    @staticmethod
    def forward(ctx, anchor, x, out_splits, in_splits, group, async_op, handle_box):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        ctx.in_rows = x.shape[0]
        out, work = _a2a(x, sum(out_splits), out_splits, in_splits, group, async_op)
        handle_box.append(work)
        return out

    @staticmethod
    def backward(ctx, g):
        gx, _ = _a2a(g, ctx.in_rows, ctx.in_splits, ctx.out_splits, ctx.group, False)
        return None, gx, None, None, None, None, None


def exchange(x: torch.Tensor, out_splits, in_splits, group, *, async_op: bool = False):
    """``(out, handle)``: autograd-aware all_to_all_single of rows."""
    box: list = []
    if torch.is_grad_enabled():
        anchor = torch.empty(0, device=x.device, requires_grad=True)
        out = _AllToAll.apply(anchor, x, list(out_splits), list(in_splits), group, async_op, box)
    else:
        out, work = _a2a(x, sum(out_splits), out_splits, in_splits, group, async_op)
        box.append(work)
    return out, box[0]


def _all_gather_flat(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere), stacked flat: ``[W * t.numel()]``."""
    W = dist.get_world_size(group)
    out = t.new_empty(W * t.numel())
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t.reshape(-1), group=group)
    return out


class AllToAllDispatcher(Dispatcher):
    """Rows travel by ``all_to_all_single`` with uneven split sizes (exchanged first)."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)

    def exchange_counts(self, counts_CP: torch.Tensor) -> torch.Tensor:
        c = counts_CP.to(torch.int64).contiguous()
        return _all_gather_flat(c, self.group).view((self.world_size,) + tuple(c.shape)).cpu()

    def dispatch(self, x_ND: torch.Tensor, layout: Layout, *, async_op: bool = False):
        return exchange(x_ND, layout.recv, layout.send, self.group, async_op=async_op)

    def combine(self, y_RD: torch.Tensor, layout: Layout, *, async_op: bool = False):
        return exchange(y_RD, layout.send, layout.recv, self.group, async_op=async_op)
