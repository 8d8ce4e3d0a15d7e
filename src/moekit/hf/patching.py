"""Whole-block patching: replace each sparse MoE block of a transformers model by a moekit MoE.

``patch(model)`` finds every sparse MoE block (named families by class, others by structure:
moekit.hf.detect), derives a :class:`moekit.MoE.Config` from the HF config
(:func:`moekit.hf.derive.config_from_hf`), builds an :class:`HFMoE` (moekit.hf.build) whose
parameters are the block's own tensors where the layout agrees (same ``nn.Parameter`` objects,
or transposed views of the same storage) and converted copies otherwise (GPT-OSS's interleaved
gate/up), checks on a probe that it computes what the block computed, and swaps it in.
``unpatch(model)`` puts the original block objects back, carrying the current weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ..experts import GroupedExperts
from .build import patch_block
from .derive import config_from_hf
from .detect import ROUTER_NAMES, is_candidate_block
from .families import spec_for_block
from .hf_moe import HFMoE
from .layout import SAME, PatchError, block_param_map, find_tensor, get_path, to_hf

__all__ = [
    "HFMoE", "config_from_hf", "patch", "unpatch", "block_param_map", "PatchError", "grads_by_hf_name",
    "spec_for_block",
]


def _iter_blocks(model: nn.Module):
    for name, mod in model.named_modules():
        if isinstance(mod, HFMoE):
            continue
        if spec_for_block(mod) is not None or is_candidate_block(mod):
            yield name, mod
        elif isinstance(getattr(mod, "experts", None), nn.ModuleList) and any(
            isinstance(getattr(mod, n, None), nn.Module) for n in ROUTER_NAMES
        ):
            raise PatchError(
                f"{name} ({type(mod).__name__}): per-expert ModuleList experts are not patched in a live "
                "model; convert the checkpoint with moekit.hf.from_hf_state_dict instead"
            )


def _set_child(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def patch(
    model: nn.Module, *, backend: str = "auto", verify: bool = True, verify_tol: float | None = None
) -> list[str]:
    """Replace, in place, every sparse MoE block of ``model`` by an :class:`HFMoE`; return the
    qualified names replaced.

    Every block is checked before it is swapped: its config must be expressible (else
    :class:`PatchError` naming the block and the reason) and, with ``verify`` (default), the
    new module must reproduce the block's output on a small random probe (tolerance
    ``verify_tol`` relative to the output's max, default 1e-4 in fp32 and 3e-2 in 16-bit).
    Nothing is swapped unless every block passes.
    """
    blocks = [(n, m) for n, m in _iter_blocks(model)]
    if not blocks:
        return []
    model_cfg = getattr(model, "config", None)
    new = [(n, patch_block(m, n, model_cfg, backend, verify, verify_tol)) for n, m in blocks]
    for n, moe in new:
        _set_child(model, n, moe)
    return [n for n, _ in new]


def unpatch(model: nn.Module) -> list[str]:
    """Put back the transformers block of every :class:`HFMoE` in ``model`` with the current
    weights (the same Parameter objects where the layout agrees, converted otherwise; the
    aux-loss-free expert bias goes back to ``e_score_correction_bias``). Returns the names."""
    done = []
    for name, moe in [(n, m) for n, m in model.named_modules() if isinstance(m, HFMoE)]:
        block = moe.hf_block
        if block is None:
            raise ValueError(
                f"{name}: this HFMoE was not made by moekit.hf.patch (no original block)"
            )
        missing = [
            en.moekit
            for en in moe.__dict__["_hf_entries"]
            if find_tensor(moe, en.moekit) is None
            or tuple(to_hf(en.kind, find_tensor(moe, en.moekit).detach().to("meta")).shape)
            != tuple(get_path(block, en.hf)[2].shape)
        ]
        if missing or not isinstance(moe.experts, GroupedExperts):
            raise ValueError(
                f"{name}: cannot unpatch, the MoE no longer holds its full weights {missing[:3]} "
                f"(experts: {type(moe.experts).__name__}; after apply_ep the experts are sharded "
                "over ranks: unpatch a full single-process copy instead)"
            )
        for en in moe.__dict__["_hf_entries"]:
            _, _, cur = get_path(moe, en.moekit)
            mod, leaf, old = get_path(block, en.hf)
            dtype = moe.__dict__["_hf_dtypes"][en.hf]
            if isinstance(old, nn.Parameter):
                if en.kind == SAME and isinstance(cur, nn.Parameter):
                    val = cur
                else:
                    val = nn.Parameter(
                        to_hf(en.kind, cur.detach(), dtype), requires_grad=cur.requires_grad
                    )
            else:
                val = to_hf(en.kind, cur.detach(), dtype)
            setattr(mod, leaf, val)
        block.train(moe.training)
        _set_child(model, name, block)
        done.append(name)
    return done


def grads_by_hf_name(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The gradients of ``model`` under the transformers names and layouts: those of patched
    blocks mapped back to the original block's parameters (to compare with an unpatched
    copy)."""
    out = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    for qn, mod in model.named_modules():
        if isinstance(mod, HFMoE):
            for k in [k for k in out if k.startswith(qn + ".")]:
                del out[k]
            for hk, g in mod.hf_tensors("grad").items():
                out[f"{qn}.{hk}"] = g
    return out
