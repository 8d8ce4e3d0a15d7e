"""``torch.library`` custom ops over the launchers, each with a fake implementation (so that
``torch.compile(fullgraph=True)`` traces through them): the forward's up projection, row GEMM,
combine and fused decode down + combine, the backward's dgrad and weight grads. They take the
launch-config overrides as one plain string, ``tiles`` (``TritonBackend.Config.tiles_spec()``).
``ops`` composes them into the fused experts call.
"""

from __future__ import annotations

# the custom ops' signatures spell optional tensors as Optional[...]: the form torch.library's
# schema inference has understood longest (torch 2.11 runs it on the GPU machine)
# ruff: noqa: UP045
from typing import Optional

import torch

from ...activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT
from ..triton_settings import parse_tiles
from . import backward as B
from . import decode as LD
from . import launchers as L
from . import weight_grads as W

__all__ = ["combine_op", "down_combine_op", "down_dgrad_op", "rows_gemm_op", "up_op", "weight_grad_op"]

_NS = "moekit_triton"


@torch.library.custom_op(f"{_NS}::up", mutates_args=())
def up_op(
    x: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], token_ids: torch.Tensor,
    roww: Optional[torch.Tensor], counts: torch.Tensor, offsets: torch.Tensor,
    act: str, gated: bool, store_h: bool, pdl: bool = False, interleaved: bool = False,
    tiles: str = "", alpha: float = GPT_OSS_ALPHA, limit: float = GPT_OSS_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor]:
    return L.up_forward(x, w, b, token_ids, roww, counts, offsets, act, gated, store_h, pdl,
                        interleaved, parse_tiles(tiles), alpha, limit)


@up_op.register_fake
def _(x, w, b, token_ids, roww, counts, offsets, act, gated, store_h, pdl=False, interleaved=False,
      tiles="", alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT):
    N, H = token_ids.shape[0], w.shape[1]
    F = H // 2 if gated else H
    return x.new_empty((N, H) if store_h else (0, H)), x.new_empty(N, F)


@torch.library.custom_op(f"{_NS}::rows_gemm", mutates_args=())
def rows_gemm_op(
    a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], counts: torch.Tensor,
    offsets: torch.Tensor, tiles: str = "", out_rows: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    return L.rows_gemm(a, w, b, counts, offsets, parse_tiles(tiles), out_rows)


@rows_gemm_op.register_fake
def _(a, w, b, counts, offsets, tiles="", out_rows=None):
    return a.new_empty(a.shape[0], w.shape[1])


@torch.library.custom_op(f"{_NS}::combine", mutates_args=())
def combine_op(
    y: torch.Tensor, inverse: torch.Tensor, weights: Optional[torch.Tensor],
    dot_with: Optional[torch.Tensor],
) -> tuple[torch.Tensor, torch.Tensor]:
    return L.combine(y, inverse, weights, dot_with)


@combine_op.register_fake
def _(y, inverse, weights, dot_with):
    T, K = inverse.shape
    dot = y.new_empty((T, K) if dot_with is not None else (0,), dtype=torch.float32)
    return y.new_empty(T, y.shape[1]), dot


@torch.library.custom_op(f"{_NS}::down_combine", mutates_args=())
def down_combine_op(
    a: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], inverse: torch.Tensor,
    expert_ids: torch.Tensor, weights: Optional[torch.Tensor], pdl: bool = False, tiles: str = "",
) -> torch.Tensor:
    return LD.down_combine(a, w, b, inverse, expert_ids, weights, pdl, parse_tiles(tiles))


@down_combine_op.register_fake
def _(a, w, b, inverse, expert_ids, weights, pdl=False, tiles=""):
    return a.new_empty(inverse.shape[0], w.shape[1])


@torch.library.custom_op(f"{_NS}::down_dgrad", mutates_args=())
def down_dgrad_op(
    g: torch.Tensor, w: torch.Tensor, b: Optional[torch.Tensor], token_ids: torch.Tensor,
    roww: torch.Tensor, h: torch.Tensor, counts: torch.Tensor, offsets: torch.Tensor,
    act: str, gated: bool, woi: bool, store_a: bool, expert_ids: Optional[torch.Tensor] = None,
    interleaved: bool = False, mode: str = "fused", tiles: str = "",
    alpha: float = GPT_OSS_ALPHA, limit: float = GPT_OSS_LIMIT,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    return B.down_dgrad(g, w, b, token_ids, roww, h, counts, offsets, act, gated, woi, store_a,
                        expert_ids_N=expert_ids, interleaved=interleaved, mode=mode,
                        tiles=parse_tiles(tiles), alpha=alpha, limit=limit)


@down_dgrad_op.register_fake
def _(g, w, b, token_ids, roww, h, counts, offsets, act, gated, woi, store_a, expert_ids=None,
      interleaved=False, mode="fused", tiles="", alpha=GPT_OSS_ALPHA, limit=GPT_OSS_LIMIT):
    N, F = h.shape[0], w.shape[2]
    return (h.new_empty(h.shape), h.new_empty(N if store_a else 0, F),
            h.new_empty(N, dtype=torch.float32))


@torch.library.custom_op(f"{_NS}::weight_grad", mutates_args=())
def weight_grad_op(
    l_src: torch.Tensor, l_tok: Optional[torch.Tensor], r_src: torch.Tensor,
    r_tok: Optional[torch.Tensor], roww: Optional[torch.Tensor], scale_left: bool,
    counts: torch.Tensor, offsets: torch.Tensor, with_bias: bool, use_grouped_mm: bool = False,
    tiles: str = "", transposed: bool = False, scale_dw: bool = True,
) -> tuple[torch.Tensor, torch.Tensor]:
    dw, db = W.weight_grad(
        l_src, l_tok, r_src, r_tok, roww, scale_left, counts, offsets, l_src.dtype, with_bias,
        use_grouped_mm, transposed, scale_dw, parse_tiles(tiles),
    )
    return dw, (db if db is not None else l_src.new_empty(0))


@weight_grad_op.register_fake
def _(l_src, l_tok, r_src, r_tok, roww, scale_left, counts, offsets, with_bias, use_grouped_mm=False,
      tiles="", transposed=False, scale_dw=True):
    E, O, I = counts.shape[0], l_src.shape[1], r_src.shape[1]
    dw = l_src.new_empty(E, I, O).transpose(1, 2) if transposed else l_src.new_empty(E, O, I)
    return dw, (l_src.new_empty(E, O) if with_bias else l_src.new_empty(0))
