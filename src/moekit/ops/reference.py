"""The reference backend: a plain per-expert loop. Slow and obviously correct."""

from __future__ import annotations

import torch

__all__ = ["grouped_linear_loop"]


def grouped_linear_loop(
    x_NI: torch.Tensor,
    w_EOI: torch.Tensor,
    counts_E: torch.Tensor,
    bias_EO: torch.Tensor | None = None,
) -> torch.Tensor:
    """``out[rows of e] = x[rows of e] @ w[e].T (+ bias[e])`` for rows grouped by expert."""
    outs = []
    for e, rows in enumerate(torch.split(x_NI, counts_E.tolist())):
        y = rows @ w_EOI[e].transpose(0, 1)
        if bias_EO is not None:
            y = y + bias_EO[e]
        outs.append(y)
    if not outs:
        return x_NI.new_zeros(x_NI.shape[0], w_EOI.shape[1])
    return torch.cat(outs)
