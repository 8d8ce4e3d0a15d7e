"""The tensor-parallel region option of expert parallelism.

Inside a TP region every TP rank holds the same activations. Expert parallelism then
splits the tokens over the TP ranks on entry (``tp_scatter``: each rank routes and
dispatches only its share, so no token is computed twice), and all-gathers the outputs on
exit (``tp_gather``). Gradients follow Megatron's rules for a replicated region: the
scatter's backward all-gathers the gradients (each rank gets the whole input gradient), the
gather's backward keeps the rank's own slice (the output gradient is replicated).

:class:`TPSharedExperts` shards the shared experts' hidden dim over the TP ranks
(column-parallel gate/up, row-parallel down, the sigmoid gate replicated) with one
all-reduce of the output; the input gradient is all-reduced in the backward.

Token shares are ``tensor_split`` bounds (``T*i//n`` .. ``T*(i+1)//n``): any T works, no
padding tokens are routed; the all-gather pads each share to the largest one internally.
"""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

__all__ = ["tp_scatter", "tp_gather", "TPSharedExperts"]


def _bounds(T: int, n: int) -> list[int]:
    return [(T * i) // n for i in range(n + 1)]


def _gather_rows(x: torch.Tensor, T: int, group) -> torch.Tensor:
    """All ranks' shares (rank i holds rows bounds[i]:bounds[i+1] of a [T, ...] tensor)."""
    n = dist.get_world_size(group)
    b = _bounds(T, n)
    m = max(b[i + 1] - b[i] for i in range(n))
    x = x.contiguous()
    pad = x.new_zeros((m,) + tuple(x.shape[1:]))
    pad[: x.shape[0]] = x
    out = x.new_empty((n * m,) + tuple(x.shape[1:]))
    fn = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
    fn(out, pad, group=group)
    out = out.view((n, m) + tuple(x.shape[1:]))
    return torch.cat([out[i, : b[i + 1] - b[i]] for i in range(n)], 0)


class _Scatter(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        n, i = dist.get_world_size(group), dist.get_rank(group)
        b = _bounds(x.shape[0], n)
        ctx.group, ctx.T = group, x.shape[0]
        return x[b[i]: b[i + 1]].clone()

    @staticmethod
    def backward(ctx, g):
        return _gather_rows(g, ctx.T, ctx.group), None


class _Gather(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, T, group):
        ctx.group, ctx.T = group, T
        return _gather_rows(x, T, group)

    @staticmethod
    def backward(ctx, g):
        n, i = dist.get_world_size(ctx.group), dist.get_rank(ctx.group)
        b = _bounds(ctx.T, n)
        return g[b[i]: b[i + 1]].contiguous(), None, None


def tp_scatter(group, x_TD, ids_TK, w_TK):
    """This TP rank's share of the tokens (and of their routing)."""
    n, i = dist.get_world_size(group), dist.get_rank(group)
    b = _bounds(x_TD.shape[0], n)
    x = _Scatter.apply(x_TD, group) if torch.is_grad_enabled() else x_TD[b[i]: b[i + 1]]
    w = _Scatter.apply(w_TK, group) if torch.is_grad_enabled() and w_TK.requires_grad else w_TK[b[i]: b[i + 1]]
    return x, ids_TK[b[i]: b[i + 1]], w


def tp_gather(group, y_local, T: int):
    """All TP ranks' outputs, in token order: [T, D] on every TP rank."""
    if torch.is_grad_enabled():
        return _Gather.apply(y_local, T, group)
    return _gather_rows(y_local, T, group)


class _CopyToTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        g = g.contiguous().clone()
        dist.all_reduce(g, group=ctx.group)
        return g, None


class _ReduceFromTP(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous().clone()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, g):
        return g, None


class TPSharedExperts(nn.Module):
    """Shared experts with the hidden dim sharded over ``tp_group``: this rank keeps rows
    ``tensor_split(F, tp)[rank]`` of ``gate_proj``/``up_proj`` and those columns of
    ``down_proj``; ``expert_gate`` is replicated. Output = all-reduce of the partial sums."""

    def __init__(self, shared: nn.Module, tp_group):
        super().__init__()
        self.group = tp_group
        if getattr(shared, "gate_up_proj", None) is not None:
            raise ValueError(
                "TP-sharded shared experts need separate gate_proj/up_proj: shared experts with "
                "fused_gate_up=True run local or external (apply_ep(shared_experts='local' or "
                "'external'))"
            )
        if getattr(getattr(shared, "config", None), "use_bias", False):
            raise ValueError(
                "TP-sharded shared experts have no biases: shared experts with use_bias=True run "
                "local or external (apply_ep(shared_experts='local' or 'external'))"
            )
        n, i = dist.get_world_size(tp_group), dist.get_rank(tp_group)
        m = copy.deepcopy(shared)
        Fh = m.up_proj.weight.shape[0]
        b = _bounds(Fh, n)
        sl = slice(b[i], b[i + 1])
        with torch.no_grad():
            for name in ("gate_proj", "up_proj"):
                lin = getattr(m, name)
                if lin is not None:
                    lin.weight = nn.Parameter(lin.weight[sl].clone())
            m.down_proj.weight = nn.Parameter(m.down_proj.weight[:, sl].clone())
        self.inner = m
        self.hidden_slice = (b[i], b[i + 1])

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        m = self.inner
        xin = _CopyToTP.apply(x_TD, self.group) if torch.is_grad_enabled() else x_TD
        up = F.linear(xin, m.up_proj.weight)
        h = m._act.gated(F.linear(xin, m.gate_proj.weight), up) if m.gate_proj is not None else m._act.unary(up)
        part = F.linear(h, m.down_proj.weight)
        if torch.is_grad_enabled():
            y = _ReduceFromTP.apply(part, self.group)
        else:
            y = part.contiguous().clone()
            dist.all_reduce(y, group=self.group)
        if m.expert_gate is not None:
            y = torch.sigmoid(m.expert_gate(x_TD)) * y
        return y
