"""Presets: the published sizes and routing options (full-size configs are checked, never built),
and every tiny variant builds and runs forward + backward."""

from __future__ import annotations

import pytest
import torch

from moekit import MoE, presets
from moekit.presets import PRESETS, get_preset, preset_sizes

# name -> (dim, hidden, experts, top_k, score_func, route_norm, topk_before_score)
PUBLISHED = {
    "deepseek-v3": (7168, 2048, 256, 8, "sigmoid", True, False),
    "qwen3-30b-a3b": (2048, 768, 128, 8, "softmax", True, False),
    "qwen3-235b-a22b": (4096, 1536, 128, 8, "softmax", True, False),
    "qwen2-57b-a14b": (3584, 2560, 64, 8, "softmax", False, False),
    "gpt-oss-20b": (2880, 2880, 32, 4, "softmax", False, True),
    "gpt-oss-120b": (2880, 2880, 128, 4, "softmax", False, True),
    "llama4-scout": (5120, 8192, 16, 1, "sigmoid", False, True),
    "mixtral-8x7b": (4096, 14336, 8, 2, "softmax", True, False),
    "olmoe-1b-7b": (2048, 1024, 64, 8, "softmax", False, False),
}


def test_every_family_has_a_preset():
    assert set(PRESETS) == set(PUBLISHED)


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_published_sizes_and_routing(name):
    cfg = get_preset(name)
    assert isinstance(cfg, MoE.Config)
    D, F, E, K, sf, norm, tbs = PUBLISHED[name]
    assert (cfg.dim, cfg.hidden_dim, cfg.num_experts) == (D, F, E)
    r = cfg.router
    assert (r.top_k, r.score_func, r.route_norm, r.topk_before_score) == (K, sf, norm, tbs)
    assert cfg.capacity_factor is None  # dropless


def test_deepseek_v3_details():
    c = presets.deepseek_v3()
    r = c.router
    assert (r.num_expert_groups, r.num_limited_groups) == (8, 4)
    assert r.route_scale == 2.5 and r.use_expert_bias and not r.use_router_bias
    assert c.shared_experts is not None and c.shared_experts.hidden_dim == 2048
    assert not c.shared_experts.use_gate
    assert c.experts.activation == "silu" and c.experts.is_gated


def test_qwen3_details():
    for c in (presets.qwen3_30b_a3b(), presets.qwen3_235b_a22b()):
        assert c.shared_experts is None and c.router.num_expert_groups is None
        assert c.router.route_scale == 1.0 and not c.router.use_expert_bias


def test_qwen2_57b_shared_gate():
    c = presets.qwen2_57b_a14b()
    assert c.shared_experts.use_gate and c.shared_experts.hidden_dim == 20480


@pytest.mark.parametrize("fn", [presets.gpt_oss_20b, presets.gpt_oss_120b])
def test_gpt_oss_details(fn):
    c = fn()
    assert c.router.use_router_bias and c.router.topk_before_score
    assert c.experts.activation == "gpt_oss" and c.experts.use_bias
    assert c.shared_experts is None


def test_llama4_scout_details():
    c = presets.llama4_scout()
    assert c.experts.routing_weight_on == "input"
    assert c.shared_experts is not None and c.shared_experts.hidden_dim == 8192
    assert not c.shared_experts.use_gate


def test_mixtral_and_olmoe_details():
    m, o = presets.mixtral_8x7b(), presets.olmoe_1b_7b()
    assert m.shared_experts is None and o.shared_experts is None
    assert o.z_loss_coeff > 0 and o.load_balance_coeff > 0


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_preset_sizes_plain_formula(name):
    c = get_preset(name)
    D, F, E, K = c.dim, c.hidden_dim, c.num_experts, c.router.top_k
    per_expert = 3 * D * F + ((2 * F + D) if c.experts.use_bias else 0)
    router = D * E + (E if c.router.use_router_bias else 0)
    shared = 0
    if c.shared_experts is not None:
        shared = 3 * D * c.shared_experts.hidden_dim + (D if c.shared_experts.use_gate else 0)
    s = preset_sizes(c)
    assert s.params == router + E * per_expert + shared
    assert s.active_params == router + K * per_expert + shared
    assert s.flops_per_token == 2 * s.active_params


def test_preset_sizes_match_built_tiny_modules():
    for name in PUBLISHED:
        c = get_preset(name, tiny=True)
        moe = c.build()
        assert preset_sizes(c).params == sum(p.numel() for p in moe.parameters()), name


@pytest.mark.parametrize("name", list(PUBLISHED))
def test_tiny_variant_keeps_routing_options(name):
    big, tiny = get_preset(name), get_preset(name, tiny=True)
    for f in ("score_func", "route_norm", "route_scale", "topk_before_score", "use_router_bias",
              "use_expert_bias"):
        assert getattr(big.router, f) == getattr(tiny.router, f), f
    assert (big.router.num_expert_groups is None) == (tiny.router.num_expert_groups is None)
    assert big.experts == tiny.experts
    assert (big.shared_experts is None) == (tiny.shared_experts is None)
    if big.shared_experts is not None:
        assert big.shared_experts.use_gate == tiny.shared_experts.use_gate
    assert tiny.dim <= 256 and tiny.hidden_dim <= 256 and tiny.num_experts <= 16


@pytest.mark.parametrize("name", list(PUBLISHED))
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_tiny_forward_backward(name, backend):
    torch.manual_seed(0)
    c = get_preset(name, tiny=True)
    c = c.replace(experts=c.experts.replace(backend=backend))
    moe = c.build()
    moe.train()
    x = torch.randn(2, 5, c.dim, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype and torch.isfinite(y).all()
    y.float().pow(2).mean().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    for n, p in moe.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), n
    assert moe.tokens_per_expert.sum().item() == 10 * c.router.top_k
    if moe.router.expert_bias is not None:
        moe.update_expert_bias()


@pytest.mark.parametrize("name", ["deepseek-v3", "gpt-oss-20b"])
def test_tiny_bf16(name):
    torch.manual_seed(0)
    moe = get_preset(name, tiny=True).build().to(torch.bfloat16)
    x = torch.randn(3, 4, 64, dtype=torch.bfloat16, requires_grad=True)
    y = moe(x)
    assert y.dtype == torch.bfloat16
    y.float().sum().backward()
    assert x.grad.dtype == torch.bfloat16
