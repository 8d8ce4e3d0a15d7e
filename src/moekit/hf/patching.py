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

import warnings

import torch
from torch import nn

from ..experts import GroupedExperts
from .build import attach_block, patch_block, relaid_entries, relayout
from .derive import config_from_hf
from .detect import is_moe_block, why_not_patchable
from .families import spec_for_block
from .hf_moe import HFMoE
from .layout import SAME, PatchError, block_param_map, find_tensor, get_path

__all__ = [
    "HFMoE", "config_from_hf", "patch", "unpatch", "block_param_map", "PatchError",
    "grads_by_hf_name",
    "spec_for_block", "PatchResult", "find_moe_blocks", "hf_state_dict",
]


class PatchResult(list):
    """What :func:`patch` returns: the qualified names of the blocks it replaced (a plain
    ``list`` of them, so ``for name in patch(model)`` and ``len(...)`` work as they always
    did), and ``skipped``, ``{name: reason}`` of the MoE blocks left as they were (only with
    ``strict=False``; with ``strict=True`` those raise :class:`PatchError`)."""

    def __init__(self, names=(), skipped: dict[str, str] | None = None):
        super().__init__(names)
        self.skipped: dict[str, str] = dict(skipped or {})

    def __repr__(self) -> str:
        return f"PatchResult({list(self)!r}, skipped={self.skipped!r})"


def find_moe_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """Every sparse MoE block of ``model`` (outermost first; nothing inside a found block):
    named families by class, then any module holding experts and a router (see
    :func:`moekit.hf.detect.is_moe_block`). Already patched blocks are left out."""
    out: list[tuple[str, nn.Module]] = []
    done = [n for n, m in model.named_modules() if isinstance(m, HFMoE)]

    def inside(name, prefixes):
        return any(p == "" or name == p or name.startswith(p + ".") for p in prefixes)

    for name, mod in model.named_modules():
        if inside(name, done) or inside(name, [n for n, _ in out]):
            continue
        if spec_for_block(mod) is not None or is_moe_block(mod):
            out.append((name, mod))
    return out


def _set_child(model: nn.Module, qualname: str, new: nn.Module) -> None:
    parent_name, _, leaf = qualname.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, leaf, new)


def _try_block(block, name, model_cfg, backend, verify, verify_tol):
    """(HFMoE, None) or (None, the reason the block cannot be patched)."""
    where = f"{name or '<root>'} ({type(block).__name__})"
    try:
        unsupported = None if spec_for_block(block) is not None else why_not_patchable(block)
        if unsupported:
            return None, f"{where}: {unsupported}"
        return patch_block(block, name, model_cfg, backend, verify, verify_tol), None
    except PatchError as e:
        msg = str(e)
        return None, msg if msg.startswith(name) and name else f"{where}: {msg}"
    except Exception as e:  # noqa: BLE001 - reported as this block's PatchError, chained
        raise PatchError(
            f"{where}: moekit failed while reading this block ({type(e).__name__}: {e})"
        ) from e


def patch(
    model: nn.Module,
    *,
    backend: str = "auto",
    verify: bool = True,
    verify_tol: float | None = None,
    strict: bool = True,
) -> PatchResult:
    """Replace, in place, every sparse MoE block of ``model`` by an :class:`HFMoE`; return a
    :class:`PatchResult`: the qualified names replaced (a list), with ``.skipped``.

    Every block that looks like an MoE block (experts next to a router, see
    :func:`find_moe_blocks`) is either replaced or reported. Each is checked before anything
    is swapped: its config must be expressible and, with ``verify`` (default), the new module
    must reproduce the block's output on a small random probe (tolerance ``verify_tol``
    relative to the output's max, default 1e-4 in fp32 and 3e-2 in 16-bit). With ``strict``
    (default) one :class:`PatchError` names every block that cannot be expressed and why, and
    nothing is swapped; with ``strict=False`` the others are swapped and the refused ones are
    returned in ``.skipped`` (``{name: reason}``). A model without any MoE block raises
    :class:`PatchError` (strict) or returns an empty result.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(
            f"patch(model): model must be a torch.nn.Module, got {type(model).__name__}"
        )
    if not isinstance(strict, bool):
        raise TypeError(f"patch(strict={strict!r}): True or False")
    if not isinstance(verify, bool):
        raise TypeError(f"patch(verify={verify!r}): True or False")
    if not isinstance(backend, str):
        raise TypeError(f"patch(backend=...): a backend name (str), got {type(backend).__name__}")
    if verify_tol is not None and not (isinstance(verify_tol, (int, float)) and verify_tol > 0):
        raise ValueError(f"patch(verify_tol={verify_tol!r}): a positive number or None")
    blocks = find_moe_blocks(model)
    if not blocks:
        if strict and not any(isinstance(m, HFMoE) for m in model.modules()):
            raise PatchError(
                f"{type(model).__name__}: no sparse MoE block found (a module with an 'experts' "
                "child and a router); nothing to patch"
            )
        return PatchResult()
    model_cfg = getattr(model, "config", None)
    new, skipped = [], {}
    for n, m in blocks:
        moe, why = _try_block(m, n, model_cfg, backend, verify, verify_tol)
        if moe is None:
            skipped[n] = why
        else:
            new.append((n, m, moe))
    if skipped and strict:
        raise PatchError(
            f"{len(skipped)} of {len(blocks)} MoE blocks cannot be expressed by moekit.MoE "
            "(nothing was patched; patch(model, strict=False) replaces the others):\n  "
            + "\n  ".join(skipped.values())
        )
    for n, block, moe in new:
        attach_block(moe, block)
        _set_child(model, n, moe)
    if new:
        _warn_new_parameters(new)
        if callable(getattr(type(model), "save_pretrained", None)):
            model.save_pretrained = HFSavePretrained(model)
    return PatchResult([n for n, _, _ in new], skipped)


def _warn_new_parameters(new) -> None:
    """Warn, once per patch, when a block's weights live on in new Parameter objects (parts
    stacked into one tensor: DBRX's rows, Switch's per-expert modules): an optimizer built
    before ``patch`` holds the old ones, which receive no gradient any more. (Weights in
    another layout keep their Parameter objects: ``attach_block``.)"""
    fresh = []
    for n, block, moe in new:
        entries = moe.__dict__["_hf_entries"]
        kept = {en.hf for en in relaid_entries(entries)}
        for en in entries:
            if (isinstance(get_path(moe, en.moekit)[2], nn.Parameter) and en.kind != SAME
                    and en.hf not in kept):
                fresh.append(f"{n}.{en.hf}")
    if fresh:
        warnings.warn(
            f"moekit.hf.patch: {len(fresh)} weights now live in new Parameter objects (parts "
            f"stacked into one tensor), e.g. {fresh[:2]}; an optimizer built before patch() would "
            "update tensors the model no longer uses: build the optimizer after patch()",
            stacklevel=3,
        )


def hf_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """``model.state_dict()`` with every patched block under the original block's names and
    layouts (what the unpatched model's state dict would hold): a transformers checkpoint."""
    sd = model.state_dict()
    for qn, mod in model.named_modules():
        if not isinstance(mod, HFMoE):
            continue
        prefix = f"{qn}." if qn else ""
        for k in [k for k in sd if k.startswith(prefix)]:
            del sd[k]
        mapped = mod.hf_tensors("data")
        for k, t in mod.hf_block.state_dict().items():
            if k not in mapped and not t.is_meta:
                sd[prefix + k] = t
        for k, t in mapped.items():
            sd[prefix + k] = t.contiguous()
    return sd


class HFSavePretrained:
    """``save_pretrained`` of a patched model (an instance attribute set by :func:`patch`):
    writes the transformers checkpoint of the original layout (:func:`hf_state_dict`), which
    plain transformers loads. A plain object holding the model, so that ``copy.deepcopy`` and
    ``pickle`` of the model carry it along."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __call__(self, save_directory, *args, state_dict=None, **kwargs):
        m = self.model
        if state_dict is None:
            state_dict = hf_state_dict(m)
        return type(m).save_pretrained(m, save_directory, *args, state_dict=state_dict, **kwargs)


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
            or tuple(moe.to_hf_tensor(en, find_tensor(moe, en.moekit).detach().to("meta")).shape)
            != tuple(get_path(block, en.hf)[2].shape)
        ]
        if missing or not isinstance(moe.experts, GroupedExperts):
            raise ValueError(
                f"{name}: cannot unpatch, the MoE no longer holds its full weights {missing[:3]} "
                f"(experts: {type(moe.experts).__name__}; after apply_ep the experts are sharded "
                "over ranks: unpatch a full single-process copy instead)"
            )
        entries = moe.__dict__["_hf_entries"]
        relaid = {en.hf for en in relaid_entries(entries)}
        for en in entries:
            _, _, cur = get_path(moe, en.moekit)
            mod, leaf, old = get_path(block, en.hf)
            if isinstance(old, nn.Parameter):
                if en.kind == SAME and isinstance(cur, nn.Parameter):
                    val = cur
                elif en.hf in relaid and isinstance(cur, nn.Parameter):  # the same object back
                    grad = None if cur.grad is None else moe.to_hf_tensor(en, cur.grad, grad=True)
                    val = relayout(cur, moe.to_hf_tensor(en, cur.detach()), grad)
                else:
                    val = nn.Parameter(
                        moe.to_hf_tensor(en, cur.detach()), requires_grad=cur.requires_grad
                    )
            else:
                val = moe.to_hf_tensor(en, cur.detach())
            setattr(mod, leaf, val)
        block.train(moe.training)
        _set_child(model, name, block)
        done.append(name)
    if "save_pretrained" in model.__dict__ and not any(
        isinstance(m, HFMoE) for m in model.modules()
    ):
        del model.__dict__["save_pretrained"]
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
