"""GroupedExperts: the routed experts' weights, their init, and the backend choice.

Parameters (per expert stored as (out, in), like ``nn.Linear``):

* gated activation: ``gate_up_proj`` [E, 2F, D] (gate rows first, then up rows);
  non-gated: ``up_proj`` [E, F, D];
* ``down_proj`` [E, D, F];
* with ``use_bias``: ``gate_up_proj_bias`` [E, 2F] (or ``up_proj_bias`` [E, F]) and
  ``down_proj_bias`` [E, D]; the down bias is added per routed row, so it is weighted by the
  routing weight like the rest of the expert's output.

``backend`` is a registered name (``"auto"``, ``"loop"``, ``"grouped_mm"``, ``"triton"`` or one
added by ``register_backend``) or a backend config, e.g. ``TritonBackend.Config(dgrad="split")``
(its settings are then part of ``to_dict()``). The module resolves it once per device type
and dtype (:meth:`GroupedExperts.backend_for`) and runs everything through that backend:
its routing plan and its experts call.

``num_zero_experts`` Z (a parent field: ``MoE.Config.zero_experts``) adds Z zero-computation
(identity) experts after the E real ones (LongCat-Flash): ids in ``[E, E + Z)`` name them, they
hold no weights, take no rows of the routing plan, and a slot routed to one adds
``weight * x`` to its token's output.

``routing_weight_on="output"`` (default) scales each expert's output row by its routing weight
before the combine; ``"input"`` scales the expert's input row instead (Llama 4). The two differ
for every non-linear expert, so the choice is explicit.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from .activations import canonical_activation, resolve_gated
from .capacity import DROP_POLICIES
from .config import Config, Module, check_bool, check_choice, check_nonneg_int, check_positive
from .ops.api import moe_experts
from .ops.backends import backend_names, resolve_backend
from .ops.experts_backend import ExpertsBackend
from .routing_plan import RoutingPlan

__all__ = ["GroupedExperts"]

ROUTING_WEIGHT_ON = ("output", "input")


class UpProjectionAccess:
    """``w_up`` / ``b_up``: the up projection and its bias whatever their names (``gate_up_proj``
    when gated, ``up_proj`` otherwise: the module's ``up_name``)."""

    up_name: str

    @property
    def w_up(self) -> torch.Tensor:
        return getattr(self, self.up_name)

    @property
    def b_up(self) -> torch.Tensor | None:
        return getattr(self, self.up_name + "_bias")


class GroupedExperts(UpProjectionAccess, Module):
    @dataclass(kw_only=True)
    class Config(Config):
        activation: str = "silu"
        gated: bool | None = None
        use_bias: bool = False
        backend: str | ExpertsBackend.Config = "auto"
        routing_weight_on: str = "output"

        def __post_init__(self) -> None:
            o = "GroupedExperts.Config"
            self.activation = canonical_activation(self.activation)
            resolve_gated(self.activation, self.gated, o)  # validates the pairing
            if isinstance(self.backend, str):
                check_choice(o, "backend", self.backend, backend_names())
            elif not isinstance(self.backend, ExpertsBackend.Config):
                raise TypeError(
                    f"{o}.backend must be a backend name {backend_names()} or an "
                    f"ExpertsBackend.Config (e.g. TritonBackend.Config()); got {type(self.backend).__name__}"
                )
            check_choice(o, "routing_weight_on", self.routing_weight_on, ROUTING_WEIGHT_ON)
            check_bool(o, "use_bias", self.use_bias)

        @property
        def is_gated(self) -> bool:
            """Whether the experts are gated (``gated=None`` means the activation's default)."""
            return resolve_gated(self.activation, self.gated)

    def __init__(
        self,
        config: Config,
        *,
        dim: int,
        hidden_dim: int,
        num_experts: int,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        num_zero_experts: int = 0,
    ):
        super().__init__()
        o = "GroupedExperts"
        check_nonneg_int(o, "num_zero_experts", num_zero_experts)
        if num_zero_experts and capacity_factor is not None:
            raise ValueError(
                f"{o}: num_zero_experts={num_zero_experts} cannot be combined with "
                f"capacity_factor={capacity_factor}; zero-computation experts are dropless"
            )
        check_positive(o, "dim", dim)
        check_positive(o, "hidden_dim", hidden_dim)
        check_positive(o, "num_experts", num_experts)
        if capacity_factor is not None:
            check_positive(o, "capacity_factor", capacity_factor, integer=False)
        check_choice(o, "drop_policy", drop_policy, DROP_POLICIES)
        self.config = config
        self.dim, self.hidden_dim, self.num_experts = dim, hidden_dim, num_experts
        self.capacity_factor, self.drop_policy = capacity_factor, drop_policy
        self.num_zero_experts = num_zero_experts
        self.activation, self.gated = config.activation, config.is_gated
        up_rows = 2 * hidden_dim if self.gated else hidden_dim
        self.up_name = "gate_up_proj" if self.gated else "up_proj"
        self.register_parameter(self.up_name, nn.Parameter(torch.empty(num_experts, up_rows, dim)))
        self.down_proj = nn.Parameter(torch.empty(num_experts, dim, hidden_dim))
        if config.use_bias:
            self.register_parameter(self.up_name + "_bias", nn.Parameter(torch.empty(num_experts, up_rows)))
            self.down_proj_bias = nn.Parameter(torch.empty(num_experts, dim))
        else:
            self.register_parameter(self.up_name + "_bias", None)
            self.down_proj_bias = None
        self.last_plan: RoutingPlan | None = None
        # logical ids of the experts this module holds, in order, when it holds only some of
        # them (expert parallelism: moekit.parallel.apply_ep); None when it holds all
        self.local_experts: list[int] | None = None
        self._backends: dict[tuple[str, torch.dtype, bool], tuple[object, ExpertsBackend]] = {}
        self.init_weights()

    def weight_names(self) -> list[str]:
        """Names of the expert tensors: the up projection, ``down_proj`` and (with biases)
        their biases."""
        names = [self.up_name, "down_proj"]
        if self.config.use_bias:
            names += [self.up_name + "_bias", "down_proj_bias"]
        return names

    def init_weights(self, init_std: float = 0.02, out_std: float | None = None) -> None:
        """As torchtitan: the gate rows (or a non-gated up projection) ~ N(0, 0.02) truncated;
        the up rows of a gated projection and the down projection ~ N(0, ``out_std``)
        (depth-scaled by the parent when it knows the layer's depth; defaults to
        ``init_std``); biases zero."""
        if self.local_experts is not None:
            raise RuntimeError(
                "initialize the MoE's weights before apply_ep (identically on every rank, e.g. the "
                "same seed): after it each rank holds only its experts"
            )
        std = init_std if out_std is None else out_std
        with torch.no_grad():
            if self.gated:
                F = self.hidden_dim
                nn.init.trunc_normal_(self.w_up[:, :F], mean=0.0, std=0.02)
                nn.init.trunc_normal_(self.w_up[:, F:], mean=0.0, std=std)
            else:
                nn.init.trunc_normal_(self.w_up, mean=0.0, std=0.02)
            nn.init.trunc_normal_(self.down_proj, mean=0.0, std=std)
            for b in (self.b_up, self.down_proj_bias):
                if b is not None:
                    nn.init.zeros_(b)

    def backend_for(self, device: torch.device, dtype: torch.dtype) -> ExpertsBackend:
        """The backend this module runs on ``device`` with ``dtype`` (resolved from
        ``config.backend`` once per device type, dtype and whether torch.compile is tracing,
        since ``auto`` may choose differently there; raises if it cannot run there)."""
        spec = self.config.backend
        key = (torch.device(device).type, dtype, torch.compiler.is_compiling())
        hit = self._backends.get(key)
        if hit is None or hit[0] is not spec:  # (resolved again when the config was replaced)
            hit = self._backends[key] = (spec, resolve_backend(spec, device, dtype))
        return hit[1]

    def make_plan(self, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor) -> RoutingPlan:
        b = self.backend_for(topk_ids_TK.device, self.down_proj.dtype)
        return b.make_plan(
            topk_ids_TK, self.num_experts, capacity_factor=self.capacity_factor,
            drop_policy=self.drop_policy, topk_weights_TK=topk_weights_TK,
            num_zero_experts=self.num_zero_experts,
        )

    def forward(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        plan: RoutingPlan | None = None,
    ) -> torch.Tensor:
        backend = self.backend_for(x_TD.device, x_TD.dtype)
        if plan is None:
            plan = self.make_plan(topk_ids_TK, topk_weights_TK)
        self.last_plan = plan
        y_TD = moe_experts(
            x_TD, self.w_up, self.down_proj, topk_ids_TK, topk_weights_TK,
            activation=self.activation, gate_up_proj_bias=self.b_up,
            down_proj_bias=self.down_proj_bias, backend=backend,
            weight_on_input=self.config.routing_weight_on == "input", plan=plan,
        )
        if self.num_zero_experts:
            y_TD = y_TD + self.zero_experts_output(x_TD, topk_ids_TK, topk_weights_TK)
        return y_TD

    def zero_experts_output(
        self, x_TD: torch.Tensor, topk_ids_TK: torch.Tensor, topk_weights_TK: torch.Tensor
    ) -> torch.Tensor:
        """What the zero-computation experts add: ``x[t] * sum of t's weights on them``
        (computed in the weights' dtype when wider, then cast to ``x``'s)."""
        w_T1 = torch.where(topk_ids_TK >= self.num_experts, topk_weights_TK, 0).sum(1, keepdim=True)
        return (x_TD * w_T1).to(x_TD.dtype)

    def extra_repr(self) -> str:
        b = self.config.backend
        return (
            f"num_experts={self.num_experts}, dim={self.dim}, hidden_dim={self.hidden_dim}, "
            f"activation={self.activation}, gated={self.gated}, "
            f"backend={b if isinstance(b, str) else b.name}"
            + (f", num_zero_experts={self.num_zero_experts}" if self.num_zero_experts else "")
            + (f", local_experts={self.local_experts}" if self.local_experts is not None else "")
        )


def depth_scaled_std(init_std: float, layer_id: int) -> float:
    """torchtitan's depth-scaled init for output projections: ``std / sqrt(2 (layer + 1))``."""
    return init_std / math.sqrt(2 * (layer_id + 1))
