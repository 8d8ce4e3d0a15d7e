"""The per-family functions of an HF config that :data:`moekit.hf.families.FAMILIES` refers
to: routing (``_softmax``, ``_deepseek_routing``, ``_deepseek_v2_routing``), experts settings
(``_gpt_oss_experts``, ``_clamped_silu``), DeepSeek-V4's per-block router
(``_deepseek_v4_block_router``), and the checks that say why a config is inexpressible
(``_mixtral_check``, ``_deepseek_v2_check``, ``_phimoe_check``, ``_longcat_check``,
``_deepseek_v4_check``, ``_dbrx_check``, ``_switch_check``, ``_llama4_check``; the noise
refusals built on ``_noise_refusal``)."""

from __future__ import annotations

from .family_spec import hf_get


def _softmax(norm_attr="norm_topk_prob", default_norm=False):
    def f(c):
        return dict(
            score_func="softmax", route_norm=bool(hf_get(c, norm_attr, default=default_norm))
        )

    return f


def _noise_refusal(c, key: str, what: str) -> str | None:
    """Why ``patch`` refuses a config whose ``key`` (training-time noise, ``what``) is set."""
    v = hf_get(c, key, default=0.0)
    if v:
        return (f"{key}={v} {what} in training; moekit's MoE has no such option (set it to 0.0 "
                "to patch)")
    return None


def _mixtral_check(c):
    return _noise_refusal(c, "router_jitter_noise", "multiplies the block input by random noise")


def _deepseek_routing(c):
    g, tg = hf_get(c, "n_group", default=1), hf_get(c, "topk_group", default=1)
    kw = dict(
        score_func=hf_get(c, "scoring_func", default="sigmoid"),
        route_norm=bool(hf_get(c, "norm_topk_prob", default=True)),
        route_scale=float(hf_get(c, "routed_scaling_factor", default=1.0)),
        use_expert_bias=True,
    )
    if g > 1:
        kw.update(num_expert_groups=g, num_limited_groups=tg, topk_beyond_groups=True)
    return kw


def _deepseek_v2_routing(c):
    kw = dict(
        score_func="softmax",
        route_norm=False,
        route_scale=float(hf_get(c, "routed_scaling_factor", default=1.0)),
    )
    g, tg = hf_get(c, "n_group", default=1), hf_get(c, "topk_group", default=1)
    if hf_get(c, "topk_method", default="greedy") == "group_limited_greedy" and g > 1:
        kw.update(num_expert_groups=g, num_limited_groups=tg, group_score="max")
    return kw


def _deepseek_v2_check(c):
    m = hf_get(c, "topk_method", default="greedy")
    if m not in ("greedy", "group_limited_greedy"):
        return (
            f"topk_method={m!r} is not supported (moekit has 'greedy' and 'group_limited_greedy')"
        )
    return None


def _gpt_oss_experts(c):
    from ..activations import GPT_OSS_ALPHA, GPT_OSS_LIMIT, make_activation_name

    a = hf_get(c, "swiglu_alpha", default=GPT_OSS_ALPHA)
    lim = hf_get(c, "swiglu_limit", default=GPT_OSS_LIMIT)
    return dict(activation=make_activation_name("gpt_oss", alpha=a, limit=lim), use_bias=True)


def _phimoe_check(c):
    return _noise_refusal(c, "input_jitter_noise", "multiplies the block input by random noise")


def _longcat_check(c):
    if not hf_get(c, "n_routed_experts", default=0):
        return "n_routed_experts=0: only zero-computation experts, nothing for moekit's experts"
    return None


def _clamped_silu(c):
    from ..activations import make_activation_name

    return make_activation_name("silu", limit=hf_get(c, "swiglu_limit"))


def _deepseek_v4_check(c):
    if hf_get(c, "hidden_act", default="silu") != "silu":
        return f"hidden_act={c.hidden_act!r}: moekit's clamped GLU is SiLU's"
    return None


def _deepseek_v4_block_router(block, c) -> dict:
    """The hash layers' router (``is_hash``): experts from the token-id table ``tid2eid``,
    weighted by the gate's scores there."""
    if not getattr(block, "is_hash", False):
        return {}
    return dict(routing="hash", hash_vocab_size=int(c.vocab_size), hash_weights="scores",
                use_expert_bias=False)


def _dbrx_check(c):
    f = c.ffn_config
    if getattr(f, "moe_jitter_eps", None):
        return (
            f"ffn_config.moe_jitter_eps={f.moe_jitter_eps} scales the router input by noise in "
            "training; moekit's MoE has no such option"
        )
    if getattr(f, "moe_normalize_expert_weights", 1.0) not in (None, 1, 1.0):
        return (
            f"ffn_config.moe_normalize_expert_weights={f.moe_normalize_expert_weights}: moekit "
            "renormalises by the sum (the p=1 norm) only"
        )
    return None


def _switch_check(c):
    why = (_noise_refusal(c, "router_jitter_noise", "multiplies the router input by random noise")
           or _noise_refusal(c, "dropout_rate", "applies dropout inside every expert"))
    if why:
        return why
    if hf_get(c, "router_dtype", default="float32") != "float32":
        return f"router_dtype={c.router_dtype!r}: moekit patches Switch routers in float32 only"
    return None


def _llama4_check(c):
    return _noise_refusal(c, "router_jitter_noise", "multiplies the router input by random noise")
