"""Numerical probes of a block's parts, for families outside the map: whether a moekit
router config routes like the block's router (:func:`router_matches`), which moekit
activation the experts' own gate function computes (:func:`gate_activation`), and the
selection-bias argument a router's forward takes (:func:`router_bias_argument`)."""

from __future__ import annotations

import copy
import inspect
import math

import torch
from torch import nn

from ..activations import get_activation, make_activation_name
from ..router import TokenChoiceTopKRouter
from .layout import PatchError

__all__ = ["router_matches", "gate_activation", "router_bias_argument", "shared_activation"]


def router_bias_argument(router: nn.Module) -> str | None:
    """The name of a selection-bias argument the router's forward takes after the hidden
    states (e.g. ``expert_bias``, ``e_score_correction_bias``), or None."""
    try:
        params = list(inspect.signature(router.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    extra = [p for p in params[1:] if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(extra) == 1 and "bias" in extra[0].name:
        return extra[0].name
    return None


def _constant(ex: nn.Module, *names: str) -> float | None:
    """The first number among the experts' attributes ``names``, then their config's."""
    for src in (ex, getattr(ex, "config", None)):
        for n in names:
            v = getattr(src, n, None)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                return float(v)
    return None


def gate_activation(ex: nn.Module, concatenated: bool) -> str | None:
    """The moekit gated activation that computes the experts' own ``_apply_gate``, found by
    calling it on a float32 probe (values up to about +-12, so clamps show): ``silu``,
    ``gelu``, ``gelu_tanh`` or a clamped SwiGLU ``silu(limit=l)`` on ``[gate | up]``
    halves, or GPT-OSS's clamped GLU ``gpt_oss`` (at its released constants, or the
    module's ``alpha``/``limit``) on alternating columns or on halves; ``l`` and ``alpha``
    are the module's ``limit``/``swiglu_limit`` and ``alpha``/``swiglu_alpha`` or its
    config's. None when none of them does (or the experts are on the meta device)."""
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
    lim, alpha = _constant(ex, "limit", "swiglu_limit"), _constant(ex, "alpha", "swiglu_alpha")
    if lim is not None and not math.isfinite(lim):
        lim = None  # an infinite limit clamps nothing: the plain activations cover it
    names = ["silu", "gelu", "gelu_tanh"] if concatenated else []
    if concatenated and lim is not None and lim > 0:
        names.append(make_activation_name("silu", limit=lim))
    caps = _constant(ex, "mlp_gate_softcap"), _constant(ex, "mlp_up_softcap")
    if concatenated and any(c is not None and 0 < c < math.inf for c in caps):
        names.append(make_activation_name("silu_softcap", gate=caps[0], up=caps[1]))
    names.append("gpt_oss")  # GPT-OSS's clamped GLU, on alternating columns or on halves
    if lim is not None and lim > 0 and alpha is not None:
        names.append(make_activation_name("gpt_oss", alpha=alpha, limit=lim))
    for name in names:
        want = get_activation(name)(h, gated=True, interleaved=not concatenated)
        if got.shape == want.shape and torch.allclose(got, want, rtol=1e-5, atol=1e-6):
            return name
    return None


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


def _run_router(hf_router: nn.Module, D: int, E: int, bias_arg: bool, dt: torch.dtype):
    """A ``dt`` copy of the router with random weights and biases, run on random hidden
    states: (copy, x, the bias argument or None, its output, None) or (..., the error)."""
    ref = copy.deepcopy(hf_router).to("cpu", dt)
    g = torch.Generator().manual_seed(1234)
    with torch.no_grad():
        for name, t in list(ref.named_parameters()) + list(ref.named_buffers()):
            if t.is_floating_point():
                scale = 0.5 if "bias" in name else 1.0
                t.copy_(torch.randn(t.shape, generator=g, dtype=t.dtype) * scale)
        x = torch.randn(97, D, generator=g, dtype=dt) / D**0.5  # logits ~ N(0, 1)
        bias = torch.randn(E, generator=g, dtype=dt) * 0.5 if bias_arg else None
        try:
            out = ref(x) if bias is None else ref(x, bias)
        except Exception as e:  # noqa: BLE001 - reported by the caller
            return ref, x, bias, None, e
    return ref, x, bias, out, None


def router_matches(
    hf_router: nn.Module,
    moe_router_cfg: TokenChoiceTopKRouter.Config,
    D: int,
    E: int,
    router_linear: str = "",
    where: str = "",
    bias_arg: bool = False,
    bias_path: str | None = None,
) -> float | None:
    """Whether a moekit router with ``moe_router_cfg`` picks the experts ``hf_router`` picks
    (tested on a float64 copy, or a float32 one for routers that fix their dtype, with random
    weights and biases, so zero-initialised biases cannot hide a difference) with weights
    equal up to one constant factor ``c``: returns
    ``c`` (1.0 when equal), or None. A family may apply a scale in its block rather than its
    router, so ``patch``'s probe of the whole block decides between ``route_scale`` and
    ``route_scale * c``. With ``bias_arg`` the router takes its selection bias as a second
    argument; else ``bias_path`` names it inside the router (default
    ``e_score_correction_bias``)."""
    for dt in (torch.float64, torch.float32):  # float32 for routers that fix their dtype
        ref, x, bias, out, err = _run_router(hf_router, D, E, bias_arg, dt)
        if err is None:
            break
    if err is not None:  # a router that is not self-contained (needs more inputs)
        raise PatchError(
            f"{where}: its router {type(hf_router).__name__} cannot be called on hidden states "
            f"alone ({type(err).__name__}: {err}); not a router moekit can stand in for"
        ) from None
    with torch.no_grad():
        w_hf, ids_hf = _split_router_output(out, E)
        if ids_hf is None:
            raise PatchError(
                f"{where}: its router {type(hf_router).__name__} does not return "
                "(logits, weights, indices) in any order"
            )
        try:
            mr = moe_router_cfg.replace(router_dtype=dt).build(dim=D, num_experts=E).to(dt)
        except ValueError:
            return None
        lin = ref.get_submodule(router_linear) if router_linear else ref
        mr.gate.weight.copy_(lin.weight)
        if mr.gate.bias is not None:
            mr.gate.bias.copy_(lin.bias)
        if mr.expert_bias is not None:
            if bias is None:
                mod, _, leaf = (bias_path or "e_score_correction_bias").rpartition(".")
                bias = getattr(ref.get_submodule(mod) if mod else ref, leaf)
            mr.expert_bias = bias.detach().reshape(-1).clone().to(dt)
        r = mr(x)
    if w_hf.shape[-1] == E and ids_hf.shape[-1] != E:
        w_hf = w_hf.gather(1, ids_hf)
    if ids_hf.shape != r.topk_ids.shape:
        return None
    a_ids, a_ord = ids_hf.sort(dim=1)
    b_ids, b_ord = r.topk_ids.sort(dim=1)
    if not torch.equal(a_ids, b_ids):
        return None
    w_a, w_b = w_hf.double().gather(1, a_ord), r.topk_weights.double().gather(1, b_ord)
    if (w_b.abs() < 1e-12).any():
        return 1.0 if torch.allclose(w_a, w_b, atol=1e-6, rtol=1e-5) else None
    c = float((w_a / w_b).mean())
    return c if torch.allclose(w_a, w_b * c, atol=1e-6, rtol=1e-5) else None


def shared_activation(sm: nn.Module, dim: int, hidden: int, preferred=()) -> str | None:
    """The moekit activation with which a :class:`~moekit.shared.SharedExperts` on one fused
    ``gate_up_proj`` computes what the shared MLP ``sm`` computes: ``preferred`` (e.g. the
    routed experts' activation), ``silu``, ``gelu``, ``gelu_tanh``, ``gpt_oss`` and, with the
    module's ``swiglu_alpha``/``swiglu_limit`` (or ``alpha``/``limit``), the clamped SwiGLU and
    GPT-OSS GLU at those constants. Checked on float64 copies with random weights and inputs
    large enough to show clamps. None when none does."""
    from ..shared import SharedExperts

    lim, alpha = _constant(sm, "swiglu_limit", "limit"), _constant(sm, "swiglu_alpha", "alpha")
    candidates = [*preferred, "silu", "gelu", "gelu_tanh", "gpt_oss"]
    if lim is not None and math.isfinite(lim) and lim > 0:
        candidates.append(make_activation_name("silu", limit=lim))
        if alpha is not None:
            candidates.append(make_activation_name("gpt_oss", alpha=alpha, limit=lim))

    ref = copy.deepcopy(sm).to("cpu", torch.float64)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) / dim**0.5)
        x = torch.randn(13, dim, generator=g, dtype=torch.float64) * 4.0
        try:
            want = ref(x)
        except Exception:  # noqa: BLE001 - not a plain MLP of its input
            return None
        for name in candidates:
            try:
                cfg = SharedExperts.Config(hidden_dim=hidden, activation=name, fused_gate_up=True)
            except ValueError:
                continue
            m = cfg.build(dim=dim).to(torch.float64)
            m.gate_up_proj.weight.copy_(ref.gate_up_proj.weight)
            m.down_proj.weight.copy_(ref.down_proj.weight)
            if torch.allclose(m(x), want, rtol=1e-7, atol=1e-9):
                return name
    return None
