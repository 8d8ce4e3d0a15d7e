"""moe_experts and GroupedExperts vs the per-token reference: every backend, activation, bias
and routing-weight placement; outputs and gradients of x, every weight, bias and topk_weights;
fp32 tight and bf16 by the tolerance rule of docs/architecture.md; odd shapes."""

from __future__ import annotations

import pytest
import torch

from moekit import GroupedExperts
from moekit.experts import depth_scaled_std
from moekit.ops import available_backends, moe_experts

from reference import assert_close, assert_tolerance_rule, moe_experts_ref

BACKENDS = ["loop", "grouped_mm"]
# (activation, gated)
ACTS = [("silu", True), ("gelu", True), ("gelu_tanh", True), ("gpt_oss", True),
        ("relu2", False), ("silu", False), ("gelu", False), ("gelu_tanh", False)]


def test_backends_available_on_cpu():
    names = available_backends(torch.device("cpu"), torch.float32)
    assert "loop" in names and "grouped_mm" in names
    assert "grouped_mm" in available_backends(torch.device("cpu"), torch.bfloat16)


def distinct_ids(T, E, K, gen):
    return torch.stack([torch.randperm(E, generator=gen)[:K] for _ in range(T)]) if T else \
        torch.zeros(0, K, dtype=torch.long)


def make_case(T=12, D=13, F=7, E=4, K=2, gated=True, use_bias=False, ids=None, seed=0, wscale=1.0):
    """fp64 master tensors of one case."""
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if gated else F
    c = {
        "x": torch.randn(T, D, generator=g, dtype=torch.float64),
        "w_up": torch.randn(E, H, D, generator=g, dtype=torch.float64) * wscale / D**0.5 * 2,
        "w_down": torch.randn(E, D, F, generator=g, dtype=torch.float64) / F**0.5,
        "topk_weights": torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1,
    }
    if use_bias:
        c["b_up"] = torch.randn(E, H, generator=g, dtype=torch.float64) * 0.5
        c["b_down"] = torch.randn(E, D, generator=g, dtype=torch.float64) * 0.5
    c["ids"] = distinct_ids(T, E, K, g) if ids is None else ids
    c["grad_out"] = torch.randn(T, D, generator=g, dtype=torch.float64)
    return c


GRAD_NAMES = ["x", "w_up", "w_down", "b_up", "b_down", "topk_weights"]


def leaves(c, dtype):
    out = {}
    for n in GRAD_NAMES:
        if n in c:
            # topk_weights come from the router in float32 whatever the activations' dtype
            dt = torch.float64 if dtype == torch.float64 else (
                torch.float32 if n == "topk_weights" else dtype)
            out[n] = c[n].detach().to(dt, copy=True).requires_grad_(True)
    return out


def run_backend(c, dtype, backend, activation, weight_on_input=False):
    L = leaves(c, dtype)
    y = moe_experts(
        L["x"], L["w_up"], L["w_down"], c["ids"], L["topk_weights"], activation=activation,
        gate_up_proj_bias=L.get("b_up"), down_proj_bias=L.get("b_down"), backend=backend,
        weight_on_input=weight_on_input,
    )
    assert y.dtype == L["x"].dtype and y.shape == c["x"].shape
    (y.double() * c["grad_out"]).sum().backward()
    return y, {n: t.grad for n, t in L.items()}


def run_ref(c, dtype, activation, gated, weight_on_input=False, kept=None):
    L = leaves(c, dtype)
    y = moe_experts_ref(
        L["x"], L["w_up"], L["w_down"], c["ids"], L["topk_weights"], activation=activation,
        gated=gated, b_up=L.get("b_up"), b_down=L.get("b_down"), weight_on_input=weight_on_input,
        kept=kept,
    )
    (y.double() * c["grad_out"]).sum().backward()
    return y, {n: t.grad for n, t in L.items()}


def compare_fp32(c, backend, activation, gated, weight_on_input=False, tol=2e-5):
    y, grads = run_backend(c, torch.float32, backend, activation, weight_on_input)
    y_ref, g_ref = run_ref(c, torch.float64, activation, gated, weight_on_input)
    assert_close(y, y_ref, tol, "y")
    for n, gr in g_ref.items():
        if gr is None:  # T = 0: the reference does not touch this tensor
            assert grads[n] is None or (grads[n] == 0).all(), n
            continue
        assert grads[n] is not None, f"no grad for {n}"
        assert_close(grads[n], gr, tol, f"grad {n}")


def compare_bf16(c, backend, activation, gated, weight_on_input=False, atol=2e-3):
    y, grads = run_backend(c, torch.bfloat16, backend, activation, weight_on_input)
    y_p, g_p = run_ref(c, torch.bfloat16, activation, gated, weight_on_input)
    y_ref, g_ref = run_ref(c, torch.float64, activation, gated, weight_on_input)
    assert_tolerance_rule(y, y_p, y_ref, atol, "y")
    for n, gr in g_ref.items():
        if gr is None:  # T = 0: the reference does not touch this tensor
            assert grads[n] is None or (grads[n] == 0).all(), n
            continue
        assert grads[n] is not None, f"no grad for {n}"
        assert_tolerance_rule(grads[n], g_p[n], gr, atol, f"grad {n}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,gated", ACTS)
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_moe_experts_fp32(backend, activation, gated, use_bias, weight_on_input):
    c = make_case(gated=gated, use_bias=use_bias, wscale=3.0 if activation == "gpt_oss" else 1.0)
    if activation == "gpt_oss":  # the clamps must be exercised
        h = torch.einsum("td,ehd->teh", c["x"], c["w_up"])
        assert (h[..., :7] > 7).any() and (h[..., 7:].abs() > 7).any()
    compare_fp32(c, backend, activation, gated, weight_on_input)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,gated", [("silu", True), ("gelu_tanh", True), ("gpt_oss", True),
                                              ("relu2", False), ("gelu", False)])
@pytest.mark.parametrize("use_bias", [False, True])
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_moe_experts_bf16(backend, activation, gated, use_bias, weight_on_input):
    c = make_case(T=16, D=24, F=16, E=4, K=2, gated=gated, use_bias=use_bias,
                  wscale=3.0 if activation == "gpt_oss" else 1.0, seed=1)
    compare_bf16(c, backend, activation, gated, weight_on_input)


# ------------------------------------------------------------------ odd shapes


ODD = {
    "T1": dict(T=1, E=4, K=2),
    "top_k_1": dict(T=9, E=4, K=1),
    "top_k_E": dict(T=7, E=3, K=3),
    "D16_F16": dict(T=8, D=16, F=16, E=4, K=2),
    "D1_F1": dict(T=5, D=1, F=1, E=3, K=2),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", list(ODD))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_odd_shapes(backend, shape, dtype):
    c = make_case(use_bias=True, **ODD[shape])
    if dtype == torch.float32:
        compare_fp32(c, backend, "silu", True)
    else:
        compare_bf16(c, backend, "silu", True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_experts_without_tokens(backend, dtype):
    E, K, T = 6, 2, 10
    g = torch.Generator().manual_seed(3)
    ids = torch.stack([torch.randperm(3, generator=g)[:K] + 1 for _ in range(T)])  # experts 1..3 only
    c = make_case(T=T, E=E, K=K, ids=ids, use_bias=True)
    if dtype == torch.float32:
        compare_fp32(c, backend, "silu", True)
    else:
        compare_bf16(c, backend, "silu", True)
    _, grads = run_backend(c, dtype, backend, "silu")
    for e in (0, 4, 5):  # experts with no tokens get exactly zero gradients
        for n in ("w_up", "w_down", "b_up", "b_down"):
            assert (grads[n][e] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,gated", [("silu", True), ("relu2", False)])
def test_all_tokens_on_one_expert(backend, activation, gated):
    T, E = 11, 5
    ids = torch.full((T, 1), 3, dtype=torch.long)
    c = make_case(T=T, E=E, K=1, ids=ids, gated=gated, use_bias=True)
    compare_fp32(c, backend, activation, gated)
    compare_bf16(c, backend, activation, gated)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("use_bias", [False, True])
def test_zero_tokens(backend, use_bias):
    c = make_case(T=0, use_bias=use_bias)
    y, grads = run_backend(c, torch.float32, backend, "silu")
    assert y.shape == (0, 13)
    for n, gr in grads.items():
        if gr is not None:
            assert (gr == 0).all() and gr.shape == c[n].shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_repeated_expert_in_a_row(backend):
    """Nothing forbids a custom router from picking one expert twice: it must count twice."""
    ids = torch.tensor([[1, 1], [0, 1], [2, 2]])
    c = make_case(T=3, E=3, K=2, ids=ids, use_bias=True)
    compare_fp32(c, backend, "silu", True)


@pytest.mark.parametrize("backend", BACKENDS)
def test_non_contiguous_inputs(backend):
    c = make_case(T=6, D=8, F=4, E=3, K=2)
    x = c["x"].float().t().contiguous().t()  # same values, column-major
    wu = c["w_up"].float().transpose(1, 2).contiguous().transpose(1, 2)
    y = moe_experts(x, wu, c["w_down"].float(), c["ids"], c["topk_weights"].float(), backend=backend)
    y_ref = moe_experts_ref(c["x"], c["w_up"], c["w_down"], c["ids"], c["topk_weights"])
    assert_close(y, y_ref, 2e-5)


def test_backends_agree_with_each_other_and_auto():
    c = make_case(T=20, E=5, K=3, use_bias=True)
    ys = [run_backend(c, torch.float32, b, "gelu")[0] for b in ("loop", "grouped_mm", "auto")]
    for y in ys[1:]:
        assert_close(y, ys[0], 1e-5)


def test_int32_topk_ids():
    c = make_case(T=5, E=3, K=2)
    y = moe_experts(c["x"].float(), c["w_up"].float(), c["w_down"].float(), c["ids"].int(),
                    c["topk_weights"].float(), backend="grouped_mm")
    y_ref = moe_experts_ref(c["x"], c["w_up"], c["w_down"], c["ids"], c["topk_weights"])
    assert_close(y, y_ref, 2e-5)


# ------------------------------------------------------------------ GroupedExperts module


def load_module(ex, c):
    with torch.no_grad():
        ex.w_up.copy_(c["w_up"])
        ex.down_proj.copy_(c["w_down"])
        if ex.b_up is not None:
            ex.b_up.copy_(c["b_up"])
            ex.down_proj_bias.copy_(c["b_down"])


@pytest.mark.parametrize("backend", BACKENDS + ["auto"])
@pytest.mark.parametrize("activation,gated", [("silu", None), ("gpt_oss", None), ("relu2", None),
                                              ("gelu", False)])
@pytest.mark.parametrize("routing_weight_on", ["output", "input"])
@pytest.mark.parametrize("use_bias", [False, True])
def test_grouped_experts_module(backend, activation, gated, routing_weight_on, use_bias):
    ex = GroupedExperts.Config(activation=activation, gated=gated, use_bias=use_bias, backend=backend,
                               routing_weight_on=routing_weight_on).build(dim=13, hidden_dim=7,
                                                                          num_experts=4)
    is_gated = ex.gated
    c = make_case(gated=is_gated, use_bias=use_bias)
    load_module(ex, c)
    x = c["x"].float().requires_grad_(True)
    w = c["topk_weights"].float().requires_grad_(True)
    y = ex(x, c["ids"], w)
    (y.double() * c["grad_out"]).sum().backward()
    L = leaves(c, torch.float64)
    y_ref = moe_experts_ref(L["x"], L["w_up"], L["w_down"], c["ids"], L["topk_weights"],
                            activation=activation, gated=is_gated, b_up=L.get("b_up"),
                            b_down=L.get("b_down"), weight_on_input=routing_weight_on == "input")
    (y_ref * c["grad_out"]).sum().backward()
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(x.grad, L["x"].grad, 2e-5, "grad x")
    assert_close(w.grad, L["topk_weights"].grad, 2e-5, "grad topk_weights")
    assert_close(ex.w_up.grad, L["w_up"].grad, 2e-5, "grad up")
    assert_close(ex.down_proj.grad, L["w_down"].grad, 2e-5, "grad down")
    if use_bias:
        assert_close(ex.b_up.grad, L["b_up"].grad, 2e-5, "grad up bias")
        assert_close(ex.down_proj_bias.grad, L["b_down"].grad, 2e-5, "grad down bias")
    assert ex.last_plan is not None and ex.last_plan.num_tokens == 12


def test_weight_on_input_differs_from_output():
    c = make_case()
    y_out = run_backend(c, torch.float32, "loop", "silu", False)[0]
    y_in = run_backend(c, torch.float32, "loop", "silu", True)[0]
    assert (y_out - y_in).abs().max() > 1e-3


@pytest.mark.parametrize("drop_policy", ["position", "weight"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_grouped_experts_capacity_drops(drop_policy, backend):
    ex = GroupedExperts.Config(backend=backend, use_bias=True).build(
        dim=13, hidden_dim=7, num_experts=4, capacity_factor=0.5, drop_policy=drop_policy)
    ids = torch.tensor([[0, 1]] * 8 + [[2, 3]] * 2)
    c = make_case(T=10, ids=ids, use_bias=True)
    load_module(ex, c)
    x = c["x"].float()
    y = ex(x, ids, c["topk_weights"].float())
    plan = ex.last_plan
    assert plan.capacity == 3 and int(plan.num_dropped) == 10
    y_ref = moe_experts_ref(c["x"], c["w_up"], c["w_down"], ids, c["topk_weights"], b_up=c["b_up"],
                            b_down=c["b_down"], kept=plan.kept_TK)
    assert_close(y, y_ref, 2e-5)
    if drop_policy == "position":
        assert plan.kept_TK[:3].all() and not plan.kept_TK[3:8].any()


# ------------------------------------------------------------------ init_weights


def test_grouped_experts_init_weights():
    ex = GroupedExperts.Config(use_bias=True).build(dim=64, hidden_dim=64, num_experts=8)
    with torch.no_grad():
        for p in ex.parameters():
            p.fill_(1.0)
    ex.init_weights(init_std=0.05)
    assert abs(ex.gate_up_proj[:, :64].std().item() - 0.02) < 0.02 * 0.05  # gate rows: 0.02
    assert abs(ex.down_proj.std().item() - 0.05) < 0.05 * 0.05
    assert (ex.gate_up_proj_bias == 0).all() and (ex.down_proj_bias == 0).all()
    ex.init_weights(init_std=0.05, out_std=0.01)
    assert abs(ex.down_proj.std().item() - 0.01) < 0.01 * 0.05


def test_grouped_experts_init_up_rows_follow_init_std_like_torchtitan():
    ex = GroupedExperts.Config().build(dim=64, hidden_dim=64, num_experts=8)
    ex.init_weights(init_std=0.05)
    assert abs(ex.gate_up_proj[:, 64:].std().item() - 0.05) < 0.05 * 0.05


def test_init_weights_on_build_is_small_and_finite():
    ex = GroupedExperts.Config(activation="relu2", use_bias=True).build(dim=32, hidden_dim=16, num_experts=4)
    assert torch.isfinite(ex.up_proj).all() and ex.up_proj.std() < 0.05
    assert (ex.up_proj_bias == 0).all()


def test_depth_scaled_std():
    assert depth_scaled_std(0.02, 0) == pytest.approx(0.02 / 2**0.5)
    assert depth_scaled_std(0.02, 3) == pytest.approx(0.02 / 8**0.5)


# ------------------------------------------------------------------ property test over shapes

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def expert_cases(draw):
    E = draw(st.integers(1, 6))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, 7))
    D = draw(st.integers(1, 20))
    F = draw(st.integers(1, 12))
    act, gated = draw(st.sampled_from(ACTS))
    skew = draw(st.sampled_from(["random", "one_expert", "first_experts"]))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    if skew == "random":
        ids = distinct_ids(T, E, K, g)
    else:
        base = torch.arange(K) if skew == "first_experts" else (torch.arange(K) + E - K)
        ids = base.expand(T, K).clone()
    return dict(T=T, D=D, F=F, E=E, K=K, gated=gated, ids=ids, seed=seed,
                use_bias=draw(st.booleans())), act, draw(st.sampled_from(BACKENDS)), draw(st.booleans())


@settings(max_examples=50, deadline=None)
@given(expert_cases())
def test_moe_experts_property_fp32(case):
    kw, act, backend, weight_on_input = case
    c = make_case(**kw)
    compare_fp32(c, backend, act, kw["gated"], weight_on_input)
