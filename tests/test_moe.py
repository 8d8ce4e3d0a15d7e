"""MoE: router -> plan -> experts -> combine (+ shared) vs the plain per-token reference."""

from __future__ import annotations

import pytest
import torch

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.experts import depth_scaled_std

from reference import assert_close, assert_tolerance_rule, moe_ref, ref_params

R = TokenChoiceTopKRouter.Config

VARIANTS = {
    "qwen3": dict(router=R(top_k=2, score_func="softmax", route_norm=True)),
    "deepseek": dict(
        router=R(top_k=3, score_func="sigmoid", route_norm=True, route_scale=2.5, use_expert_bias=True,
                 num_expert_groups=4, num_limited_groups=2),
        shared_experts=SharedExperts.Config(hidden_dim=9)),
    "gpt_oss": dict(router=R(top_k=2, topk_before_score=True, use_router_bias=True),
                    experts=GroupedExperts.Config(activation="gpt_oss", use_bias=True)),
    "llama4": dict(router=R(top_k=1, score_func="sigmoid", topk_before_score=True),
                   experts=GroupedExperts.Config(routing_weight_on="input"),
                   shared_experts=SharedExperts.Config(hidden_dim=6)),
    "qwen2": dict(router=R(top_k=2), shared_experts=SharedExperts.Config(hidden_dim=10, use_gate=True)),
    "relu2": dict(router=R(top_k=8, score_func="sigmoid"),
                  experts=GroupedExperts.Config(activation="relu2", use_bias=True),
                  shared_experts=SharedExperts.Config(hidden_dim=5, activation="relu2")),
}


def build(variant, backend="loop", E=8, D=13, F=7, seed=0, **kw):
    v = dict(VARIANTS[variant])
    ex = v.pop("experts", GroupedExperts.Config())
    ex = ex.replace(backend=backend)
    torch.manual_seed(seed)
    moe = MoE.Config(dim=D, hidden_dim=F, num_experts=E, experts=ex, **v, **kw).build()
    with torch.no_grad():
        for name, p in moe.named_parameters():
            p.normal_(0, 0.5 if "router" not in name else 1.0)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.normal_(0, 0.05)
    return moe


@pytest.mark.parametrize("variant", list(VARIANTS))
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("three_d", [False, True])
def test_moe_vs_reference_fp32(variant, backend, three_d):
    moe = build(variant, backend)
    shape = (2, 5, 13) if three_d else (10, 13)
    x = torch.randn(*shape, requires_grad=True)
    y = moe(x)
    assert y.shape == x.shape and y.dtype == x.dtype
    g = torch.randn(shape)
    y.backward(g)
    xr = x.detach().double().requires_grad_(True)
    P = ref_params(moe)
    y_ref, ids = moe_ref(moe, xr.reshape(-1, 13), P)
    assert torch.equal(moe.last_router_output.topk_ids.sort(1).values, ids.sort(1).values)
    (y_ref * g.reshape(-1, 13).double()).sum().backward()
    assert_close(y.reshape(-1, 13), y_ref, 2e-5, "y")
    assert_close(x.grad, xr.grad.reshape(shape), 2e-5, "grad x")
    for n, p in moe.named_parameters():
        assert p.grad is not None, n
        assert_close(p.grad, P[n].grad, 2e-5, f"grad {n}")


@pytest.mark.parametrize("variant", ["qwen3", "gpt_oss", "qwen2"])
@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_moe_bf16_tolerance_rule(variant, backend):
    moe = build(variant, backend).to(torch.bfloat16)
    x0 = torch.randn(2, 6, 13, dtype=torch.float64)
    g = torch.randn(12, 13, dtype=torch.float64)
    x = x0.bfloat16().requires_grad_(True)
    y = moe(x)
    assert y.dtype == torch.bfloat16 and y.shape == x.shape
    (y.reshape(12, 13).double() * g).sum().backward()
    forced = moe.last_router_output.topk_ids.tolist()
    got = {"y": y.reshape(12, 13), "x": x.grad.reshape(12, 13),
           **{n: p.grad for n, p in moe.named_parameters()}}

    def ref(dtype):
        xr = x0.reshape(12, 13).to(dtype).requires_grad_(True)
        P = ref_params(moe, dtype)
        yr, _ = moe_ref(moe, xr, P, forced_ids=forced)
        (yr.double() * g).sum().backward()
        return {"y": yr, "x": xr.grad, **{n: p.grad for n, p in P.items()}}

    plain, truth = ref(torch.bfloat16), ref(torch.float64)
    for k in got:
        # atol: 2 bf16 ulps of the largest value; x.grad is the bf16 sum of the router path and
        # the experts path, each rounded, so a single element can be off by ~2 ulps either way
        assert_tolerance_rule(got[k], plain[k], truth[k], 2**-7, k)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("backend", ["auto", "loop", "grouped_mm"])
def test_output_dtype_equals_input_dtype(dtype, backend):
    moe = build("deepseek", backend).to(dtype)
    x = torch.randn(3, 4, 13, dtype=dtype)
    y = moe(x)
    assert y.dtype == dtype and y.shape == x.shape


def test_float64_loop_backend():
    moe = build("deepseek", "loop").to(torch.float64)
    x = torch.randn(3, 13, dtype=torch.float64)
    y = moe(x)
    y_ref, _ = moe_ref(moe, x, ref_params(moe))
    assert y.dtype == torch.float64
    assert_close(y, y_ref, 1e-6)  # routing math runs in router_dtype=float32


def test_float64_auto_backend():
    moe = build("deepseek", "auto").to(torch.float64)
    y = moe(torch.randn(3, 13, dtype=torch.float64))
    assert y.dtype == torch.float64


def test_grouped_mm_float64_clear_error():
    moe = build("deepseek", "grouped_mm").to(torch.float64)
    with pytest.raises(ValueError, match="grouped_mm"):
        moe(torch.randn(3, 13, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(0, 13), (2, 0, 13), (0, 3, 13)])
def test_zero_tokens_returns_empty(shape):
    moe = build("deepseek", "grouped_mm", load_balance_coeff=0.1)
    before = moe.tokens_per_expert.clone()
    y = moe(torch.randn(*shape))
    assert y.shape == shape
    assert torch.equal(moe.tokens_per_expert, before)


def test_zero_tokens_backward():
    moe = build("qwen3", "grouped_mm")
    x = torch.randn(0, 13, requires_grad=True)
    moe(x).sum().backward()
    assert x.grad.shape == (0, 13)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
def test_single_token(backend):
    moe = build("qwen3", backend)
    x = torch.randn(1, 13)
    y = moe(x)
    y_ref, _ = moe_ref(moe, x.double(), ref_params(moe))
    assert_close(y, y_ref, 2e-5)


def test_three_d_equals_flat():
    moe = build("qwen2", "grouped_mm")
    x = torch.randn(3, 4, 13)
    torch.testing.assert_close(moe(x), moe(x.reshape(12, 13)).reshape(3, 4, 13))


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("drop_policy", ["position", "weight"])
def test_moe_capacity_factor(backend, drop_policy):
    moe = build("qwen3", backend, capacity_factor=0.5, drop_policy=drop_policy)
    x = torch.randn(16, 13, requires_grad=True)
    y = moe(x)
    plan = moe.experts.last_plan
    assert plan.capacity == 2 and int(plan.num_dropped) > 0
    P = ref_params(moe)
    xr = x.detach().double().requires_grad_(True)
    y_ref, _ = moe_ref(moe, xr, P, kept=plan.kept_TK)
    assert_close(y, y_ref, 2e-5)
    y.sum().backward()
    y_ref.sum().backward()
    assert_close(x.grad, xr.grad, 2e-5)
    assert_close(moe.router.gate.weight.grad, P["router.gate.weight"].grad, 2e-5)


@pytest.mark.parametrize("backend", ["loop", "grouped_mm"])
@pytest.mark.parametrize("variant", ["deepseek", "llama4"])
def test_moe_zero_experts(backend, variant):
    """Zero-computation experts (LongCat-Flash): the router picks among E + Z; a zero expert
    adds weight * x and takes no row of the plan; output and grads vs the reference."""
    E, Z = 8, 4
    moe = build(variant, backend, E=E, zero_experts=Z)
    assert moe.router.gate.weight.shape[0] == E + Z and moe.experts.w_up.shape[0] == E
    x = torch.randn(24, 13, requires_grad=True)
    y = moe(x)
    ids = moe.last_router_output.topk_ids
    zero = ids >= E
    assert zero.any() and (~zero).any()
    plan = moe.experts.last_plan
    assert plan.num_rows == int((~zero).sum()) and int(plan.num_dropped) == 0
    assert torch.equal(plan.inverse_TK < 0, zero)
    assert moe.tokens_per_expert.shape == (E + Z,) and int(moe.tokens_per_expert[E:].sum()) == int(zero.sum())
    P = ref_params(moe)
    xr = x.detach().double().requires_grad_(True)
    y_ref, ids_ref = moe_ref(moe, xr, P)
    assert torch.equal(ids.sort(1).values, ids_ref.sort(1).values)
    assert_close(y, y_ref, 2e-5)
    g = torch.randn(y.shape)
    y.backward(g)
    y_ref.backward(g.double())
    assert_close(x.grad, xr.grad, 2e-5)
    for n, p in moe.named_parameters():
        assert_close(p.grad, P[n].grad, 2e-5, n)


def test_moe_zero_experts_config_errors():
    with pytest.raises(ValueError, match="zero_experts=-1"):
        MoE.Config(dim=4, hidden_dim=4, num_experts=2, zero_experts=-1)
    with pytest.raises(ValueError, match="capacity_factor"):
        MoE.Config(dim=4, hidden_dim=4, num_experts=2, zero_experts=1, capacity_factor=1.0)
    with pytest.raises(ValueError, match="top_k=4 > num_experts=3"):  # the router sees E + Z
        MoE.Config(dim=4, hidden_dim=4, num_experts=2, zero_experts=1, router=R(top_k=4))
    from moekit.parallel import apply_ep

    with pytest.raises(ValueError, match="zero_experts=1"):
        apply_ep(MoE.Config(dim=4, hidden_dim=4, num_experts=2, zero_experts=1).build(), None)


def test_token_mask_does_not_change_output():
    moe = build("qwen3")
    x = torch.randn(2, 4, 13)
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0]], dtype=torch.bool)
    torch.testing.assert_close(moe(x, token_mask=mask), moe(x))


def test_moe_init_weights_depth_scaled():
    cfg = MoE.Config(dim=256, hidden_dim=64, num_experts=8, router=R(top_k=2, use_router_bias=True),
                     experts=GroupedExperts.Config(use_bias=True),
                     shared_experts=SharedExperts.Config(hidden_dim=256))
    moe = cfg.build()
    with torch.no_grad():
        for p in moe.parameters():
            p.fill_(1.0)
    moe.init_weights(init_std=0.02, layer_id=3)
    s = depth_scaled_std(0.02, 3)
    assert s == pytest.approx(0.02 / (2 * 4) ** 0.5)

    def near(t, std):
        return abs(t.std().item() - std) < 0.06 * std

    assert near(moe.experts.down_proj, s)
    assert near(moe.shared_experts.down_proj.weight, s)
    assert near(moe.experts.gate_up_proj[:, :64], 0.02)
    assert near(moe.experts.gate_up_proj[:, 64:], s)  # torchtitan: w3 as w2
    assert near(moe.shared_experts.up_proj.weight, s)
    assert near(moe.shared_experts.gate_proj.weight, 0.02)
    assert near(moe.router.gate.weight, s)  # torchtitan: the router gate gets the block's init_std
    assert (moe.router.gate.bias == 0).all()
    assert (moe.experts.gate_up_proj_bias == 0).all() and (moe.experts.down_proj_bias == 0).all()
    moe.init_weights(init_std=0.02)
    assert near(moe.experts.down_proj, 0.02)
