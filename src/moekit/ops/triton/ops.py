"""The autograd function that composes the ``torch.library`` custom ops of ``custom_ops`` (each
with a fake implementation, so that ``torch.compile(fullgraph=True)`` traces through them), and
``fused_experts``: the ``fused`` entry of the ``triton`` backend.

Forward (3 kernels):  up (gather x rows by token + GEMM + bias + activation; saves the
pre-activation) -> down (grouped GEMM) -> combine (fixed-order weighted sum over k); at decode
(inference, ``fused_decode_tokens`` tokens or fewer) down and combine are one kernel.
Backward (5-6 kernels): down-dgrad (gather the output grad by token + GEMM, activation
derivative and routing-weight grad in the epilogue; in eager mode, unless the graph is
retained, it writes dH over the saved pre-activation; it also recomputes the activation, which
the forward then does not keep, where ``backward.recompute_activation`` says so; where
``backward.dgrad_mode`` says so, as two kernels: the gather GEMM, Triton's or cuBLAS's, then
the epilogue row-wise) -> dX
rows (grouped GEMM) -> gather-sum over k (no scatter, no atomics; the rows buffer is freed
here) -> dW_down, dW_up (grouped GEMMs over each expert's rows, gathering by token; for large
experts torch's cuBLAS grouped GEMM over gathered copies, see ``weight_grads.dw_uses_grouped_mm``).
Everything is deterministic.

Every choice above is a field of ``TritonBackend.Config`` (``moekit.ops.triton_backend``),
passed to :func:`fused_experts` as ``settings``; the custom ops take the launch-config
overrides as one plain string, ``tiles`` (``TritonBackend.Config.tiles_spec()``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from ...routing_plan import RoutingPlan
from ..triton_backend import TritonBackend
from ..triton_settings import parse_tiles
from . import backward as B
from . import decode as LD
from . import weight_grads as W
from .custom_ops import (
    combine_op,
    down_combine_op,
    down_dgrad_op,
    rows_gemm_op,
    up_op,
    weight_grad_op,
)

__all__ = ["FusedExperts", "fused_experts"]


# ----------------------------------------------------------------------------- autograd
class FusedExperts(torch.autograd.Function):
    """The fused experts, forward and backward. The code-path choices come resolved as plain
    arguments: ``cublas`` (the weight grads on torch grouped_mm), ``cublas_up`` (the up
    projection's, ``weight_grads.dw_up_uses_grouped_mm``), ``rows_cublas`` (the row GEMMs,
    ``weight_grads.rows_on_cublas``), ``recompute`` (the backward
    recomputes the activation), ``dgrad`` (the dgrad step's mode, ``backward.dgrad_mode``),
    ``inplace`` (the eager backward may write dH over h), ``tiles`` (launch-config overrides)
    and ``alpha``, ``limit`` (the ``gpt_oss`` activation's constants)."""

    @staticmethod
    def forward(ctx, x, w_up, w_down, b_up, b_down, topk_w, token_ids, sorted_slots, counts,
                offsets, inverse, expert_ids, act, gated, woi, interleaved, cublas, cublas_up,
                rows_cublas, recompute, dgrad, inplace, tiles, alpha, limit):
        roww = topk_w.reshape(-1).to(torch.float32).index_select(0, sorted_slots)
        h, a = up_op(x, w_up, b_up, token_ids, roww if woi else None, counts, offsets, act, gated,
                     True, False, interleaved, tiles, alpha, limit)
        y = _down_projection(a, w_down, b_down, counts, offsets, tiles, rows_cublas)
        out, _ = combine_op(y, inverse, None if woi else topk_w, None)
        # the rows' experts are read only for the down bias's routing-weight-grad term of the
        # split dgrad: not kept otherwise (an [N] int64 vector held to the end of the backward)
        keep_eids = b_down is not None and not woi
        ctx.save_for_backward(x, w_up, w_down, b_up, b_down, topk_w, token_ids, counts, offsets,
                              inverse, expert_ids if keep_eids else None, roww, h,
                              None if recompute else a)
        ctx.cublas, ctx.cublas_up, ctx.rows_cublas = cublas, cublas_up, rows_cublas
        ctx.recompute = recompute
        ctx.dgrad, ctx.inplace = dgrad, inplace
        ctx.act, ctx.gated, ctx.woi, ctx.interleaved = act, gated, woi, interleaved
        ctx.tiles, ctx.alpha, ctx.limit = tiles, alpha, limit
        return out

    @staticmethod
    def backward(ctx, g):
        inplace = ctx.inplace and _graph_freed_after_backward()
        dgrad, tiles = ctx.dgrad, ctx.tiles
        glu = {"alpha": ctx.alpha, "limit": ctx.limit}
        (x, w_up, w_down, b_up, b_down, topk_w, token_ids, counts, offsets, inverse, expert_ids,
         roww, h, a_saved) = ctx.saved_tensors
        cublas, recompute = ctx.cublas, ctx.recompute
        act, gated, woi, interleaved = ctx.act, ctx.gated, ctx.woi, ctx.interleaved
        need = ctx.needs_input_grad
        g = g.to(x.dtype).contiguous()
        if inplace:
            # dH overwrites h (nothing reads h after this kernel, and the graph is freed after
            # this backward); the version bump makes any stray later use fail loudly
            dh, a, dwt_N = B.down_dgrad(g, w_down, b_down, token_ids, roww, h, counts, offsets,
                                        act, gated, woi, recompute, out=h, expert_ids_N=expert_ids,
                                        interleaved=interleaved, mode=dgrad,
                                        tiles=parse_tiles(tiles), **glu)
            torch.autograd.graph.increment_version(h)
        else:
            dh, a, dwt_N = down_dgrad_op(g, w_down, b_down, token_ids, roww, h, counts, offsets,
                                         act, gated, woi, recompute, expert_ids, interleaved, dgrad,
                                         tiles, **glu)
        if not recompute:
            a = a_saved
        dw_down = db_down = dw_up = db_up = dx = dtopk = None
        # memory order: dX first (its [rows, D] buffer is freed before the weight grads exist),
        # then dW_down (the last use of a recomputed activation, freed before dW_up)
        if need[0] or (woi and need[5]):
            dx_rows = input_grad_rows(dh, w_up, counts, offsets, tiles, ctx.rows_cublas)
            dx, dot = combine_op(dx_rows, inverse, topk_w if woi else None, x if woi else None)
            del dx_rows
            if woi:
                dtopk = dot
        if need[2] or need[4]:
            # a recomputed by a split dgrad already carries the routing weight
            prescaled = recompute and B.activation_prescaled(dgrad, woi)
            dw_down, db_down = weight_grad_op(g, token_ids, a, None, None if woi else roww, True,
                                              counts, offsets, b_down is not None, cublas, tiles,
                                              _stored_transposed(w_down), not prescaled)
            if b_down is None:
                db_down = None
        del a, a_saved
        if need[1] or need[3]:
            dw_up, db_up = weight_grad_op(dh, None, x, token_ids, roww if woi else None, False,
                                          counts, offsets, b_up is not None, ctx.cublas_up, tiles,
                                          _stored_transposed(w_up))
            if b_up is None:
                db_up = None
        if need[5] and not woi:
            dtopk = slot_grads(dwt_N, inverse)
        if dtopk is not None:
            dtopk = dtopk.to(topk_w.dtype)
        if db_up is not None:
            db_up = db_up.to(b_up.dtype)
        if db_down is not None:
            db_down = db_down.to(b_down.dtype)
        return (dx if need[0] else None, dw_up if need[1] else None,
                dw_down if need[2] else None, db_up if need[3] else None,
                db_down if need[4] else None, dtopk if need[5] else None,
                None, None, None, None, None, None, None, None, None, None,
                None, None, None, None, None, None, None, None, None)


def slot_grads(grad_N: torch.Tensor, inverse_TK: torch.Tensor) -> torch.Tensor:
    """``[T, K]``: each slot's value of the per-row ``grad_N`` (its row's; 0 where the slot has
    no row: dropped, or a zero expert)."""
    idx = torch.where(inverse_TK < 0, grad_N.shape[0], inverse_TK).reshape(-1)
    return torch.cat([grad_N, grad_N.new_zeros(1)]).index_select(0, idx).view(inverse_TK.shape)


def _down_projection(a, w_down, b_down, counts, offsets, tiles, cublas: bool) -> torch.Tensor:
    """The forward's down projection ``[N, D]``: torch's grouped GEMM (cuBLAS) where
    ``cublas`` (``weight_grads.rows_on_cublas``) and there is no down bias (its rows are already
    sorted; H200, the GEMM alone against the pointer-fed Triton kernel: mixtral 3.45 -> 2.91
    ms, deepseek-64e 3.96 -> 3.23, the same output bit for bit), else the Triton row GEMM."""
    if cublas and b_down is None:
        return W.grouped_mm(a, w_down.transpose(1, 2), offsets)
    return rows_gemm_op(a, w_down, b_down, counts, offsets, tiles)


def input_grad_rows(dh, w_up, counts, offsets, tiles, cublas: bool, out_rows=None) -> torch.Tensor:
    """The input grad's rows ``dH @ W_up`` ``[N, D]``: cuBLAS's grouped GEMM where ``cublas``
    (``weight_grads.rows_on_cublas``; large experts, dH's rows are in order), else the Triton row
    GEMM, which with ``out_rows`` writes row n at row ``out_rows[n]``."""
    if cublas:
        if out_rows is not None:
            raise ValueError("input_grad_rows: out_rows needs the Triton row GEMM (cublas=False)")
        return W.grouped_mm(dh, w_up, offsets)
    return rows_gemm_op(dh, w_up.transpose(1, 2), None, counts, offsets, tiles, out_rows)


@dataclass(frozen=True)
class TrainingPaths:
    """The code paths of one training call (from ``TritonBackend.Config`` and the sizes):
    ``cublas``/``cublas_up`` (the weight grads on torch grouped_mm), ``rows_cublas`` (the row
    GEMMs), ``dgrad`` (the dgrad step's mode) and ``recompute`` (the activation recomputed)."""

    cublas: bool
    cublas_up: bool
    rows_cublas: bool
    dgrad: str
    recompute: bool


def training_paths(s: TritonBackend.Config, tiles: str, x: torch.Tensor, n_rows: int,
                   n_experts: int, hidden: int) -> TrainingPaths:
    """The :class:`TrainingPaths` of ``n_rows`` rows over ``n_experts`` experts of hidden size
    ``hidden`` (``x``: the dtype, device and model dim of the rows)."""
    D = x.shape[-1]
    cublas = W.dw_uses_grouped_mm(n_rows, n_experts, D, hidden, x.dtype, x.device, s.dw)
    cublas_up = W.dw_up_uses_grouped_mm(n_rows, n_experts, D, hidden, x.dtype, x.device, s.dw)
    rows_cublas = W.rows_on_cublas(cublas, parse_tiles(tiles), x, n_rows, n_experts)
    dgrad = B.dgrad_mode(hidden, cublas, s.dgrad, rows_cublas)
    return TrainingPaths(cublas, cublas_up, rows_cublas, dgrad,
                         B.recompute_activation(dgrad, s.recompute_act))


def _stored_transposed(w_EOI: torch.Tensor) -> bool:
    """Whether the weight ``[E, O, I]`` is a transposed view of a contiguous ``[E, I, O]``
    (transformers' experts stored ``(in, out)``): its grad is then made in that layout."""
    return w_EOI.shape[1] > 1 and w_EOI.stride(1) == 1 and w_EOI.stride(2) == w_EOI.shape[1]


def _graph_freed_after_backward() -> bool:
    """Whether this backward may write dH over the saved pre-activation (where
    ``TritonBackend.Config.inplace_dgrad`` allows it): in eager mode, when the graph is freed
    after it (not ``retain_graph=True``, which another backward will read h from). Under
    torch.compile the functional op keeps the graph pure."""
    if torch.compiler.is_compiling():
        return False
    keep_graph = getattr(torch._C._autograd, "_get_current_graph_task_keep_graph", None)
    return keep_graph is not None and not keep_graph()


def _needs_grad(*ts) -> bool:
    return torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in ts)


def fused_experts(
    x_TD: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    plan: RoutingPlan,
    topk_weights_TK: torch.Tensor,
    *,
    activation: str,
    gated: bool,
    gate_up_proj_bias: torch.Tensor | None = None,
    down_proj_bias: torch.Tensor | None = None,
    weight_on_input: bool = False,
    gate_up_interleaved: bool = False,
    settings: TritonBackend.Config | None = None,
    tiles: str | None = None,
    alpha: float = GPT_OSS_ALPHA,
    limit: float = GPT_OSS_LIMIT,
) -> torch.Tensor:
    """The whole routed-experts computation in the fused Triton kernels (``TritonBackend``'s
    ``fused`` entry); differentiable in x, both weights, both biases and the routing weights.
    ``settings``: the code-path choices (default ``TritonBackend.Config()``); ``tiles``: its
    ``tiles_spec()``, when the caller has it already; ``alpha``, ``limit``: the ``gpt_oss``
    activation's constants (GPT-OSS's ``swiglu_alpha``, ``swiglu_limit``)."""
    s = TritonBackend.Config() if settings is None else settings
    if tiles is None:
        tiles = s.tiles_spec()
    args = (x_TD, gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias, topk_weights_TK)
    if _needs_grad(*args):
        cp = training_paths(s, tiles, x_TD, plan.num_rows, plan.num_experts, down_proj.shape[2])
        return FusedExperts.apply(
            *args, plan.token_ids_N, plan.sorted_slots_N, plan.counts_E, plan.offsets_E,
            plan.inverse_TK, plan.expert_ids_N, activation, gated, weight_on_input,
            gate_up_interleaved, cp.cublas, cp.cublas_up, cp.rows_cublas, cp.recompute, cp.dgrad,
            s.inplace_dgrad, tiles, float(alpha), float(limit),
        )
    # inference: no pre-activation is stored; for a token or so (decode) the down projection
    # and the combine are one kernel
    roww = None
    if weight_on_input:
        roww = topk_weights_TK.reshape(-1).to(torch.float32).index_select(0, plan.sorted_slots_N)
    combine_w = None if weight_on_input else topk_weights_TK
    fuse = x_TD.shape[0] <= s.fused_decode_tokens
    pdl = fuse and LD.use_pdl(x_TD.device, s.pdl)
    _, a = up_op(x_TD, gate_up_proj, gate_up_proj_bias, plan.token_ids_N, roww, plan.counts_E,
                 plan.offsets_E, activation, gated, False, pdl, gate_up_interleaved, tiles,
                 alpha, limit)
    if fuse:
        return down_combine_op(a, down_proj, down_proj_bias, plan.inverse_TK, plan.expert_ids_N,
                               combine_w, pdl, tiles)
    cublas = W.dw_uses_grouped_mm(plan.num_rows, plan.num_experts, x_TD.shape[1],
                                  down_proj.shape[2], x_TD.dtype, x_TD.device, s.dw)
    rows_cublas = W.rows_on_cublas(cublas, parse_tiles(tiles), x_TD, plan.num_rows, plan.num_experts)
    y = _down_projection(a, down_proj, down_proj_bias, plan.counts_E, plan.offsets_E, tiles,
                         rows_cublas)
    out, _ = combine_op(y, plan.inverse_TK, combine_w, None)
    return out
