"""moekit as a transformers experts implementation (``experts_implementation="moekit"``).

transformers (>= 5) decorates each fused experts class with ``@use_experts_implementation(...)``,
which records the layout on every instance (``has_gate``, ``has_bias``, ``is_transposed``,
``is_concatenated``, ``has_post_expert_norm``) and dispatches ``forward(hidden_states,
top_k_index, top_k_weights)`` to the function registered in ``ExpertsInterface`` under
``config._experts_implementation``. :func:`register` adds :func:`moekit_experts_forward` there.

Layouts are honoured with views, never copies at call time:

* concatenated ``gate_up_proj [E, 2F, D]`` / ``down_proj [E, D, F]``: passed as they are to
  :func:`moekit.ops.moe_experts`;
* transposed ``[E, D, 2F]`` / ``[E, F, D]``: passed as ``.transpose(1, 2)`` views;
* GPT-OSS's gate (its clamped GLU on alternating gate/up columns), with whatever
  ``swiglu_alpha``/``swiglu_limit`` the module has: the weights as they are, with
  ``gate_up_interleaved=True`` and the ``gpt_oss`` activation with those constants (the fused
  kernels read the interleaved, transposed rows in place and take the constants as
  arguments);
* a family's own ``_apply_gate`` otherwise, an activation moekit has no name for, or a
  post-expert norm: the staged path (moekit's routing
  plan, permute, the backend's grouped linear layers, unpermute) with the module's own gate /
  activation / norm in the middle.
"""

from __future__ import annotations

import torch

from ..activations import make_activation_name
from ..ops import api as _api
from ..ops import permute, resolve_backend, unpermute

__all__ = ["moekit_experts_forward", "register", "hf_activation_name", "EXPERTS_IMPLEMENTATION"]

EXPERTS_IMPLEMENTATION = "moekit"

# transformers activation classes -> moekit activation names (same math)
_ACT_CLASSES = {
    "SiLUActivation": "silu",
    "SiLU": "silu",
    "GELUActivation": "gelu",
    "GELU": None,  # nn.GELU: depends on approximate, resolved below
    "GELUTanh": "gelu_tanh",
    "NewGELUActivation": "gelu_tanh",
    "FastGELUActivation": "gelu_tanh",
    "PytorchGELUTanh": "gelu_tanh",
    "ReLUSquaredActivation": "relu2",
    "ReLU": "relu",
}

# config.hidden_act strings -> moekit activation names
HIDDEN_ACT_NAMES = {
    "silu": "silu",
    "swish": "silu",
    "gelu": "gelu",
    "gelu_python": "gelu",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu_python_tanh": "gelu_tanh",
    "gelu_new": "gelu_tanh",
    "gelu_fast": "gelu_tanh",
    "relu2": "relu2",
    "relu": "relu",
}


def _function_names() -> dict:
    import torch.nn.functional as F

    return {F.silu: "silu", F.gelu: "gelu"}


def hf_activation_name(act_fn) -> str | None:
    """The moekit activation computing the same function as the transformers module (or
    plain function, e.g. ``F.silu``) ``act_fn``, or None when moekit has none."""
    if not isinstance(act_fn, torch.nn.Module):
        try:
            return _function_names().get(act_fn)
        except TypeError:  # unhashable
            return None
    name = type(act_fn).__name__
    if name == "GELU":
        return "gelu_tanh" if getattr(act_fn, "approximate", "none") == "tanh" else "gelu"
    if name == "GELUActivation" and getattr(act_fn, "act", None) is not None:
        return "gelu"
    return _ACT_CLASSES.get(name)


def _has_default_gate(module) -> bool:
    try:
        from transformers.integrations.moe import _default_apply_gate
    except ImportError:  # pragma: no cover - every transformers>=5 has it
        return False
    return getattr(type(module), "_apply_gate", None) is _default_apply_gate


def _gpt_oss_activation(module) -> str | None:
    """moekit's name of the module's gate when it is GPT-OSS's clamped GLU (``gpt_oss``, with
    the module's ``alpha``/``limit`` as parameters where they differ from the released
    model's), else None."""
    try:
        from transformers.models.gpt_oss.modeling_gpt_oss import GptOssExperts
    except ImportError:  # pragma: no cover - every transformers>=5 has it
        return None
    if getattr(type(module), "_apply_gate", None) is not GptOssExperts._apply_gate:
        return None
    alpha, limit = getattr(module, "alpha", None), getattr(module, "limit", None)
    if alpha is None or limit is None:
        return None
    return make_activation_name("gpt_oss", alpha=float(alpha), limit=float(limit))


def _module_layout(module):
    """(w_up [E, H, D], b_up, w_down [E, D, F], b_down) as views in moekit's orientation."""
    has_gate = getattr(module, "has_gate", True)
    has_bias = getattr(module, "has_bias", False)
    up_name = "gate_up_proj" if has_gate else "up_proj"
    w_up = getattr(module, up_name)
    w_down = module.down_proj
    if getattr(module, "is_transposed", False):
        w_up = w_up.transpose(1, 2)
        w_down = w_down.transpose(1, 2)
    b_up = getattr(module, up_name + "_bias", None) if has_bias else None
    b_down = getattr(module, "down_proj_bias", None) if has_bias else None
    return has_gate, w_up, b_up, w_down, b_down


def moekit_experts_forward(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    top_k_index: torch.Tensor,
    top_k_weights: torch.Tensor,
    *,
    backend=None,
) -> torch.Tensor:
    """The ``ExpertsInterface`` function: ``y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])``
    for a transformers experts module ``self``, through moekit's experts backend interface
    (``backend``: a name, a backend config or a backend; see :mod:`moekit.ops.backends`)."""
    if backend is None:
        backend = (
            getattr(self, "moekit_backend", None)
            or getattr(getattr(self, "config", None), "moekit_backend", None)
            or "auto"
        )
    if top_k_index.is_floating_point() or top_k_index.is_complex():
        raise TypeError(
            f"top_k_index must be an integer tensor of expert ids, got {top_k_index.dtype}"
        )
    has_gate, w_up, b_up, w_down, b_down = _module_layout(self)
    E = w_up.shape[0]
    out_dtype = hidden_states.dtype
    x = hidden_states.to(w_up.dtype)
    b = resolve_backend(backend, x.device, x.dtype)
    ids = top_k_index.to(torch.int64)
    weights = top_k_weights
    if getattr(self, "_is_expert_parallel", False):
        # expert-parallel sentinels (ids >= E) carry zero weight: compute them on expert E-1
        # and keep them out of the output and of the router gradient
        sentinel = ids >= E
        ids = ids.clamp(max=E - 1)
        weights = weights.masked_fill(sentinel, 0.0)

    concatenated = getattr(self, "is_concatenated", True)
    act_name = (
        hf_activation_name(getattr(self, "act_fn", None)) if hasattr(self, "act_fn") else None
    )
    default_gate = _has_default_gate(self)
    post_norm = (
        getattr(self, "post_expert_norm", None)
        if getattr(self, "has_post_expert_norm", False)
        else None
    )
    # GPT-OSS's gate slices the up projection's columns alternately (gate ::2, up 1::2),
    # whatever the layout flag says: that is moekit's gpt_oss activation on interleaved rows
    gpt_oss_name = (_gpt_oss_activation(self)
                    if has_gate and not default_gate and post_norm is None else None)
    gpt_oss = gpt_oss_name is not None
    if gpt_oss:
        act_name = gpt_oss_name
    fast = (
        act_name is not None
        and post_norm is None
        and (not has_gate or (concatenated and default_gate) or gpt_oss)
    )
    if fast:
        y = _api.moe_experts(
            x,
            w_up,
            w_down,
            ids,
            weights,
            activation=act_name,
            gate_up_proj_bias=b_up,
            down_proj_bias=b_down,
            backend=b,
            gate_up_interleaved=gpt_oss,
        )
        return y.to(out_dtype)

    # staged path with the module's own gate / activation / post-expert norm
    plan = b.make_plan(ids, E)
    x_ND = permute(x, plan)
    h = b.grouped_linear(x_ND, w_up, plan, b_up)
    h = self._apply_gate(h) if has_gate else self.act_fn(h)
    y_ND = b.grouped_linear(h, w_down, plan, b_down)
    if post_norm is not None:
        y_ND = post_norm(y_ND)
    return unpermute(y_ND, plan, weights).to(out_dtype)


def register(name: str = EXPERTS_IMPLEMENTATION) -> None:
    """Register moekit in transformers' ``ExpertsInterface`` under ``name`` (default
    ``"moekit"``), so that ``from_pretrained(..., experts_implementation="moekit")`` and
    ``model.set_experts_implementation("moekit")`` run the experts through moekit. Idempotent.
    The backend is ``"auto"``; set ``experts_module.moekit_backend`` (or
    ``config.moekit_backend``) to pick another one."""
    from transformers.integrations.moe import ExpertsInterface

    ExpertsInterface.register(name, moekit_experts_forward)
