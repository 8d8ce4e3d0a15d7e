"""Parts of a transformers MoE block beyond its router and experts, read for ``patch``: a
norm on the block output (:func:`output_norm_child`), a shared MLP with one fused gate/up
projection (:func:`fused_shared_mlp`), and whether a module's ``forward`` only raises (a
module its owner uses through other methods: :func:`forward_only_raises`)."""

from __future__ import annotations

import ast
import inspect
import textwrap

import torch
from torch import nn

from .layout import PatchError
from .probe import shared_activation

__all__ = ["forward_only_raises", "fused_shared_mlp", "output_norm_child"]

_RMSNORM_EPS_NAMES = ("variance_epsilon", "eps")


def forward_only_raises(mod: nn.Module) -> bool:
    """Whether the module's ``forward`` does nothing but raise (a module its owner uses
    through other methods, e.g. JetMoE's mixture-of-attention experts: map/reduce)."""
    fn = getattr(type(mod), "forward", None)
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    except (OSError, TypeError, SyntaxError):
        return False
    body = tree.body[0].body if tree.body and hasattr(tree.body[0], "body") else []
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]  # the docstring
    return len(body) == 1 and isinstance(body[0], ast.Raise)


def output_norm_child(block: nn.Module) -> tuple[str | None, float | None]:
    """``(name, eps)`` of a norm the block applies to its output, read as an RMSNorm with a
    ``[D]`` scale: a child named ``post_*norm*`` (A.X-K1's ``post_mlp_layernorm``) whose class
    is an RMSNorm; ``(None, None)`` when there is none. (``patch``'s probe confirms that the
    block computes it there and that way.)"""
    for name, m in block.named_children():
        if not (name.startswith("post") and "norm" in name and "RMSNorm" in type(m).__name__):
            continue
        w = getattr(m, "weight", None)
        eps = next(
            (getattr(m, n) for n in _RMSNORM_EPS_NAMES if isinstance(getattr(m, n, None), float)),
            None,
        )
        one_weight = len(list(m.parameters())) == 1
        if isinstance(w, torch.Tensor) and w.dim() == 1 and eps is not None and one_weight:
            return name, eps
    return None, None


def fused_shared_mlp(sm: nn.Module, where: str, name: str, experts_act: str) -> tuple[int, str]:
    """``(hidden size, moekit activation)`` of a shared MLP with one fused ``gate_up_proj``
    Linear and a ``down_proj`` (MiniMax-M3's), its activation found on a probe."""
    gu, down = sm.gate_up_proj, getattr(sm, "down_proj", None)
    if not isinstance(down, nn.Linear) or gu.bias is not None or down.bias is not None:
        raise PatchError(
            f"{where}: shared expert {name!r} has a fused gate_up_proj but no bias-free down_proj"
        )
    if len(list(sm.parameters())) != 2 or gu.out_features != 2 * down.in_features:
        raise PatchError(
            f"{where}: shared expert {name!r}: gate_up_proj {tuple(gu.weight.shape)} and "
            f"down_proj {tuple(down.weight.shape)} are not one gated MLP (or it has more weights)"
        )
    if gu.weight.is_meta:
        raise PatchError(f"{where}: shared expert {name!r}: its activation is read on real weights")
    act = shared_activation(sm, gu.in_features, down.in_features, [experts_act])
    if act is None:
        raise PatchError(
            f"{where}: shared expert {name!r} computes none of moekit's gated activations on "
            "its fused gate_up_proj (checked on a probe)"
        )
    return down.in_features, act
