"""SharedExperts: a dense MLP every token goes through, added to the routed output.

``gate_proj``/``up_proj``/``down_proj`` are ``nn.Linear`` (with biases when ``use_bias``:
ERNIE-4.5's ``use_bias``, DeepSeek-V4's ``mlp_bias``); a non-gated activation has no
``gate_proj``. With ``fused_gate_up`` (gated only) one ``gate_up_proj`` Linear
(D -> 2F, gate rows first) stands for ``gate_proj`` and ``up_proj`` (both None then), as
MiniMax-M3's shared expert keeps them. With ``use_gate`` a Linear ``expert_gate`` (D -> 1) scales the output by
``sigmoid(expert_gate(x))`` per token (Qwen2-MoE's shared expert gate).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from .activations import canonical_activation, get_activation, resolve_gated
from .config import Config, Module, check_bool, check_positive

__all__ = ["SharedExperts"]


class SharedExperts(Module):
    @dataclass(kw_only=True)
    class Config(Config):
        hidden_dim: int
        activation: str = "silu"
        gated: bool | None = None
        use_gate: bool = False
        fused_gate_up: bool = False
        use_bias: bool = False

        def __post_init__(self) -> None:
            o = "SharedExperts.Config"
            check_positive(o, "hidden_dim", self.hidden_dim)
            check_bool(o, "use_gate", self.use_gate)
            check_bool(o, "fused_gate_up", self.fused_gate_up)
            check_bool(o, "use_bias", self.use_bias)
            self.activation = canonical_activation(self.activation)
            resolve_gated(self.activation, self.gated, o)  # validates the pairing
            if self.fused_gate_up and not self.is_gated:
                raise ValueError(
                    f"{o}: fused_gate_up=True needs a gated activation (activation="
                    f"{self.activation!r}, gated={self.gated!r})"
                )

        @property
        def is_gated(self) -> bool:
            """Whether the experts are gated (``gated=None`` means the activation's default)."""
            return resolve_gated(self.activation, self.gated)

    def __init__(self, config: Config, *, dim: int):
        super().__init__()
        check_positive("SharedExperts", "dim", dim)
        self.config = config
        self.dim, self.hidden_dim = dim, config.hidden_dim
        self._act = get_activation(config.activation)
        F, fused, bias = config.hidden_dim, config.fused_gate_up, config.use_bias
        self.gate_up_proj = nn.Linear(dim, 2 * F, bias=bias) if fused else None
        self.gate_proj = nn.Linear(dim, F, bias=bias) if config.is_gated and not fused else None
        self.up_proj = None if fused else nn.Linear(dim, F, bias=bias)
        self.down_proj = nn.Linear(config.hidden_dim, dim, bias=bias)
        self.expert_gate = nn.Linear(dim, 1, bias=False) if config.use_gate else None
        self.init_weights()

    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """As torchtitan's FeedForward: the first projection (gate, or up when non-gated) and the
        expert gate ~ N(0, 0.02); the up projection of a gated MLP and the down projection
        ~ N(0, ``out_std``) (defaults to ``init_std``); biases zero."""
        std = init_std if out_std is None else out_std
        F = self.hidden_dim
        fused = self.gate_up_proj.weight if self.gate_up_proj is not None else None
        gate = fused[:F] if fused is not None else getattr(self.gate_proj, "weight", None)
        up = fused[F:] if fused is not None else self.up_proj.weight
        with torch.no_grad():
            first = gate if gate is not None else up
            for w in (first, getattr(self.expert_gate, "weight", None)):
                if w is not None:
                    nn.init.trunc_normal_(w, mean=0.0, std=0.02)
            if gate is not None:
                nn.init.trunc_normal_(up, mean=0.0, std=std)
            nn.init.trunc_normal_(self.down_proj.weight, mean=0.0, std=std)
            for lin in (self.gate_up_proj, self.gate_proj, self.up_proj, self.down_proj):
                if lin is not None and lin.bias is not None:
                    lin.bias.zero_()

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        if not isinstance(x_TD, torch.Tensor) or x_TD.dim() < 1 or x_TD.shape[-1] != self.dim:
            raise ValueError(
                f"SharedExperts input must be [..., {self.dim}], got "
                f"{tuple(x_TD.shape) if isinstance(x_TD, torch.Tensor) else type(x_TD).__name__}"
            )
        if x_TD.dtype != self.down_proj.weight.dtype:
            raise TypeError(
                f"SharedExperts input has dtype {x_TD.dtype} but its weights are {self.down_proj.weight.dtype}; "
                "cast one of them"
            )
        if self.gate_up_proj is not None:
            h = self._act(self.gate_up_proj(x_TD), gated=True)
        else:
            up = self.up_proj(x_TD)
            h = self._act.gated(self.gate_proj(x_TD), up) if self.gate_proj is not None else self._act.unary(up)
        y = self.down_proj(h)
        if self.expert_gate is not None:
            y = torch.sigmoid(self.expert_gate(x_TD)) * y
        return y
