"""With torch.use_deterministic_algorithms(True), two runs give bit-identical outputs and grads."""

from __future__ import annotations

import pytest
import torch

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.ops import moe_experts

R = TokenChoiceTopKRouter.Config


@pytest.fixture
def deterministic():
    was, warn_only = torch.are_deterministic_algorithms_enabled(), \
        torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def run_moe(backend, dtype, **kw):
    torch.manual_seed(0)
    cfg = MoE.Config(
        dim=24, hidden_dim=16, num_experts=8,
        router=R(top_k=3, score_func="sigmoid", route_norm=True, use_expert_bias=True,
                 num_expert_groups=4, num_limited_groups=2),
        experts=GroupedExperts.Config(backend=backend, use_bias=True),
        shared_experts=SharedExperts.Config(hidden_dim=12, use_gate=True),
        load_balance_coeff=0.01, z_loss_coeff=0.001, seq_aux_loss_coeff=0.01, **kw,
    )
    moe = cfg.build().to(dtype)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 16, 24, generator=g).to(dtype).requires_grad_(True)
    y = moe(x)
    (y.float() * torch.randn(y.shape, generator=g)).sum().backward()
    return [y.detach(), x.grad] + [p.grad for p in moe.parameters()] + [moe.tokens_per_expert.clone()]


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_moe_bit_identical(deterministic, backend, dtype, capacity_factor):
    assert torch.are_deterministic_algorithms_enabled()
    a = run_moe(backend, dtype, capacity_factor=capacity_factor)
    b = run_moe(backend, dtype, capacity_factor=capacity_factor)
    assert len(a) == len(b)
    for i, (u, v) in enumerate(zip(a, b)):
        assert u is not None and v is not None, i
        assert u.dtype == v.dtype and torch.equal(u, v), f"tensor {i} differs between runs"


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_moe_experts_bit_identical(deterministic, backend, weight_on_input):
    def run():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(33, 13, generator=g, requires_grad=True)
        wu = torch.randn(5, 14, 13, generator=g, requires_grad=True)
        wd = torch.randn(5, 13, 7, generator=g, requires_grad=True)
        bu = torch.randn(5, 14, generator=g, requires_grad=True)
        bd = torch.randn(5, 13, generator=g, requires_grad=True)
        ids = torch.randint(0, 5, (33, 2), generator=g)
        w = torch.rand(33, 2, generator=g, requires_grad=True)
        y = moe_experts(x, wu, wd, ids, w, gate_up_proj_bias=bu, down_proj_bias=bd, backend=backend,
                        weight_on_input=weight_on_input)
        y.backward(torch.randn(y.shape, generator=g))
        return [y.detach()] + [t.grad for t in (x, wu, wd, bu, bd, w)]

    for u, v in zip(run(), run()):
        assert torch.equal(u, v)
