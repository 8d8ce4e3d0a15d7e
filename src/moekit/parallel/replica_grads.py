"""The gradient sum over the replicas of redundant experts (:class:`_ReplicaGradSum`): with a
placement that holds an expert on several ranks, ``ExpertParallel._params`` (``ep.py``) passes
the local expert tensors through it, so that every replica gets the gradient of the whole layer
for its expert (one all-reduce in the backward) and the replicas stay identical.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

__all__ = ["_ReplicaGradSum"]


class _ReplicaGradSum(torch.autograd.Function):
    """Identity on the local expert tensors; the backward sums the gradients of the replicas
    of each redundant expert over the group (one all-reduce), so every replica gets the
    gradient of the whole layer for that expert."""

    @staticmethod
    def forward(ctx, mod, *tensors):
        ctx.mod = mod
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        mod = ctx.mod
        rows = mod._replica_rows  # [L] row in the hot buffer of each local slot, -1 if not hot
        H = mod._num_hot
        flat = []
        for g, shape in zip(grads, mod._param_shapes):
            g = torch.zeros(shape, device=rows.device, dtype=mod._grad_dtype) if g is None else g
            buf = g.new_zeros((H + 1,) + tuple(shape[1:]))
            idx = torch.where(rows < 0, H, rows)
            buf.index_add_(0, idx, g.to(buf.dtype))
            flat.append(buf[:H].reshape(-1))
        big = torch.cat(flat) if flat else None
        dist.all_reduce(big, group=mod.group)
        out, off = [], 0
        for g, shape in zip(grads, mod._param_shapes):
            n = H * math.prod(shape[1:])
            summed = big[off:off + n].view((H,) + tuple(shape[1:]))
            off += n
            g = torch.zeros(shape, device=rows.device, dtype=big.dtype) if g is None else g
            hot = rows >= 0
            g = torch.where(
                hot.view((-1,) + (1,) * (len(shape) - 1)),
                summed.index_select(0, rows.clamp(min=0)).to(g.dtype), g,
            ) if shape[0] > 0 else g
            out.append(g)
        return (None, *out)
