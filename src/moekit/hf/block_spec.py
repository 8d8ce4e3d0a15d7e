"""The :class:`FamilySpec` of a family not in :data:`moekit.hf.families.FAMILIES`, read from
its block's modules (:func:`generic_spec`): the experts layout and activation, the router's
gate and selection bias, the shared expert, an output norm, and the routing candidates that
``patch`` checks on a probe (:func:`moekit.hf.probe.router_matches`)."""

from __future__ import annotations

import torch
from torch import nn

from .block_parts import fused_shared_mlp, output_norm_child
from .detect import ROUTER_NAMES
from .experts_impl import hf_activation_name
from .family_spec import (
    CONCAT,
    INTERLEAVED_TRANSPOSED,
    TRANSPOSED,
    FamilySpec,
    routing_from_config,
)
from .layout import PatchError, get_path
from .probe import gate_activation, router_bias_argument

__all__ = ["generic_spec"]

_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_SHARED_GATE_NAMES = ("shared_expert_gate",)


def _layout_flags(ex: nn.Module) -> tuple[bool, bool, bool, bool, bool]:
    """(has_gate, is_transposed, is_concatenated, has_bias, has_post_expert_norm) of the
    experts: the decorator's flags, or the standard fused layout (detect.py's
    ``_plain_fused``)."""
    if hasattr(ex, "has_gate") and hasattr(ex, "is_transposed"):
        return (
            bool(ex.has_gate), bool(ex.is_transposed), bool(getattr(ex, "is_concatenated", True)),
            bool(getattr(ex, "has_bias", False)), bool(getattr(ex, "has_post_expert_norm", False)),
        )
    return True, False, True, False, False


def _selection_bias_in_router(router: nn.Module, E: int) -> str | None:
    """The path, inside the router, of its selection bias: ``e_score_correction_bias`` on the
    router or on one of its submodules (ERNIE's ``moe_statics``), ``[E]`` or ``[1, E]``."""
    for name, mod in router.named_modules():
        t = getattr(mod, "e_score_correction_bias", None)
        if isinstance(t, torch.Tensor) and t.numel() == E and t.dim() <= 2:
            return f"{name}.e_score_correction_bias" if name else "e_score_correction_bias"
    return None


def _router_gate_problem(router: nn.Module, name: str, w, E: int) -> str:
    """Why the router has no ``[E, hidden]`` gate weight moekit's router could take."""
    kind = f"router {name!r} ({type(router).__name__})"
    lins = [n for n, m in router.named_modules() if isinstance(m, nn.Linear)]
    if len(lins) > 1:
        return (
            f"{kind} computes its logits with a network of {len(lins)} Linear layers {lins}, "
            "not one linear gate; moekit's router is a single [num_experts, hidden] gate"
        )
    if isinstance(w, torch.Tensor) and w.dim() == 2 and w.shape[0] > E:
        return (
            f"{kind} scores {w.shape[0]} outputs for {E} routed experts: the {w.shape[0] - E} "
            "more score other experts with the routed ones (e.g. shared experts weighted by the "
            "router), which moekit's router does not have"
        )
    return f"{kind} has no gate weight [num_experts={E}, hidden]"


def generic_spec(block: nn.Module, cfg, where: str) -> tuple[FamilySpec, list[dict]]:
    """Read a non-listed family's layout from its block; return the spec and the routing
    candidates to try (config-derived guess first)."""
    ex = block.experts
    router_name = next(
        (n for n in ROUTER_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
    )
    if router_name is None:
        raise PatchError(f"{where}: no router child named {ROUTER_NAMES}")
    router = getattr(block, router_name)
    E = ex.down_proj.shape[0]
    router_linear, lin = "", router
    if not isinstance(getattr(router, "weight", None), torch.Tensor):
        # the gate Linear may sit inside the router (e.g. HunYuan's ``gate.wg``)
        lins = [(n, m) for n, m in router.named_children() if isinstance(m, nn.Linear)]
        if len(lins) == 1:
            router_linear, lin = lins[0]
    w = getattr(lin, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2 or w.shape[0] != E:
        raise PatchError(f"{where}: {_router_gate_problem(router, router_name, w, E)}")
    has_gate, transposed, concat, has_bias, post_norm = _layout_flags(ex)
    if post_norm:
        norm = type(getattr(ex, "post_expert_norm", None)).__name__
        around = [
            n for n, m in block.named_children()
            if n not in ("experts", router_name) and any(True for _ in m.parameters())
        ]
        raise PatchError(
            f"{where}: experts apply a post-expert norm ({norm} on each expert's output, before "
            "its routing weight), which moekit's grouped experts do not have"
            + (f"; the block also runs {around} around the experts" if around else "")
        )
    if not concat and not transposed:
        raise PatchError(f"{where}: interleaved, non-transposed experts layout is not supported")
    layout = CONCAT if not transposed else (TRANSPOSED if concat else INTERLEAVED_TRANSPOSED)
    from transformers.integrations.moe import _default_apply_gate

    experts_kw: dict = {}
    own_gate = getattr(type(ex), "_apply_gate", _default_apply_gate)
    if has_gate and own_gate is not _default_apply_gate:
        act = gate_activation(ex, concat)
        if act is None:
            raise PatchError(
                f"{where}: experts {type(ex).__name__} use their own gate function (_apply_gate), "
                "which computes none of moekit's gated activations (checked on a probe)"
            )
        experts_kw["activation"] = act
    else:
        act = hf_activation_name(getattr(ex, "act_fn", None))
        if act is None:
            raise PatchError(
                f"{where}: experts activation {getattr(ex, 'act_fn', None)!r} has no moekit "
                "equivalent"
            )
        experts_kw["activation"] = act
    if not has_gate:
        experts_kw["gated"] = False
    if has_bias:
        experts_kw["use_bias"] = True
    if not has_gate and layout == INTERLEAVED_TRANSPOSED:
        raise PatchError(f"{where}: interleaved layout without a gate")

    shared_name = next(
        (n for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
    )
    shared_hidden = sact = shared_gated = None
    shared_fused = shared_bias = False
    if shared_name is not None:
        sm = getattr(block, shared_name)
        up = getattr(sm, "up_proj", None)
        down = getattr(sm, "down_proj", None)
        if isinstance(getattr(sm, "gate_up_proj", None), nn.Linear) and up is None:
            shared_hidden, sact = fused_shared_mlp(sm, where, shared_name, experts_kw["activation"])
            shared_gated = shared_fused = True
        elif not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
            raise PatchError(
                f"{where}: shared expert {shared_name!r} is neither a gate/up/down MLP nor one "
                "with a fused gate_up_proj"
            )
        else:
            lin = [m for m in (getattr(sm, "gate_proj", None), up, down) if m is not None]
            shared_bias = any(m.bias is not None for m in lin)
            if shared_bias and not all(m.bias is not None for m in lin):
                raise PatchError(
                    f"{where}: shared expert {shared_name!r} has biases on some of its "
                    "projections only (moekit's have them on all or none)"
                )
            shared_hidden = up.out_features
            shared_gated = isinstance(getattr(sm, "gate_proj", None), nn.Linear)
            sfn = getattr(sm, "act_fn", None) or getattr(sm, "activation_fn", None)
            sact = hf_activation_name(sfn)
            if sact is None:
                raise PatchError(
                    f"{where}: shared expert {shared_name!r} activation {sfn!r} has no moekit "
                    "equivalent"
                )
    shared_gate = next(
        (n for n in _SHARED_GATE_NAMES if isinstance(getattr(block, n, None), nn.Linear)), None
    )
    if shared_gate is not None and shared_name is None:
        raise PatchError(f"{where}: shared expert gate without a shared expert")

    post_norm, norm_eps = output_norm_child(block)
    known = {router_name, "experts", shared_name, shared_gate, post_norm} - {None}
    extra = [
        n for n, m in block.named_children() if n not in known and any(True for _ in m.parameters())
    ]
    extra += [n for n, _ in block.named_parameters(recurse=False)]
    if extra:
        raise PatchError(f"{where}: block has parameters moekit.MoE does not hold: {extra}")

    base = routing_from_config(cfg)
    g_r = next((getattr(router, n) for n in ("n_group", "num_group") if hasattr(router, n)), None)
    tg_r = getattr(router, "topk_group", None)
    if isinstance(g_r, int) and isinstance(tg_r, int) and g_r > 1:
        base.update(num_expert_groups=g_r, num_limited_groups=tg_r)
    for n in ("routed_scaling_factor", "router_scaling_factor", "route_scale"):
        v = getattr(router, n, None)
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            base["route_scale"] = float(v)
            break
    if isinstance(getattr(router, "norm_topk_prob", None), bool):
        base["route_norm"] = router.norm_topk_prob
    base["use_router_bias"] = isinstance(getattr(lin, "bias", None), torch.Tensor)
    bias_arg = router_bias_argument(router)
    bias_attr = None
    if bias_arg is not None:
        bias_attr = next(
            (
                n
                for n in (bias_arg, "expert_bias", "e_score_correction_bias")
                if isinstance(getattr(block, n, None), torch.Tensor)
            ),
            None,
        )
        if bias_attr is None:
            raise PatchError(
                f"{where}: its router {type(router).__name__} takes {bias_arg!r}, which the block "
                "does not hold as a tensor"
            )
    in_router = _selection_bias_in_router(router, E)
    if bias_attr is None and in_router not in (None, "e_score_correction_bias"):
        bias_attr = f"{router_name}.{in_router}"  # e.g. ERNIE-VL's gate.moe_statics.*
    base["use_expert_bias"] = bias_attr is not None or in_router is not None
    spec = FamilySpec(
        name=f"generic:{type(block).__name__}",
        model_types=(),
        block_classes=(type(block).__name__,),
        router=router_name,
        router_linear=router_linear,
        shared=shared_name,
        shared_gate=shared_gate,
        layout=layout,
        expert_hidden=lambda c, f=ex.down_proj.shape[1 if transposed else 2]: f,
        shared_hidden=(lambda c, h=shared_hidden: h) if shared_name else None,
        routing=lambda c: dict(base),
        experts_kwargs=lambda c, kw=experts_kw: dict(kw),
        router_in_fp32=base["use_expert_bias"] or bool(base.get("num_expert_groups")),
        expert_bias=bias_attr,
        expert_bias_row=bias_attr is not None and get_path(block, bias_attr)[2].dim() == 2,
        extra={
            "router_bias_arg": bias_arg is not None,
            "router_bias_path": in_router,
            "shared_activation": sact if shared_name else None,
            "shared_gated": shared_gated if shared_name else None,
            "shared_fused": shared_fused,
            "shared_bias": lambda c, b=shared_bias: b,
            "output_norm": post_norm,
            "moe_kwargs": lambda c, eps=norm_eps: {} if eps is None else {"output_norm_eps": eps},
        },
    )
    cands = [dict(base)]
    groups = [{}]
    if base.get("num_expert_groups"):
        g = {k: base[k] for k in ("num_expert_groups", "num_limited_groups")}
        groups = [g, dict(g, group_score="max"), {}]
    for score in ("softmax", "sigmoid"):
        for before in (False, True):
            for norm in (False, True):
                for grp in groups if not before else [{}]:
                    c = {
                        k: v
                        for k, v in base.items()
                        if k not in ("num_expert_groups", "num_limited_groups", "group_score")
                    }
                    c.update(score_func=score, topk_before_score=before, route_norm=norm, **grp)
                    if c not in cands:
                        cands.append(c)
    return spec, cands
