"""Bad inputs to the MoE layer's forward (and its router): a clear error, or the right result.

Error cases: (id, callable, error type, phrase). Result cases compare the layer with itself on
an equivalent well-formed input, or with the loop reference (tests/reference.py).
"""

from __future__ import annotations

import pytest
import torch

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter

from reference import assert_close, moe_experts_ref

D, F, E, K = 8, 16, 4, 2
R = TokenChoiceTopKRouter.Config


def layer(**kw):
    torch.manual_seed(0)
    return MoE.Config(dim=D, hidden_dim=F, num_experts=E, router=kw.pop("router", R(top_k=K)), **kw).build()


def hash_layer():
    return layer(router=R(top_k=K, routing="hash", hash_vocab_size=10))


X = torch.randn(5, D, generator=torch.Generator().manual_seed(1))


def meta_layer():
    with torch.device("meta"):
        m = layer()
    return m(X.to("meta"))


ERRORS = [
    ("x-1d", lambda: layer()(X[0]), ValueError, "MoE input must be [T, 8] or [B, S, 8]"),
    ("x-4d", lambda: layer()(X.view(1, 1, 5, D)), ValueError, "got (1, 1, 5, 8)"),
    ("x-wrong-dim", lambda: layer()(torch.randn(5, D + 1)), ValueError, "got (5, 9)"),
    ("x-int", lambda: layer()(X.long()), TypeError, "must be a floating tensor"),
    ("x-bool", lambda: layer()(X > 0), TypeError, "must be a floating tensor"),
    ("x-float64-layer-float32", lambda: layer()(X.double()), TypeError, "dtype torch.float64"),
    ("x-bf16-layer-float32", lambda: layer()(X.bfloat16()), TypeError, "moe.to(torch.bfloat16)"),
    ("x-not-a-tensor", lambda: layer()(X.tolist()), TypeError, "must be a tensor, got list"),
    ("x-on-meta-layer-on-cpu", lambda: layer()(X.to("meta")), ValueError, "parameters are on cpu"),
    ("layer-on-meta", meta_layer, ValueError, "meta device"),
    ("mask-wrong-length", lambda: layer()(X, token_mask=torch.ones(4)), ValueError, "token_mask has 4 entries"),
    ("mask-value-2", lambda: layer()(X, token_mask=torch.tensor([1, 0, 2, 1, 1])), ValueError, "only 0/1"),
    ("mask-half", lambda: layer()(X, token_mask=torch.full((5,), 0.5)), ValueError, "only 0/1"),
    ("mask-other-device", lambda: layer()(X, token_mask=torch.ones(5, device="meta")), ValueError,
     "token_mask is on meta"),
    ("mask-not-a-tensor", lambda: layer()(X, token_mask=[1] * 5), TypeError, "token_mask must be a tensor"),
    ("router-logits-wrong-E", lambda: layer()(X, router_logits=torch.randn(5, E + 1)), ValueError,
     "router_logits must be [T=5, E=4]"),
    ("router-logits-wrong-T", lambda: layer()(X, router_logits=torch.randn(6, E)), ValueError,
     "router_logits must be [T=5, E=4]"),
    ("router-logits-int", lambda: layer()(X, router_logits=torch.ones(5, E, dtype=torch.long)), TypeError,
     "router_logits must be a floating"),
    ("router-logits-0d", lambda: layer()(X, router_logits=torch.tensor(1.0)), ValueError, "router_logits must be"),
    ("hash-no-ids", lambda: hash_layer()(X), ValueError, "needs input_ids"),
    ("hash-float-ids", lambda: hash_layer()(X, input_ids=torch.arange(5.0)), TypeError, "integer input_ids"),
    ("hash-ids-out-of-vocab", lambda: hash_layer()(X, input_ids=torch.tensor([0, 1, 2, 3, 10])), ValueError,
     "[0, 10)"),
    ("hash-ids-negative", lambda: hash_layer()(X, input_ids=torch.tensor([0, 1, 2, 3, -1])), ValueError,
     "[0, 10)"),
    ("hash-ids-wrong-count", lambda: hash_layer()(X, input_ids=torch.arange(4)), ValueError,
     "input_ids has 4 tokens"),
    ("update-bias-without-bias", lambda: layer().update_expert_bias(), ValueError, "use_expert_bias=True"),
    ("update-bias-group-str", lambda: layer(router=R(top_k=K, use_expert_bias=True)).update_expert_bias("world"),
     TypeError, "ProcessGroup or None"),
    ("router-direct-wrong-dim", lambda: layer().router(torch.randn(5, D + 1)), ValueError, "router input must be"),
    ("router-direct-nothing", lambda: layer().router(), ValueError, "needs x_TD or precomputed logits"),
    ("router-direct-int-x", lambda: layer().router(X.long()), TypeError, "router input must be a floating"),
    ("shared-float64-x", lambda: SharedExperts.Config(hidden_dim=4).build(dim=D)(X.double()), TypeError,
     "SharedExperts input has dtype torch.float64"),
    ("shared-wrong-dim", lambda: SharedExperts.Config(hidden_dim=4).build(dim=D)(torch.randn(3, D + 1)),
     ValueError, "SharedExperts input must be [..., 8]"),
]


@pytest.mark.parametrize("fn,err,phrase", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_bad_forward_raises(fn, err, phrase):
    with pytest.raises(err) as e:
        fn()
    assert phrase in str(e.value), str(e.value)


def routed_ref(moe, x):
    """The routed experts of ``moe`` on ``x`` by the loop reference, on the layer's own routing."""
    r = moe.router(x)
    ex = moe.experts
    return moe_experts_ref(x.double(), ex.w_up.double(), ex.down_proj.double(), r.topk_ids,
                           r.topk_weights.double()).float()


def same(a, b):
    return a, b


def case_noncontiguous():
    m = layer()
    xt = X.t().contiguous().t()
    return m(xt), m(X.contiguous())


def case_bsd():
    m = layer()
    return m(X.view(1, 5, D)).view(5, D), m(X)


def case_reference():
    m = layer()
    return m(X), routed_ref(m, X)


def case_empty():
    m = layer()
    return m(torch.randn(0, D)), torch.zeros(0, D)


def case_empty_bsd():
    m = layer()
    return m(torch.randn(2, 0, D)), torch.zeros(2, 0, D)


def case_mask_bool_vs_int():
    m = layer(load_balance_coeff=0.1)
    y1 = m(X, token_mask=torch.tensor([1, 1, 0, 1, 0]))
    l1 = m.aux_losses["load_balance"]
    y2 = m(X, token_mask=torch.tensor([True, True, False, True, False]))
    return torch.stack([l1, *y1.flatten()]), torch.stack([m.aux_losses["load_balance"], *y2.flatten()])


def case_router_logits_bse():
    m = layer()
    lg = torch.randn(1, 5, E)
    return m(X.view(1, 5, D), router_logits=lg).view(5, D), m(X, router_logits=lg.view(5, E))


def case_bf16_layer():
    m = layer()
    yb = m.to(torch.bfloat16)(X.bfloat16()).float()
    m32 = layer()
    with torch.no_grad():  # the fp32 twin with the bf16-rounded weights
        for p32, pb in zip(m32.parameters(), m.parameters()):
            p32.copy_(pb.float())
    return yb, m32(X.bfloat16().float())


def case_float64_layer():
    m = layer().double()
    return m(X.double()).float(), routed_ref(layer(), X)


def case_nan_row_stays_in_its_token():
    """A NaN token does not leak into the other tokens' outputs."""
    m = layer()
    x = X.clone()
    x[2] = float("nan")
    y = m(x)
    keep = torch.tensor([0, 1, 3, 4])
    return y[keep], m(X[keep])


def case_autocast(backend):
    def run():
        m = layer(experts=GroupedExperts.Config(backend=backend))
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = m(X)
        return y.float(), m(X)
    return run


RESULTS = [
    ("autocast-bf16-loop", case_autocast("loop"), 3e-2),
    ("autocast-bf16-grouped_mm", case_autocast("grouped_mm"), 3e-2),
    ("non-contiguous-x", case_noncontiguous, 1e-6),
    ("bsd-equals-td", case_bsd, 1e-6),
    ("matches-loop-reference", case_reference, 2e-5),
    ("empty-T", case_empty, 0.0),
    ("empty-BS", case_empty_bsd, 0.0),
    ("mask-bool-equals-int", case_mask_bool_vs_int, 0.0),
    ("router-logits-BSE", case_router_logits_bse, 1e-6),
    ("bf16-layer-on-cpu", case_bf16_layer, 3e-2),
    ("float64-layer", case_float64_layer, 2e-5),
    ("nan-token-isolated", case_nan_row_stays_in_its_token, 2e-5),
]


@pytest.mark.parametrize("fn,tol", [c[1:] for c in RESULTS], ids=[c[0] for c in RESULTS])
def test_odd_but_valid_forward_is_right(fn, tol):
    got, want = fn()
    assert got.shape == want.shape
    assert_close(got.float(), want.float(), tol)
