"""The functional experts API: ``moe_experts`` and its stages, over any experts backend.

``moe_experts`` checks its arguments, resolves the backend (a name, a backend config or a
backend: :mod:`moekit.ops.backends`), builds the routing plan with the backend's
``make_plan`` and runs the backend's ``experts`` (its fused call, or the staged composition).
The stages (``permute`` -> ``expert_up`` -> ``expert_down`` -> ``unpermute``) are public
functions too, over the backend's ``grouped_linear``, so that chunking and communication
overlap can compose them.
"""

from __future__ import annotations

import torch

from ..activations import get_activation
from ..routing_plan import RoutingPlan
from .backends import resolve_backend
from .experts_backend import ExpertsBackend
from .stages import check_expert_down, check_expert_up, check_given_plan

__all__ = ["check_expert_args", "expert_down", "expert_up", "moe_experts"]


def expert_up(
    x_ND: torch.Tensor,
    w_up_EHD: torch.Tensor,
    plan: RoutingPlan,
    *,
    activation: str = "silu",
    gated: bool = True,
    bias_EH: torch.Tensor | None = None,
    backend: str | ExpertsBackend.Config | ExpertsBackend = "auto",
    interleaved: bool = False,
) -> torch.Tensor:
    """Up projection (``H = 2F`` when gated, else ``F``) and the activation: ``[N, F]``
    (``interleaved``: gate and up rows of ``w_up_EHD`` alternate, as in GPT-OSS)."""
    check_expert_up(x_ND, w_up_EHD, plan, bias_EH, gated)
    b = resolve_backend(backend, x_ND.device, x_ND.dtype)
    h_NH = b.grouped_linear(x_ND, w_up_EHD, plan, bias_EH)
    return get_activation(activation)(h_NH, gated, interleaved)


def expert_down(
    h_NF: torch.Tensor,
    w_down_EDF: torch.Tensor,
    plan: RoutingPlan,
    *,
    bias_ED: torch.Tensor | None = None,
    backend: str | ExpertsBackend.Config | ExpertsBackend = "auto",
) -> torch.Tensor:
    """Down projection ``[N, D]`` (the bias is added per routed row)."""
    check_expert_down(h_NF, w_down_EDF, plan, bias_ED)
    b = resolve_backend(backend, h_NF.device, h_NF.dtype)
    return b.grouped_linear(h_NF, w_down_EDF, plan, bias_ED)


def check_expert_args(x_TD, w_up, w_down, topk_ids, topk_weights, b_up, b_down) -> bool:
    """Validate the functional arguments; return whether the experts are gated."""
    if x_TD.dim() != 2:
        raise ValueError(f"x must be [T, D], got shape {tuple(x_TD.shape)}")
    if w_up.dim() != 3 or w_down.dim() != 3:
        raise ValueError(
            f"expert weights must be 3-D: gate_up_proj/up_proj [E, 2F or F, D] and down_proj "
            f"[E, D, F]; got {tuple(w_up.shape)} and {tuple(w_down.shape)}"
        )
    E, H, D = w_up.shape
    E2, D2, Fh = w_down.shape
    if E2 != E or D2 != D or D != x_TD.shape[1]:
        raise ValueError(
            f"shape mismatch: x {tuple(x_TD.shape)}, up {tuple(w_up.shape)} [E, H, D], "
            f"down {tuple(w_down.shape)} [E, D, F]"
        )
    if H == 2 * Fh:
        gated = True
    elif H == Fh:
        gated = False
    else:
        raise ValueError(f"up projection has {H} rows; it must be 2F={2 * Fh} (gated) or F={Fh}")
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != x_TD.shape[0]:
        raise ValueError(
            f"topk_ids {tuple(topk_ids.shape)} and topk_weights {tuple(topk_weights.shape)} "
            f"must both be [T={x_TD.shape[0]}, K]"
        )
    if b_up is not None and tuple(b_up.shape) != (E, H):
        raise ValueError(f"up bias must be [E, H]=({E}, {H}), got {tuple(b_up.shape)}")
    if b_down is not None and tuple(b_down.shape) != (E, D):
        raise ValueError(f"down bias must be [E, D]=({E}, {D}), got {tuple(b_down.shape)}")
    for name, t in (("gate_up_proj", w_up), ("down_proj", w_down)):
        if t.dtype != x_TD.dtype:
            raise TypeError(f"{name} has dtype {t.dtype} but x has {x_TD.dtype}; cast one of them")
        if t.device != x_TD.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x_TD.device}")
    if not x_TD.dtype.is_floating_point:
        raise TypeError(f"x must be a floating tensor, got {x_TD.dtype}")
    return gated


def moe_experts(
    x_TD: torch.Tensor,
    gate_up_proj: torch.Tensor,
    down_proj: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    *,
    activation: str = "silu",
    gate_up_proj_bias: torch.Tensor | None = None,
    down_proj_bias: torch.Tensor | None = None,
    backend: str | ExpertsBackend.Config | ExpertsBackend = "auto",
    weight_on_input: bool = False,
    plan: RoutingPlan | None = None,
    gate_up_interleaved: bool = False,
) -> torch.Tensor:
    """Routed experts, functional: ``y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])``.

    ``gate_up_proj`` is ``[E, 2F, D]`` (gate rows first; with ``gate_up_interleaved`` gate and
    up rows alternate, GPT-OSS's layout, and so does the bias) for gated activations, or the up
    projection ``[E, F, D]`` for non-gated ones (told apart by ``down_proj``'s ``F``);
    ``down_proj`` is ``[E, D, F]``. The down bias is added per routed row, so it is weighted
    by the routing weight. With ``weight_on_input`` the weight scales the expert's input row
    instead of its output (Llama 4). ``plan`` reuses a RoutingPlan made from ``topk_ids``.
    ``backend``: a registered name (``"auto"``, ``"loop"``, ``"grouped_mm"``, ``"triton"``, ...),
    a backend config (``TritonBackend.Config(dgrad="split")``) or a backend object.
    """
    gated = check_expert_args(
        x_TD, gate_up_proj, down_proj, topk_ids, topk_weights, gate_up_proj_bias, down_proj_bias
    )
    act = get_activation(activation)
    if not gated and not act.supports_plain:
        raise ValueError(f"activation={activation!r} is gated only; pass gate_up_proj [E, 2F, D]")
    if gate_up_interleaved and not gated:
        raise ValueError("gate_up_interleaved=True needs gated experts (gate_up_proj [E, 2F, D])")
    check_given_plan(plan, topk_ids, gate_up_proj.shape[0])
    b = resolve_backend(backend, x_TD.device, x_TD.dtype)
    if plan is None:
        plan = b.make_plan(topk_ids, gate_up_proj.shape[0])
    elif plan.num_tokens != x_TD.shape[0] or plan.num_experts != gate_up_proj.shape[0]:
        raise ValueError(
            f"plan was made for T={plan.num_tokens}, E={plan.num_experts}; got "
            f"T={x_TD.shape[0]}, E={gate_up_proj.shape[0]}"
        )
    return b.experts(
        x_TD, gate_up_proj, down_proj, plan, topk_weights, activation=act.name, gated=gated,
        gate_up_proj_bias=gate_up_proj_bias, down_proj_bias=down_proj_bias,
        weight_on_input=weight_on_input, gate_up_interleaved=gate_up_interleaved,
    )
