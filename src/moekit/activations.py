"""Expert activations: gated (``act(gate) * up`` style) and non-gated, by name.

Gated activations take the two halves of the up projection (``gate`` rows first, then ``up``)
and return ``F`` features; non-gated ones take the ``F`` features of the up projection.

============== ====== ============================================================
name           gated  formula
============== ====== ============================================================
``silu``       yes    ``silu(gate) * up``  (SwiGLU; alias ``swiglu``)
``gelu``       yes    ``gelu(gate) * up``  (GEGLU, exact erf; alias ``geglu``)
``gelu_tanh``  yes    ``gelu_tanh(gate) * up``
``gpt_oss``    yes    ``(up.clamp(-l, l) + 1) * g * sigmoid(alpha * g)``, ``g = gate.clamp(max=l)``
                      with ``alpha = 1.702``, ``l = 7.0`` (GPT-OSS's clamped GLU)
``gpt_oss(alpha=a,limit=l)``  the same with other constants (e.g. GPT-OSS configs with
                      another ``swiglu_alpha`` / ``swiglu_limit``)
``silu(limit=l)``  yes  ``silu(gate.clamp(max=l)) * up.clamp(-l, l)`` (clamped SwiGLU)
``silu_softcap(gate=a,up=b)``  ``cap_a(gate) * sigmoid(gate) * cap_b(up)``,
                      ``cap_c(v) = c * tanh(v / c)`` (softcapped SwiGLU)
``relu``       yes    ``relu(gate) * up`` (ReGLU); non-gated ``relu(h)`` (Switch Transformers)
``relu2``      no     ``relu(h) ** 2``
``silu``       no     ``silu(h)`` (when the experts are configured non-gated)
``gelu``       no     ``gelu(h)``; ``gelu_tanh`` likewise
============== ====== ============================================================

Whether an expert is gated is a property of the experts config (``gated``), defaulting to the
activation's natural form (every name above but ``relu2`` is gated by default).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "Activation", "get_activation", "ACTIVATIONS", "ALIASES", "canonical_activation",
    "make_activation_name", "activation_params",
]

GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def activation_params(name: str) -> tuple[str, dict[str, float]]:
    """``(base name, parameters)`` of an activation name, e.g. ``"gpt_oss(alpha=1.5,limit=5.0)"``
    -> ``("gpt_oss", {"alpha": 1.5, "limit": 5.0})``; ``(name, {})`` for a plain one."""
    key = canonical_activation(name)
    return _parse(key) if "(" in key else (key, {})


def _gpt_oss_glu(
    gate: torch.Tensor, up: torch.Tensor, alpha: float = GPT_OSS_ALPHA, limit: float = GPT_OSS_LIMIT
) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


def _clamped_swiglu(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def _softcap(v: torch.Tensor, cap: float | None) -> torch.Tensor:
    return v if cap is None else torch.tanh(v / cap) * cap


def _softcapped_swiglu(
    gate: torch.Tensor, up: torch.Tensor, gate_cap: float | None, up_cap: float | None
) -> torch.Tensor:
    return _softcap(gate, gate_cap) * torch.sigmoid(gate) * _softcap(up, up_cap)


def _relu2(h: torch.Tensor) -> torch.Tensor:
    return torch.relu(h).square()


def _gelu_tanh(h: torch.Tensor) -> torch.Tensor:
    return F.gelu(h, approximate="tanh")


@dataclass(frozen=True)
class Activation:
    """One activation. ``unary`` maps features to features; ``glu`` (if not None) is a
    custom gated form ``glu(gate, up)``; otherwise the gated form is ``unary(gate) * up``."""

    name: str
    unary: Callable[[torch.Tensor], torch.Tensor] | None
    default_gated: bool
    glu: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None

    @property
    def supports_gated(self) -> bool:
        return self.glu is not None or self.unary is not None

    @property
    def supports_plain(self) -> bool:
        return self.unary is not None

    def gated(self, gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
        if self.glu is not None:
            return self.glu(gate, up)
        return self.unary(gate) * up

    def __call__(self, h: torch.Tensor, gated: bool, interleaved: bool = False) -> torch.Tensor:
        """Apply to the up projection's output ``h`` ([..., 2F] if gated, else [..., F]); gated
        columns are ``[gate | up]``, or with ``interleaved`` alternate ``gate0, up0, gate1, ...``
        (GPT-OSS's layout)."""
        if gated:
            if interleaved:
                return self.gated(h[..., 0::2], h[..., 1::2])
            f = h.shape[-1] // 2
            return self.gated(h[..., :f], h[..., f:])
        if interleaved:
            raise ValueError("interleaved gate/up columns need a gated activation")
        return self.unary(h)


ACTIVATIONS: dict[str, Activation] = {
    "silu": Activation("silu", F.silu, True),
    "gelu": Activation("gelu", F.gelu, True),
    "gelu_tanh": Activation("gelu_tanh", _gelu_tanh, True),
    "gpt_oss": Activation("gpt_oss", None, True, glu=_gpt_oss_glu),
    "relu": Activation("relu", torch.relu, True),
    "relu2": Activation("relu2", _relu2, False),
}
ALIASES = {"swiglu": "silu", "geglu": "gelu", "gpt_oss_glu": "gpt_oss", "squared_relu": "relu2"}


# activations that take parameters: name -> (allowed parameters, their defaults)
PARAMETRIC = {
    "gpt_oss": {"alpha": GPT_OSS_ALPHA, "limit": GPT_OSS_LIMIT},
    "silu": {"limit": None},  # no limit: plain silu
    "silu_softcap": {"gate": None, "up": None},  # no caps: plain silu
}


def _parse(name: str) -> tuple[str, dict[str, float]]:
    """``"gpt_oss(alpha=1.5,limit=5)"`` -> ``("gpt_oss", {"alpha": 1.5, "limit": 5.0})``."""
    base, _, rest = name.partition("(")
    base = ALIASES.get(base.strip(), base.strip())
    if not rest.endswith(")") or base not in PARAMETRIC:
        raise ValueError(
            f"activation={name!r}: parameters are written name(key=value, ...) and only "
            f"{sorted(PARAMETRIC)} take them"
        )
    allowed, params = PARAMETRIC[base], {}
    for item in filter(None, (x.strip() for x in rest[:-1].split(","))):
        k, eq, v = (x.strip() for x in item.partition("="))
        if not eq or k not in allowed:
            raise ValueError(f"activation={name!r}: {base} takes {sorted(allowed)}, got {item!r}")
        try:
            params[k] = float(v)
        except ValueError:
            raise ValueError(f"activation={name!r}: {k}={v!r} is not a number") from None
        if not math.isfinite(params[k]) or (k != "alpha" and params[k] <= 0):
            raise ValueError(f"activation={name!r}: {k} must be finite (and a limit or cap > 0)")
    return base, params


def make_activation_name(base: str, **params: float) -> str:
    """The canonical name of ``base`` with ``params`` (the plain name when every parameter
    is its default), e.g. ``make_activation_name("gpt_oss", alpha=1.702, limit=5.0)``."""
    defaults = PARAMETRIC[base]
    vals = {k: (None if v is None else float(v)) for k, v in params.items()}
    if all(vals.get(k, d) == d for k, d in defaults.items()):
        return base if base in ACTIVATIONS else "silu"  # silu_softcap without caps
    inner = ",".join(
        f"{k}={vals.get(k, d)!r}" for k, d in defaults.items() if vals.get(k, d) is not None
    )
    return f"{base}({inner})"


def canonical_activation(name: str) -> str:
    if isinstance(name, str) and "(" in name:
        base, params = _parse(name)
        return make_activation_name(base, **params)
    key = ALIASES.get(name, name)
    if key not in ACTIVATIONS:
        allowed = sorted(ACTIVATIONS) + sorted(ALIASES) + [f"{p}(...)" for p in PARAMETRIC]
        raise ValueError(f"activation={name!r} is unknown; allowed: {allowed}")
    return key


def get_activation(name: str) -> Activation:
    key = canonical_activation(name)
    if "(" not in key:
        return ACTIVATIONS[key]
    base, p = _parse(key)
    if base == "gpt_oss":
        glu = functools.partial(_gpt_oss_glu, alpha=p.get("alpha", GPT_OSS_ALPHA),
                                limit=p.get("limit", GPT_OSS_LIMIT))
        return Activation(key, None, True, glu=glu)
    if base == "silu_softcap":
        glu = functools.partial(_softcapped_swiglu, gate_cap=p.get("gate"), up_cap=p.get("up"))
        return Activation(key, None, True, glu=glu)
    return Activation(key, None, True, glu=functools.partial(_clamped_swiglu, limit=p["limit"]))


def resolve_gated(name: str, gated: bool | None, owner: str = "activation") -> bool:
    """The gating to use for ``name`` (``gated=None`` means the activation's default);
    raises if the activation has no such form (``gpt_oss`` is gated only)."""
    act = get_activation(name)
    if gated is None:
        return act.default_gated
    if not isinstance(gated, bool):
        raise TypeError(f"{owner}: gated={gated!r}; it must be True, False or None (the activation's default)")
    if not gated and not act.supports_plain:
        raise ValueError(f"{owner}: activation={name!r} exists only in gated form; set gated=True")
    return bool(gated)
