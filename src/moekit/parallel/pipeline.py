"""The expert-parallel pipeline: dispatch -> local experts -> combine, chunk by chunk, as one
autograd node (:class:`Pipeline`, run by :class:`ExpertParallel` in ``ep.py``).

Chunk ``c`` holds the rows of one group of every rank's local experts (experts
``[L*c//C, L*(c+1)//C)`` of a rank with ``L``), so each expert's rows are all in one chunk,
in the global token order: the chunks change neither the arithmetic nor the capacity drops,
and each expert's GEMMs see all of its rows.

Forward: every chunk's dispatch is issued at once (on CUDA on the dispatcher's communication
stream); chunk ``c`` computes as soon as its rows are in, and its combine is issued right
after, so it travels while chunk ``c+1`` computes. Backward: every chunk's output grad is sent
at once; chunk ``c``'s input grad is computed (the runner's ``backward``: no weight grads) and
sent back while chunk ``c+1``'s is computed; the weight grads are made last, once over all
chunks (the triton backend: two grouped GEMMs), while the last exchange travels.

The local compute is the experts backend's chunk runner (``ExpertsBackend.chunk_runner``,
:mod:`moekit.ops.chunked`); an external shared rank runs its shared experts instead.
"""

from __future__ import annotations

from collections.abc import Callable
from itertools import accumulate
from typing import Any

import torch

from .dispatch import Dispatcher, Layout

__all__ = ["Pipeline"]


def _into(res: torch.Tensor, buf: torch.Tensor) -> torch.Tensor:
    """``buf`` holding ``res`` (a dispatcher may return its own tensor instead of filling the
    buffer it was given)."""
    if res is not buf and (res.numel() == 0 or res.data_ptr() != buf.data_ptr()):
        buf.copy_(res)
    return buf


class _Node(torch.autograd.Function):
    """One autograd node over ``run``: ``run.forward(*inputs)`` -> ``(y, side output or None)``,
    ``run.backward(g, g_side, needs)`` -> the grads of the inputs, then of every param
    (``needs``: which params need a grad)."""

    @staticmethod
    def forward(ctx, run, anchor, n_in, *args):
        ctx.run, ctx.n_in = run, n_in
        y, y_side = run.forward(*args[:n_in])
        if y_side is None:
            y_side = y.new_empty(0)
            ctx.mark_non_differentiable(y_side)
        return y, y_side

    @staticmethod
    def backward(ctx, g, g_side):
        run, ctx.run = ctx.run, None
        return (None, None, None, *run.backward(g, g_side, ctx.needs_input_grad[3 + ctx.n_in:]))


def run_node(run, inputs: list, params: list, side_params: list = ()):
    """``(y, side output or None)`` of ``run`` (a :class:`Pipeline`, or the token exchange's
    run) as one autograd node, differentiable in ``inputs``, ``params`` and ``side_params``.
    Every rank joins the backward's exchanges whenever grad mode is on (the ``anchor`` input),
    even where nothing of its own needs a grad."""
    dev = next(t.device for t in inputs if t is not None)
    anchor = torch.empty(0, device=dev, requires_grad=torch.is_grad_enabled())
    y, y_side = _Node.apply(run, anchor, len(inputs), *inputs, *params, *side_params)
    return y, (y_side if run.side is not None else None)


class Pipeline:
    """One forward (and its backward) of the pipeline on this rank.

    * ``layouts``: per chunk, the split sizes of its exchange;
    * ``groups``: per chunk, the local experts ``(lo, hi)`` it holds;
    * ``runner``: the chunk runner (``forward``/``backward``/``weight_grads``);
    * ``recv_ids``: ``recv_ids(c)`` -> the received rows' experts ``[R_c, 1]`` within the group
      (None on a shared rank);
    * ``plan_kwargs``: per chunk, the capacity arguments of the receiver's plan;
    * ``side``: a runner (``moekit.ops.chunked.AutogradChunks``) of work on this rank's own
      tokens that needs no exchange (the layer's shared experts): it computes while the first
      exchange of each direction travels, forward and backward;
    * ``out_dtype``: the dtype of the rows sent back, both directions (the token exchange's
      partial sums: float32 keeps them unrounded until the sender sums them);
    * ``routing_cols``: with the token exchange, K: the backward also sends back the grads of
      the received rows' routing weights (the runner's ``routing_grad``), ``[N, K]`` in
      ``routing_dtype``.
    """

    def __init__(self, dispatcher: Dispatcher, layouts: list[Layout], groups: list[tuple[int, int]],
                 runner: Any, recv_ids: Callable[[int], torch.Tensor | None],
                 plan_kwargs: list[dict], side: Any = None, *, out_dtype=None,
                 routing_cols: int = 0, routing_dtype=torch.float32):
        self.disp, self.layouts, self.groups = dispatcher, layouts, groups
        self.runner, self.recv_ids, self.plan_kwargs = runner, recv_ids, plan_kwargs
        self.side = side
        self.out_dtype = out_dtype  # of the rows sent back (None: the sent rows')
        self.routing_cols = routing_cols  # K of the token exchange's routing weights (0: none)
        self.routing_dtype = routing_dtype
        self.num_params = 0
        self.send_sizes = [l.num_send for l in layouts]
        self.recv_sizes = [l.num_recv for l in layouts]
        self.send_at = [0, *accumulate(self.send_sizes)]
        self.recv_at = [0, *accumulate(self.recv_sizes)]
        self.x_all: torch.Tensor | None = None

    def apply(self, send_ND: torch.Tensor, params: list[torch.Tensor | None],
              x_side: torch.Tensor | None = None, side_params: list[torch.Tensor] = ()):
        """``(combined rows [N, D], side output or None)``: this rank's sent rows back in their
        order, and the ``side`` runner's output on ``x_side``; differentiable in ``send_ND``,
        ``params``, ``x_side`` and ``side_params`` (:func:`run_node`)."""
        self.num_params = len(params)
        return run_node(self, [send_ND, x_side], params, side_params)

    def forward(self, send_ND, x_side):
        return self.run_forward(send_ND, x_side)

    def backward(self, g_ND, g_side, needs):
        dx_ND, dx_side, grads, side_grads = self.run_backward(g_ND, g_side,
                                                              needs[:self.num_params])
        return (dx_ND, dx_side, *grads, *side_grads)

    def _split(self, t: torch.Tensor, sizes: list[int]) -> list[torch.Tensor]:
        """``t``'s rows per chunk (views; one op, none for one chunk)."""
        return [t] if len(sizes) == 1 else list(t.split(sizes))

    def _exchanges(self, rows_ND: torch.Tensor, into_RD: torch.Tensor) -> tuple[list, list]:
        """Every chunk's rows sent towards the experts (dispatch direction), received into
        ``into_RD``: ``([(received, handle)], the chunks' views of into_RD)``."""
        into = self._split(into_RD, self.recv_sizes)
        rows = self._split(rows_ND, self.send_sizes)
        return [self.disp.dispatch(x, lay, async_op=True, out=buf)
                for x, lay, buf in zip(rows, self.layouts, into)], into

    def _pipe(self, first: list, recv: list, back_ND: torch.Tensor, step,
              extra_ND: torch.Tensor | None = None) -> list:
        """For each chunk: wait for its rows (``first``, received into the views ``recv``),
        ``step(c, rows)``, send the result back into ``back_ND`` (and, with ``extra_ND``, the
        runner's routing grad into it); returns the back exchanges (not yet waited for)."""
        backs = []
        back = self._split(back_ND, self.send_sizes)
        extra = None if extra_ND is None else self._split(extra_ND, self.send_sizes)
        for c, lay in enumerate(self.layouts):
            res, h = first[c]
            h.wait()
            rows = _into(res, recv[c])
            y = step(c, rows)
            if y.dtype != back_ND.dtype:
                y = y.to(back_ND.dtype)
            backs.append((self.disp.combine(y, lay, async_op=True, out=back[c]), back[c]))
            if extra is not None:
                g = self.runner.routing_grad(c)
                g = rows.new_zeros(rows.shape[0], extra_ND.shape[1], dtype=extra_ND.dtype) \
                    if g is None else g.to(extra_ND.dtype)
                backs.append((self.disp.combine(g, lay, async_op=True, out=extra[c]), extra[c]))
        return backs

    def _finish(self, backs: list) -> None:
        for (res, h), buf in backs:
            h.wait()
            _into(res, buf)

    def run_forward(self, send_ND: torch.Tensor, x_side=None):
        send_ND = send_ND.contiguous()
        D = send_ND.shape[1]
        x_all = send_ND.new_empty(self.recv_at[-1], D)
        y_ND = send_ND.new_empty(self.send_at[-1], D, dtype=self.out_dtype or send_ND.dtype)

        def step(c, x_c):
            lo, hi = self.groups[c]
            return self.runner.forward(c, x_c, self.recv_ids(c), lo, hi, base=self.recv_at[c],
                                       **self.plan_kwargs[c])

        with torch.no_grad():
            first, recv = self._exchanges(send_ND, x_all)
            y_side = None if self.side is None else self.side.forward(0, x_side, None, 0, 0)
            backs = self._pipe(first, recv, y_ND, step)
            self._finish(backs)
        self.x_all = x_all
        return y_ND, y_side

    def run_backward(self, g_ND: torch.Tensor, g_side=None, needs=None):
        """``(dx_ND, dx_side, param grads, side param grads)``, and with ``routing_cols`` the
        sent rows' routing-weight grads ``[N, K]`` after them; ``needs``: which params
        need a grad (all when None)."""
        g_ND = g_ND.contiguous()
        dy_all = g_ND.new_empty(self.recv_at[-1], g_ND.shape[1])
        dx_ND = g_ND.new_empty(self.send_at[-1], g_ND.shape[1], dtype=self.out_dtype or g_ND.dtype)
        dw_NK = None
        if self.routing_cols:
            dw_NK = g_ND.new_empty(self.send_at[-1], self.routing_cols, dtype=self.routing_dtype)
        dx_side, side_grads = None, []
        with torch.no_grad():
            first, recv = self._exchanges(g_ND, dy_all)
            if self.side is not None:  # while the first exchange travels
                dx_side = self.side.backward(0, g_side)
                side_grads = self.side.weight_grads()
            backs = self._pipe(first, recv, dx_ND, self.runner.backward, dw_NK)
            # while the last exchange travels
            grads = self.runner.weight_grads(self.x_all, dy_all, needs)
            self.x_all = None
            self._finish(backs)
        if dw_NK is not None:
            return dx_ND, dx_side, grads, side_grads, dw_NK
        return dx_ND, dx_side, grads, side_grads
