"""MoE.Config presets for today's open MoE models, each with a tiny variant for tests.

Sizes are those of one MoE layer of the published model (hidden size, expert hidden size,
experts, top-k) with its routing; ``tiny=True`` keeps every routing option but shrinks the
sizes (dim 64, expert hidden 32, few experts) so a layer runs in milliseconds on a CPU.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .config import check_bool
from .experts import GroupedExperts
from .moe import MoE
from .router import TokenChoiceTopKRouter
from .shared import SharedExperts

__all__ = ["PRESETS", "get_preset", "preset_sizes", "PresetSizes"]


def _cfg(dim, hidden, E, router, *, tiny, tiny_E=None, experts=None, shared_hidden=None,
         shared_gate=False, **moe_kwargs) -> MoE.Config:
    if tiny:
        E = tiny_E or min(E, 8)
        dim, hidden = 64, 32
        shared_hidden = None if shared_hidden is None else 64
    return MoE.Config(
        dim=dim, hidden_dim=hidden, num_experts=E, router=router,
        experts=experts or GroupedExperts.Config(activation="silu"),
        shared_experts=None if shared_hidden is None else SharedExperts.Config(
            hidden_dim=shared_hidden, use_gate=shared_gate
        ),
        **moe_kwargs,
    )


def deepseek_v3(tiny: bool = False) -> MoE.Config:
    """DeepSeek-V3 (671B): sigmoid scores, aux-loss-free expert bias, 8 groups / 4 kept,
    normalised top-8 scaled by 2.5, one shared expert."""
    router = TokenChoiceTopKRouter.Config(
        top_k=4 if tiny else 8, score_func="sigmoid", route_norm=True, route_scale=2.5,
        use_expert_bias=True, num_expert_groups=4 if tiny else 8,
        num_limited_groups=2 if tiny else 4,
    )
    return _cfg(7168, 2048, 256, router, tiny=tiny, tiny_E=16, shared_hidden=2048,
                seq_aux_loss_coeff=1e-4)


def _qwen3(dim, hidden, tiny) -> MoE.Config:
    router = TokenChoiceTopKRouter.Config(
        top_k=2 if tiny else 8, score_func="softmax", route_norm=True
    )
    return _cfg(dim, hidden, 128, router, tiny=tiny, load_balance_coeff=1e-3)


def qwen3_30b_a3b(tiny: bool = False) -> MoE.Config:
    """Qwen3-30B-A3B: softmax, normalised top-8 of 128 experts, no shared expert."""
    return _qwen3(2048, 768, tiny)


def qwen3_235b_a22b(tiny: bool = False) -> MoE.Config:
    """Qwen3-235B-A22B: softmax, normalised top-8 of 128 experts."""
    return _qwen3(4096, 1536, tiny)


def qwen2_57b_a14b(tiny: bool = False) -> MoE.Config:
    """Qwen2-57B-A14B: softmax top-8 of 64 (not renormalised), shared expert with sigmoid gate."""
    router = TokenChoiceTopKRouter.Config(top_k=2 if tiny else 8, score_func="softmax")
    return _cfg(3584, 2560, 64, router, tiny=tiny, shared_hidden=20480, shared_gate=True,
                load_balance_coeff=1e-3)


def _gpt_oss(E, tiny) -> MoE.Config:
    router = TokenChoiceTopKRouter.Config(
        top_k=2 if tiny else 4, score_func="softmax", topk_before_score=True, use_router_bias=True
    )
    experts = GroupedExperts.Config(activation="gpt_oss", use_bias=True)
    return _cfg(2880, 2880, E, router, tiny=tiny, experts=experts)


def gpt_oss_20b(tiny: bool = False) -> MoE.Config:
    """GPT-OSS-20B: router bias, top-4 then softmax, clamped GLU, expert biases."""
    return _gpt_oss(32, tiny)


def gpt_oss_120b(tiny: bool = False) -> MoE.Config:
    """GPT-OSS-120B: as 20B with 128 experts (4 active per token, as its config says)."""
    return _gpt_oss(128, tiny)


def llama4_scout(tiny: bool = False) -> MoE.Config:
    """Llama-4-Scout-17B-16E: top-1 then sigmoid, routing weight on the expert input, shared
    expert."""
    router = TokenChoiceTopKRouter.Config(top_k=1, score_func="sigmoid", topk_before_score=True)
    experts = GroupedExperts.Config(activation="silu", routing_weight_on="input")
    return _cfg(5120, 8192, 16, router, tiny=tiny, experts=experts, shared_hidden=8192)


def mixtral_8x7b(tiny: bool = False) -> MoE.Config:
    """Mixtral-8x7B: softmax, renormalised top-2 of 8."""
    router = TokenChoiceTopKRouter.Config(top_k=2, score_func="softmax", route_norm=True)
    return _cfg(4096, 14336, 8, router, tiny=tiny, load_balance_coeff=1e-2)


def olmoe_1b_7b(tiny: bool = False) -> MoE.Config:
    """OLMoE-1B-7B: softmax top-8 of 64, not renormalised, aux and z losses."""
    router = TokenChoiceTopKRouter.Config(top_k=2 if tiny else 8, score_func="softmax")
    return _cfg(2048, 1024, 64, router, tiny=tiny, load_balance_coeff=1e-2, z_loss_coeff=1e-3)


PRESETS: dict[str, Callable[..., MoE.Config]] = {
    "deepseek-v3": deepseek_v3,
    "qwen3-30b-a3b": qwen3_30b_a3b,
    "qwen3-235b-a22b": qwen3_235b_a22b,
    "qwen2-57b-a14b": qwen2_57b_a14b,
    "gpt-oss-20b": gpt_oss_20b,
    "gpt-oss-120b": gpt_oss_120b,
    "llama4-scout": llama4_scout,
    "mixtral-8x7b": mixtral_8x7b,
    "olmoe-1b-7b": olmoe_1b_7b,
}


def get_preset(name: str, tiny: bool = False) -> MoE.Config:
    if not isinstance(name, str) or name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; allowed: {sorted(PRESETS)}")
    check_bool("get_preset", "tiny", tiny)
    return PRESETS[name](tiny=tiny)


@dataclass(frozen=True)
class PresetSizes:
    params: int  # all parameters of one MoE layer
    active_params: int  # parameters one token uses
    flops_per_token: int  # forward matmul FLOPs per token (2 x active params)


def preset_sizes(cfg: MoE.Config) -> PresetSizes:
    """Parameter counts and FLOPs of one layer, from the config alone (nothing built)."""
    if not isinstance(cfg, MoE.Config):
        raise TypeError(f"preset_sizes takes a MoE.Config (e.g. get_preset(name)), got {type(cfg).__name__}")
    D, F, E, K = cfg.dim, cfg.hidden_dim, cfg.num_experts, cfg.top_k
    up_rows = 2 * F if cfg.experts.is_gated else F
    per_expert = up_rows * D + D * F
    if cfg.experts.use_bias:
        per_expert += up_rows + D
    router = D * E + (E if getattr(cfg.router, "use_router_bias", False) else 0)
    shared = 0
    if cfg.shared_experts is not None:
        s = cfg.shared_experts
        shared = (3 if s.is_gated else 2) * D * s.hidden_dim + (D if s.use_gate else 0)
    active = router + K * per_expert + shared
    return PresetSizes(router + E * per_expert + shared, active, 2 * active)
