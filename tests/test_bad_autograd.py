"""Autograd in unusual but valid uses: every gradient against an independent reference
(finite differences in float64, or the loop reference), and the misuses that must raise."""

from __future__ import annotations

import copy

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moekit import MoE, TokenChoiceTopKRouter
from moekit.ops import expert_down, expert_up, moe_experts, permute, unpermute
from moekit.plan import make_plan

from reference import assert_close, moe_experts_ref

T, D, F, E, K = 4, 5, 3, 4, 2
R = TokenChoiceTopKRouter.Config
IDS = torch.tensor([[0, 1], [1, 3], [3, 3], [2, 0]])  # a token picking the same expert twice too


def f64_inputs(seed=0, bias=False):
    g = torch.Generator().manual_seed(seed)
    t = lambda *s, scale=1.0: (torch.randn(*s, generator=g, dtype=torch.float64) * scale).requires_grad_()
    out = [t(T, D), t(E, 2 * F, D, scale=0.4), t(E, D, F, scale=0.4),
           (torch.rand(T, K, generator=g, dtype=torch.float64) + 0.1).requires_grad_()]
    if bias:
        out += [t(E, 2 * F, scale=0.1), t(E, D, scale=0.1)]
    return out


def layer(**kw):
    torch.manual_seed(0)
    return MoE.Config(dim=D, hidden_dim=F, num_experts=E, router=R(top_k=K), **kw).build()


# ------------------------------------------------------------------ gradcheck (float64)
def gc_fused(x, w1, w2, w):
    return moe_experts(x, w1, w2, IDS, w, backend="loop")


def gc_bias(x, w1, w2, w, b1, b2):
    return moe_experts(x, w1, w2, IDS, w, gate_up_proj_bias=b1, down_proj_bias=b2, backend="loop")


def gc_weight_on_input(x, w1, w2, w):
    return moe_experts(x, w1, w2, IDS, w, weight_on_input=True, backend="loop")


def gc_stages(x, w1, w2, w):
    p = make_plan(IDS, E)
    h = expert_up(permute(x, p), w1, p, backend="loop")
    return unpermute(expert_down(h, w2, p, backend="loop"), p, w)


def gc_capacity(x, w1, w2, w):
    p = make_plan(IDS, E, capacity_factor=0.5)
    return moe_experts(x, w1, w2, IDS, w, plan=p, backend="loop")


def gc_int32_ids(x, w1, w2, w):
    return moe_experts(x, w1, w2, IDS.int(), w, backend="loop")


GRADCHECK = [
    ("moe_experts", gc_fused, False),
    ("moe_experts-biases", gc_bias, True),
    ("weight-on-input", gc_weight_on_input, False),
    ("stages", gc_stages, False),
    ("capacity-plan", gc_capacity, False),
    ("int32-ids", gc_int32_ids, False),
]


@pytest.mark.parametrize("fn,bias", [c[1:] for c in GRADCHECK], ids=[c[0] for c in GRADCHECK])
def test_gradcheck(fn, bias):
    assert torch.autograd.gradcheck(fn, tuple(f64_inputs(bias=bias)), eps=1e-6, atol=1e-6)


# ------------------------------------------------------------------ the layer
def test_grad_of_x_only_matches_reference():
    """Weights frozen (requires_grad False), only the input differentiated."""
    moe = layer()
    for p in moe.parameters():
        p.requires_grad_(False)
    x = torch.randn(T, D, dtype=torch.float64)
    moe = moe.double()
    r = moe.router(x)
    xr = x.clone().requires_grad_()
    ex = moe.experts
    y_ref = moe_experts_ref(xr, ex.w_up, ex.down_proj, r.topk_ids, r.topk_weights)
    (gx_ref,) = torch.autograd.grad(y_ref.sum(), xr)
    xl = x.clone().requires_grad_()
    # the routing weights depend on x through the router as well: hold them fixed on both sides
    y = moe_experts(xl, ex.w_up, ex.down_proj, r.topk_ids, r.topk_weights)
    (gx,) = torch.autograd.grad(y.sum(), xl)
    assert_close(gx, gx_ref, 1e-10)


def test_checkpointed_layer_same_grads_and_counts():
    moe = layer(load_balance_coeff=0.1)
    twin = copy.deepcopy(moe)
    x = torch.randn(6, D)
    x1, x2 = x.clone().requires_grad_(), x.clone().requires_grad_()
    moe(x1).square().sum().backward()
    checkpoint(twin, x2, use_reentrant=False).square().sum().backward()
    assert_close(x2.grad, x1.grad, 1e-6)
    for (n, p), (_, q) in zip(moe.named_parameters(), twin.named_parameters()):
        assert_close(q.grad, p.grad, 1e-6, n)
    assert torch.equal(twin.tokens_per_expert, moe.tokens_per_expert)  # not counted twice


def test_two_forwards_one_backward_sum_the_grads():
    moe = layer()
    a, b = torch.randn(3, D), torch.randn(4, D)
    (moe(a).sum() + moe(b).sum()).backward()
    g_both = moe.router.gate.weight.grad.clone()
    moe.zero_grad()
    moe(a).sum().backward()
    moe(b).sum().backward()
    assert_close(g_both, moe.router.gate.weight.grad, 1e-6)


def test_backward_after_the_layer_was_deepcopied():
    moe = layer(z_loss_coeff=0.1)
    x = torch.randn(5, D, requires_grad=True)
    y = moe(x)
    twin = copy.deepcopy(moe)
    y.sum().backward()
    assert moe.router.gate.weight.grad is not None and twin.router.gate.weight.grad is None


def test_router_logits_given_get_their_gradient():
    moe = layer()
    lg = torch.randn(5, E, requires_grad=True)
    x = torch.randn(5, D)
    moe(x, router_logits=lg).sum().backward()
    r = moe.router(x, logits=lg.detach().requires_grad_())
    ex = moe.experts
    y_ref = moe_experts_ref(x, ex.w_up.detach(), ex.down_proj.detach(), r.topk_ids, r.topk_weights)
    (g_ref,) = torch.autograd.grad(y_ref.sum(), r.logits)
    assert_close(lg.grad, g_ref, 1e-5)


def test_grad_of_topk_weights_only():
    x, w1, w2, w = f64_inputs()
    (gw,) = torch.autograd.grad(moe_experts(x, w1, w2, IDS, w).sum(), w)
    wr = w.detach().clone().requires_grad_()
    (gw_ref,) = torch.autograd.grad(moe_experts_ref(x, w1, w2, IDS, wr).sum(), wr)
    assert_close(gw, gw_ref, 1e-10)


ERRORS = [
    ("ids-requiring-grad", lambda: moe_experts(*f64_inputs()[:3], IDS.double().requires_grad_(), f64_inputs()[3]),
     TypeError, "int32 or int64"),
    ("plan-from-other-ids-in-a-grad-graph",
     lambda: moe_experts(*f64_inputs()[:3], IDS, f64_inputs()[3], plan=make_plan(IDS.flip(0), E)),
     ValueError, "not the tensor the routing plan was made from"),
    ("grad-rows-disagree", lambda: unpermute(torch.randn(3, D, requires_grad=True), make_plan(IDS, E)),
     ValueError, "routes N=8 rows"),
]


@pytest.mark.parametrize("fn,err,phrase", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_autograd_misuse_raises(fn, err, phrase):
    with pytest.raises(err) as e:
        fn()
    assert phrase in str(e.value), str(e.value)
