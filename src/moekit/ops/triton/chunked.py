"""The triton backend's chunk runner (``moekit.ops.chunked`` says what a runner does): each
chunk's forward and input-grad backward run the fused kernels on that chunk's group of
experts, and the weight grads are made once, after every chunk's backward, over all chunks'
rows (two grouped GEMMs, as ``FusedExperts`` makes them on one process): no per-chunk weight
grad, no accumulation, no copy of the weight grads.

Chunk ``c``'s rows sit at rows ``[base_c, base_c + R_c)`` of the received buffers that
``weight_grads(x_RD, dy_RD)`` is given; its experts ``[lo, hi)`` come after the previous
chunk's, so the chunks' expert-sorted rows, one after another, are all the rows sorted by
expert.

A chunk's rows are either routed slots of weight 1 (``ids [R, 1]``; the row exchange: the
row GEMMs write them back in the received order, no combine) or tokens (``weights [R, K]``;
the token exchange): their rows are made by the plan, as on one process, and the combine sums
each token's experts with its routing weights (in ``out_dtype``; the routing-weight grad comes
from the dgrad's epilogue, :meth:`TritonChunks.routing_grad`).
"""

from __future__ import annotations

import torch

from ...activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT, activation_params
from ..triton_settings import parse_tiles
from . import backward as B
from . import launchers as L
from .custom_ops import combine_op, rows_gemm_op, up_op, weight_grad_op
from .ops import (
    _down_projection,
    _graph_freed_after_backward,
    _stored_transposed,
    input_grad_rows,
    slot_grads,
    training_paths,
)

__all__ = ["TritonChunks"]


class TritonChunks:
    """Chunk runner of the fused kernels, for training (``backend``: a TritonBackend;
    ``weights``: ``(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)`` of all local
    experts, not differentiated through: the grads come from :meth:`weight_grads`;
    ``total_rows``: the rows of all chunks, which sets the same code-path choices as one
    ``FusedExperts`` call over them)."""

    def __init__(self, backend, weights, *, activation: str, total_rows: int):
        self.backend = backend
        s, self.tiles = backend.config, backend.tiles
        self.w_up, self.w_down, self.b_up, self.b_down = (
            None if w is None else w.detach() for w in weights)
        base, params = activation_params(activation)
        self.act = base
        self.alpha = float(params.get("alpha", GPT_OSS_ALPHA))
        self.limit = float(params.get("limit", GPT_OSS_LIMIT))
        L, F = self.w_down.shape[0], self.w_down.shape[2]
        self.gated = self.w_up.shape[1] == 2 * F
        # (w_down [L, D, F]: the rows' dtype, device and model dim)
        cp = training_paths(s, self.tiles, self.w_down.transpose(1, 2), total_rows, L, F)
        self.cublas, self.cublas_up, self.rows_cublas = cp.cublas, cp.cublas_up, cp.rows_cublas
        self.dgrad, self.recompute, self.inplace = cp.dgrad, cp.recompute, s.inplace_dgrad
        self._chunks: dict[int, dict] = {}

    def _glu(self) -> dict:
        return {"alpha": self.alpha, "limit": self.limit}

    def forward(self, c: int, x_RD: torch.Tensor, ids_RK: torch.Tensor, lo: int, hi: int, *,
                base: int, capacity=None, drop_policy: str = "position", row_weights=None,
                weights=None, num_zero_experts: int = 0, num_real_slots=None, out_dtype=None):
        dt = out_dtype or x_RD.dtype
        if x_RD.shape[0] == 0 or hi == lo:  # no rows: the group's experts get zero grads
            H, F = self.w_up.shape[1], self.w_down.shape[2]
            self._chunks[c] = {"plan": None, "lo": lo, "hi": hi, "base": base,
                               "counts": torch.zeros(hi - lo, dtype=torch.int32, device=x_RD.device),
                               "tok": torch.zeros(0, dtype=torch.int64, device=x_RD.device),
                               "roww": torch.zeros(0, dtype=torch.float32, device=x_RD.device),
                               "a": x_RD.new_empty(0, F), "dh": x_RD.new_empty(0, H),
                               "dw": None if weights is None else torch.zeros_like(weights)}
            return x_RD.new_zeros(x_RD.shape, dtype=dt)
        plan = self.backend.make_plan(ids_RK, hi - lo, capacity=capacity, drop_policy=drop_policy,
                                      topk_weights_TK=row_weights if weights is None else weights,
                                      num_zero_experts=num_zero_experts,
                                      num_real_slots=num_real_slots, check_ids=False)
        w_up, w_down = self.w_up[lo:hi], self.w_down[lo:hi]
        b_up = None if self.b_up is None else self.b_up[lo:hi]
        b_down = None if self.b_down is None else self.b_down[lo:hi]
        if weights is None:
            roww = torch.ones(plan.num_rows, device=x_RD.device, dtype=torch.float32)
        else:
            roww = weights.reshape(-1).float().index_select(0, plan.sorted_slots_N)
        h, a = up_op(x_RD, w_up, b_up, plan.token_ids_N, None, plan.counts_E, plan.offsets_E,
                     self.act, self.gated, True, False, False, self.tiles, self.alpha, self.limit)
        if weights is None and self._scatter(plan):  # the rows land in the received order
            out = rows_gemm_op(a, w_down, b_down, plan.counts_E, plan.offsets_E, self.tiles,
                               plan.token_ids_N)
        else:
            y = _down_projection(a, w_down, b_down, plan.counts_E, plan.offsets_E, self.tiles,
                                 self.rows_cublas)
            out, _ = L.combine(y, plan.inverse_TK, weights, None, dt)
        self._chunks[c] = {"plan": plan, "h": h, "a": None if self.recompute else a,
                           "roww": roww, "lo": lo, "hi": hi, "base": base,
                           "counts": plan.counts_E, "tok": plan.token_ids_N,
                           "weighted": weights is not None, "dt": dt}
        return out

    def backward(self, c: int, dy_RD: torch.Tensor) -> torch.Tensor:
        k = self._chunks[c]
        plan, lo, hi = k["plan"], k["lo"], k["hi"]
        if plan is None:
            return torch.zeros_like(dy_RD)
        w_up, w_down = self.w_up[lo:hi], self.w_down[lo:hi]
        b_down = None if self.b_down is None else self.b_down[lo:hi]
        g = dy_RD.to(self.w_down.dtype).contiguous()
        inplace = self.inplace and _graph_freed_after_backward()
        dh, a, dwt = B.down_dgrad(
            g, w_down, b_down, plan.token_ids_N, k["roww"], k["h"], plan.counts_E, plan.offsets_E,
            self.act, self.gated, False, self.recompute, out=k["h"] if inplace else None,
            expert_ids_N=plan.expert_ids_N if b_down is not None else None, interleaved=False,
            mode=self.dgrad, tiles=parse_tiles(self.tiles), **self._glu())
        k["h"] = None
        k["dh"] = dh
        if self.recompute:
            k["a"] = a
        if k["weighted"]:  # each slot's routing-weight grad
            k["dw"] = slot_grads(dwt, plan.inverse_TK)
        scatter = not k["weighted"] and self._scatter(plan)
        dx_rows = input_grad_rows(dh, w_up, plan.counts_E, plan.offsets_E, self.tiles,
                                  self.rows_cublas, plan.token_ids_N if scatter else None)
        if scatter:  # already in the received order
            return dx_rows
        if k["weighted"]:
            return L.combine(dx_rows, plan.inverse_TK, None, None, k["dt"])[0]
        dx, _ = combine_op(dx_rows, plan.inverse_TK, None, None)
        return dx

    def routing_grad(self, c: int) -> torch.Tensor | None:
        """The grad of chunk ``c``'s ``weights`` (after its :meth:`backward`; None when the
        chunk's rows had none)."""
        return self._chunks[c].pop("dw", None)

    def _scatter(self, plan) -> bool:
        """Whether the row GEMMs write the rows straight back in the received order (every
        received row is one row of the plan: dropless; on the Triton row GEMM)."""
        return plan.capacity is None and not self.rows_cublas

    def weight_grads(self, x_RD: torch.Tensor, dy_RD: torch.Tensor,
                     needs=None) -> list[torch.Tensor | None]:
        """``[dW_up, dW_down, dB_up, dB_down]`` over every chunk's rows (``x_RD``, ``dy_RD``:
        the received rows and their output grads, all chunks; ``needs``: which of the four
        are wanted, all when None: an up or down pair not wanted is not made)."""
        ks = [self._chunks[c] for c in sorted(self._chunks)]
        self._chunks = {}
        needs = [True] * 4 if needs is None else list(needs)
        want_up, want_down = needs[0] or needs[2], needs[1] or needs[3]
        one = len(ks) == 1
        tok = ks[0]["tok"] if one else torch.cat([k["tok"] + k["base"] for k in ks])
        counts = ks[0]["counts"] if one else torch.cat([k["counts"] for k in ks])
        weighted = any(k.get("weighted") for k in ks)
        roww = None
        if weighted:  # the token exchange: rows of routing weight other than 1
            roww = ks[0]["roww"] if one else torch.cat([k["roww"] for k in ks])
        offsets = torch.cumsum(counts, 0, dtype=torch.int32)
        a = ks[0]["a"] if one else torch.cat([k["a"] for k in ks])
        for k in ks:
            k["a"] = None
        dw_up = dw_down = db_up = db_down = None
        if want_down:
            # a recomputed by a split dgrad already carries the routing weight
            prescaled = self.recompute and B.activation_prescaled(self.dgrad, False)
            dw_down, db_down = weight_grad_op(
                dy_RD.to(self.w_down.dtype).contiguous(), tok, a, None, roww, True, counts,
                offsets, self.b_down is not None, self.cublas, self.tiles,
                _stored_transposed(self.w_down), not (weighted and prescaled))
        del a
        if want_up:
            dh = ks[0]["dh"] if one else torch.cat([k["dh"] for k in ks])
            for k in ks:
                k["dh"] = None
            dw_up, db_up = weight_grad_op(
                dh, None, x_RD, tok, None, False, counts, offsets, self.b_up is not None,
                self.cublas_up, self.tiles, _stored_transposed(self.w_up))
        return [dw_up, dw_down,
                None if self.b_up is None or db_up is None else db_up.to(self.b_up.dtype),
                None if self.b_down is None or db_down is None else db_down.to(self.b_down.dtype)]
