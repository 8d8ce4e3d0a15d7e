"""The experts benchmark's shapes, inputs and implementations: ``Shape`` and the shape tables
(``SHAPES`` on a GPU, ``CPU_SHAPES`` for the smoke test), ``IMPLS``, ``make_inputs`` (weights,
tokens and routing of one shape) and ``_get_impl``: moekit's backends, transformers' experts
functions (``integrations.moe``), a replica of transformers' eager loop, and ScatterMoE.
Driven by ``moekit.benchmark``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .ops import moe_experts


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    D: int
    F: int
    E: int
    K: int
    kind: str = "train"  # "train" | "decode" | "layer"

    @property
    def fwd_flops(self) -> float:
        return 6.0 * self.T * self.K * self.D * self.F


SHAPES = [  # in the order they run (the cheap, most-asked-for first)
    Shape("qwen3-30b-a3b", 16384, 2048, 768, 128, 8),
    Shape("qwen3-decode-T1", 1, 2048, 768, 128, 8, "decode"),
    Shape("qwen3-decode-T8", 8, 2048, 768, 128, 8, "decode"),
    Shape("qwen3-decode-T64", 64, 2048, 768, 128, 8, "decode"),
    Shape("qwen3-30b-a3b-layer", 16384, 2048, 768, 128, 8, "layer"),
    Shape("mixtral-8x7b", 8192, 4096, 14336, 8, 2),
    Shape("deepseek-v3-64e", 8192, 7168, 2048, 64, 8),
    Shape("gpt-oss-20b", 16384, 2880, 2880, 32, 4),
    Shape("olmoe", 16384, 2048, 1024, 64, 8),
    Shape("deepseek-v3-64e-layer", 8192, 7168, 2048, 64, 8, "layer"),
]
CPU_SHAPES = [
    Shape("tiny-cpu", 64, 64, 32, 8, 2),
    Shape("tiny-cpu-decode-T1", 1, 64, 32, 8, 2, "decode"),
    Shape("tiny-cpu-layer", 64, 64, 32, 8, 2, "layer"),
]
IMPLS = ["moekit-triton", "moekit-grouped_mm", "hf-grouped_mm", "hf-batched_mm", "hf-eager",
         "scattermoe", "moekit-loop"]


# ----------------------------------------------------------------------------- inputs
def make_inputs(shape: Shape, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, D, Fh, E, K = shape.T, shape.D, shape.F, shape.E, shape.K

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(T, D)
    w1 = rnd(E, 2 * Fh, D, std=D ** -0.5)
    w2 = rnd(E, D, Fh, std=Fh ** -0.5)
    scores = torch.randn(T, E, generator=g)
    top = scores.topk(K, dim=-1)
    ids = top.indices.to(device)
    wts = torch.softmax(top.values, dim=-1).to(device=device, dtype=dtype)
    return x, w1, w2, ids, wts


# ----------------------------------------------------------------------------- impls
def _moekit(backend: str):
    def f(x, w1, w2, ids, wts, plan=None):
        return moe_experts(x, w1, w2, ids, wts, activation="silu", backend=backend, plan=plan)
    return f


class _HFExperts(torch.nn.Module):
    """Just the attributes transformers' experts functions read (non-transposed, gated, no bias)."""

    def __init__(self, w1, w2):
        super().__init__()
        self.gate_up_proj, self.down_proj = w1, w2
        self.num_experts = w1.shape[0]
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.is_concatenated = True
        self.has_post_expert_norm = False
        self._is_expert_parallel = False
        self.act_fn = F.silu

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def _hf(name: str):
    from transformers.integrations import moe as hf_moe  # noqa: WPS433

    fn = getattr(hf_moe, f"{name}_experts_forward")

    def f(x, w1, w2, ids, wts, plan=None):
        return fn(_HFExperts(w1, w2), x, ids, wts)
    return f


def _hf_eager(x, w1, w2, ids, wts, plan=None):
    """transformers' eager experts loop (Qwen3MoeExperts / MixtralExperts style)."""
    E = w1.shape[0]
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)  # [E, K, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e[0])
        k_idx, tok = torch.where(mask[e])
        cur = x[tok]
        gate, up = F.linear(cur, w1[e]).chunk(2, dim=-1)
        cur = F.linear(F.silu(gate) * up, w2[e]) * wts[tok, k_idx, None]
        out = out.index_add(0, tok, cur.to(out.dtype))
    return out


def _scattermoe():
    from scattermoe.parallel_experts import parallel_linear  # noqa: WPS433

    def f(x, w1, w2, ids, wts, plan=None):
        E = w1.shape[0]
        K = ids.shape[1]
        with torch.no_grad():  # as scattermoe's own flatten_sort_count
            flat = ids.flatten()
            sorted_e, sorted_idx = torch.sort(flat)
            offs = torch.bincount(flat, minlength=E).cumsum(-1)
        # the GLU is applied here (not by scattermoe's GLUMLP, which wants [up; gate] rows), so
        # our [gate; up] weights are used as they are: no reordered copy inside the timing
        h = parallel_linear(x, w1.permute(0, 2, 1), K, sorted_e, sorted_idx, offs, grouped_out=True)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        return parallel_linear(h, w2.permute(0, 2, 1), 1, sorted_e, sorted_idx, offs,
                               grouped_in=True, gates=wts.to(h.dtype))
    return f


def _get_impl(name: str) -> Callable:
    if name == "moekit-triton":
        return _moekit("triton")
    if name == "moekit-grouped_mm":
        return _moekit("grouped_mm")
    if name == "moekit-loop":
        return _moekit("loop")
    if name == "hf-grouped_mm":
        return _hf("grouped_mm")
    if name == "hf-batched_mm":
        return _hf("batched_mm")
    if name == "hf-eager":
        return _hf_eager
    if name == "scattermoe":
        return _scattermoe()
    raise ValueError(f"impl={name!r} is unknown; allowed: {IMPLS}")
