"""Experts backends: one interface for every way of computing the routed experts.

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

Backends are chosen by name or by config: ``register_backend(name, config_or_factory)`` adds
a name; ``resolve_backend(spec, device, dtype)`` turns a name, a config or a backend into the
backend to run, and :func:`auto_backend` holds ``"auto"``'s choice.
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
from .reference import grouped_linear_loop
from .stages import permute, unpermute
from .torch_mm import grouped_linear_mm, grouped_mm_available

__all__ = [
    "ExpertsBackend",
    "GroupedMMBackend",
    "LoopBackend",
    "auto_backend",
    "available_backends",
    "backend_names",
    "register_backend",
    "resolve_backend",
]


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


class LoopBackend(ExpertsBackend):
    """A plain per-expert loop: slow and obviously correct, on every device and dtype."""

    name = "loop"

    @dataclass(kw_only=True)
    class Config(ExpertsBackend.Config):
        pass

    def available(self, device, dtype) -> bool:
        return True

    def grouped_linear(self, x_NI, w_EOI, plan, bias_EO=None):
        return grouped_linear_loop(x_NI, w_EOI, plan.counts_E, bias_EO)


class GroupedMMBackend(ExpertsBackend):
    """torch's grouped GEMM (``torch.nn.functional.grouped_mm``), forward and backward."""

    name = "grouped_mm"
    why_unavailable = (
        "torch grouped_mm runs float32/bfloat16/float16 on CPU and bfloat16 on CUDA GPUs with "
        "SM>=80; use backend='loop' (or 'triton') otherwise"
    )

    @dataclass(kw_only=True)
    class Config(ExpertsBackend.Config):
        pass

    def available(self, device, dtype) -> bool:
        return grouped_mm_available(device, dtype)

    def grouped_linear(self, x_NI, w_EOI, plan, bias_EO=None):
        return grouped_linear_mm(
            x_NI, w_EOI, plan.offsets_E, bias_EO=bias_EO, expert_ids_N=plan.expert_ids_N,
            counts_E=plan.counts_E,
        )


# ----------------------------------------------------------------------------- registry
def _triton_defaults() -> ExpertsBackend:
    from .triton_backend import TritonBackend

    return TritonBackend.with_env_defaults()


# name -> a config, or a zero-argument factory returning one (or a backend)
_REGISTRY: dict[str, Any] = {
    "loop": LoopBackend.Config,
    "grouped_mm": GroupedMMBackend.Config,
    "triton": _triton_defaults,
}


def register_backend(name: str, backend: ExpertsBackend.Config | Callable[[], Any]) -> None:
    """Make ``name`` a backend choice (``GroupedExperts.Config(backend=name)``,
    ``moe_experts(..., backend=name)``): ``backend`` is an ``ExpertsBackend.Config`` (the
    settings to use) or a zero-argument callable returning a config or a backend. Replaces
    an earlier registration of the same name; ``"auto"`` is reserved."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backend: name={name!r}; it must be a non-empty string")
    if name == "auto":
        raise ValueError("register_backend: 'auto' is reserved (it picks among the backends)")
    if not (isinstance(backend, ExpertsBackend.Config) or callable(backend)):
        raise TypeError(
            f"register_backend({name!r}, ...): expected an ExpertsBackend.Config or a factory "
            f"returning one, got {type(backend).__name__}"
        )
    _REGISTRY[name] = backend


def backend_names() -> tuple[str, ...]:
    """Every name a backend can be chosen by: ``"auto"`` and the registered ones."""
    return ("auto", *_REGISTRY)


def _build(spec: Any, what: str) -> ExpertsBackend:
    if isinstance(spec, ExpertsBackend):
        return spec
    if isinstance(spec, ExpertsBackend.Config):
        return spec.build()
    if isinstance(spec, type) and issubclass(spec, ExpertsBackend.Config):
        return spec().build()
    if callable(spec):
        return _build(spec(), what)
    raise TypeError(f"{what} gave {type(spec).__name__}; expected an ExpertsBackend.Config or backend")


def default_backend(name: str) -> ExpertsBackend:
    """The backend registered under ``name``, with its default settings."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; allowed: {backend_names()}")
    return _build(_REGISTRY[name], f"the backend registered as {name!r}")


def auto_backend(device: torch.device, dtype: torch.dtype) -> ExpertsBackend:
    """``"auto"``'s choice: triton on a CUDA GPU where it runs the dtype, else grouped_mm where
    torch's grouped GEMM runs the device and dtype, else the loop. (The triton backend under
    the interpreter on CPU is for tests, never an automatic choice.)"""
    device = torch.device(device)
    if device.type == "cuda":
        b = default_backend("triton")
        if b.available(device, dtype):
            return b
    b = default_backend("grouped_mm")
    return b if b.available(device, dtype) else default_backend("loop")


def resolve_backend(
    spec: str | ExpertsBackend.Config | ExpertsBackend, device: torch.device, dtype: torch.dtype
) -> ExpertsBackend:
    """The backend to run for ``spec`` (a name, a backend config or a backend) on
    ``device``/``dtype``; raises ValueError when it cannot run there, saying why."""
    if isinstance(spec, str):
        b = auto_backend(device, dtype) if spec == "auto" else default_backend(spec)
    elif isinstance(spec, (ExpertsBackend, ExpertsBackend.Config)):
        b = _build(spec, "backend")
    else:
        raise TypeError(
            f"backend must be a name {backend_names()}, an ExpertsBackend.Config or an "
            f"ExpertsBackend; got {type(spec).__name__}"
        )
    if not b.available(torch.device(device), dtype):
        raise ValueError(f"backend={b.name!r} cannot run on {device} with {dtype}: {b.why_unavailable}")
    return b


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """The registered names whose default backend runs on ``device`` with ``dtype``."""
    return [n for n in _REGISTRY if default_backend(n).available(torch.device(device), dtype)]
