"""moekit: modular, fast, well-tested Mixture-of-Experts layers for PyTorch.

    cfg = moekit.MoE.Config(
        dim=2048, hidden_dim=768, num_experts=128,
        router=moekit.TokenChoiceTopKRouter.Config(top_k=8, score_func="softmax", route_norm=True),
        experts=moekit.GroupedExperts.Config(activation="swiglu", backend="auto"),
    )
    moe = cfg.build()
    y = moe(x)      # x: [B, S, D] or [T, D]
"""

from . import balance, ops, presets
from .config import Config, Module
from .experts import GroupedExperts
from .moe import MoE
from .plan import make_plan
from .router import RouterOutput, TokenChoiceTopKRouter
from .routing_plan import RoutingPlan
from .shared import SharedExperts

__version__ = "0.1.0"

__all__ = [
    "Config",
    "GroupedExperts",
    "MoE",
    "Module",
    "RouterOutput",
    "RoutingPlan",
    "SharedExperts",
    "TokenChoiceTopKRouter",
    "balance",
    "make_plan",
    "ops",
    "presets",
]
