"""The checks of the MoE layer (``moe.py``): its config's fields and its forward's inputs.

:func:`check_moe_config` validates ``MoE.Config`` (its ``__post_init__``);
:func:`check_moe_input` the input, ``token_mask`` and ``router_logits`` of ``MoE.forward``
against the layer's dim, router and experts. Each raises a ValueError or TypeError naming
the field or argument and what is allowed.
"""

from __future__ import annotations

import torch

from .capacity import DROP_POLICIES
from .config import (
    Config,
    check_bool,
    check_choice,
    check_nonneg,
    check_nonneg_int,
    check_positive,
)
from .experts import GroupedExperts
from .router import TokenChoiceTopKRouter
from .shared import SharedExperts

__all__ = ["check_moe_config", "check_moe_input"]


def check_moe_config(cfg) -> None:
    """``MoE.Config``'s fields (``cfg``): values, types, and the combinations that conflict."""
    o = "MoE.Config"
    for name in ("dim", "hidden_dim", "num_experts"):
        check_positive(o, name, getattr(cfg, name))
    check_nonneg_int(o, "zero_experts", cfg.zero_experts)
    if cfg.zero_experts and cfg.capacity_factor is not None:
        raise ValueError(
            f"{o}: zero_experts={cfg.zero_experts} cannot be combined with capacity_factor="
            f"{cfg.capacity_factor}; zero-computation experts are dropless"
        )
    if not isinstance(cfg.router, Config):
        raise TypeError(
            f"{o}.router must be a moekit Config (e.g. TokenChoiceTopKRouter.Config, or a "
            f"custom Config whose build(dim=, num_experts=) returns a router); got {type(cfg.router).__name__}"
        )
    if not isinstance(cfg.experts, GroupedExperts.Config):
        raise TypeError(f"{o}.experts must be a GroupedExperts.Config, got {type(cfg.experts).__name__}")
    if cfg.shared_experts is not None and not isinstance(cfg.shared_experts, SharedExperts.Config):
        raise TypeError(
            f"{o}.shared_experts must be a SharedExperts.Config or None, got {type(cfg.shared_experts).__name__}"
        )
    if cfg.capacity_factor is not None:
        check_positive(o, "capacity_factor", cfg.capacity_factor, integer=False)
    check_choice(o, "drop_policy", cfg.drop_policy, DROP_POLICIES)
    for name in ("load_balance_coeff", "seq_aux_loss_coeff", "z_loss_coeff"):
        check_nonneg(o, name, getattr(cfg, name))
    check_positive(o, "expert_bias_update_rate", cfg.expert_bias_update_rate, integer=False)
    if cfg.sequence_capacity is not None:
        check_positive(o, "sequence_capacity", cfg.sequence_capacity)
        if cfg.capacity_factor is not None:
            raise ValueError(
                f"{o}: sequence_capacity={cfg.sequence_capacity} and capacity_factor="
                f"{cfg.capacity_factor} are two capacity rules; set one of them"
            )
    check_bool(o, "output_bias", cfg.output_bias)
    if cfg.output_norm_eps is not None:
        check_positive(o, "output_norm_eps", cfg.output_norm_eps, integer=False)
    if isinstance(cfg.router, TokenChoiceTopKRouter.Config):
        cfg.router.validate_for(cfg.router_experts)


def check_moe_input(
    x, token_mask, router_logits, *, dim: int, router_experts: int,
    router: torch.nn.Module, experts: torch.nn.Module,
) -> None:
    """Shape, dtype and device of the inputs (metadata only, except the values of a
    non-boolean token_mask on CPU)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"MoE input must be a tensor, got {type(x).__name__}")
    if x.dim() not in (2, 3) or x.shape[-1] != dim:
        raise ValueError(f"MoE input must be [T, {dim}] or [B, S, {dim}], got {tuple(x.shape)}")
    if not x.is_floating_point():
        raise TypeError(f"MoE input must be a floating tensor, got {x.dtype}")
    w = router.gate.weight if isinstance(getattr(router, "gate", None), torch.nn.Linear) else None
    if w is not None and x.device != w.device:
        raise ValueError(
            f"MoE input is on {x.device} but the layer's parameters are on {w.device}; move one of them"
        )
    wx = next((p for p in experts.parameters() if p.is_floating_point()), None)
    if wx is not None and x.dtype != wx.dtype and not torch.is_autocast_enabled(x.device.type):
        raise TypeError(
            f"MoE input has dtype {x.dtype} but the experts' weights are {wx.dtype}; cast the "
            f"input or the layer (moe.to({wx.dtype}) / moe.to({x.dtype}))"
        )
    if x.device.type == "meta":
        raise ValueError(
            "MoE input is on the meta device: routing needs values; materialize the layer "
            "(module.to_empty(device=...) then init_weights() or load_state_dict) and run on real tensors"
        )
    T = x.numel() // dim
    if token_mask is not None:
        if not isinstance(token_mask, torch.Tensor):
            raise TypeError(f"token_mask must be a tensor, got {type(token_mask).__name__}")
        if token_mask.numel() != T:
            raise ValueError(f"token_mask has {token_mask.numel()} entries; the input has {T} tokens")
        if token_mask.device != x.device:
            raise ValueError(f"token_mask is on {token_mask.device} but the input is on {x.device}")
        if (token_mask.dtype != torch.bool and token_mask.device.type == "cpu"
                and not torch.compiler.is_compiling()
                and not bool(((token_mask == 0) | (token_mask == 1)).all())):
            raise ValueError("token_mask must hold only 0/1 (or True/False): 1 for real tokens, 0 for padding")
    if router_logits is not None:
        if not isinstance(router_logits, torch.Tensor) or not router_logits.is_floating_point():
            raise TypeError(
                "router_logits must be a floating tensor [T, E], got "
                f"{getattr(router_logits, 'dtype', type(router_logits).__name__)}"
            )
        if router_logits.dim() == 0 or router_logits.numel() != T * router_experts:
            raise ValueError(
                f"router_logits must be [T={T}, E={router_experts}] (or [B, S, E]), "
                f"got {tuple(router_logits.shape)}"
            )
        if router_logits.device != x.device:
            raise ValueError(f"router_logits is on {router_logits.device} but the input is on {x.device}")
