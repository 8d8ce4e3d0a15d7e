"""Declarative per-family maps: where each family keeps its router, experts and shared expert,
how its experts are laid out, what its block returns, and its routing from the HF config.

A :class:`FamilySpec` is all moekit needs to know about a family; :data:`FAMILIES` holds the
named ones. Families not listed go through :func:`generic_spec`, which reads the same facts
from the block's structure and the config; ``patch`` then verifies the guess on a probe.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .experts_impl import HIDDEN_ACT_NAMES

__all__ = ["FamilySpec", "FAMILIES", "spec_for_model_type", "hf_get", "routing_from_config"]

# experts layouts (decided by family / decorator flags, never by shape)
CONCAT = "concat"  # gate_up_proj [E, 2F, D], down_proj [E, D, F]
TRANSPOSED = "transposed"  # gate_up_proj [E, D, 2F] (gate cols first), down_proj [E, F, D]
INTERLEAVED_TRANSPOSED = "interleaved_transposed"  # [E, D, 2F] with gate/up columns alternating
DBRX_ROWS = "dbrx_rows"  # mlp.w1 / v1 / w2 [E * F, D] each (gate, up, down transposed)
# one nn.Linear-style module per expert (``experts.expert_{i}.wi / wo``, non-gated), stacked once
# into moekit's [E, F, D] / [E, D, F] at patch time (extra: expert_key, expert_linears)
PER_EXPERT = "per_expert"
LAYOUTS = (CONCAT, TRANSPOSED, INTERLEAVED_TRANSPOSED, DBRX_ROWS, PER_EXPERT)

# what a block's forward returns
RET_TENSOR = "tensor"
RET_WEIGHTS = "tuple_weights"  # (y, topk weights [T, K])  (GPT-OSS)
RET_LOGITS = "tuple_logits"  # (y, router logits [T, E])  (Llama 4)
RET_FLAT_LOGITS = "tuple_flat_logits"  # (y.flatten(), router logits.flatten())  (ERNIE-VL)


def hf_get(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``cfg`` has and is not None."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def num_experts_of(cfg) -> int | None:
    return hf_get(cfg, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def top_k_of(cfg) -> int | None:
    return hf_get(cfg, "num_experts_per_tok", "moe_topk", "top_k", "moe_k")


def activation_of(cfg, owner: str, act: str | None = None) -> str:
    act = act or hf_get(cfg, "hidden_act", "hidden_activation", default="silu")
    if act not in HIDDEN_ACT_NAMES:
        raise ValueError(
            f"{owner}: hidden_act={act!r} has no moekit activation; supported: {sorted(HIDDEN_ACT_NAMES)}"
        )
    return HIDDEN_ACT_NAMES[act]


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps things, and its routing (``routing(cfg) -> router kwargs``)."""

    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]
    router: str = "gate"
    router_linear: str = ""  # the gate Linear inside the router ("" = the router's own weight)
    expert_bias: str | None = None  # selection-only bias (default: router.e_score_correction_bias)
    expert_bias_row: bool = False  # stored [1, E] rather than [E]
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    layout: str = CONCAT
    returns: str = RET_TENSOR
    expert_hidden: Callable[[Any], int] = lambda c: hf_get(
        c, "moe_intermediate_size", "intermediate_size"
    )
    shared_hidden: Callable[[Any], int] | None = None
    routing: Callable[[Any], dict] = lambda c: {}
    experts_kwargs: Callable[[Any], dict] = lambda c: {}
    check: Callable[[Any], str | None] = lambda c: None  # a reason the config is inexpressible
    router_in_fp32: bool = False  # the HF gate matmul runs in float32
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> "FamilySpec":
        return replace(self, **changes)


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


FAMILIES: dict[str, FamilySpec] = {
    s.name: s
    for s in [
        FamilySpec(
            "mixtral",
            ("mixtral",),
            ("MixtralSparseMoeBlock",),
            expert_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(score_func="softmax", route_norm=True),
            check=_mixtral_check,
        ),
        FamilySpec(
            "qwen2_moe",
            ("qwen2_moe",),
            ("Qwen2MoeSparseMoeBlock",),
            shared="shared_expert",
            shared_gate="shared_expert_gate",
            shared_hidden=lambda c: c.shared_expert_intermediate_size,
            routing=_softmax(),
        ),
        FamilySpec("qwen3_moe", ("qwen3_moe",), ("Qwen3MoeSparseMoeBlock",), routing=_softmax()),
        FamilySpec(
            "olmoe",
            ("olmoe",),
            ("OlmoeSparseMoeBlock",),
            expert_hidden=lambda c: c.intermediate_size,
            routing=_softmax(),
        ),
        FamilySpec(
            "deepseek_v3",
            ("deepseek_v3",),
            ("DeepseekV3MoE",),
            shared="shared_experts",
            shared_hidden=lambda c: c.moe_intermediate_size * c.n_shared_experts,
            routing=_deepseek_routing,
            router_in_fp32=True,
        ),
        FamilySpec(
            "deepseek_v2",
            ("deepseek_v2",),
            ("DeepseekV2Moe",),
            shared="shared_experts",
            shared_hidden=lambda c: c.moe_intermediate_size * c.n_shared_experts,
            routing=_deepseek_v2_routing,
            check=_deepseek_v2_check,
            router_in_fp32=True,
        ),
        FamilySpec(
            "minimax_m2",
            ("minimax_m2",),
            ("MiniMaxM2SparseMoeBlock",),
            expert_bias="e_score_correction_bias",  # kept on the block, passed to the router
            expert_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(score_func="sigmoid", route_norm=True, use_expert_bias=True),
            check=_mixtral_check,
        ),
        FamilySpec(
            "afmoe",
            ("afmoe",),
            ("AfmoeSparseMoeBlock",),
            router="router",
            router_linear="gate",
            expert_bias="expert_bias",  # a frozen Parameter on the block
            shared="shared_experts",
            shared_hidden=lambda c: c.moe_intermediate_size * c.num_shared_experts,
            routing=lambda c: dict(
                score_func="sigmoid",
                route_norm=True,
                route_scale=float(hf_get(c, "route_scale", default=1.0)),
                use_expert_bias=True,
            ),
        ),
        FamilySpec(
            "ernie4_5_moe",
            ("ernie4_5_moe",),
            ("Ernie4_5_MoeSparseMoeBlock",),
            expert_bias="gate.moe_statics.e_score_correction_bias",
            expert_bias_row=True,
            shared="shared_experts",
            shared_hidden=lambda c: (
                c.moe_intermediate_size * hf_get(c, "moe_num_shared_experts", default=0)
            ),
            routing=lambda c: dict(score_func="softmax", route_norm=True, use_expert_bias=True),
            router_in_fp32=True,
            # use_bias: biases on the shared MLP (the routed experts have none)
            extra={"shared_bias": lambda c: bool(hf_get(c, "use_bias", default=False))},
        ),
        FamilySpec(
            "gpt_oss",
            ("gpt_oss",),
            ("GptOssMLP",),
            router="router",
            layout=INTERLEAVED_TRANSPOSED,
            returns=RET_WEIGHTS,
            expert_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(
                score_func="softmax", topk_before_score=True, use_router_bias=True
            ),
            experts_kwargs=_gpt_oss_experts,
        ),
        FamilySpec(
            "phimoe",
            ("phimoe",),
            ("PhimoeSparseMoeBlock",),
            router="router",
            expert_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(
                routing="sparsemixer",
                sparsemixer_eps=float(hf_get(c, "router_jitter_noise", default=0.0)),
            ),
            check=_phimoe_check,
            # transformers' sparsemixer picks two experts whatever num_experts_per_tok says
            extra={"top_k": lambda c: 2},
        ),
        FamilySpec(
            "longcat_flash",
            ("longcat_flash",),
            ("LongcatFlashMoE",),
            router="router",
            router_linear="classifier",  # its bias, if any, is never used by the router
            expert_hidden=lambda c: c.expert_ffn_hidden_size,
            routing=lambda c: dict(
                score_func="softmax",
                route_scale=float(hf_get(c, "routed_scaling_factor", default=1.0)),
                use_expert_bias=True,
            ),
            check=_longcat_check,
            router_in_fp32=True,
            extra={
                "num_experts": lambda c: c.n_routed_experts,
                "zero_experts": lambda c: hf_get(c, "zero_expert_num", default=0),
                "zero_expert_rows": True,  # gate_up_proj holds E + Z rows, the last Z unread
            },
        ),
        FamilySpec(
            "deepseek_v4",
            ("deepseek_v4",),
            ("DeepseekV4SparseMoeBlock",),
            shared="shared_experts",
            expert_hidden=lambda c: c.intermediate_size,
            shared_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(
                score_func=hf_get(c, "scoring_func", default="sqrtsoftplus"),
                route_norm=True,
                route_scale=float(hf_get(c, "routed_scaling_factor", default=1.0)),
                use_expert_bias=True,
            ),
            experts_kwargs=lambda c: dict(activation=_clamped_silu(c)),
            check=_deepseek_v4_check,
            extra={
                "shared_activation": _clamped_silu,
                "shared_bias": lambda c: bool(hf_get(c, "mlp_bias", default=False)),
                "block_router": _deepseek_v4_block_router,  # per block: hash or learned
                "hash_table": "tid2eid",  # the hash layers' [vocab, K] token -> experts table
            },
        ),
        FamilySpec(
            "dbrx",
            ("dbrx",),
            ("DbrxFFN",),
            router="router",
            router_linear="layer",
            layout=DBRX_ROWS,
            expert_hidden=lambda c: c.ffn_config.ffn_hidden_size,
            routing=lambda c: dict(
                score_func="softmax",
                route_norm=c.ffn_config.moe_normalize_expert_weights is not None,
            ),
            check=_dbrx_check,
            extra={
                "num_experts": lambda c: c.ffn_config.moe_num_experts,
                "top_k": lambda c: c.ffn_config.moe_top_k,
                "hidden_act": lambda c: (c.ffn_config.ffn_act_fn or {}).get("name", "silu"),
            },
        ),
        FamilySpec(
            "switch_transformers",
            ("switch_transformers",),
            ("SwitchTransformersSparseMLP",),
            router="router",
            router_linear="classifier",
            layout=PER_EXPERT,
            expert_hidden=lambda c: c.d_ff,
            routing=lambda c: dict(score_func="softmax", use_router_bias=bool(c.router_bias)),
            experts_kwargs=lambda c: dict(gated=False),
            check=_switch_check,
            router_in_fp32=True,
            extra={
                "num_experts": lambda c: c.num_experts,
                "top_k": lambda c: 1,
                "hidden_act": lambda c: c.dense_act_fn,
                "expert_key": "expert_{}",
                "expert_linears": ("wi", "wo"),
                # capacity per sequence, earliest positions first
                "moe_kwargs": lambda c: dict(sequence_capacity=int(c.expert_capacity)),
            },
        ),
        FamilySpec(
            "jetmoe",
            ("jetmoe",),
            ("JetMoeMoE",),
            router="router",
            router_linear="layer",
            expert_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(score_func="softmax", topk_before_score=True),
            extra={
                "hidden_act": lambda c: c.activation_function,
                # input_linear [E, 2F, D] (gate rows first) and output_linear [E, D, F]
                "expert_paths": ("input_linear.weight", "output_linear.weight"),
                "output_bias": "bias",  # a [D] bias added to the block's output
                "moe_kwargs": lambda c: dict(output_bias=True),
            },
        ),
        FamilySpec(
            "llama4",
            ("llama4_text", "llama4"),
            ("Llama4TextMoe",),
            router="router",
            shared="shared_expert",
            layout=TRANSPOSED,
            returns=RET_LOGITS,
            expert_hidden=lambda c: c.intermediate_size,
            shared_hidden=lambda c: c.intermediate_size,
            routing=lambda c: dict(score_func="sigmoid", topk_before_score=True),
            experts_kwargs=lambda c: dict(routing_weight_on="input"),
            check=_llama4_check,
            extra={"flat_output": True},  # the block returns [T, D] rows
        ),
    ]
}

_BY_MODEL_TYPE = {mt: s for s in FAMILIES.values() for mt in s.model_types}
_BY_BLOCK_CLASS = {bc: s for s in FAMILIES.values() for bc in s.block_classes}


def spec_for_model_type(model_type: str | None) -> FamilySpec | None:
    return _BY_MODEL_TYPE.get(model_type)


def spec_for_block(block) -> FamilySpec | None:
    return _BY_BLOCK_CLASS.get(type(block).__name__)


def routing_from_config(cfg) -> dict:
    """A first guess at a generic family's routing from common config attribute names."""
    kw: dict = {}
    score = hf_get(cfg, "scoring_func", "score_func", "router_score_func")
    if score in ("softmax", "sigmoid"):
        kw["score_func"] = score
    norm = hf_get(cfg, "norm_topk_prob", "moe_renormalize", "route_norm")
    if norm is not None:
        kw["route_norm"] = bool(norm)
    scale = hf_get(cfg, "routed_scaling_factor", "router_scaling_factor", "route_scale")
    if scale is not None:
        kw["route_scale"] = float(scale)
    g, tg = hf_get(cfg, "n_group", "num_expert_group"), hf_get(cfg, "topk_group")
    if g is not None and tg is not None and g > 1:
        kw.update(num_expert_groups=int(g), num_limited_groups=int(tg))
    return kw
