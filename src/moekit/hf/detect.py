"""Structure detection for families not in the map: a block's layout, activation, router,
shared expert and routing read from its modules (:func:`generic_spec`), and the check that a
moekit router config routes like the block's router (:func:`router_matches`)."""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..activations import get_activation
from ..router import TokenChoiceTopKRouter
from .experts_impl import hf_activation_name
from .families import (
    CONCAT,
    INTERLEAVED_TRANSPOSED,
    TRANSPOSED,
    FamilySpec,
    routing_from_config,
)
from .layout import PatchError

__all__ = [
    "ROUTER_NAMES", "is_candidate_block", "is_moe_block", "why_not_patchable", "generic_spec",
    "router_matches",
]

ROUTER_NAMES = ("gate", "router")
_SHARED_NAMES = ("shared_expert", "shared_experts", "shared_mlp")
_SHARED_GATE_NAMES = ("shared_expert_gate",)


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
    ``gating`` child, or a child whose class name says Router or Gating)."""
    ex, r = _experts_child(mod), _router_child(mod)
    return ex is not None and r is not None and ex is not r


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
    return (
        f"experts {kind} are not a transformers fused experts module "
        "(@use_experts_implementation), so moekit cannot read their layout"
    )


def _router_bias_argument(router: nn.Module) -> str | None:
    """The name of a selection-bias argument the router's forward takes after the hidden
    states (e.g. ``expert_bias``, ``e_score_correction_bias``), or None."""
    import inspect

    try:
        params = list(inspect.signature(router.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    extra = [p for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(extra) == 1 and "bias" in extra[0].name:
        return extra[0].name
    return None


def gate_activation(ex: nn.Module, concatenated: bool) -> str | None:
    """The moekit gated activation that computes the experts' own ``_apply_gate``, found by
    calling it on a float32 probe (values up to about +-12, so clamps show): ``silu``,
    ``gelu`` or ``gelu_tanh`` on ``[gate | up]`` halves, or ``gpt_oss`` on alternating
    columns; None when none of them does (or the experts are on the meta device)."""
    w = getattr(ex, "down_proj", None)
    if not isinstance(w, torch.Tensor) or w.is_meta:
        return None
    f = int(w.shape[1] if getattr(ex, "is_transposed", False) else w.shape[2])
    g = torch.Generator().manual_seed(7)
    h = torch.randn(11, 2 * f, generator=g) * 4.0
    try:
        with torch.no_grad():
            got = ex._apply_gate(h.to(w.device)).float().cpu()
    except Exception:  # noqa: BLE001 - a gate that needs more than its input: not ours
        return None
    names = ("silu", "gelu", "gelu_tanh") if concatenated else ("gpt_oss",)
    for name in names:
        want = get_activation(name)(h, gated=True, interleaved=not concatenated)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return name
    return None


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
        raise PatchError(
            f"{where}: router {router_name!r} has no gate weight [num_experts={E}, hidden]"
        )
    if getattr(ex, "has_post_expert_norm", False):
        raise PatchError(
            f"{where}: experts apply a post-expert norm, which moekit.MoE does not have"
        )
    transposed, concat = bool(ex.is_transposed), bool(getattr(ex, "is_concatenated", True))
    if not concat and not transposed:
        raise PatchError(f"{where}: interleaved, non-transposed experts layout is not supported")
    layout = CONCAT if not transposed else (TRANSPOSED if concat else INTERLEAVED_TRANSPOSED)
    from transformers.integrations.moe import _default_apply_gate

    experts_kw: dict = {}
    if ex.has_gate and getattr(type(ex), "_apply_gate", None) is not _default_apply_gate:
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
    if not ex.has_gate:
        experts_kw["gated"] = False
    if getattr(ex, "has_bias", False):
        experts_kw["use_bias"] = True
    if not ex.has_gate and layout == INTERLEAVED_TRANSPOSED:
        raise PatchError(f"{where}: interleaved layout without a gate")

    shared_name = next(
        (n for n in _SHARED_NAMES if isinstance(getattr(block, n, None), nn.Module)), None
    )
    shared_hidden = sact = shared_gated = None
    if shared_name is not None:
        sm = getattr(block, shared_name)
        up = getattr(sm, "up_proj", None)
        down = getattr(sm, "down_proj", None)
        if not isinstance(up, nn.Linear) or not isinstance(down, nn.Linear):
            raise PatchError(f"{where}: shared expert {shared_name!r} is not a gate/up/down MLP")
        lin = [m for m in (getattr(sm, "gate_proj", None), up, down) if m is not None]
        if any(m.bias is not None for m in lin):
            raise PatchError(
                f"{where}: shared expert {shared_name!r} has biases (moekit's have none)"
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

    known = {router_name, "experts", shared_name, shared_gate} - {None}
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
    bias_arg = _router_bias_argument(router)
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
    base["use_expert_bias"] = bias_attr is not None or isinstance(
        getattr(router, "e_score_correction_bias", None), torch.Tensor
    )
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
        extra={
            "router_bias_arg": bias_attr is not None,
            "shared_activation": sact if shared_name else None,
            "shared_gated": shared_gated if shared_name else None,
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


def _split_router_output(out, E: int):
    """(weights, indices) of a router's output tuple, whatever its order: the integer tensor
    is the indices, the float tensor with K columns the weights (the conventional
    ``(logits, weights, indices)`` order when K == E makes the two alike)."""
    if (
        not isinstance(out, tuple)
        or len(out) != 3
        or not all(isinstance(t, torch.Tensor) for t in out)
    ):
        return None, None
    ints = [t for t in out if not t.is_floating_point()]
    floats = [t for t in out if t.is_floating_point()]
    if len(ints) != 1 or len(floats) != 2:
        return None, None
    ids = ints[0]
    K = ids.shape[-1]
    by_k = [t for t in floats if t.shape[-1] == K and t.shape[-1] != E]
    if len(by_k) == 1:
        return by_k[0], ids
    return (out[1], ids) if out[2] is ids else (floats[1], ids)


def router_matches(
    hf_router: nn.Module,
    moe_router_cfg: TokenChoiceTopKRouter.Config,
    D: int,
    E: int,
    router_linear: str = "",
    where: str = "",
    bias_arg: bool = False,
) -> bool:
    """Whether a moekit router with ``moe_router_cfg`` routes like ``hf_router`` (tested on a
    float64 copy with random weights and biases, so zero-initialised biases cannot hide a
    difference). With ``bias_arg`` the router takes its selection bias as a second argument.
    The weights may differ by the config's ``route_scale`` (families that apply it in the
    block); ``patch``'s probe of the whole block then decides."""
    ref = copy.deepcopy(hf_router).to("cpu", torch.float64)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
            if t.is_floating_point():
                t.copy_(
                    torch.randn(t.shape, generator=g, dtype=t.dtype)
                    * (0.5 if "bias" in name else 1.0)
                )
        x = torch.randn(97, D, generator=g, dtype=torch.float64) / D**0.5  # logits ~ N(0, 1)
        bias = torch.randn(E, generator=g, dtype=torch.float64) * 0.5 if bias_arg else None
        try:
            out = ref(x) if bias is None else ref(x, bias)
        except Exception as e:  # a router that is not self-contained (needs more inputs)
            raise PatchError(
                f"{where}: its router {type(hf_router).__name__} cannot be called on hidden states "
                f"alone ({type(e).__name__}: {e}); not a router moekit can stand in for"
            ) from None
        w_hf, ids_hf = _split_router_output(out, E)
        if ids_hf is None:
            raise PatchError(
                f"{where}: its router {type(hf_router).__name__} does not return "
                "(logits, weights, indices) in any order"
            )
        try:
            mr = (
                moe_router_cfg.replace(router_dtype=torch.float64)
                .build(dim=D, num_experts=E)
                .double()
            )
        except ValueError:
            return False
        lin = ref.get_submodule(router_linear) if router_linear else ref
        mr.gate.weight.copy_(lin.weight)
        if mr.gate.bias is not None:
            mr.gate.bias.copy_(lin.bias)
        if mr.expert_bias is not None:
            src = bias if bias is not None else ref.e_score_correction_bias
            mr.expert_bias = src.detach().clone().double()
        r = mr(x)
    if w_hf.shape[-1] == E and ids_hf.shape[-1] != E:
        w_hf = w_hf.gather(1, ids_hf)
    if ids_hf.shape != r.topk_ids.shape:
        return False
    a_ids, a_ord = ids_hf.sort(dim=1)
    b_ids, b_ord = r.topk_ids.sort(dim=1)
    if not torch.equal(a_ids, b_ids):
        return False
    w_a, w_b = w_hf.double().gather(1, a_ord), r.topk_weights.double().gather(1, b_ord)
    scale = float(moe_router_cfg.route_scale)
    return any(
        torch.allclose(w_a, w_b / s, atol=1e-6, rtol=1e-5) for s in dict.fromkeys((1.0, scale))
    )
