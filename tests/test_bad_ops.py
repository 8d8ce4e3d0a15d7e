"""Bad arguments to the functional experts API and its stages: a clear error, or the right result.

Table-driven. Error cases: (id, callable, error type, phrase of the message). Result cases:
(id, callable returning (actual, expected)) against the loop reference of tests/reference.py.
Every stage checks that its inputs agree with the routing plan (tokens, rows, experts), and
``moe_experts`` that a given plan was made from the ids it is used with.
"""

from __future__ import annotations

import pytest
import torch

from moekit import balance
from moekit.ops import expert_down, expert_up, moe_experts, permute, unpermute
from moekit.ops.stages import gather_slots
from moekit.plan import make_plan

from reference import assert_close, moe_experts_ref

T, D, F, E, K = 5, 8, 16, 4, 2
g = torch.Generator().manual_seed(0)
X = torch.randn(T, D, generator=g)
W1 = torch.randn(E, 2 * F, D, generator=g) / D**0.5
W2 = torch.randn(E, D, F, generator=g) / F**0.5
IDS = torch.tensor([[0, 1], [1, 3], [3, 2], [2, 0], [1, 2]])
WTS = torch.rand(T, K, generator=g) + 0.1
PLAN = make_plan(IDS, E)
N = T * K


def moe(x=X, w1=W1, w2=W2, ids=IDS, w=WTS, **kw):
    return moe_experts(x, w1, w2, ids, w, **kw)


def plan_then_modify():
    ids = IDS.clone()
    p = make_plan(ids, E)
    ids[0, 0] = 3  # in place, after the plan was made
    return moe(ids=ids, plan=p)


ERRORS = [
    # ids
    ("ids-negative", lambda: moe(ids=torch.tensor([[-1, 0]] * T)), ValueError, "must lie in [0, 4)"),
    ("ids-too-large", lambda: moe(ids=torch.tensor([[E, 0]] * T)), ValueError, "found values in [0, 4]"),
    ("ids-float", lambda: moe(ids=IDS.float()), TypeError, "int32 or int64"),
    ("ids-int16", lambda: moe(ids=IDS.short()), TypeError, "int32 or int64"),
    ("ids-bool", lambda: moe(ids=IDS.bool()), TypeError, "int32 or int64"),
    ("ids-requires-grad", lambda: moe(ids=IDS.float().requires_grad_()), TypeError, "int32 or int64"),
    ("ids-1d", lambda: moe(ids=IDS.reshape(-1), w=WTS.reshape(-1)), ValueError, "must both be [T=5, K]"),
    ("ids-wrong-T", lambda: moe(ids=IDS[:4], w=WTS[:4]), ValueError, "must both be [T=5, K]"),
    ("ids-meta", lambda: moe(ids=IDS.to("meta")), ValueError, "meta device"),
    # weights and x
    ("weights-wrong-K", lambda: moe(w=torch.rand(T, 3)), ValueError, "topk_weights (5, 3)"),
    ("weights-1d", lambda: moe(w=WTS.reshape(-1)), ValueError, "topk_weights (10,)"),
    ("weights-int", lambda: moe(w=torch.ones(T, K, dtype=torch.long)), TypeError, "topk_weights must be a floating"),
    ("x-1d", lambda: moe(x=X[0]), ValueError, "x must be [T, D]"),
    ("x-3d", lambda: moe(x=X.unsqueeze(0)), ValueError, "x must be [T, D]"),
    ("x-int", lambda: moe(x=X.long(), w1=W1.long(), w2=W2.long()), TypeError, "floating"),
    ("x-bf16-weights-fp32", lambda: moe(x=X.bfloat16()), TypeError, "cast one of them"),
    ("weights-2d", lambda: moe(w1=W1[0]), ValueError, "must be 3-D"),
    ("up-rows-odd", lambda: moe(w1=W1[:, :7]), ValueError, "2F=32 (gated) or F=16"),
    ("down-E-mismatch", lambda: moe(w2=W2[:3]), ValueError, "shape mismatch"),
    ("up-bias-shape", lambda: moe(gate_up_proj_bias=torch.zeros(E, F)), ValueError, "up bias must be [E, H]"),
    ("down-bias-shape", lambda: moe(down_proj_bias=torch.zeros(E, F)), ValueError, "down bias must be [E, D]"),
    ("activation-unknown", lambda: moe(activation="tanh"), ValueError, "activation='tanh'"),
    ("backend-unknown", lambda: moe(backend="cuda"), ValueError, "backend='cuda' is unknown"),
    ("backend-triton-on-cpu", lambda: moe(backend="triton"), ValueError, "cannot run on cpu"),
    ("interleaved-not-gated", lambda: moe(w1=W1[:, :F], gate_up_interleaved=True, activation="relu2"),
     ValueError, "needs gated experts"),
    # a given plan against the ids it is used with
    ("plan-from-other-ids", lambda: moe(plan=make_plan((IDS + 1) % E, E)), ValueError,
     "not the tensor the routing plan was made from"),
    ("plan-from-a-clone", lambda: moe(plan=make_plan(IDS.clone(), E)), ValueError,
     "not the tensor the routing plan was made from"),
    ("plan-ids-modified-in-place", plan_then_modify, ValueError, "modified in place"),
    ("plan-other-K", lambda: moe(plan=make_plan(IDS[:, :1], E)), ValueError, "[T=5, K=1]"),
    ("plan-other-T", lambda: moe(plan=make_plan(IDS[:3], E)), ValueError, "[T=3, K=2]"),
    ("plan-other-E", lambda: moe(plan=make_plan(IDS, E + 2)), ValueError, "E=6 experts"),
    ("plan-not-a-plan", lambda: moe(plan="plan"), TypeError, "plan must be a RoutingPlan"),
    # permute: tokens against the plan
    ("permute-fewer-tokens", lambda: permute(X[:3], PLAN), ValueError, "x has 3 tokens"),
    ("permute-more-tokens", lambda: permute(torch.randn(9, D), PLAN), ValueError, "made for T=5"),
    ("permute-1d", lambda: permute(X[0], PLAN), ValueError, "must be 2-D"),
    ("permute-int-x", lambda: permute(X.long(), PLAN), TypeError, "floating"),
    ("permute-weights-shape", lambda: permute(X, PLAN, torch.rand(T, 3)), ValueError, "topk_weights has shape (5, 3)"),
    ("permute-not-a-plan", lambda: permute(X, IDS), TypeError, "plan must be a RoutingPlan"),
    ("permute-not-a-tensor", lambda: permute(X.tolist(), PLAN), TypeError, "must be a tensor"),
    # unpermute: rows against the plan
    ("unpermute-fewer-rows", lambda: unpermute(torch.randn(N - 3, D), PLAN), ValueError, "has 7 rows"),
    ("unpermute-more-rows", lambda: unpermute(torch.randn(N + 2, D), PLAN), ValueError, "routes N=10 rows"),
    ("unpermute-weights-shape", lambda: unpermute(torch.randn(N, D), PLAN, torch.rand(4, K)), ValueError,
     "topk_weights has shape (4, 2)"),
    ("unpermute-int-weights", lambda: unpermute(torch.randn(N, D), PLAN, torch.ones(T, K, dtype=torch.long)),
     TypeError, "floating"),
    ("unpermute-3d", lambda: unpermute(torch.randn(N, 1, D), PLAN), ValueError, "must be 2-D"),
    # expert_up / expert_down: rows, experts, features, dtypes against the plan and each other
    ("up-fewer-rows", lambda: expert_up(torch.randn(N - 3, D), W1, PLAN), ValueError, "has 7 rows"),
    ("up-more-rows-loop", lambda: expert_up(torch.randn(N + 2, D), W1, PLAN, backend="loop"), ValueError,
     "routes N=10 rows"),
    ("up-other-E", lambda: expert_up(torch.randn(N, D), W1[:3], PLAN), ValueError, "has 3 experts"),
    ("up-other-D", lambda: expert_up(torch.randn(N, D + 1), W1, PLAN), ValueError, "has 9 features"),
    ("up-2d-weight", lambda: expert_up(torch.randn(N, D), W1[0], PLAN), ValueError, "must be a 3-D tensor"),
    ("up-odd-rows-gated", lambda: expert_up(torch.randn(N, D), W1[:, :7], PLAN), ValueError, "even number"),
    ("up-dtype", lambda: expert_up(torch.randn(N, D), W1.double(), PLAN), TypeError, "cast one of them"),
    ("up-bias-shape", lambda: expert_up(torch.randn(N, D), W1, PLAN, bias_EH=torch.zeros(E, F)), ValueError,
     "the bias must be [E, out]"),
    ("down-fewer-rows", lambda: expert_down(torch.randn(N - 1, F), W2, PLAN), ValueError, "has 9 rows"),
    ("down-other-F", lambda: expert_down(torch.randn(N, F + 1), W2, PLAN), ValueError, "has 17 features"),
    ("down-not-a-plan", lambda: expert_down(torch.randn(N, F), W2, None), TypeError, "plan must be a RoutingPlan"),
    # make_plan
    ("make_plan-1d", lambda: make_plan(IDS.reshape(-1), E), ValueError, "must be [T, K]"),
    ("make_plan-float", lambda: make_plan(IDS.float(), E), TypeError, "int32 or int64"),
    ("make_plan-E-zero", lambda: make_plan(IDS, 0), ValueError, "num_experts=0"),
    ("make_plan-E-float", lambda: make_plan(IDS, 4.0), ValueError, "num_experts=4.0"),
    ("make_plan-pad-zero", lambda: make_plan(IDS, E, pad_to_multiple=0), ValueError, "pad_to_multiple=0"),
    ("make_plan-weight-policy-no-weights", lambda: make_plan(IDS, E, capacity_factor=1.0, drop_policy="weight"),
     ValueError, 'drop_policy="weight" needs topk_weights'),
    ("make_plan-drop-policy", lambda: make_plan(IDS, E, drop_policy="random"), ValueError, "drop_policy='random'"),
    ("gather_slots-inverse-past-rows", lambda: gather_slots(torch.randn(3, D), PLAN.inverse_TK), ValueError,
     "of y's 3 rows"),
    ("gather_slots-1d", lambda: gather_slots(torch.randn(N), PLAN.inverse_TK), ValueError, "takes y [N, D]"),
    # the balance losses and statistics
    ("switch-ids-out-of-range", lambda: balance.switch_aux_loss(torch.rand(T, E), IDS + E), ValueError,
     "must lie in [0, 4)"),
    ("switch-ids-other-T", lambda: balance.switch_aux_loss(torch.rand(T, E), IDS[:3]), ValueError,
     "topk_ids must be [T, K] with T=5"),
    ("switch-ids-float", lambda: balance.switch_aux_loss(torch.rand(T, E), IDS.float()), TypeError,
     "must be an integer tensor"),
    ("switch-scores-1d", lambda: balance.switch_aux_loss(torch.rand(E), IDS), ValueError, "scores must be [T, E]"),
    ("switch-counts-shape", lambda: balance.switch_aux_loss(torch.rand(T, E), IDS, None, torch.ones(E + 1)),
     ValueError, "one count per expert"),
    ("switch-mask-length", lambda: balance.switch_aux_loss(torch.rand(T, E), IDS, torch.ones(3)), ValueError,
     "token_mask has 3 entries"),
    ("count-negative-ids", lambda: balance.count_tokens_per_expert(IDS - E, E), ValueError, "found values in [-4, -1]"),
    ("count-1d-ids", lambda: balance.count_tokens_per_expert(IDS.reshape(-1), E), ValueError, "must be [T, K]"),
    ("seq-aux-2d-scores", lambda: balance.sequence_aux_loss(torch.rand(T, E), IDS), ValueError,
     "scores must be [B, S, E]"),
    ("seq-aux-ids-other-shape", lambda: balance.sequence_aux_loss(torch.rand(1, T, E), IDS.view(T, 1, K)),
     ValueError, "with BS=(1, 5)"),
    ("seq-aux-ids-out-of-range", lambda: balance.sequence_aux_loss(torch.rand(1, T, E), (IDS + E).view(1, T, K)),
     ValueError, "must lie in [0, 4)"),
    ("seq-aux-mask-length", lambda: balance.sequence_aux_loss(torch.rand(1, T, E), IDS.view(1, T, K),
                                                              torch.ones(4)), ValueError, "expected B*S=5"),
    ("z-loss-1d", lambda: balance.z_loss(torch.rand(E)), ValueError, "logits must be [T, E]"),
    ("z-loss-int-logits", lambda: balance.z_loss(torch.ones(T, E, dtype=torch.long)), TypeError, "floating"),
    ("bias-update-rate-nan", lambda: balance.expert_bias_update(torch.ones(E), float("nan")), ValueError,
     "rate=nan"),
    ("bias-update-2d-counts", lambda: balance.expert_bias_update(torch.ones(E, 2), 1e-3), ValueError, "1-D tensor"),
    ("load-stats-2d", lambda: balance.load_stats(torch.ones(E, 2)), ValueError, "1-D tensor [E]"),
    ("attach-loss-not-a-tensor", lambda: balance.attach_aux_loss(X, 0.1), TypeError, "takes two tensors"),
]


@pytest.mark.parametrize("fn,err,phrase", [c[1:] for c in ERRORS], ids=[c[0] for c in ERRORS])
def test_bad_ops_raise(fn, err, phrase):
    with pytest.raises(err) as e:
        fn()
    assert phrase in str(e.value), str(e.value)


def ref(x=X, w1=W1, w2=W2, ids=IDS, w=WTS, **kw):
    return moe_experts_ref(x.double(), w1.double(), w2.double(), ids, w.double(), **kw).float()


def staged(ids=IDS, w=WTS, backend="grouped_mm"):
    p = make_plan(ids, E)
    h = expert_up(permute(X, p), W1, p, backend=backend)
    return unpermute(expert_down(h, W2, p, backend=backend), p, w)


def dup_ids():
    ids = torch.tensor([[0, 0, 0, 1, 1, 3]] * T)  # K > E: an expert picked several times
    w = torch.rand(T, 6, generator=torch.Generator().manual_seed(1))
    return moe(ids=ids, w=w), ref(ids=ids, w=w)


def capacity_plan():
    p = make_plan(IDS, E, capacity_factor=0.5)
    return moe(plan=p), ref(kept=p.kept_TK)


def noncontig():
    xt = X.t().contiguous().t()
    ids = IDS.t().contiguous().t()
    w = WTS.t().contiguous().t()
    assert not (xt.is_contiguous() or ids.is_contiguous() or w.is_contiguous())
    return moe(x=xt, ids=ids, w=w), ref()


def all_experts():
    ids = torch.arange(E).repeat(T, 1)  # K = E: every expert once per token
    w = torch.rand(T, E, generator=torch.Generator().manual_seed(2))
    return moe(ids=ids, w=w), ref(ids=ids, w=w)


def bf16_on_cpu():
    xb, w1b, w2b = X.bfloat16(), W1.bfloat16(), W2.bfloat16()
    return moe(x=xb, w1=w1b, w2=w2b).float(), ref(x=xb.float(), w1=w1b.float(), w2=w2b.float())


RESULTS = [  # (id, callable -> (actual, expected), tolerance relative to max |expected|)
    ("int32-ids", lambda: (moe(ids=IDS.int()), ref()), 2e-5),
    ("int32-ids-loop", lambda: (moe(ids=IDS.int(), backend="loop"), ref()), 2e-5),
    ("K-greater-than-E", dup_ids, 2e-5),
    ("K-equals-E", all_experts, 2e-5),
    ("T-zero", lambda: (moe(x=X[:0], ids=IDS[:0], w=WTS[:0]), torch.zeros(0, D)), 0.0),
    ("K-zero", lambda: (moe(ids=IDS[:, :0], w=WTS[:, :0]), torch.zeros(T, D)), 0.0),
    ("non-contiguous-inputs", noncontig, 2e-5),
    ("plan-reused-with-its-ids", lambda: (moe(plan=make_plan(IDS, E)), ref()), 2e-5),
    ("plan-with-capacity", capacity_plan, 2e-5),
    ("stages-grouped_mm", lambda: (staged(), ref()), 2e-5),
    ("stages-loop", lambda: (staged(backend="loop"), ref()), 2e-5),
    ("weights-float64", lambda: (moe(w=WTS.double()), ref()), 2e-5),
    ("bf16-on-cpu", bf16_on_cpu, 3e-2),
]


@pytest.mark.parametrize("fn,tol", [c[1:] for c in RESULTS], ids=[c[0] for c in RESULTS])
def test_odd_but_valid_ops_are_right(fn, tol):
    got, want = fn()
    assert got.shape == want.shape
    assert_close(got.float(), want, tol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_agreement_checks_do_not_synchronise_on_cuda():
    """The plan/stage checks read metadata only: no host-device sync (sync debug mode 'error')."""
    from moekit.ops.stages import check_expert_down, check_expert_up, check_given_plan

    dev = torch.device("cuda")
    x, w1, w2 = X.to(dev), W1.to(dev), W2.to(dev)
    ids, w = IDS.to(dev), WTS.to(dev)
    p = make_plan(ids, E)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        check_given_plan(p, ids, E)
        x_ND = permute(x, p)
        check_expert_up(x_ND, w1, p, None, True)
        check_expert_down(torch.empty(N, F, device=dev), w2, p, None)
        y = unpermute(torch.randn(N, D, device=dev), p, w)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert y.shape == (T, D) and x_ND.shape == (N, D)
