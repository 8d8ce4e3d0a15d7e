"""RoutingPlan, property-tested with hypothesis against plain python bookkeeping."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

import moekit.plan as plan_mod
from moekit.plan import capacity_for, make_plan

SETTINGS = settings(max_examples=50, deadline=None)


@st.composite
def routing(draw, max_T=24, max_E=9):
    E = draw(st.integers(1, max_E))
    K = draw(st.integers(1, E))
    T = draw(st.integers(0, max_T))
    # distinct experts per token (as a router gives), or skewed: all tokens on expert 0..K-1
    skew = draw(st.booleans())
    rows = []
    for _ in range(T):
        if skew:
            rows.append(list(range(K)))
        else:
            rows.append(draw(st.permutations(range(E)))[:K])
    ids = torch.tensor(rows, dtype=torch.int64).view(T, K)
    w = torch.tensor(
        draw(st.lists(st.integers(0, 10**6), min_size=T * K, max_size=T * K)), dtype=torch.float32
    ).view(T, K) / 1e6
    return ids, w, E


def check_common(p, ids, E):
    T, K = ids.shape
    N = p.num_rows
    assert (p.num_tokens, p.top_k, p.num_experts) == (T, K, E)
    assert p.counts_E.dtype == torch.int32 and p.offsets_E.dtype == torch.int32
    counts = p.counts_E.tolist()
    offsets = p.offsets_E.tolist()
    # offsets are the cumulative sum of counts, monotone, ending at N
    acc = 0
    for e in range(E):
        acc += counts[e]
        assert offsets[e] == acc
    assert all(a <= b for a, b in zip(offsets, offsets[1:]))
    assert (offsets[-1] if E else 0) == N
    assert int(p.num_dropped) == T * K - N
    # each kept row's expert and token agree with the slot it carries
    slots = p.sorted_slots_N.tolist()
    assert len(set(slots)) == N, "a (token, k) slot appears twice"
    for row, s in enumerate(slots):
        t, k = divmod(s, K)
        assert int(p.token_ids_N[row]) == t
        assert int(p.expert_ids_N[row]) == int(ids[t, k])
    # expert ids non-decreasing and consistent with offsets
    exp = p.expert_ids_N.tolist()
    assert exp == sorted(exp)
    for e in range(E):
        assert exp[offsets[e] - counts[e]:offsets[e]] == [e] * counts[e]
    # inverse permutation round-trips
    inv = p.inverse_TK
    assert inv.shape == (T, K)
    for t in range(T):
        for k in range(K):
            r = int(inv[t, k])
            if r >= 0:
                assert slots[r] == t * K + k
            else:
                assert t * K + k not in set(slots)
    assert int((inv >= 0).sum()) == N
    assert torch.equal(p.kept_TK, inv >= 0)


@SETTINGS
@given(routing())
def test_dropless_plan_properties(data):
    ids, _, E = data
    T, K = ids.shape
    p = make_plan(ids, E)
    check_common(p, ids, E)
    assert p.dropless and p.capacity is None and int(p.num_dropped) == 0
    assert p.num_rows == T * K
    assert p.counts_E.tolist() == [int((ids == e).sum()) for e in range(E)]
    # stable: within an expert, rows keep slot (token) order
    slots = p.sorted_slots_N.tolist()
    for e in range(E):
        seg = [s for s in slots if int(ids.view(-1)[s]) == e]
        assert seg == sorted(seg)
    # the inverse is a bijection of slots onto rows
    assert sorted(p.inverse_TK.reshape(-1).tolist()) == list(range(T * K))


@SETTINGS
@given(routing(), st.sampled_from([0.25, 0.5, 1.0, 1.3, 2.0]))
def test_capacity_position_keeps_earliest(data, cf):
    ids, w, E = data
    T, K = ids.shape
    p = make_plan(ids, E, capacity_factor=cf, drop_policy="position", topk_weights_TK=w)
    check_common(p, ids, E)
    cap = math.ceil(cf * T * K / E)
    assert p.capacity == cap == capacity_for(T, K, E, cf)
    kept = set(p.sorted_slots_N.tolist())
    for e in range(E):
        slots_e = [s for s in range(T * K) if int(ids.view(-1)[s]) == e]  # slot order = token order
        assert [s for s in slots_e if s in kept] == slots_e[:cap]
        assert int(p.counts_E[e]) == min(cap, len(slots_e))
    # stable order within expert
    slots = p.sorted_slots_N.tolist()
    for e in range(E):
        seg = [s for s in slots if int(ids.view(-1)[s]) == e]
        assert seg == sorted(seg)


@SETTINGS
@given(routing(), st.sampled_from([0.25, 0.5, 1.0, 2.0]))
def test_capacity_weight_keeps_highest(data, cf):
    ids, w, E = data
    T, K = ids.shape
    p = make_plan(ids, E, capacity_factor=cf, drop_policy="weight", topk_weights_TK=w)
    check_common(p, ids, E)
    cap = p.capacity
    kept = set(p.sorted_slots_N.tolist())
    wf = w.reshape(-1).tolist()
    for e in range(E):
        slots_e = [s for s in range(T * K) if int(ids.view(-1)[s]) == e]
        kept_e = [s for s in slots_e if s in kept]
        dropped_e = [s for s in slots_e if s not in kept]
        assert len(kept_e) == min(cap, len(slots_e))
        if kept_e and dropped_e:
            assert min(wf[s] for s in kept_e) >= max(wf[s] for s in dropped_e)
        # ties broken towards earlier tokens
        for d in dropped_e:
            for k_ in kept_e:
                if wf[k_] == wf[d]:
                    assert k_ < d


@SETTINGS
@given(routing(), st.integers(1, 8), st.sampled_from([None, 0.5, 1.0]))
def test_padding_offsets(data, m, cf):
    ids, w, E = data
    T, K = ids.shape
    p = make_plan(ids, E, pad_to_multiple=m, capacity_factor=cf, topk_weights_TK=w)
    check_common(p, ids, E)
    if m == 1:
        assert p.padded_rows_N is None
        return
    po = p.padded_offsets_E.tolist()
    assert all(o % m == 0 for o in po)
    counts = p.counts_E.tolist()
    starts = [0] + po[:-1]
    for e in range(E):
        assert po[e] - starts[e] == -(-counts[e] // m) * m  # round up to multiple of m
    assert p.num_padded_rows >= po[-1]
    assert p.num_padded_rows == p.num_rows + E * (m - 1)
    rows = p.padded_rows_N.tolist()
    assert len(set(rows)) == len(rows)
    offs = p.offsets_E.tolist()
    for e in range(E):
        seg = rows[offs[e] - counts[e]:offs[e]]
        assert seg == list(range(starts[e], starts[e] + counts[e]))


def test_int32_overflow_guard(monkeypatch):
    ids = torch.zeros(100, 4, dtype=torch.int64)
    make_plan(ids, 4)
    monkeypatch.setattr(plan_mod, "_INT32_MAX", 300)
    with pytest.raises(ValueError, match="overflow"):
        make_plan(ids, 4)


def test_int32_overflow_guard_real_size():
    # a [T, K] expanded view: no memory, 2**31 routed rows
    ids = torch.zeros(1, 1, dtype=torch.int64).expand(2**29, 4)
    with pytest.raises(ValueError, match="int32"):
        make_plan(ids, 8)


def test_int32_topk_ids_accepted():
    ids = torch.tensor([[1, 0], [1, 2]], dtype=torch.int32)
    p = make_plan(ids, 3)
    assert p.counts_E.tolist() == [1, 2, 1]


def test_all_tokens_one_expert_and_empty_experts():
    ids = torch.full((6, 1), 2, dtype=torch.int64)
    p = make_plan(ids, 5)
    assert p.counts_E.tolist() == [0, 0, 6, 0, 0]
    assert p.offsets_E.tolist() == [0, 0, 6, 6, 6]
    assert p.sorted_slots_N.tolist() == list(range(6))


def test_capacity_drop_count_example():
    ids = torch.tensor([[0], [0], [0], [1]])
    p = make_plan(ids, 2, capacity_factor=1.0)  # capacity ceil(4/2) = 2
    assert p.capacity == 2 and int(p.num_dropped) == 1
    assert p.inverse_TK[:, 0].tolist()[2] == -1


def test_count_per_expert_matches_bincount():
    from moekit.plan import count_per_expert

    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 7, (50, 3), generator=g)
    ids[ids == 5] = 6  # an expert with no rows
    got = count_per_expert(ids, 9)
    assert got.dtype == torch.int64
    assert torch.equal(got, torch.bincount(ids.reshape(-1), minlength=9))
    w = torch.rand(50, 3, generator=g, dtype=torch.float64)
    torch.testing.assert_close(count_per_expert(ids, 9, w),
                               torch.bincount(ids.reshape(-1), weights=w.reshape(-1), minlength=9))
    assert torch.equal(count_per_expert(torch.zeros(0, 2, dtype=torch.int64), 3), torch.zeros(3, dtype=torch.int64))


def test_plan_zero_experts_skip_their_slots():
    """ids in [E, E + Z) name zero-computation experts: no rows, inverse -1, not dropped."""
    ids = torch.tensor([[0, 5], [4, 2], [2, 3], [6, 0]])
    p = make_plan(ids, 4, num_zero_experts=3)
    assert p.counts_E.tolist() == [2, 0, 2, 1] and p.num_rows == 5 and int(p.num_dropped) == 0
    assert (p.inverse_TK < 0).tolist() == [[False, True], [True, False], [False, False], [True, False]]
    assert p.expert_ids_N.tolist() == [0, 0, 2, 2, 3] and p.token_ids_N.tolist() == [0, 3, 1, 2, 2]
    with pytest.raises(ValueError, match=r"\[0, 7\)"):
        make_plan(ids + 1, 4, num_zero_experts=3)
    with pytest.raises(ValueError, match="num_zero_experts=-1"):
        make_plan(ids, 4, num_zero_experts=-1)


@pytest.mark.parametrize("policy", ["position", "weight"])
def test_plan_zero_experts_with_capacity(policy):
    """With a capacity, the zero experts' slots are neither rows nor counted against it: the
    kept slots are those of the plan of the real experts' slots alone (what expert
    parallelism's token exchange relies on: a slot held by another rank is a zero expert)."""
    g = torch.Generator().manual_seed(3)
    T, K, E, Z = 40, 3, 5, 1
    ids = torch.randint(0, E + Z, (T, K), generator=g)
    w = torch.rand(T, K, generator=g)
    p = make_plan(ids, E, num_zero_experts=Z, capacity=4, drop_policy=policy, topk_weights_TK=w)
    # the reference: per expert, keep the 4 earliest slots (position) or heaviest (weight)
    keep = torch.zeros(T * K, dtype=torch.bool)
    flat, fw = ids.reshape(-1), w.reshape(-1)
    for e in range(E):
        slots = (flat == e).nonzero().flatten()
        if policy == "weight":
            slots = slots[torch.argsort(-fw[slots], stable=True)]
        keep[slots[:4]] = True
    assert torch.equal(p.kept_TK.reshape(-1), keep)
    assert p.counts_E.tolist() == [min(4, int((flat == e).sum())) for e in range(E)]
    assert int(p.num_dropped) == int((flat < E).sum()) - int(keep.sum())
    rows = p.sorted_slots_N
    assert torch.equal(p.inverse_TK.reshape(-1)[rows], torch.arange(rows.numel()))


def test_plan_num_real_slots():
    """``num_real_slots`` (the count of slots on real experts, when known) gives the same
    plan without reading the count back; a wrong kind of value is refused."""
    ids = torch.tensor([[0, 5], [4, 2], [2, 3], [6, 0]])
    a = make_plan(ids, 4, num_zero_experts=3)
    b = make_plan(ids, 4, num_zero_experts=3, num_real_slots=5)
    for f in ("sorted_slots_N", "token_ids_N", "expert_ids_N", "counts_E", "offsets_E", "inverse_TK"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    for bad in (-1, 9, 2.0, True):
        with pytest.raises(ValueError, match="num_real_slots"):
            make_plan(ids, 4, num_zero_experts=3, num_real_slots=bad)


def test_prepare_plan_finish_is_make_plans_plan():
    """``prepare_plan(...).finish(n)`` (the device work before n is known) is the plan of
    ``make_plan(..., num_real_slots=n)``, field for field and dtype for dtype."""
    from moekit.plan import prepare_plan

    g = torch.Generator().manual_seed(2)
    for T, K, E, Z in ((7, 3, 4, 1), (5, 1, 3, 2), (0, 2, 4, 1), (6, 4, 1, 1)):
        ids = torch.randint(0, E + Z, (T, K), generator=g)
        n = int((ids < E).sum())
        a = make_plan(ids, E, num_zero_experts=Z, num_real_slots=n)
        b = prepare_plan(ids, E, num_zero_experts=Z).finish(n)
        for f in ("sorted_slots_N", "token_ids_N", "expert_ids_N", "counts_E", "offsets_E",
                  "inverse_TK", "num_dropped"):
            x, y = getattr(a, f), getattr(b, f)
            assert x.dtype == y.dtype and torch.equal(x, y), f
        assert (b.num_tokens, b.top_k, b.num_experts, b.num_rows) == (T, K, E, n)
        b.check_ids(ids)


def test_plan_check_ids_off_is_the_same_plan():
    """``check_ids=False`` (ids the caller built from checked ones) makes the same plan; the
    default still refuses ids out of range."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, 6, (9, 2), generator=g)
    a, b = make_plan(ids, 6), make_plan(ids, 6, check_ids=False)
    for f in ("sorted_slots_N", "token_ids_N", "expert_ids_N", "counts_E", "offsets_E", "inverse_TK"):
        assert torch.equal(getattr(a, f), getattr(b, f)), f
    with pytest.raises(ValueError, match=r"\[0, 5\)"):
        make_plan(ids, 5)
