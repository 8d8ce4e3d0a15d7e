"""The experts' stages over a RoutingPlan: permute -> expert_up -> expert_down -> unpermute
composes to moe_experts; capacity-dropped slots get zero output; stage-level references."""

from __future__ import annotations

import pytest
import torch

from moekit.ops import expert_down, expert_up, moe_experts, permute, row_weights, unpermute
from moekit.plan import make_plan

from reference import activate, assert_close, interleave_gate_up, moe_experts_ref

BACKENDS = ["loop", "grouped_mm"]


def case(T=10, D=13, F=7, E=4, K=2, seed=0, gated=True, ids=None):
    g = torch.Generator().manual_seed(seed)
    H = 2 * F if gated else F
    x = torch.randn(T, D, generator=g)
    wu = torch.randn(E, H, D, generator=g) / D**0.5
    wd = torch.randn(E, D, F, generator=g) / F**0.5
    bu = torch.randn(E, H, generator=g) * 0.1
    bd = torch.randn(E, D, generator=g) * 0.1
    if ids is None:
        ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    return x, wu, wd, bu, bd, ids, w


def staged(x, wu, wd, ids, w, plan, *, backend, activation="silu", gated=True, bu=None, bd=None,
           weight_on_input=False):
    x_ND = permute(x, plan, w if weight_on_input else None)
    h = expert_up(x_ND, wu, plan, activation=activation, gated=gated, bias_EH=bu, backend=backend)
    y_ND = expert_down(h, wd, plan, bias_ED=bd, backend=backend)
    return unpermute(y_ND, plan, None if weight_on_input else w)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("weight_on_input", [False, True])
@pytest.mark.parametrize("activation,gated", [("silu", True), ("relu2", False), ("gpt_oss", True)])
def test_stages_compose_to_moe_experts(backend, weight_on_input, activation, gated):
    x, wu, wd, bu, bd, ids, w = case(gated=gated)
    leaves1 = [t.clone().requires_grad_(True) for t in (x, wu, wd, bu, bd, w)]
    leaves2 = [t.clone().requires_grad_(True) for t in (x, wu, wd, bu, bd, w)]
    plan = make_plan(ids, 4)
    xa, wua, wda, bua, bda, wa = leaves1
    y1 = staged(xa, wua, wda, ids, wa, plan, backend=backend, activation=activation, gated=gated,
                bu=bua, bd=bda, weight_on_input=weight_on_input)
    xb, wub, wdb, bub, bdb, wb = leaves2
    y2 = moe_experts(xb, wub, wdb, ids, wb, activation=activation, gate_up_proj_bias=bub,
                     down_proj_bias=bdb, backend=backend, weight_on_input=weight_on_input)
    torch.testing.assert_close(y1, y2, rtol=0, atol=0)
    go = torch.randn_like(y1)
    y1.backward(go)
    y2.backward(go)
    for a, b in zip(leaves1, leaves2):
        torch.testing.assert_close(a.grad, b.grad, rtol=1e-6, atol=1e-6)


def test_permute_is_gather_in_expert_order():
    x, *_, ids, w = case()
    plan = make_plan(ids, 4)
    x_ND = permute(x, plan)
    rows = []
    for e in range(4):  # plain: for every expert, its tokens in token order
        for t in range(ids.shape[0]):
            for k in range(ids.shape[1]):
                if int(ids[t, k]) == e:
                    rows.append(x[t])
    assert torch.equal(x_ND, torch.stack(rows))
    xw = permute(x, plan, w)
    rw = row_weights(w, plan)
    assert torch.allclose(xw, x_ND * rw[:, None])


def test_permute_backward_sums_rows():
    x, *_, ids, w = case()
    x = x.requires_grad_(True)
    plan = make_plan(ids, 4)
    g = torch.randn(plan.num_rows, x.shape[1])
    permute(x, plan).backward(g)
    ref = torch.zeros_like(x)
    for row in range(plan.num_rows):
        ref[int(plan.token_ids_N[row])] += g[row]
    assert_close(x.grad, ref, 1e-6)


def test_unpermute_reference_and_backward():
    x, *_, ids, w = case()
    plan = make_plan(ids, 4)
    y_ND = torch.randn(plan.num_rows, 5, requires_grad=True)
    w = w.requires_grad_(True)
    out = unpermute(y_ND, plan, w)
    slots = plan.sorted_slots_N.tolist()
    K = ids.shape[1]
    yd = y_ND.detach().double().requires_grad_(True)
    wd = w.detach().double().requires_grad_(True)
    ref = [torch.zeros(5, dtype=torch.float64) for _ in range(ids.shape[0])]
    for row, s in enumerate(slots):
        t, k = divmod(s, K)
        ref[t] = ref[t] + wd[t, k] * yd[row]
    ref = torch.stack(ref)
    assert_close(out, ref, 1e-6)
    g = torch.randn_like(out)
    out.backward(g)
    (ref * g.double()).sum().backward()
    assert_close(y_ND.grad, yd.grad, 1e-6)
    assert_close(w.grad, wd.grad, 1e-6)
    # without weights: plain sum over the K rows
    out1 = unpermute(y_ND.detach(), plan)
    assert torch.allclose(out1, unpermute(y_ND.detach(), plan, torch.ones_like(w)))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation,gated", [("gelu", True), ("silu", False)])
def test_expert_up_down_vs_reference(backend, activation, gated):
    x, wu, wd, bu, bd, ids, w = case(gated=gated)
    plan = make_plan(ids, 4)
    x_ND = permute(x, plan)
    h = expert_up(x_ND, wu, plan, activation=activation, gated=gated, bias_EH=bu, backend=backend)
    y = expert_down(h, wd, plan, bias_ED=bd, backend=backend)
    F = wd.shape[2]
    for row in range(plan.num_rows):
        e = int(plan.expert_ids_N[row])
        hr = activate(wu[e].double() @ x_ND[row].double() + bu[e].double(), activation, gated, F)
        assert_close(h[row], hr, 2e-5)
        assert_close(y[row], wd[e].double() @ hr + bd[e].double(), 2e-5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("drop_policy", ["position", "weight"])
@pytest.mark.parametrize("weight_on_input", [False, True])
def test_capacity_dropped_slots_get_zero(backend, drop_policy, weight_on_input):
    E, K, T = 4, 2, 12
    ids = torch.tensor([[0, 1]] * 9 + [[2, 3]] * 3)
    x, wu, wd, bu, bd, ids, w = case(T=T, E=E, K=K, ids=ids)
    plan = make_plan(ids, E, capacity_factor=1.0, drop_policy=drop_policy, topk_weights_TK=w)
    assert plan.capacity == 6 and int(plan.num_dropped) == 6  # 3 extra slots on experts 0 and 1
    leaves = [t.clone().requires_grad_(True) for t in (x, wu, wd, bu, bd, w)]
    xa, wua, wda, bua, bda, wa = leaves
    y = moe_experts(xa, wua, wda, ids, wa, gate_up_proj_bias=bua, down_proj_bias=bda,
                    backend=backend, plan=plan, weight_on_input=weight_on_input)
    refl = [t.double().requires_grad_(True) for t in (x, wu, wd, bu, bd, w)]
    xr, wur, wdr, bur, bdr, wr = refl
    y_ref = moe_experts_ref(xr, wur, wdr, ids, wr, b_up=bur, b_down=bdr, kept=plan.kept_TK,
                            weight_on_input=weight_on_input)
    assert_close(y, y_ref, 2e-5)
    g = torch.randn(T, 13)
    y.backward(g)
    (y_ref * g.double()).sum().backward()
    for a, b in zip(leaves, refl):
        assert_close(a.grad, b.grad, 2e-5)
    # dropped slots' routing weights get no gradient
    assert (wa.grad[~plan.kept_TK] == 0).all()
    if drop_policy == "weight":
        for e in (0, 1):
            col = ids == e
            kept_w = w[col & plan.kept_TK]
            drop_w = w[col & ~plan.kept_TK]
            assert kept_w.min() >= drop_w.max()


def test_gather_dropped_slot_rows_are_zero():
    ids = torch.tensor([[0], [0], [0], [1]])
    plan = make_plan(ids, 2, capacity_factor=1.0)
    y_ND = torch.ones(plan.num_rows, 3)
    out = unpermute(y_ND, plan)
    assert out[2].abs().sum() == 0 and (out[[0, 1, 3]] == 1).all()


def test_moe_experts_rejects_plan_of_other_shape():
    x, wu, wd, bu, bd, ids, w = case()
    plan = make_plan(ids[:5], 4)
    with pytest.raises(ValueError, match="plan"):
        moe_experts(x, wu, wd, ids, w, plan=plan)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("activation", ["gpt_oss", "silu"])
def test_interleaved_gate_up_equals_concatenated(backend, activation):
    """gate_up_interleaved=True on interleaved weights computes what the concatenated layout
    does, and the weight/bias grads come back interleaved."""
    x, wu, wd, bu, bd, ids, w = case(T=12, D=10, F=6, E=4, K=2, seed=3)
    x = x * 4  # exercise GPT-OSS's clamps
    dt = torch.float64 if backend == "loop" else torch.float32
    ref_leaves = [t.to(dt).requires_grad_(True) for t in (x, wu, wd, bu, bd, w)]
    y_ref = moe_experts(ref_leaves[0], ref_leaves[1], ref_leaves[2], ids, ref_leaves[5],
                        activation=activation, gate_up_proj_bias=ref_leaves[3],
                        down_proj_bias=ref_leaves[4], backend=backend)
    leaves = [t.to(dt).requires_grad_(True) for t in
              (x, interleave_gate_up(wu), wd, interleave_gate_up(bu), bd, w)]
    y = moe_experts(leaves[0], leaves[1], leaves[2], ids, leaves[5], activation=activation,
                    gate_up_proj_bias=leaves[3], down_proj_bias=leaves[4], backend=backend,
                    gate_up_interleaved=True)
    assert_close(y, y_ref)
    gy = torch.randn(y.shape, dtype=y.dtype)
    g_ref = torch.autograd.grad(y_ref, ref_leaves, gy)
    g = torch.autograd.grad(y, leaves, gy)
    for i, (a, b) in enumerate(zip(g, g_ref)):
        assert_close(a, interleave_gate_up(b) if i in (1, 3) else b)


def test_interleaved_needs_gated():
    x, wu, wd, _, _, ids, w = case(gated=False)
    with pytest.raises(ValueError, match="needs gated experts"):
        moe_experts(x, wu, wd, ids, w, activation="relu2", gate_up_interleaved=True, backend="loop")
