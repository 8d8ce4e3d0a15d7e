"""Load balancing: aux losses vs plain references (with padding masks), attaching them to the
graph, token counts (also under activation checkpointing), the expert-bias rule, load stats."""

from __future__ import annotations

import pytest
import torch
from torch.utils.checkpoint import checkpoint

from moekit import MoE, TokenChoiceTopKRouter, balance

from reference import (
    assert_close,
    counts_ref,
    linear_ref,
    moe_ref,
    ref_params,
    route_ref,
    seq_aux_ref,
    switch_aux_ref,
    z_loss_ref,
)

R = TokenChoiceTopKRouter.Config


def routed(T=14, E=6, K=2, seed=0, score_func="softmax"):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(T, E, generator=g, dtype=torch.float64) * 2
    scores = torch.softmax(logits, -1) if score_func == "softmax" else torch.sigmoid(logits)
    ids = logits.topk(K, dim=-1).indices
    return logits, scores, ids


MASKS = [None, "some", "none_real"]


def same_loss_and_grad(loss_fn, ref_fn, scores):
    """``loss_fn(scores)`` equals ``ref_fn(scores)`` in value and in its gradient (to 1e-6);
    returns the gradient."""
    s1 = scores.clone().requires_grad_(True)
    s2 = scores.clone().requires_grad_(True)
    loss, ref = loss_fn(s1), ref_fn(s2)
    assert_close(loss, ref, 1e-6)
    loss.backward()
    ref.backward()
    assert_close(s1.grad, s2.grad, 1e-6)
    return s1.grad


def make_mask(kind, shape, seed=1):
    if kind is None:
        return None
    if kind == "none_real":
        m = torch.zeros(shape, dtype=torch.bool)
        m.view(-1)[0] = True
        return m
    g = torch.Generator().manual_seed(seed)
    m = torch.rand(shape, generator=g) > 0.4
    m.view(-1)[0] = True
    return m


@pytest.mark.parametrize("mask", MASKS)
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_switch_aux_loss(mask, score_func):
    logits, scores, ids = routed(score_func=score_func)
    m = make_mask(mask, (14,))
    grad = same_loss_and_grad(lambda s: balance.switch_aux_loss(s, ids, m),
                              lambda s: switch_aux_ref(s, ids, m), scores)
    if m is not None:  # padded tokens get no gradient
        assert (grad[~m] == 0).all()


@pytest.mark.parametrize("mask", MASKS)
def test_switch_aux_loss_with_given_counts(mask):
    """The counts the MoE layer already has give the same loss and gradient; a wrong shape is
    refused."""
    logits, scores, ids = routed()
    m = make_mask(mask, (14,))
    counts = balance.count_tokens_per_expert(ids, scores.shape[1], m)
    same_loss_and_grad(lambda s: balance.switch_aux_loss(s, ids, m, counts),
                       lambda s: switch_aux_ref(s, ids, m), scores)
    with pytest.raises(ValueError, match="one count per expert"):
        balance.switch_aux_loss(scores, ids, m, counts[:-1])


def test_switch_aux_loss_padding_does_not_count():
    logits, scores, ids = routed()
    m = make_mask("some", (14,))
    a = balance.switch_aux_loss(scores, ids, m)
    b = balance.switch_aux_loss(scores[m], ids[m])
    assert_close(a, b, 1e-6)


def test_switch_aux_loss_uniform_is_one():
    # perfectly balanced routing with uniform probabilities gives E * sum (1/E)(1/E) = 1
    E, T = 4, 8  # top-2
    scores = torch.full((T, E), 1.0 / E)
    ids = torch.tensor([[(2 * t) % E, (2 * t + 1) % E] for t in range(T)])
    assert balance.switch_aux_loss(scores, ids).item() == pytest.approx(1.0)


@pytest.mark.parametrize("mask", MASKS + ["one_seq_empty"])
def test_sequence_aux_loss(mask):
    B, S, E, K = 3, 5, 6, 2
    logits, scores, ids = routed(T=B * S, E=E, K=K, score_func="sigmoid")
    scores, ids = scores.view(B, S, E), ids.view(B, S, K)
    if mask == "one_seq_empty":
        m = make_mask("some", (B, S))
        m[1] = False
    else:
        m = make_mask(mask, (B, S))
    same_loss_and_grad(lambda s: balance.sequence_aux_loss(s, ids, m),
                       lambda s: seq_aux_ref(s, ids, m), scores)


@pytest.mark.parametrize("mask", MASKS)
def test_z_loss(mask):
    logits, _, _ = routed()
    m = make_mask(mask, (14,))
    l1 = logits.clone().requires_grad_(True)
    l2 = logits.clone().requires_grad_(True)
    loss = balance.z_loss(l1, m)
    ref = z_loss_ref(l2, m)
    assert_close(loss, ref, 1e-6)
    loss.backward()
    ref.backward()
    assert_close(l1.grad, l2.grad, 1e-6)


def test_z_loss_large_logits_finite():
    assert torch.isfinite(balance.z_loss(torch.full((3, 4), 1e4)))


@pytest.mark.parametrize("mask", MASKS)
def test_count_tokens_per_expert(mask):
    _, _, ids = routed()
    m = make_mask(mask, (14,))
    c = balance.count_tokens_per_expert(ids, 6, m)
    assert c.dtype == torch.float32
    assert c.tolist() == counts_ref(ids, 6, m)


# ------------------------------------------------------------------ MoE integration


def build(coeffs, E=6, K=2, score_func="softmax", seed=0, **kw):
    torch.manual_seed(seed)
    moe = MoE.Config(dim=10, hidden_dim=6, num_experts=E,
                     router=R(top_k=K, score_func=score_func, **kw), **coeffs).build()
    with torch.no_grad():
        for n, p in moe.named_parameters():
            p.normal_(0, 1.0 if "router" in n else 0.5)
    return moe


COEFFS = {
    "switch": dict(load_balance_coeff=0.3),
    "seq": dict(seq_aux_loss_coeff=0.2),
    "z": dict(z_loss_coeff=0.05),
    "all": dict(load_balance_coeff=0.3, seq_aux_loss_coeff=0.2, z_loss_coeff=0.05),
}


@pytest.mark.parametrize("which", list(COEFFS))
@pytest.mark.parametrize("masked", [False, True])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_aux_losses_reach_gradients(which, masked, score_func):
    coeffs = COEFFS[which]
    moe = build(coeffs, score_func=score_func)
    moe.train()
    B, S = 2, 5
    x = torch.randn(B, S, 10, requires_grad=True)
    m = make_mask("some", (B, S)) if masked else None
    y = moe(x, token_mask=m)
    assert type(y) is torch.Tensor and y.shape == x.shape
    y.sum().backward()

    # by hand: plain out.sum() + sum of coeff * loss, all from the reference
    P = ref_params(moe)
    xr = x.detach().double().requires_grad_(True)
    x_TD = xr.reshape(-1, 10)
    y_ref, ids = moe_ref(moe, x_TD, P)
    logits = linear_ref(x_TD, P["router.gate.weight"])
    _, _, scores = route_ref(logits, top_k=2, score_func=score_func)
    mT = None if m is None else m.reshape(-1)
    total = y_ref.sum()
    expected = {}
    if "load_balance_coeff" in coeffs:
        expected["load_balance"] = coeffs["load_balance_coeff"] * switch_aux_ref(scores, ids, mT)
    if "seq_aux_loss_coeff" in coeffs:
        expected["seq_aux"] = coeffs["seq_aux_loss_coeff"] * seq_aux_ref(
            scores.view(B, S, -1), ids.view(B, S, -1), m)
    if "z_loss_coeff" in coeffs:
        expected["z_loss"] = coeffs["z_loss_coeff"] * z_loss_ref(logits, mT)
    for v in expected.values():
        total = total + v
    total.backward()
    assert set(moe.aux_losses) == set(expected)
    for k, v in expected.items():
        assert not moe.aux_losses[k].requires_grad
        assert_close(moe.aux_losses[k], v, 1e-5, k)
    assert_close(moe.router.gate.weight.grad, P["router.gate.weight"].grad, 2e-5, "grad gate")
    assert_close(x.grad, xr.grad, 2e-5, "grad x")
    assert_close(moe.experts.gate_up_proj.grad, P["experts.gate_up_proj"].grad, 2e-5, "grad up")


def test_aux_loss_does_not_change_output_and_eval_has_none():
    moe = build(COEFFS["all"])
    moe0 = build({})
    moe0.load_state_dict(moe.state_dict())
    x = torch.randn(7, 10)
    torch.testing.assert_close(moe(x), moe0(x), rtol=0, atol=0)
    assert moe.aux_losses and not moe0.aux_losses
    moe.eval()
    moe(x)
    assert moe.aux_losses == {}
    # the gate gets only the main loss's gradient in eval mode
    moe.router.gate.weight.grad = None
    moe0.eval()
    moe(x).sum().backward()
    moe0(x).sum().backward()
    torch.testing.assert_close(moe.router.gate.weight.grad, moe0.router.gate.weight.grad)


def test_attach_aux_loss_function():
    out = torch.randn(3, requires_grad=True)
    p = torch.tensor(2.0, requires_grad=True)
    loss = p * p
    y = balance.attach_aux_loss(out, loss)
    torch.testing.assert_close(y, out)
    (y * torch.tensor([1.0, 2.0, 3.0])).sum().backward()
    assert p.grad.item() == pytest.approx(4.0)
    assert out.grad.tolist() == [1.0, 2.0, 3.0]
    with torch.no_grad():
        assert balance.attach_aux_loss(out, loss) is out


def test_tokens_per_expert_accumulates_and_excludes_padding():
    moe = build({})
    xs = [torch.randn(2, 4, 10) for _ in range(3)]
    masks = [None, make_mask("some", (2, 4)), torch.ones(2, 4)]
    expected = [0] * 6
    for x, m in zip(xs, masks):
        moe(x, token_mask=m)
        ids = moe.last_router_output.topk_ids
        c = counts_ref(ids, 6, None if m is None else m.reshape(-1))
        expected = [a + b for a, b in zip(expected, c)]
    assert moe.tokens_per_expert.tolist() == expected
    assert moe.load_stats()["tokens_per_expert"] == expected
    moe.reset_load()
    assert moe.tokens_per_expert.sum() == 0


@pytest.mark.parametrize("use_reentrant", [False, True])
def test_tokens_per_expert_not_double_counted_under_checkpoint(use_reentrant):
    moe = build(COEFFS["switch"])
    ref = build(COEFFS["switch"])
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(9, 10, requires_grad=True)
    xr = x.detach().clone().requires_grad_(True)
    y = checkpoint(moe, x, use_reentrant=use_reentrant)
    y.sum().backward()
    ref(xr).sum().backward()
    assert moe.tokens_per_expert.tolist() == ref.tokens_per_expert.tolist()
    assert moe.tokens_per_expert.sum().item() == 9 * 2
    # grads, aux loss included, are the same as without checkpointing
    torch.testing.assert_close(x.grad, xr.grad)
    torch.testing.assert_close(moe.router.gate.weight.grad, ref.router.gate.weight.grad)
    torch.testing.assert_close(moe.experts.down_proj.grad, ref.experts.down_proj.grad)
    # a second micro-batch accumulates once more
    checkpoint(moe, x, use_reentrant=use_reentrant).sum().backward()
    assert moe.tokens_per_expert.sum().item() == 2 * 9 * 2


@pytest.mark.parametrize("rate", [1e-3, 0.25])
def test_update_expert_bias_sign_rule(rate):
    torch.manual_seed(0)
    moe = MoE.Config(dim=10, hidden_dim=6, num_experts=6, router=R(top_k=2, use_expert_bias=True),
                     expert_bias_update_rate=rate).build()
    with torch.no_grad():
        moe.router.expert_bias.copy_(torch.arange(6.0) * 0.01)
        moe.tokens_per_expert.copy_(torch.tensor([10.0, 0.0, 4.0, 4.0, 2.0, 4.0]))  # mean 4
    before = moe.router.expert_bias.clone()
    delta = moe.update_expert_bias()
    want = [-rate, rate, 0.0, 0.0, rate, 0.0]  # under-loaded up, over-loaded down, mean unchanged
    assert delta.tolist() == pytest.approx(want)
    assert (moe.router.expert_bias - before).tolist() == pytest.approx(want, abs=1e-7)
    assert moe.tokens_per_expert.sum() == 0  # counts reset
    # the bias really steers the next routing: flooding expert 1's bias selects it
    with torch.no_grad():
        moe.router.expert_bias[1] = 100.0
    moe(torch.randn(5, 10))
    assert (moe.last_router_output.topk_ids == 1).any(1).all()


def test_expert_bias_update_function():
    d = balance.expert_bias_update(torch.tensor([1.0, 3.0, 2.0]), 0.5)
    assert d.tolist() == [0.5, -0.5, 0.0]


def test_load_stats():
    stats = balance.load_stats(torch.tensor([6.0, 0.0, 2.0, 0.0]))
    assert stats["tokens_per_expert"] == [6.0, 0.0, 2.0, 0.0]
    assert stats["total"] == 8.0
    assert stats["max_over_mean"] == pytest.approx(3.0)
    assert stats["min_over_mean"] == pytest.approx(0.0)
    assert stats["dead_experts"] == [1, 3] and stats["num_dead"] == 2
    empty = balance.load_stats(torch.zeros(3))
    assert empty["max_over_mean"] == 0.0 and empty["num_dead"] == 3


def test_moe_load_stats_after_forward():
    moe = build({}, force_load_balance=True)
    moe(torch.randn(6, 10))  # round robin: 12 slots on 6 experts
    s = moe.load_stats()
    assert s["tokens_per_expert"] == [2.0] * 6
    assert s["max_over_mean"] == pytest.approx(1.0) and s["dead_experts"] == []


def test_tokens_per_expert_exact_after_bf16_cast():
    torch.manual_seed(0)
    moe = MoE.Config(dim=16, hidden_dim=8, num_experts=2, router=R(top_k=1)).build().to(torch.bfloat16)
    total = [0, 0]
    for _ in range(6):
        moe(torch.randn(257, 16, dtype=torch.bfloat16))
        c = counts_ref(moe.last_router_output.topk_ids, 2)
        total = [a + b for a, b in zip(total, c)]
    assert moe.tokens_per_expert.tolist() == total


def test_expert_bias_updates_survive_bf16_cast():
    moe = MoE.Config(dim=16, hidden_dim=8, num_experts=4, router=R(top_k=1, use_expert_bias=True),
                     expert_bias_update_rate=1e-3).build().to(torch.bfloat16)
    with torch.no_grad():
        moe.router.expert_bias.fill_(1.0)
        moe.tokens_per_expert.copy_(torch.tensor([9.0, 1.0, 1.0, 1.0]))
    moe.update_expert_bias()
    assert moe.router.expert_bias.tolist() == pytest.approx([0.999, 1.001, 1.001, 1.001], abs=1e-6)
