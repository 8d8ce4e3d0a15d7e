"""Experts run chunk by chunk, each chunk holding the rows of one group of experts: what the
expert-parallel pipeline (``moekit/parallel/pipeline.py``) drives, so that one chunk's
exchange travels while another chunk computes.

A runner has four calls: ``forward(c, x_RD, ids_RK, lo, hi, ...)`` runs the experts
``[lo, hi)`` on chunk ``c``'s rows (``ids_RK`` local to the group, in ``[0, hi - lo)``): either
each row one routed slot of weight 1 (``ids_R1``; expert parallelism's row exchange), or, with
``weights=`` ``[R, K]`` and ``num_zero_experts=1``, each row a token with up to K of the group's
experts (id ``hi - lo``: none), whose outputs it sums with those weights (the token exchange),
in ``out_dtype`` when given; ``backward(c, dy_RD)`` returns that chunk's input grad (summed
over its experts), ``routing_grad(c)`` then the grad of its ``weights`` (or None);
``weight_grads()``, after every chunk's backward, returns the full-size grads of the weights it
was given. The backward of a chunk only makes input grads, so that the exchange of the last
chunk's input grad can travel while the weight grads are made.

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
        self._routing: dict[int, torch.Tensor | None] = {}
        self._ranges: dict[int, tuple[int, int]] = {}

    def _params(self, lo: int, hi: int) -> list[torch.Tensor | None]:
        if not self.slice_params:
            return list(self.weights)
        return [None if w is None else w[lo:hi] for w in self.weights]

    def forward(self, c: int, x_RD: torch.Tensor, ids_RK: torch.Tensor | None, lo: int, hi: int,
                *, base: int = 0, weights: torch.Tensor | None = None,
                out_dtype: torch.dtype | None = None, **plan_kwargs) -> torch.Tensor:
        self._ranges[c] = (lo, hi)
        if not self.train:
            with torch.no_grad():
                y = self.fn(x_RD, ids_RK, self._params(lo, hi), dict(plan_kwargs, weights=weights))
            return y if out_dtype is None else y.to(out_dtype)
        with torch.enable_grad():
            x = x_RD.detach().requires_grad_()
            w = None if weights is None else weights.detach().requires_grad_()
            ps = [None if p is None else p.detach().requires_grad_(p.requires_grad)
                  for p in self._params(lo, hi)]
            y = self.fn(x, ids_RK, ps, dict(plan_kwargs, weights=w))
        self._graphs[c] = (y, x, w, ps)
        y = y.detach()
        return y if out_dtype is None else y.to(out_dtype)

    def backward(self, c: int, dy_RD: torch.Tensor | None) -> torch.Tensor:
        y, x, w, ps = self._graphs.pop(c)
        if dy_RD is None:  # the output was not used
            dy_RD = torch.zeros_like(y)
        live = [p for p in ps if p is not None and p.requires_grad]
        ins = [x] + ([w] if w is not None else []) + live
        if not y.requires_grad:  # nothing in the chunk needs a grad (no rows, frozen weights)
            gs = [None] * len(ins)
        else:
            gs = list(torch.autograd.grad(y, ins, dy_RD.to(y.dtype), allow_unused=True))
        if w is not None:
            self._routing[c] = torch.zeros_like(w) if gs[1] is None else gs[1]
        it = iter(gs[len(ins) - len(live):])
        self._grads[c] = [None if p is None or not p.requires_grad else next(it) for p in ps]
        return torch.zeros_like(x) if gs[0] is None else gs[0]

    def routing_grad(self, c: int) -> torch.Tensor | None:
        """The grad of chunk ``c``'s ``weights`` (after its :meth:`backward`; None without)."""
        return self._routing.pop(c, None)

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


def routed_experts_fn(backend, activation: str, *, weight_on_input: bool = False) -> Callable:
    """``fn`` of :class:`AutogradChunks` for routed experts: the backend's plan over the
    group's experts, then its experts call (every row one slot of weight 1, or the rows'
    ``weights`` over their ``[R, K]`` ids; ``weight_on_input``: they scale the expert's input)."""
    from ..activations import get_activation

    activation = get_activation(activation).name

    def fn(x_RD, ids_RK, params, kw):
        w_up, w_down, b_up, b_down = params
        if w_up.shape[0] == 0:  # a group without experts has no rows
            return x_RD * 0
        w = kw.get("weights")
        plan = backend.make_plan(ids_RK, w_up.shape[0], capacity=kw.get("capacity"),
                                 drop_policy=kw.get("drop_policy", "position"),
                                 topk_weights_TK=kw.get("row_weights") if w is None else w,
                                 num_zero_experts=kw.get("num_zero_experts", 0),
                                 num_real_slots=kw.get("num_real_slots"), check_ids=False)
        if w is None:
            w = x_RD.new_ones(x_RD.shape[0], 1)
        return backend.experts(x_RD, w_up, w_down, plan, w, activation=activation,
                               gated=w_up.shape[1] == 2 * w_down.shape[2],
                               gate_up_proj_bias=b_up, down_proj_bias=b_down,
                               weight_on_input=weight_on_input)

    return fn


def module_fn(module: torch.nn.Module) -> Callable:
    """``fn`` of :class:`AutogradChunks` (``slice_params=False``, the weights
    ``list(module.parameters())``) that runs ``module`` with those weights: shared experts."""
    names = [n for n, _ in module.named_parameters()]

    def fn(x_RD, ids_R1, params, kw):
        return torch.func.functional_call(module, dict(zip(names, params)), (x_RD,))

    return fn
