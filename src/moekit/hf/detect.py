"""Recognising MoE blocks in a model: whether a module is a sparse MoE block
(:func:`is_moe_block`), one whose experts are a transformers fused experts module
(:func:`is_candidate_block`), and a reason, read from its structure alone, that a block is
outside what ``patch`` can read (:func:`why_not_patchable`). Reading a patchable unlisted
block's layout and routing is :func:`moekit.hf.block_spec.generic_spec`."""

from __future__ import annotations

from torch import nn

from .block_parts import forward_only_raises

__all__ = ["ROUTER_NAMES", "is_candidate_block", "is_moe_block", "why_not_patchable"]

ROUTER_NAMES = ("gate", "router")


def is_candidate_block(mod: nn.Module) -> bool:
    """A block whose ``experts`` child is a transformers fused experts module (decorated with
    ``@use_experts_implementation``): the kind ``generic_spec`` reads."""
    ex = getattr(mod, "experts", None)
    return isinstance(ex, nn.Module) and hasattr(ex, "has_gate") and hasattr(ex, "is_transposed")


_ROUTER_CLASS_WORDS = ("Router", "Gating", "TopkGate", "TopKGate")
_LAYER_CHILDREN = ("self_attn", "attention", "self_attention", "input_layernorm", "mixer_norm")


def _experts_child(mod: nn.Module) -> nn.Module | None:
    ex = getattr(mod, "experts", None)
    if isinstance(ex, nn.Module):
        return ex
    return next(
        (m for _, m in mod.named_children() if type(m).__name__.endswith("Experts")), None
    )


def _router_child(mod: nn.Module) -> nn.Module | None:
    for n in ROUTER_NAMES + ("gating", "router_gate"):
        r = getattr(mod, n, None)
        if isinstance(r, nn.Module):
            return r
    return next(
        (
            m
            for _, m in mod.named_children()
            if any(w in type(m).__name__ for w in _ROUTER_CLASS_WORDS)
        ),
        None,
    )


def is_moe_block(mod: nn.Module) -> bool:
    """Whether ``mod`` looks like a sparse MoE block: experts (an ``experts`` child, or a
    child whose class name ends in ``Experts``) next to a router (a ``gate``/``router``/
    ``gating`` child, or a child whose class name says Router or Gating), and a ``forward``
    that computes something (not one that only raises: such a module is no layer that
    anything calls, e.g. JetMoE's mixture of attention heads)."""
    ex, r = _experts_child(mod), _router_child(mod)
    return ex is not None and r is not None and ex is not r and not forward_only_raises(mod)


def _plain_fused(ex: nn.Module) -> bool:
    """Undecorated experts holding exactly the standard fused layout: ``gate_up_proj``
    ``[E, 2F, D]`` and ``down_proj`` ``[E, D, F]`` (3-D, consistent shapes, no other
    parameters), e.g. Step3p7's."""
    gu, dn = getattr(ex, "gate_up_proj", None), getattr(ex, "down_proj", None)
    if not (isinstance(gu, nn.Parameter) and isinstance(dn, nn.Parameter)):
        return False
    if gu.dim() != 3 or dn.dim() != 3 or len(list(ex.parameters())) != 2:
        return False
    E, H, D = gu.shape
    return dn.shape[0] == E and dn.shape[1] == D and H == 2 * dn.shape[2]



def why_not_patchable(block: nn.Module) -> str | None:
    """A reason an MoE block (:func:`is_moe_block`) is outside what ``patch`` can read, found
    from its structure alone; None when it may be patchable (then the block is read and
    verified in full)."""
    if is_candidate_block(block):
        layer = [n for n in _LAYER_CHILDREN if isinstance(getattr(block, n, None), nn.Module)]
        if layer:
            return (
                f"its router and experts are children of a decoder layer (which also holds "
                f"{layer}): there is no separate MoE block to replace; use "
                "experts_implementation='moekit'"
            )
        return None
    ex = _experts_child(block)
    kind = type(ex).__name__
    if isinstance(ex, (nn.ModuleList, nn.ModuleDict)):
        return (
            f"per-expert experts ({kind} of {len(ex)} modules) are not patched in a live "
            "model; convert the checkpoint with moekit.hf.from_hf_state_dict instead"
        )
    if getattr(ex, "zero_expert_num", 0) or hasattr(ex, "identity_expert"):
        return (
            f"experts {kind} include zero-computation (identity) experts, which "
            "moekit.MoE does not have"
        )
    if _plain_fused(ex):
        return None  # read as the standard fused layout; patch's probe confirms it
    return (
        f"experts {kind} are not a transformers fused experts module "
        "(@use_experts_implementation), so moekit cannot read their layout"
    )
