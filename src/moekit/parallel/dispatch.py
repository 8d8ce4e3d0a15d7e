"""Dispatchers: how routed rows travel to the ranks holding their experts and back.

A dispatcher has a small interface (:class:`Dispatcher`):

* ``exchange_counts(counts_CP, header)`` — every rank's rows per (chunk, global slot), gathered
  on every rank as a host ``[W, C, P]`` int64 tensor (one collective, one host sync per
  forward), with every rank's few ``header`` integers (``[W, H]``; the layer's fail-together
  status travels there). From the counts each rank derives the send and receive split sizes.
* ``dispatch(x_ND, layout)`` — rows sorted by global slot go out, ``[R, D]`` rows come in
  (sender-major: all of rank 0's rows, then rank 1's, ...).
* ``combine(y_RD, layout)`` — the inverse exchange, ``[N, D]`` back in the sender's order.

Both return ``(tensor, handle)``; with ``async_op=True`` the caller must call
``handle.wait()`` before reading the tensor (the chunked pipeline issues chunk i+1's
exchange before computing chunk i). Both are autograd-aware: the backward of a dispatch is
a combine of the gradients and vice versa.

On CUDA, ``async_op=True`` runs the exchange on a communication stream of the dispatcher's
own: the collective waits only for its input (an event), not for everything issued before it
on the compute stream, and ``handle.wait()`` makes the compute stream wait for it. Its
backward runs on that stream too (autograd runs a node's backward on its forward's stream and
orders the streams by events), so the backward's exchanges of one chunk overlap the expert
GEMMs of another, as the forward's do.

:class:`AllToAllDispatcher` uses ``torch.distributed.all_to_all_single`` (NCCL or gloo).
Another transport (DeepEP's NVLink/RDMA kernels, say) implements the same three methods.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from contextlib import nullcontext as _nullcontext
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
    def exchange_counts(self, counts_CP: torch.Tensor, header: list[int]) -> tuple[torch.Tensor, list]:
        """``(counts [W, C, P] on the host, headers: W lists of ints)``."""

    @abstractmethod
    def dispatch(self, x_ND: torch.Tensor, layout: Layout, *, async_op: bool = False,
                 out: torch.Tensor | None = None):
        """``out``: a buffer of the received shape to receive into (an implementation may
        return another tensor instead; the caller then copies)."""

    @abstractmethod
    def combine(self, y_RD: torch.Tensor, layout: Layout, *, async_op: bool = False,
                out: torch.Tensor | None = None): ...


def _a2a(x: torch.Tensor, out_rows: int, out_splits, in_splits, group, async_op: bool,
         out: torch.Tensor | None = None):
    x = x.contiguous()
    if out is None:
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
    def forward(ctx, anchor, x, out_splits, in_splits, group, async_op, handle_box, consumer):
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        ctx.in_rows, ctx.consumer = x.shape[0], consumer
        out, work = _a2a(x, sum(out_splits), out_splits, in_splits, group, async_op)
        handle_box.append(work)
        return out

    @staticmethod
    def backward(ctx, g):
        if ctx.consumer is not None:  # on the communication stream: g was made on another
            g.record_stream(torch.cuda.current_stream(g.device))
        gx, _ = _a2a(g, ctx.in_rows, ctx.in_splits, ctx.out_splits, ctx.group, False)
        if ctx.consumer is not None:  # read next on the compute stream
            gx.record_stream(ctx.consumer)
        return None, gx, None, None, None, None, None, None


class _StreamWait:
    """The handle of an exchange on a communication stream: ``wait()`` orders the compute
    stream after this exchange only (an event recorded right after it), not after exchanges
    issued later on that stream."""

    def __init__(self, compute, comm):
        self.compute = compute
        self.event = torch.cuda.Event()
        self.event.record(comm)

    def wait(self) -> None:
        self.compute.wait_event(self.event)


def exchange(x: torch.Tensor, out_splits, in_splits, group, *, async_op: bool = False,
             stream=None, out: torch.Tensor | None = None):
    """``(out, handle)``: autograd-aware all_to_all_single of rows; with ``stream`` (a CUDA
    stream) the exchange runs there (see the module docstring) and ``handle.wait()`` orders
    the current stream after it. ``out``: receive into this buffer (without grad mode only:
    the pipeline's exchanges, ``moekit/parallel/pipeline.py``)."""
    box: list = []
    consumer = None
    if stream is not None:
        consumer = torch.cuda.current_stream(x.device)
        stream.wait_stream(consumer)  # the rows to send are ready
        ctx_stream = torch.cuda.stream(stream)
        async_op = False  # the collective is ordered on `stream`; the handle orders the rest
    else:
        ctx_stream = _nullcontext()
    with ctx_stream:
        if torch.is_grad_enabled():
            anchor = torch.empty(0, device=x.device, requires_grad=True)
            out = _AllToAll.apply(anchor, x, list(out_splits), list(in_splits), group, async_op,
                                  box, consumer)
        else:
            out, work = _a2a(x, sum(out_splits), out_splits, in_splits, group, async_op, out)
            box.append(work)
    if stream is not None:
        x.record_stream(stream)
        out.record_stream(consumer)
        return out, _StreamWait(consumer, stream)
    return out, box[0]


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device`` without a stream sync on CUDA (through pinned memory: a
    plain copy from pageable memory synchronizes the stream, and the GPU then idles while the
    host enqueues the next kernels)."""
    if torch.device(device).type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)
    return t.to(device)


def _all_gather_flat(t: torch.Tensor, group) -> torch.Tensor:
    """Every rank's ``t`` (same shape everywhere), stacked flat: ``[W * t.numel()]``."""
    W = dist.get_world_size(group)
    out = t.new_empty(W * t.numel())
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, t.reshape(-1), group=group)
    return out


class AllToAllDispatcher(Dispatcher):
    """Rows travel by ``all_to_all_single`` with uneven split sizes (exchanged first); on CUDA,
    asynchronous exchanges run on a communication stream of the dispatcher's own."""

    def __init__(self, group=None):
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self._streams: dict = {}
        self._headers: dict = {}  # (header, device) -> the header on the device

    def _stream(self, x: torch.Tensor, async_op: bool):
        if not async_op or x.device.type != "cuda":
            return None
        if x.device not in self._streams:
            self._streams[x.device] = torch.cuda.Stream(device=x.device)
        return self._streams[x.device]

    def _header(self, header: list[int], device: torch.device) -> torch.Tensor:
        """``header`` on ``device``, copied there once per distinct value (the status of a
        forward that succeeds is the same every time)."""
        key = (tuple(header), device)
        h = self._headers.get(key)
        if h is None:
            if len(self._headers) >= 16:  # (failures and other shapes: keep a few)
                self._headers.clear()
            h = self._headers[key] = to_device(torch.tensor(header, dtype=torch.int64), device)
        return h

    def exchange_counts(self, counts_CP: torch.Tensor, header: list[int]) -> tuple[torch.Tensor, list]:
        # one int64 row (cat promotes the counts), one all-gather, one copy to the host
        flat = torch.cat([counts_CP.reshape(-1), self._header(header, counts_CP.device)])
        got = _all_gather_flat(flat, self.group).view(self.world_size, -1).cpu()
        n = counts_CP.numel()
        return got[:, :n].reshape((self.world_size,) + tuple(counts_CP.shape)), got[:, n:].tolist()

    def dispatch(self, x_ND: torch.Tensor, layout: Layout, *, async_op: bool = False,
                 out: torch.Tensor | None = None):
        return exchange(x_ND, layout.recv, layout.send, self.group, async_op=async_op,
                        stream=self._stream(x_ND, async_op), out=out)

    def combine(self, y_RD: torch.Tensor, layout: Layout, *, async_op: bool = False,
                out: torch.Tensor | None = None):
        return exchange(y_RD, layout.send, layout.recv, self.group, async_op=async_op,
                        stream=self._stream(y_RD, async_op), out=out)
