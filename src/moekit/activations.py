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
``relu2``      no     ``relu(h) ** 2``
``silu``       no     ``silu(h)`` (when the experts are configured non-gated)
``gelu``       no     ``gelu(h)``; ``gelu_tanh`` likewise
============== ====== ============================================================

Whether an expert is gated is a property of the experts config (``gated``), defaulting to the
activation's natural form (every name above but ``relu2`` is gated by default).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

__all__ = [
    "Activation", "get_activation", "ACTIVATIONS", "ALIASES", "canonical_activation", "is_gpt_oss_glu",
]

GPT_OSS_ALPHA = 1.702
GPT_OSS_LIMIT = 7.0


def is_gpt_oss_glu(alpha, limit) -> bool:
    """Whether a clamped GLU with ``alpha`` and ``limit`` is moekit's ``gpt_oss`` activation
    (fixed at ``GPT_OSS_ALPHA``, ``GPT_OSS_LIMIT``); False when either is None."""
    return (alpha is not None and limit is not None
            and float(alpha) == GPT_OSS_ALPHA and float(limit) == GPT_OSS_LIMIT)


def _gpt_oss_glu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    gate = gate.clamp(max=GPT_OSS_LIMIT)
    up = up.clamp(min=-GPT_OSS_LIMIT, max=GPT_OSS_LIMIT)
    return (up + 1) * (gate * torch.sigmoid(gate * GPT_OSS_ALPHA))


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
    "relu2": Activation("relu2", _relu2, False),
}
ALIASES = {"swiglu": "silu", "geglu": "gelu", "gpt_oss_glu": "gpt_oss", "squared_relu": "relu2"}


def canonical_activation(name: str) -> str:
    key = ALIASES.get(name, name)
    if key not in ACTIVATIONS:
        allowed = sorted(ACTIVATIONS) + sorted(ALIASES)
        raise ValueError(f"activation={name!r} is unknown; allowed: {allowed}")
    return key


def get_activation(name: str) -> Activation:
    return ACTIVATIONS[canonical_activation(name)]


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
