"""The experts-backend interface: :class:`ExpertsBackend`, one interface for every way of
computing the routed experts.

A backend is an object built from its nested ``Config`` (``LoopBackend.Config().build()``)
that owns what it needs to run the experts over a :class:`~moekit.routing_plan.RoutingPlan`:

* ``make_plan(topk_ids_TK, num_experts, ...)``: the routing plan (the plan module's one
  builder; a backend may override it, as the triton backend does at decode sizes);
* ``grouped_linear(x_NI, w_EOI, plan, bias_EO)``: one grouped linear layer over the plan's
  rows (differentiable), from which the staged path is composed;
* ``fused(...)``: the whole experts computation in one call, or ``None`` when the backend has
  none (then :meth:`ExpertsBackend.experts` composes permute -> up + activation -> down ->
  combine from ``grouped_linear``).

:meth:`ExpertsBackend.experts` is the single entry that ``moe_experts``, ``GroupedExperts``,
the local experts of expert parallelism and the transformers experts function call.

The backends built on torch (``LoopBackend``, ``GroupedMMBackend``) are in
``torch_backends.py``, the triton backend in ``triton_backend.py``, and the registry that
chooses a backend by name or by config in ``backends.py``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

from ..activations import get_activation
from ..config import Config
from ..plan import make_plan
from ..routing_plan import RoutingPlan
from .stages import permute, unpermute

__all__ = ["ExpertsBackend"]


class ExpertsBackend:
    """Base of the experts backends. Subclasses set ``name``, ``why_unavailable``, may define a
    nested ``Config`` (a subclass of their parent's, attached by ``__init_subclass__`` so that
    ``Config.build()`` returns the backend; without one they get a copy of the parent's),
    ``available`` and ``grouped_linear``, and optionally ``fused`` and ``make_plan``."""

    name: ClassVar[str] = "base"
    why_unavailable: ClassVar[str] = ""
    # the whole experts call (``experts``' signature without ``self``), or None: compose stages
    fused: Callable[..., torch.Tensor] | None = None

    @dataclass(kw_only=True)
    class Config(Config):
        """A backend's settings. ``name`` records which backend the settings are for (in
        ``to_dict()``); it is the backend class's ``name`` and not set by the user."""

        name: str = dataclasses.field(default="", init=False)

        def __post_init__(self) -> None:
            self.name = self._module.name if self._module is not None else ""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cfg = cls.__dict__.get("Config")
        if cfg is None:  # a subclass without settings of its own: its parent's, building it
            cfg = dataclass(kw_only=True)(type("Config", (cls.Config,), {
                "__qualname__": f"{cls.__qualname__}.Config", "__module__": cls.__module__,
            }))
            cls.Config = cfg
        cfg._module = cls

    def __init__(self, config: ExpertsBackend.Config | None = None):
        cfg_cls = type(self).Config
        if config is None:
            config = cfg_cls()
        if not isinstance(config, cfg_cls):
            raise TypeError(f"{type(self).__name__} takes a {cfg_cls.__qualname__}, got {type(config).__name__}")
        self.config = config

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.config!r})"

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        raise NotImplementedError(f"{type(self).__name__}.available")

    def grouped_linear(
        self, x_NI: torch.Tensor, w_EOI: torch.Tensor, plan: RoutingPlan,
        bias_EO: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """``y[rows of e] = x[rows of e] @ w[e].T (+ bias[e])`` for the plan's rows (sorted by
        expert), differentiable in x, w and the bias."""
        raise NotImplementedError(f"{type(self).__name__}.grouped_linear")

    def make_plan(
        self,
        topk_ids_TK: torch.Tensor,
        num_experts: int,
        *,
        capacity_factor: float | None = None,
        drop_policy: str = "position",
        topk_weights_TK: torch.Tensor | None = None,
        capacity: int | None = None,
        num_zero_experts: int = 0,
        num_real_slots: int | None = None,
        check_ids: bool = True,
    ) -> RoutingPlan:
        """The routing plan of ``topk_ids_TK`` (see :func:`moekit.plan.make_plan`)."""
        return make_plan(
            topk_ids_TK, num_experts, capacity_factor=capacity_factor, drop_policy=drop_policy,
            topk_weights_TK=topk_weights_TK, capacity=capacity, num_zero_experts=num_zero_experts,
            num_real_slots=num_real_slots, check_ids=check_ids,
        )

    def experts(
        self,
        x_TD: torch.Tensor,
        gate_up_proj: torch.Tensor,
        down_proj: torch.Tensor,
        plan: RoutingPlan,
        topk_weights_TK: torch.Tensor,
        *,
        activation: str,
        gated: bool,
        gate_up_proj_bias: torch.Tensor | None = None,
        down_proj_bias: torch.Tensor | None = None,
        weight_on_input: bool = False,
        gate_up_interleaved: bool = False,
    ) -> torch.Tensor:
        """The routed experts over ``plan`` (arguments already checked): ``fused`` when the
        backend has one, else :meth:`staged_experts`."""
        run = self.fused if self.fused is not None else self.staged_experts
        return run(x_TD, gate_up_proj, down_proj, plan, topk_weights_TK, activation=activation,
                   gated=gated, gate_up_proj_bias=gate_up_proj_bias, down_proj_bias=down_proj_bias,
                   weight_on_input=weight_on_input, gate_up_interleaved=gate_up_interleaved)

    def permute(self, x_TD: torch.Tensor, plan: RoutingPlan,
                topk_weights_TK: torch.Tensor | None = None) -> torch.Tensor:
        """``moekit.ops.stages.permute`` on this backend (the rows of ``x`` in the plan's
        order, scaled by their routing weight when it is given)."""
        return permute(x_TD, plan, topk_weights_TK)

    def unpermute(self, y_ND: torch.Tensor, plan: RoutingPlan,
                  topk_weights_TK: torch.Tensor | None = None, *,
                  out_dtype: torch.dtype | None = None) -> torch.Tensor:
        """``moekit.ops.stages.unpermute`` on this backend (the weighted sum over k), in
        ``out_dtype`` when given (the sum made in ``y``'s dtype, rounded once)."""
        y = unpermute(y_ND, plan, topk_weights_TK)
        return y if out_dtype is None else y.to(out_dtype)

    def chunk_runner(self, weights, *, activation: str, train: bool, total_rows: int,
                     weight_on_input: bool = False):
        """The runner of the routed experts chunk by chunk, each chunk one group of experts
        (:mod:`moekit.ops.chunked`; the expert-parallel pipeline's local compute).
        ``weights``: ``(gate_up_proj, down_proj, gate_up_proj_bias, down_proj_bias)`` of all
        local experts; ``total_rows``: the rows of all chunks; ``weight_on_input``: routing
        weights given to the chunks scale the experts' input. This default runs each chunk
        as a small autograd graph through :meth:`experts`."""
        from .chunked import AutogradChunks, routed_experts_fn

        fn = routed_experts_fn(self, activation, weight_on_input=weight_on_input)
        return AutogradChunks(fn, weights, train=train)

    def staged_experts(self, x_TD, gate_up_proj, down_proj, plan, topk_weights_TK, *, activation,
                       gated, gate_up_proj_bias=None, down_proj_bias=None, weight_on_input=False,
                       gate_up_interleaved=False) -> torch.Tensor:
        """permute -> up projection + activation -> down projection -> combine, over
        ``grouped_linear`` (``experts``' arguments)."""
        x_ND = permute(x_TD, plan, topk_weights_TK if weight_on_input else None)
        h_NH = self.grouped_linear(x_ND, gate_up_proj, plan, gate_up_proj_bias)
        a_NF = get_activation(activation)(h_NH, gated, gate_up_interleaved)
        y_ND = self.grouped_linear(a_NF, down_proj, plan, down_proj_bias)
        return unpermute(y_ND, plan, None if weight_on_input else topk_weights_TK)


ExpertsBackend.Config._module = ExpertsBackend
