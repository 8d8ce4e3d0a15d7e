"""Experts run chunk by chunk, each chunk holding the rows of one group of experts: what the
expert-parallel pipeline (``moekit/parallel/pipeline.py``) drives, so that one chunk's
exchange travels while another chunk computes.

A runner has three calls: ``forward(c, x_RD, ids_R1, lo, hi, ...)`` runs the experts
``[lo, hi)`` on chunk ``c``'s rows (each row one routed slot of weight 1; ``ids_R1`` are
local to the group, in ``[0, hi - lo)``); ``backward(c, dy_RD)`` returns that chunk's input
grad; ``weight_grads()``, after every chunk's backward, returns the full-size grads of the
weights it was given. The backward of a chunk only makes input grads, so that the exchange of
the last chunk's input grad can travel while the weight grads are made.

:class:`AutogradChunks` works with any backend: each chunk is a small autograd graph over
detached views of the group's weights; the groups' weight grads are concatenated at the end
(one copy of the weight grads). The triton backend has its own runner
(``moekit.ops.triton.chunked``) that makes the weight grads once over all chunks' rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch

__all__ = ["AutogradChunks", "module_fn", "routed_experts_fn"]


class AutogradChunks:
    """A chunk runner over any computation ``fn(x_RD, ids_R1, params, plan_kwargs) -> y_RD``
    whose ``params`` are the group's slices of ``weights`` (``slice_params=True``: the routed
    experts, whose grads are concatenated over the groups) or the whole ``weights`` in every
    chunk (``slice_params=False``: shared experts, whose grads are summed)."""

    def __init__(self, fn: Callable, weights: Sequence[torch.Tensor | None], *, train: bool,
                 slice_params: bool = True):
        self.fn, self.weights, self.train, self.slice_params = fn, list(weights), train, slice_params
        self._graphs: dict[int, tuple] = {}
        self._grads: dict[int, list] = {}
        self._ranges: dict[int, tuple[int, int]] = {}

    def _params(self, lo: int, hi: int) -> list[torch.Tensor | None]:
        if not self.slice_params:
            return list(self.weights)
        return [None if w is None else w[lo:hi] for w in self.weights]

    def forward(self, c: int, x_RD: torch.Tensor, ids_R1: torch.Tensor | None, lo: int, hi: int,
                *, base: int = 0, **plan_kwargs) -> torch.Tensor:
        self._ranges[c] = (lo, hi)
        if not self.train:
            with torch.no_grad():
                return self.fn(x_RD, ids_R1, self._params(lo, hi), plan_kwargs)
        with torch.enable_grad():
            x = x_RD.detach().requires_grad_()
            ps = [None if p is None else p.detach().requires_grad_(p.requires_grad)
                  for p in self._params(lo, hi)]
            y = self.fn(x, ids_R1, ps, plan_kwargs)
        self._graphs[c] = (y, x, ps)
        return y.detach()

    def backward(self, c: int, dy_RD: torch.Tensor | None) -> torch.Tensor:
        y, x, ps = self._graphs.pop(c)
        if dy_RD is None:  # the output was not used
            dy_RD = torch.zeros_like(y)
        live = [p for p in ps if p is not None and p.requires_grad]
        if not y.requires_grad:  # nothing in the chunk needs a grad (no rows, frozen weights)
            gs = [None] * (1 + len(live))
        else:
            gs = list(torch.autograd.grad(y, [x, *live], dy_RD, allow_unused=True))
        it = iter(gs[1:])
        self._grads[c] = [None if p is None or not p.requires_grad else next(it) for p in ps]
        return torch.zeros_like(x) if gs[0] is None else gs[0]

    def weight_grads(self, x_RD=None, dy_RD=None, needs=None) -> list[torch.Tensor | None]:
        """The full-size grads of ``weights`` (``x_RD``, ``dy_RD``, ``needs``: unused here: a
        weight that does not require grad gets None)."""
        out: list[torch.Tensor | None] = []
        chunks = sorted(self._grads)
        for j, w in enumerate(self.weights):
            if w is None or not w.requires_grad:
                out.append(None)
                continue
            parts = []
            for c in chunks:
                g = self._grads[c][j]
                if g is None:
                    lo, hi = self._ranges[c]
                    g = torch.zeros_like(w[lo:hi] if self.slice_params else w)
                parts.append(g)
            if not parts:
                out.append(torch.zeros_like(w))
            elif self.slice_params:
                out.append(torch.cat(parts, 0) if len(parts) > 1 else parts[0])
            else:
                out.append(torch.stack(parts).sum(0) if len(parts) > 1 else parts[0])
        self._grads.clear()
        return out


def routed_experts_fn(backend, activation: str) -> Callable:
    """``fn`` of :class:`AutogradChunks` for routed experts: the backend's plan over the
    group's experts, then its experts call (every row one slot of weight 1)."""
    from .api import moe_experts

    def fn(x_RD, ids_R1, params, kw):
        w_up, w_down, b_up, b_down = params
        if w_up.shape[0] == 0:  # a group without experts has no rows
            return x_RD * 0
        plan = backend.make_plan(ids_R1, w_up.shape[0], capacity=kw.get("capacity"),
                                 drop_policy=kw.get("drop_policy", "position"),
                                 topk_weights_TK=kw.get("row_weights"))
        return moe_experts(x_RD, w_up, w_down, ids_R1, x_RD.new_ones(x_RD.shape[0], 1),
                           activation=activation, gate_up_proj_bias=b_up,
                           down_proj_bias=b_down, backend=backend, plan=plan)

    return fn


def module_fn(module: torch.nn.Module) -> Callable:
    """``fn`` of :class:`AutogradChunks` (``slice_params=False``, the weights
    ``list(module.parameters())``) that runs ``module`` with those weights: shared experts."""
    names = [n for n, _ in module.named_parameters()]

    def fn(x_RD, ids_R1, params, kw):
        return torch.func.functional_call(module, dict(zip(names, params)), (x_RD,))

    return fn
