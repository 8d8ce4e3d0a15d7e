"""Tiny random transformers MoE models, built offline: for tests, ``moekit check --tiny`` and
examples. Every one has 2 layers, hidden size 32 and a few experts; the zero-initialised
routing and expert biases are randomised so that a wrong bias, scale or layout shows."""

from __future__ import annotations

import torch

__all__ = ["TINY_FAMILIES", "tiny_config", "build_tiny", "tiny_model", "randomize_routing"]

TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4")

COMMON_FIELDS = dict(
    vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
    num_key_value_heads=2, head_dim=8, max_position_embeddings=64, initializer_range=0.2,
    pad_token_id=0, eos_token_id=1, bos_token_id=2,
)

# family -> (transformers config class name, its MoE fields)
_FAMILY_FIELDS = {
    "mixtral": ("MixtralConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "qwen2_moe": ("Qwen2MoeConfig", dict(
        intermediate_size=24, moe_intermediate_size=16, shared_expert_intermediate_size=20,
        num_experts=4, num_experts_per_tok=2)),
    "qwen3_moe": ("Qwen3MoeConfig", dict(
        intermediate_size=24, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False)),
    "qwen3_moe_norm": ("Qwen3MoeConfig", dict(
        intermediate_size=24, moe_intermediate_size=16, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=True)),
    "olmoe": ("OlmoeConfig", dict(intermediate_size=16, num_experts=4, num_experts_per_tok=2)),
    "deepseek_v3": ("DeepseekV3Config", dict(
        intermediate_size=24, moe_intermediate_size=16, n_routed_experts=8, num_experts_per_tok=2,
        n_group=4, topk_group=2, first_k_dense_replace=1, n_shared_experts=1, kv_lora_rank=8,
        q_lora_rank=8, qk_rope_head_dim=4, qk_nope_head_dim=4, v_head_dim=8,
        routed_scaling_factor=2.5)),
    "gpt_oss": ("GptOssConfig", dict(intermediate_size=16, num_local_experts=4, num_experts_per_tok=2)),
    "llama4": ("Llama4TextConfig", dict(
        intermediate_size=16, intermediate_size_mlp=24, num_local_experts=4, num_experts_per_tok=1)),
    "minimax": ("MiniMaxConfig", dict(  # not in moekit's family map: the generic path
        intermediate_size=16, num_local_experts=4, num_experts_per_tok=2,
        layer_types=["full_attention"] * 2)),
}


def tiny_config(family: str, **overrides):
    """The tiny transformers config of ``family`` (see ``_FAMILY_FIELDS``), with ``overrides``."""
    import transformers

    if family not in _FAMILY_FIELDS:
        raise ValueError(f"unknown tiny family {family!r}; allowed: {sorted(_FAMILY_FIELDS)}")
    cls_name, fields = _FAMILY_FIELDS[family]
    c = dict(COMMON_FIELDS)
    if family == "deepseek_v3":
        c.pop("head_dim")  # MLA derives it
    return getattr(transformers, cls_name)(**{**c, **fields, **overrides})


def randomize_routing(model: torch.nn.Module, seed: int = 0) -> None:
    """Randomise ``model``'s routing weights and its (zero-initialised) routing and expert
    biases in place, so that a wrong bias, scale or layout shows."""
    g = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for name, t in list(model.named_parameters()) + list(model.named_buffers()):
            if not t.is_floating_point() or "rotary" in name or "inv_freq" in name:
                continue
            if "e_score_correction_bias" in name:
                t.copy_(torch.rand(t.shape, generator=g) * 0.3)
            elif any(s in name for s in ("bias", "router", "gate.weight")):
                t.copy_(torch.randn(t.shape, generator=g) * 0.5)


def build_tiny(config, seed: int = 0) -> torch.nn.Module:
    """A causal LM for ``config`` with random weights (``seed``), its routing weights and
    zero-initialised routing / expert biases randomised."""
    import transformers

    torch.manual_seed(seed)
    if config.model_type == "llama4_text":
        model = transformers.Llama4ForCausalLM(config)
    else:
        model = transformers.AutoModelForCausalLM.from_config(config)
    randomize_routing(model, seed)
    return model


def tiny_model(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    return build_tiny(tiny_config(family, **overrides), seed)
