"""The functional experts API shared by every backend.

A *backend* computes the grouped linear layers of the experts. The staged backends
(``loop``, ``grouped_mm``) provide ``grouped_linear`` and are composed here as
permute -> up projection + activation -> down projection -> combine (seed 001's split), each
stage a public function so that chunking and communication overlap can compose them. A fused
backend (``triton``) may provide ``fused``: the whole ``moe_experts`` in its own kernels.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from ..activations import get_activation
from ..plan import RoutingPlan, make_plan
from .reference import grouped_linear_loop
from .stages import check_expert_down, check_expert_up, check_given_plan, permute, unpermute
from .torch_mm import grouped_linear_mm, grouped_mm_available

__all__ = [
    "Backend",
    "register_backend",
    "available_backends",
    "resolve_backend",
    "staged_backend",
    "expert_up",
    "expert_down",
    "moe_experts",
    "BACKEND_NAMES",
]


@dataclass(frozen=True)
class Backend:
    name: str
    available: Callable[[torch.device, torch.dtype], bool]
    grouped_linear: Callable[..., torch.Tensor] | None = None
    fused: Callable[..., torch.Tensor] | None = None
    why_unavailable: str = ""


def _linear_loop(x_NI, w_EOI, plan, bias_EO=None):
    return grouped_linear_loop(x_NI, w_EOI, plan.counts_E, bias_EO)


def _linear_mm(x_NI, w_EOI, plan, bias_EO=None):
    return grouped_linear_mm(
        x_NI, w_EOI, plan.offsets_E, bias_EO=bias_EO, expert_ids_N=plan.expert_ids_N,
        counts_E=plan.counts_E,
    )


_BACKENDS: dict[str, Backend] = {
    "loop": Backend("loop", lambda device, dtype: True, grouped_linear=_linear_loop),
    "grouped_mm": Backend(
        "grouped_mm",
        lambda device, dtype: grouped_mm_available(device, dtype),
        grouped_linear=_linear_mm,
        why_unavailable=(
            "torch grouped_mm runs float32/bfloat16/float16 on CPU and bfloat16 on CUDA GPUs with "
            "SM>=80; use backend='loop' (or 'triton') otherwise"
        ),
    ),
}
# "auto" tries these in order
_AUTO_ORDER = ["triton", "grouped_mm", "loop"]
BACKEND_NAMES = ("auto", "loop", "grouped_mm", "triton")


def register_backend(backend: Backend) -> None:
    """Add (or replace) a backend; ``auto`` considers it in ``_AUTO_ORDER`` when listed there."""
    _BACKENDS[backend.name] = backend


def _ensure_optional_backends() -> None:
    """Import the optional backends once (the triton backend registers itself on import)."""
    global _OPTIONAL_LOADED
    if _OPTIONAL_LOADED:
        return
    _OPTIONAL_LOADED = True
    try:
        from . import triton as _triton  # noqa: F401
    except ImportError:
        pass


_OPTIONAL_LOADED = False


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    _ensure_optional_backends()
    return [n for n, b in _BACKENDS.items() if b.available(device, dtype)]


def resolve_backend(name: str, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend to run for ``name`` on ``device``/``dtype``; ``auto`` picks the fastest
    available (triton on CUDA, then grouped_mm, then the loop)."""
    if name not in BACKEND_NAMES:
        raise ValueError(f"backend={name!r} is unknown; allowed: {BACKEND_NAMES}")
    _ensure_optional_backends()
    if name == "auto":
        for cand in _AUTO_ORDER:
            b = _BACKENDS.get(cand)
            if cand == "triton" and device.type != "cuda":
                continue  # the interpreter on CPU is for tests, never an automatic choice
            if b is not None and b.available(device, dtype):
                return b
        raise RuntimeError("no experts backend is available")  # pragma: no cover - loop always is
    b = _BACKENDS.get(name)
    if b is None:
        raise ValueError(
            f"backend={name!r} is not installed; pip install 'moekit[triton]' (needs a CUDA GPU)"
        )
    if not b.available(device, dtype):
        raise ValueError(f"backend={name!r} cannot run on {device} with {dtype}: {b.why_unavailable}")
    return b


def staged_backend(backend: str | Backend, device: torch.device, dtype: torch.dtype) -> Backend:
    """The backend whose per-stage ``grouped_linear`` runs ``backend``'s stages: itself when it
    has one; for a fused-only backend (triton) grouped_mm where it runs, else the loop."""
    b = backend if isinstance(backend, Backend) else resolve_backend(backend, device, dtype)
    if b.grouped_linear is not None:
        return b
    mm = _BACKENDS["grouped_mm"]
    return mm if mm.available(device, dtype) else _BACKENDS["loop"]


def expert_up(
    x_ND: torch.Tensor,
    w_up_EHD: torch.Tensor,
    plan: RoutingPlan,
    *,
    activation: str = "silu",
    gated: bool = True,
    bias_EH: torch.Tensor | None = None,
    backend: str | Backend = "auto",
    interleaved: bool = False,
) -> torch.Tensor:
    """Up projection (``H = 2F`` when gated, else ``F``) and the activation: ``[N, F]``
    (``interleaved``: gate and up rows of ``w_up_EHD`` alternate, as in GPT-OSS)."""
    check_expert_up(x_ND, w_up_EHD, plan, bias_EH, gated)
    b = staged_backend(backend, x_ND.device, x_ND.dtype)
    h_NH = b.grouped_linear(x_ND, w_up_EHD, plan, bias_EH)
    return get_activation(activation)(h_NH, gated, interleaved)


def expert_down(
    h_NF: torch.Tensor,
    w_down_EDF: torch.Tensor,
    plan: RoutingPlan,
    *,
    bias_ED: torch.Tensor | None = None,
    backend: str | Backend = "auto",
) -> torch.Tensor:
    """Down projection ``[N, D]`` (the bias is added per routed row)."""
    check_expert_down(h_NF, w_down_EDF, plan, bias_ED)
    b = staged_backend(backend, h_NF.device, h_NF.dtype)
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
    backend: str = "auto",
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
        plan = make_plan(topk_ids, gate_up_proj.shape[0])
    elif plan.num_tokens != x_TD.shape[0] or plan.num_experts != gate_up_proj.shape[0]:
        raise ValueError(
            f"plan was made for T={plan.num_tokens}, E={plan.num_experts}; got "
            f"T={x_TD.shape[0]}, E={gate_up_proj.shape[0]}"
        )
    if b.fused is not None:
        return b.fused(
            x_TD, gate_up_proj, down_proj, plan, topk_weights, activation=act.name, gated=gated,
            gate_up_proj_bias=gate_up_proj_bias, down_proj_bias=down_proj_bias,
            weight_on_input=weight_on_input, gate_up_interleaved=gate_up_interleaved,
        )
    x_ND = permute(x_TD, plan, topk_weights if weight_on_input else None)
    h_NF = expert_up(
        x_ND, gate_up_proj, plan, activation=act.name, gated=gated, bias_EH=gate_up_proj_bias,
        backend=b, interleaved=gate_up_interleaved,
    )
    y_ND = expert_down(h_NF, down_proj, plan, bias_ED=down_proj_bias, backend=b)
    return unpermute(y_ND, plan, None if weight_on_input else topk_weights)
