"""TokenChoiceTopKRouter: every routing mode vs the per-token reference in tests/reference.py."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass

import pytest
import torch

import moekit
from moekit import MoE, RouterOutput, TokenChoiceTopKRouter

from reference import assert_close, moe_experts_ref, route_ref

R = TokenChoiceTopKRouter.Config


def make_router(E=8, D=12, seed=0, **kw):
    torch.manual_seed(seed)
    r = R(**kw).build(dim=D, num_experts=E)
    with torch.no_grad():
        r.gate.weight.normal_(0, 1.0)  # well-separated logits: no near-ties
        if r.gate.bias is not None:
            r.gate.bias.normal_(0, 1.0)
    return r


def check_against_ref(r, x, *, ref_kwargs, forced=False, cmp_scores=True):
    """Forward + gate grads vs reference; sets and weights compared order-insensitively."""
    T, E = x.shape[0], r.num_experts
    out = r(x)
    assert isinstance(out, RouterOutput)
    assert out.topk_ids.shape == (T, r.top_k) and out.topk_weights.shape == (T, r.top_k)
    assert out.scores.shape == (T, E) and out.logits.shape == (T, E)
    assert not out.topk_ids.dtype.is_floating_point

    W = r.gate.weight.detach().double().requires_grad_(True)
    b = None if r.gate.bias is None else r.gate.bias.detach().double().requires_grad_(True)
    logits = x.double() @ W.T + (0 if b is None else b)
    ids, w_ref, s_ref = route_ref(
        logits, top_k=r.top_k, forced_ids=out.topk_ids.tolist() if forced else None, **ref_kwargs
    )
    assert_close(out.logits, logits, what="logits")
    if cmp_scores:
        assert_close(out.scores, s_ref, what="scores")
    for t in range(T):
        got = sorted(zip(out.topk_ids[t].tolist(), out.topk_weights[t].tolist()))
        exp = sorted(zip(ids[t], w_ref[t].tolist()))
        assert [g[0] for g in got] == [e[0] for e in exp], f"token {t}: ids {got} vs {exp}"
        for (_, gw), (_, ew) in zip(got, exp):
            assert abs(gw - ew) <= 1e-5 * max(1.0, abs(ew)), f"token {t}: {got} vs {exp}"
    # gradient of an order-insensitive function of the weights: sum_t sum_k c[t, id] * w[t,k]
    c = torch.randn(T, E, dtype=torch.float64)
    loss = (c.gather(1, out.topk_ids).float() * out.topk_weights).sum()
    r.gate.weight.grad = None
    if r.gate.bias is not None:
        r.gate.bias.grad = None
    loss.backward()
    ref_ids = torch.tensor(ids, dtype=torch.long).view(T, r.top_k)
    (c.gather(1, ref_ids) * w_ref).sum().backward()
    assert_close(r.gate.weight.grad, W.grad, what="grad gate.weight")
    if b is not None:
        assert_close(r.gate.bias.grad, b.grad, what="grad gate.bias")
    return out


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("route_norm", [False, True])
@pytest.mark.parametrize("top_k", [1, 3, 8])
def test_score_then_topk(score_func, route_norm, top_k):
    r = make_router(top_k=top_k, score_func=score_func, route_norm=route_norm, route_scale=1.7)
    x = torch.randn(20, 12)
    check_against_ref(r, x, ref_kwargs=dict(score_func=score_func, route_norm=route_norm, route_scale=1.7))


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_expert_bias_affects_selection_only(score_func):
    r = make_router(top_k=2, score_func=score_func, use_expert_bias=True)
    with torch.no_grad():
        r.expert_bias.copy_(torch.linspace(-0.3, 0.3, 8))
        r.expert_bias[5] = 10.0  # expert 5 always picked
    x = torch.randn(20, 12)
    out = check_against_ref(
        r, x, ref_kwargs=dict(score_func=score_func, expert_bias=r.expert_bias.tolist())
    )
    assert (out.topk_ids == 5).any(dim=1).all()
    # weight of the picked expert 5 is its unbiased score
    col = (out.topk_ids == 5).float().argmax(1)
    w5 = out.topk_weights.gather(1, col[:, None]).squeeze(1)
    torch.testing.assert_close(w5, out.scores[:, 5])
    assert (w5 < 1.0 + 1e-6).all()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("groups,limited,top_k", [(4, 2, 3), (8, 4, 8), (2, 1, 2), (4, 4, 2)])
def test_group_limited(score_func, groups, limited, top_k):
    r = make_router(E=16, top_k=top_k, score_func=score_func, num_expert_groups=groups,
                    num_limited_groups=limited, use_expert_bias=True, route_norm=True,
                    route_scale=2.5)
    with torch.no_grad():
        r.expert_bias.normal_(0, 0.1)
    x = torch.randn(24, 12)
    out = check_against_ref(
        r, x,
        ref_kwargs=dict(score_func=score_func, expert_bias=r.expert_bias.tolist(),
                        num_expert_groups=groups, num_limited_groups=limited,
                        route_norm=True, route_scale=2.5),
    )
    per = 16 // groups
    for t in range(24):
        assert len({i // per for i in out.topk_ids[t].tolist()}) <= limited


def test_group_limited_uses_top2_sum_not_max():
    # group 0: one large score and small rest; group 1: two medium scores -> top2 sum prefers group 1
    r = make_router(E=8, top_k=1, score_func="sigmoid", num_expert_groups=2, num_limited_groups=1)
    logits = torch.tensor([[3.0, -9.0, -9.0, -9.0, 1.5, 1.4, -9.0, -9.0]])
    out = r(logits=logits)
    ids, _, _ = route_ref(logits.double(), top_k=1, score_func="sigmoid", num_expert_groups=2,
                          num_limited_groups=1)
    assert out.topk_ids.tolist() == ids and ids[0][0] == 4


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_group_score_max(score_func):
    r = make_router(E=12, top_k=2, score_func=score_func, num_expert_groups=4, num_limited_groups=2,
                    group_score="max")
    check_against_ref(r, torch.randn(20, 12), ref_kwargs=dict(
        score_func=score_func, num_expert_groups=4, num_limited_groups=2, group_score="max"))


@pytest.mark.parametrize("kw", [dict(topk_before_score=True), dict(routing="hash", hash_vocab_size=16)])
def test_expert_bias_never_silently_ignored(kw):
    try:
        r = make_router(E=4, top_k=1, use_expert_bias=True, **kw)
    except ValueError as e:
        assert "expert_bias" in str(e)
        return
    with torch.no_grad():
        r.expert_bias[2] = 1e4
    out = r(torch.randn(6, 12), input_ids=torch.arange(6))
    assert (out.topk_ids == 2).all()


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
@pytest.mark.parametrize("router_bias", [False, True])
@pytest.mark.parametrize("top_k", [1, 2, 4])
def test_topk_before_score(score_func, router_bias, top_k):
    """GPT-OSS (softmax over the k picked logits) and Llama 4 (sigmoid), router bias in the gate."""
    r = make_router(top_k=top_k, score_func=score_func, topk_before_score=True,
                    use_router_bias=router_bias)
    check_against_ref(r, torch.randn(20, 12),
                      ref_kwargs=dict(score_func=score_func, topk_before_score=True))


def test_topk_before_score_with_norm_and_scale():
    r = make_router(top_k=3, score_func="sigmoid", topk_before_score=True, route_norm=True,
                    route_scale=0.5)
    check_against_ref(r, torch.randn(10, 12), ref_kwargs=dict(
        score_func="sigmoid", topk_before_score=True, route_norm=True, route_scale=0.5))


def test_router_bias_changes_selection():
    r = make_router(top_k=1, topk_before_score=True, use_router_bias=True)
    with torch.no_grad():
        r.gate.bias.zero_()
        r.gate.bias[3] = 100.0
    out = r(torch.randn(7, 12))
    assert (out.topk_ids == 3).all()
    torch.testing.assert_close(out.topk_weights, torch.ones(7, 1))


@pytest.mark.parametrize("topk_before_score", [False, True])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_force_load_balance(topk_before_score, score_func):
    E, K, T = 8, 3, 29
    r = make_router(E=E, top_k=K, score_func=score_func, topk_before_score=topk_before_score,
                    force_load_balance=True, route_norm=True)
    out = check_against_ref(
        r, torch.randn(T, 12), forced=True,
        ref_kwargs=dict(score_func=score_func, topk_before_score=topk_before_score, route_norm=True),
    )
    counts = Counter(out.topk_ids.reshape(-1).tolist())
    loads = [counts.get(e, 0) for e in range(E)]
    assert max(loads) - min(loads) <= 1 and sum(loads) == T * K
    for row in out.topk_ids.tolist():
        assert len(set(row)) == K


def test_force_load_balance_ignores_logits():
    r = make_router(E=4, top_k=2, force_load_balance=True)
    a = r(torch.randn(6, 12)).topk_ids
    b = r(torch.randn(6, 12) * 100).topk_ids
    assert torch.equal(a, b)


@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_router_dtype_float32_with_bf16_input(score_func):
    r = make_router(top_k=2, score_func=score_func, route_norm=True, use_router_bias=True)
    r = r.to(torch.bfloat16)
    x = torch.randn(16, 12, dtype=torch.bfloat16)
    out = r(x)
    assert out.logits.dtype == torch.float32
    assert out.scores.dtype == torch.float32 and out.topk_weights.dtype == torch.float32
    logits = x.double() @ r.gate.weight.double().T + r.gate.bias.double()
    ids, w_ref, _ = route_ref(logits, top_k=2, score_func=score_func, route_norm=True)
    assert_close(out.logits, logits, tol=1e-5)
    for t in range(16):
        assert sorted(out.topk_ids[t].tolist()) == sorted(ids[t])
        got = dict(zip(out.topk_ids[t].tolist(), out.topk_weights[t].tolist()))
        for i, wv in zip(ids[t], w_ref[t].tolist()):
            assert abs(got[i] - wv) < 1e-5


def test_router_dtype_none_runs_gate_in_input_dtype():
    r = make_router(top_k=2, router_dtype=None).to(torch.bfloat16)
    out = r(torch.randn(4, 12, dtype=torch.bfloat16))
    assert out.logits.dtype == torch.bfloat16
    assert out.scores.dtype == torch.float32


@pytest.mark.parametrize("topk_before_score", [False, True])
def test_precomputed_logits(topk_before_score):
    r = make_router(top_k=2, topk_before_score=topk_before_score, score_func="sigmoid")
    logits = torch.randn(9, 8, requires_grad=True)
    out = r(logits=logits)
    ids, w_ref, _ = route_ref(logits.double(), top_k=2, score_func="sigmoid",
                              topk_before_score=topk_before_score)
    assert out.logits is logits
    for t in range(9):
        got = sorted(zip(out.topk_ids[t].tolist(), out.topk_weights[t].tolist()))
        exp = sorted(zip(ids[t], w_ref[t].tolist()))
        assert [g[0] for g in got] == [e[0] for e in exp]
        assert all(abs(a[1] - b[1]) < 1e-6 for a, b in zip(got, exp))
    out.topk_weights.sum().backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0


def test_precomputed_logits_through_moe():
    torch.manual_seed(0)
    moe = MoE.Config(dim=8, hidden_dim=4, num_experts=4, router=R(top_k=2)).build()
    x, logits = torch.randn(5, 8), torch.randn(5, 4)
    y = moe(x, router_logits=logits)
    ids, w, _ = route_ref(logits.double(), top_k=2)
    ref = moe_experts_ref(x.double(), moe.experts.gate_up_proj.double(), moe.experts.down_proj.double(),
                          torch.tensor(ids), w)
    assert_close(y, ref)


@pytest.mark.parametrize("hash_weights", ["uniform", "scores"])
@pytest.mark.parametrize("score_func", ["softmax", "sigmoid"])
def test_hash_routing(hash_weights, score_func):
    V, E, K = 50, 8, 3
    r = make_router(E=E, top_k=K, routing="hash", hash_vocab_size=V, hash_weights=hash_weights,
                    score_func=score_func)
    table = r.hash_table
    assert tuple(table.shape) == (V, K)
    assert int(table.min()) >= 0 and int(table.max()) < E
    for row in table.tolist():
        assert len(set(row)) == K, "hash picks must be distinct per token id"
    ids = torch.randint(0, V, (2, 7))
    x = torch.randn(14, 12)
    out = r(x, input_ids=ids)
    assert torch.equal(out.topk_ids, table[ids.reshape(-1)])
    forced = out.topk_ids.tolist()
    if hash_weights == "uniform":
        torch.testing.assert_close(out.topk_weights, torch.full((14, K), 1.0 / K))
    else:
        logits = x.double() @ r.gate.weight.double().T
        _, w_ref, _ = route_ref(logits, top_k=K, score_func=score_func, forced_ids=forced)
        assert_close(out.topk_weights, w_ref)
    # same token id -> same experts, fixed by the seed
    r2 = make_router(E=E, top_k=K, routing="hash", hash_vocab_size=V, seed=1)
    assert torch.equal(r2.hash_table, table)


def test_hash_routing_scores_weights_get_gradients_and_moe_path():
    torch.manual_seed(0)
    cfg = MoE.Config(dim=8, hidden_dim=4, num_experts=4,
                     router=R(top_k=2, routing="hash", hash_vocab_size=11, hash_weights="scores"))
    moe = cfg.build()
    ids = torch.randint(0, 11, (2, 3))
    x = torch.randn(2, 3, 8)
    y = moe(x, input_ids=ids)
    y.sum().backward()
    assert moe.router.gate.weight.grad.abs().sum() > 0
    topk = moe.router.hash_table[ids.reshape(-1)]
    _, w, _ = route_ref(x.reshape(6, 8).double() @ moe.router.gate.weight.double().T, top_k=2,
                        forced_ids=topk.tolist())
    ref = moe_experts_ref(x.reshape(6, 8).double(), moe.experts.gate_up_proj.double(),
                          moe.experts.down_proj.double(), topk, w)
    assert_close(y.reshape(6, 8), ref)


def test_hash_table_is_persistent_buffer():
    r = make_router(E=4, top_k=2, routing="hash", hash_vocab_size=5)
    assert "hash_table" in r.state_dict()


def test_router_zero_tokens():
    r = make_router(top_k=2)
    out = r(torch.randn(0, 12))
    assert out.topk_ids.shape == (0, 2) and out.topk_weights.shape == (0, 2)


def test_router_top_k_equals_num_experts_picks_all():
    r = make_router(E=5, top_k=5, route_norm=False)
    out = r(torch.randn(6, 12))
    assert (out.topk_ids.sort(1).values == torch.arange(5)).all()
    torch.testing.assert_close(out.topk_weights.sum(1), torch.ones(6))


# ------------------------------------------------------------------ custom router stands in


class FirstExpertsRouter(moekit.Module):
    """Routes token t to experts (t % E, (t+1) % E) with fixed weights (0.75, 0.25)."""

    @dataclass(kw_only=True)
    class Config(moekit.Config):
        top_k: int = 2

    def __init__(self, config, *, dim, num_experts):
        super().__init__()
        self.config, self.num_experts = config, num_experts
        self.dummy = torch.nn.Parameter(torch.zeros(()))

    def init_weights(self, init_std=0.02):
        pass

    def forward(self, x_TD, **kw):
        T, E = x_TD.shape[0], self.num_experts
        t = torch.arange(T)
        ids = torch.stack([t % E, (t + 1) % E], 1)
        w = torch.tensor([0.75, 0.25]).expand(T, 2) + 0 * self.dummy
        logits = torch.zeros(T, E)
        return RouterOutput(topk_ids=ids, topk_weights=w, scores=torch.softmax(logits, -1), logits=logits)


def test_custom_router_stands_in():
    torch.manual_seed(0)
    cfg = MoE.Config(dim=8, hidden_dim=6, num_experts=3, router=FirstExpertsRouter.Config())
    moe = cfg.build()
    assert isinstance(moe.router, FirstExpertsRouter)
    assert cfg.top_k == 2
    x = torch.randn(7, 8)
    y = moe(x)
    t = torch.arange(7)
    ids = torch.stack([t % 3, (t + 1) % 3], 1)
    ref = moe_experts_ref(x.double(), moe.experts.gate_up_proj.double(), moe.experts.down_proj.double(),
                          ids, torch.tensor([[0.75, 0.25]] * 7, dtype=torch.float64))
    assert_close(y, ref)


def test_custom_router_must_return_router_output():
    class Bad(FirstExpertsRouter):
        @dataclass(kw_only=True)
        class Config(moekit.Config):
            top_k: int = 2

        def forward(self, x_TD, **kw):
            return (torch.zeros(x_TD.shape[0], 2, dtype=torch.long), torch.ones(x_TD.shape[0], 2))

    moe = MoE.Config(dim=8, hidden_dim=6, num_experts=3, router=Bad.Config()).build()
    with pytest.raises(TypeError, match="RouterOutput"):
        moe(torch.randn(2, 8))


def test_router_init_weights():
    r = R(top_k=2, use_router_bias=True, use_expert_bias=True).build(dim=256, num_experts=64)
    with torch.no_grad():
        r.gate.bias.fill_(1.0)
        r.expert_bias.fill_(1.0)
    r.init_weights(0.05)
    assert abs(r.gate.weight.std().item() - 0.05) < 0.05 * 0.05
    assert abs(r.gate.weight.mean().item()) < 0.005
    assert (r.gate.bias == 0).all() and (r.expert_bias == 0).all()


# ------------------------------------------------------------------ property test over configs

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


@st.composite
def router_configs(draw):
    topk_before_score = draw(st.booleans())
    G = draw(st.sampled_from([1, 2, 4])) if not topk_before_score else None
    E = draw(st.integers(2, 6)) * (G or 1) if G else draw(st.integers(1, 12))
    if G is not None and E // G < 2:
        E = 2 * G
    kw = dict(
        score_func=draw(st.sampled_from(["softmax", "sigmoid", "sqrtsoftplus"])),
        route_norm=draw(st.booleans()),
        route_scale=draw(st.sampled_from([1.0, 2.5, 0.3])),
        topk_before_score=topk_before_score,
        use_router_bias=draw(st.booleans()),
        use_expert_bias=(not topk_before_score) and draw(st.booleans()),
    )
    max_k = E
    if G is not None:
        kept = draw(st.integers(1, G))
        kw.update(num_expert_groups=G, num_limited_groups=kept)
        max_k = kept * (E // G)
    kw["top_k"] = draw(st.integers(1, max_k))
    return E, kw, draw(st.integers(0, 2**16))


@settings(max_examples=50, deadline=None)
@given(router_configs())
def test_router_property_vs_reference(case):
    E, kw, seed = case
    r = make_router(E=E, seed=seed, **kw)
    if r.expert_bias is not None:
        with torch.no_grad():
            r.expert_bias.normal_(0, 0.1)
    x = torch.randn(6, 12, generator=torch.Generator().manual_seed(seed))
    ref_kwargs = {k: kw[k] for k in ("score_func", "route_norm", "route_scale", "topk_before_score")}
    if "num_expert_groups" in kw:
        ref_kwargs.update(num_expert_groups=kw["num_expert_groups"],
                          num_limited_groups=kw["num_limited_groups"])
    if r.expert_bias is not None:
        ref_kwargs["expert_bias"] = r.expert_bias.tolist()
    check_against_ref(r, x, ref_kwargs=ref_kwargs)
