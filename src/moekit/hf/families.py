"""The named families (:data:`FAMILIES`: one :class:`FamilySpec` each) and their lookups by
model type (:func:`spec_for_model_type`) and block class (:func:`spec_for_block`).

:class:`FamilySpec`, the layouts, :func:`hf_get` and :func:`routing_from_config` live in
family_spec.py, and the per-family routing and check functions in family_rules.py; all that
this module's ``__all__`` lists is importable from here. Families not listed go through
:func:`moekit.hf.block_spec.generic_spec`, which reads the same facts from the block's
structure and the config; ``patch`` then verifies the guess on a probe.
"""

from __future__ import annotations

from .family_rules import (
    _clamped_silu,
    _dbrx_check,
    _deepseek_routing,
    _deepseek_v2_check,
    _deepseek_v2_routing,
    _deepseek_v4_block_router,
    _deepseek_v4_check,
    _gpt_oss_experts,
    _llama4_check,
    _longcat_check,
    _mixtral_check,
    _phimoe_check,
    _softmax,
    _switch_check,
)
from .family_spec import (
    DBRX_ROWS,
    INTERLEAVED_TRANSPOSED,
    PER_EXPERT,
    RET_LOGITS,
    RET_WEIGHTS,
    TRANSPOSED,
    FamilySpec,
    hf_get,
    routing_from_config,
)

__all__ = ["FamilySpec", "FAMILIES", "spec_for_model_type", "hf_get", "routing_from_config"]


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
