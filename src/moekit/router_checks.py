"""The checks of the token-choice router's config (``router.py``): its fields and their
combinations, and its agreement with the number of experts.

:func:`check_router_config` validates ``TokenChoiceTopKRouter.Config`` (its
``__post_init__``); :func:`check_router_num_experts` checks it against the number of experts
the router chooses among (``TokenChoiceTopKRouter.Config.validate_for``). Each raises a
ValueError or TypeError naming the field and what is allowed. ``SCORE_FUNCS``, ``ROUTINGS``,
``HASH_WEIGHTS`` and ``GROUP_SCORES`` are the allowed values of the config's choice fields.
"""

from __future__ import annotations

import torch

from .config import check_bool, check_choice, check_nonneg, check_positive

__all__ = ["check_router_config", "check_router_num_experts"]

SCORE_FUNCS = ("softmax", "sigmoid", "sqrtsoftplus")
ROUTINGS = ("learned", "hash", "sparsemixer")
HASH_WEIGHTS = ("uniform", "scores")
GROUP_SCORES = ("top2_sum", "max")


def check_router_config(cfg) -> None:
    """``TokenChoiceTopKRouter.Config``'s fields (``cfg``): values, types, and the
    combinations that conflict."""
    o = "TokenChoiceTopKRouter.Config"
    check_positive(o, "top_k", cfg.top_k)
    check_choice(o, "score_func", cfg.score_func, SCORE_FUNCS)
    check_choice(o, "routing", cfg.routing, ROUTINGS)
    check_choice(o, "hash_weights", cfg.hash_weights, HASH_WEIGHTS)
    check_choice(o, "group_score", cfg.group_score, GROUP_SCORES)
    check_nonneg(o, "route_scale", cfg.route_scale)
    for name in ("route_norm", "topk_before_score", "use_router_bias", "use_expert_bias",
                 "force_load_balance"):
        check_bool(o, name, getattr(cfg, name))
    if isinstance(cfg.hash_seed, bool) or not isinstance(cfg.hash_seed, int):
        raise TypeError(f"{o}.hash_seed={cfg.hash_seed!r}; it must be an integer")
    check_choice(
        o, "router_dtype", cfg.router_dtype,
        (None, torch.float32, torch.float64, torch.bfloat16, torch.float16),
    )
    g, lg = cfg.num_expert_groups, cfg.num_limited_groups
    if (g is None) != (lg is None):
        raise ValueError(
            f"{o}: num_expert_groups={g} and num_limited_groups={lg} must be set together "
            "(group-limited routing) or both left None"
        )
    if g is not None:
        check_positive(o, "num_expert_groups", g)
        check_positive(o, "num_limited_groups", lg)
        if lg > g:
            raise ValueError(
                f"{o}: num_limited_groups={lg} > num_expert_groups={g}; it must be in [1, {g}]"
            )
        if cfg.topk_before_score:
            raise ValueError(
                f"{o}: topk_before_score=True cannot be combined with group-limited routing "
                "(num_expert_groups); group limits are defined on scores"
            )
    if cfg.routing == "hash":
        if cfg.use_expert_bias:
            raise ValueError(
                f"{o}: use_expert_bias=True has no effect with routing='hash' (the table fixes "
                "the experts); set use_expert_bias=False"
            )
        if cfg.hash_vocab_size is None:
            raise ValueError(f"{o}: routing='hash' needs hash_vocab_size (the token vocabulary size)")
        check_positive(o, "hash_vocab_size", cfg.hash_vocab_size)
        if g is not None or cfg.topk_before_score:
            raise ValueError(f"{o}: routing='hash' takes no groups and no topk_before_score")
    check_nonneg(o, "sparsemixer_eps", cfg.sparsemixer_eps)
    if cfg.routing == "sparsemixer":
        if cfg.top_k != 2:
            raise ValueError(f"{o}: routing='sparsemixer' picks two experts; top_k={cfg.top_k} must be 2")
        if cfg.score_func != "softmax":
            raise ValueError(
                f"{o}: routing='sparsemixer' weighs by masked softmaxes; score_func="
                f"{cfg.score_func!r} must be 'softmax'"
            )
        bad = [n for n in ("use_expert_bias", "topk_before_score", "force_load_balance")
               if getattr(cfg, n)]
        if g is not None:
            bad.append("num_expert_groups")
        if bad:
            raise ValueError(f"{o}: routing='sparsemixer' cannot be combined with {bad}")

def check_router_num_experts(cfg, num_experts: int) -> None:
    """``TokenChoiceTopKRouter.Config`` (``cfg``) against ``num_experts``, the experts the
    router chooses among: ``top_k`` and the expert groups must fit them."""
    o = "TokenChoiceTopKRouter.Config"
    if cfg.top_k > num_experts:
        raise ValueError(f"{o}: top_k={cfg.top_k} > num_experts={num_experts}; it must be in [1, {num_experts}]")
    g = cfg.num_expert_groups
    if g is not None:
        if num_experts % g:
            raise ValueError(
                f"{o}: num_experts={num_experts} is not divisible by num_expert_groups={g}"
            )
        per_group = num_experts // g
        if cfg.group_score == "top2_sum" and per_group < 2:
            raise ValueError(
                f"{o}: group_score='top2_sum' needs >= 2 experts per group; got {per_group}"
            )
        if cfg.top_k > cfg.num_limited_groups * per_group and not cfg.topk_beyond_groups:
            raise ValueError(
                f"{o}: top_k={cfg.top_k} exceeds the {cfg.num_limited_groups} kept groups "
                f"x {per_group} experts = {cfg.num_limited_groups * per_group} eligible experts "
                "(topk_beyond_groups=True picks the rest from the masked groups)"
            )
