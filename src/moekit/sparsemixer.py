"""SparseMixer top-2 routing (PhiMoE; Liu et al., "GRIN: GRadient-INformed MoE", 2024).

Two picks, one after the other. For each pick, with ``m`` the largest logit still eligible
(the first pick's expert is not eligible for the second), every expert whose logit ``l``
has ``(m - l) / max(|l|, m) > 2 * eps`` is masked out, and the pick's weight is the softmax,
over the experts left (and still eligible), taken at the picked expert. ``eps`` is
PhiMoE's ``router_jitter_noise``.

Evaluation picks the eligible expert of largest logit. Training samples the pick from that
masked softmax (Gumbel-max) and multiplies the weight by 1, or by 1/3 when the sample is not
the masked softmax's argmax and a uniform draw is <= 0.75 (Heun's third-order estimate); the
gradient is that of the masked softmax at the pick, without the multiplier. The random draws
are those of transformers' ``sparsemixer``, in the same order, so a module in training mode
reproduces it from the same RNG state.
"""

from __future__ import annotations

import torch

__all__ = ["sparsemixer_top2"]


def _threshold_mask(logits: torch.Tensor, top: torch.Tensor, eps: float) -> torch.Tensor:
    """True where an expert's logit is more than ``2 eps`` (relative) below ``top``."""
    factor = logits.abs().clamp(min=top)
    return ((top - logits) / factor) > (2 * eps)


def _pick(eligible: torch.Tensor, logits: torch.Tensor, eps: float, training: bool, second: bool):
    """One SparseMixer pick over ``eligible`` logits (-inf = not eligible): (ids [T, 1],
    weights [T, 1])."""
    with torch.no_grad():
        top, top_ind = eligible.max(dim=-1, keepdim=True)
        mask = _threshold_mask(logits, top, eps)
    masked = eligible.masked_fill(mask, float("-inf"))
    if training:
        noise = torch.empty_like(masked, memory_format=torch.legacy_contiguous_format)
        ids = (masked - noise.exponential_().log()).max(dim=-1)[1].unsqueeze(-1)  # Gumbel-max
    else:
        ids = top_ind
    probs = torch.softmax(masked, dim=-1)
    w = probs.gather(dim=-1, index=ids)
    if not training:
        return ids, w
    with torch.no_grad():
        best = probs.max(dim=-1, keepdim=True)
        u = torch.rand_like(best.values)
        if second:  # transformers draws twice here (rand_like, then uniform_)
            u = u.uniform_()
        keep_one = torch.logical_or(ids == best.indices, u > 0.75)
        mult = torch.add(0.3333, keep_one, alpha=0.6667).type_as(probs)
    # forward: w * mult; gradient: that of w alone (exactly w * mult: w - w.detach() is 0)
    return ids, (w * mult).detach() + (w - w.detach())


def sparsemixer_top2(logits: torch.Tensor, eps: float, training: bool):
    """SparseMixer's two picks of ``logits`` [T, E]: (ids int64 [T, 2], weights [T, 2], in
    the logits' dtype)."""
    ids1, w1 = _pick(logits, logits, eps, training, second=False)
    rest = torch.scatter(logits, -1, ids1, float("-inf"))
    ids2, w2 = _pick(rest, logits, eps, training, second=True)
    return torch.cat((ids1, ids2), dim=-1), torch.cat((w1, w2), dim=-1)
