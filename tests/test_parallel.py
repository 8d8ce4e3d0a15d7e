"""Expert parallelism on CPU with gloo: 2 and 4 processes, outputs and every gradient equal
to the single-process layer fed all ranks' tokens (fp32, tight).

Each spawned group runs many scenarios (processes and the group are started once). A bug
fails instead of hanging: collectives time out after 60 s, and the test kills the group
after a wall-clock deadline.
"""

from __future__ import annotations

import copy
import os
import socket
import time
import traceback
from datetime import timedelta
from typing import ClassVar

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.ops import LoopBackend, register_backend
from moekit.parallel import (
    AllToAllDispatcher,
    apply_ep,
    placement,
    rebalance,
    sync_replicated_grads,
)

RTOL, ATOL = 1e-5, 1e-5


# ----------------------------------------------------------------------------- helpers
def make_moe(seed, *, E, K, dim=16, hidden=8, activation="silu", gated=None, bias=False, weight_on="output",
             capacity=None, drop="position", shared=False, shared_gate=False, backend="grouped_mm"):
    torch.manual_seed(seed)
    cfg = MoE.Config(
        dim=dim, hidden_dim=hidden, num_experts=E,
        router=TokenChoiceTopKRouter.Config(top_k=K, score_func="softmax", route_norm=True),
        experts=GroupedExperts.Config(activation=activation, gated=gated, use_bias=bias, backend=backend,
                                      routing_weight_on=weight_on),
        shared_experts=SharedExperts.Config(hidden_dim=12, use_gate=shared_gate) if shared else None,
        capacity_factor=capacity, drop_policy=drop,
    )
    moe = cfg.build()
    with torch.no_grad():  # larger weights than the init, and non-zero biases: a real signal
        for n, p in moe.named_parameters():
            p.copy_(torch.randn_like(p) * (0.3 if "bias" not in n else 0.5))
    return moe


def inputs(seed, Ts, dim, E=None, logits_fn=None):
    g = torch.Generator().manual_seed(seed + 1000)
    xs = [torch.randn(T, dim, generator=g) for T in Ts]
    gs = [torch.randn(T, dim, generator=g) for T in Ts]
    ls = None if logits_fn is None else [logits_fn(T, E) for T in Ts]
    return xs, gs, ls


def close(a, b, what):
    assert a.shape == b.shape, f"{what}: shape {tuple(a.shape)} vs {tuple(b.shape)}"
    if not torch.allclose(a, b, rtol=RTOL, atol=ATOL):
        err = (a - b).abs().max().item()
        raise AssertionError(f"{what}: max abs err {err:.3e} (rank {dist.get_rank()})")


def run_ref(ref, xs, gs, ls):
    x = torch.cat(xs).requires_grad_()
    kw = {} if ls is None else {"router_logits": torch.cat(ls)}
    y = ref(x, **kw)
    if not y.requires_grad:  # T=0 everywhere: the single-process layer returns early
        return y.detach(), torch.zeros_like(x)
    (y * torch.cat(gs)).sum().backward()
    return y.detach(), x.grad


def grad(p):
    return torch.zeros_like(p) if p.grad is None else p.grad


def run_ep(moe, xs, gs, ls, rank):
    x = xs[rank].clone().requires_grad_()
    kw = {} if ls is None else {"router_logits": ls[rank]}
    y = moe(x, **kw)
    (y * gs[rank]).sum().backward()
    return y.detach(), torch.zeros_like(x) if x.grad is None else x.grad


def compare(ref, moe, xs, gs, ls, rank, *, tag, check_shared_local=True):
    y_ref, gx_ref = run_ref(ref, xs, gs, ls)
    y, gx = run_ep(moe, xs, gs, ls, rank)
    Ts = [x.shape[0] for x in xs]
    a = sum(Ts[:rank])
    close(y, y_ref[a:a + Ts[rank]], f"{tag}: output")
    close(gx, gx_ref[a:a + Ts[rank]], f"{tag}: x grad")
    ep = moe.experts
    for name in ep.weight_names():
        p_ep, p_ref = getattr(ep, name), getattr(ref.experts, name)
        for j, e in enumerate(ep.local_experts):
            close(grad(p_ep)[j], grad(p_ref)[e], f"{tag}: {name}.grad of expert {e} (slot {j})")
            close(p_ep.detach()[j], p_ref.detach()[e], f"{tag}: {name} of expert {e}")
    sync_replicated_grads(moe)
    for (n, p), (n2, q) in zip(moe.router.named_parameters(), ref.router.named_parameters()):
        if q.grad is not None or p.grad is not None:
            close(grad(p), grad(q), f"{tag}: router.{n}.grad")
    if moe.shared_experts is not None and check_shared_local:
        for (n, p), (n2, q) in zip(moe.shared_experts.named_parameters(), ref.shared_experts.named_parameters()):
            close(grad(p), grad(q), f"{tag}: shared_experts.{n}.grad")
    if moe.dispatch.shared_experts is not None:
        for (n, p), (n2, q) in zip(moe.dispatch.shared_experts.named_parameters(),
                                   ref.shared_experts.named_parameters()):
            close(grad(p), grad(q), f"{tag}: external shared_experts.{n}.grad")


def zero_grads(*mods):
    for m in mods:
        for p in m.parameters():
            p.grad = None


def scenario(ep_kwargs, moe_kwargs, Ts, *, seed=0, logits_fn=None, repeat=1, tag=""):
    rank = dist.get_rank()
    moe = make_moe(seed, **moe_kwargs)
    ref = copy.deepcopy(moe)
    apply_ep(moe, **ep_kwargs)
    for it in range(repeat):
        xs, gs, ls = inputs(seed + it, Ts, moe.dim, moe.num_experts, logits_fn)
        compare(ref, moe, xs, gs, ls, rank, tag=f"{tag}#{it}")
        zero_grads(moe, ref)
    return moe, ref


def skewed_logits(T, E):
    """Routing forced to the low experts: the last experts get no tokens anywhere."""
    l = torch.full((T, E), -30.0)
    l[:, 0] = 5.0
    if E > 1:
        l[:, 1] = torch.linspace(0, 4, T) if T else l[:, 1]
    return l


def all_to_first(T, E):
    """Every token to expert 0 only (top-1): every other expert and rank gets no rows."""
    l = torch.full((T, E), -30.0)
    l[:, 0] = 10.0
    return l


class Counting(LoopBackend):
    """A custom backend: its fused entry records (rows, experts, top_k) of every call."""

    name = "counting"
    calls: ClassVar[list] = []

    def fused(self, x_TD, w_up, w_down, plan, topk_weights_TK, **kw):
        Counting.calls.append((x_TD.shape[0], plan.num_experts, plan.top_k))
        return self.staged_experts(x_TD, w_up, w_down, plan, topk_weights_TK, **kw)


def backend_scenarios(rank):
    """The local experts run through the experts' own backend: a backend registered under a
    new name, and (Triton installed; this group runs under TRITON_INTERPRET=1) the triton
    backend's fused kernels, forward and backward, equal to the single-process layer."""
    register_backend("counting", Counting.Config)
    Counting.calls.clear()
    scenario({"num_chunks": 2}, dict(E=4, K=2, bias=True, backend="counting"), [5, 4], tag="custom-backend")
    # on each rank, per chunk: one group of the layer's 2 local experts (one expert each) on
    # the received rows (one slot per row)
    local = [e for _, e, k in Counting.calls if k == 1]
    assert local == [1, 1], Counting.calls
    try:
        from moekit.ops import TritonBackend
        from moekit.ops.triton import ops as triton_ops
    except ImportError:  # pragma: no cover - Triton not installed
        return
    from moekit.ops.triton import chunked as triton_chunked

    calls = []
    real = triton_ops.FusedExperts.apply
    real_chunk = triton_chunked.TritonChunks.forward
    triton_ops.FusedExperts.apply = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    triton_chunked.TritonChunks.forward = (
        lambda self, c, x, *a, **k: calls.append(("chunk", c)) or real_chunk(self, c, x, *a, **k))
    try:
        for chunks in (1, 2):
            calls.clear()
            scenario({"num_chunks": chunks}, dict(E=4, K=2, bias=True, dim=16, hidden=8,
                                                  backend=TritonBackend.Config(dgrad="split")),
                     [3, 2], tag=f"triton-chunks={chunks}")
            # the single-process layer's call, then the local experts' chunks on the kernels
            assert calls[0] == 5 and calls[1:] == [("chunk", c) for c in range(chunks)], calls
    finally:
        triton_ops.FusedExperts.apply = real
        triton_chunked.TritonChunks.forward = real_chunk
    # frozen up projection: its grads are not made, the rest as on one process
    moe = make_moe(4, E=4, K=2, bias=True, backend=TritonBackend.Config(dgrad="split"))
    moe.experts.gate_up_proj.requires_grad_(False)
    ref = copy.deepcopy(moe)
    apply_ep(moe, num_chunks=2)
    xs, gs, ls = inputs(4, [3, 2], moe.dim)
    compare(ref, moe, xs, gs, ls, rank, tag="triton-frozen-up")
    assert moe.experts.gate_up_proj.grad is None and moe.experts.down_proj.grad is not None


# ----------------------------------------------------------------------------- scenarios
def scenarios_2(rank):
    backend_scenarios(rank)
    # even split, different T per rank, biases, gated silu
    scenario({}, dict(E=4, K=2, bias=True), [5, 7], tag="even")
    # chunked overlap (3 chunks: one is empty on rank 0), local shared experts with gate
    # (the local shared experts run inside the pipeline, beside the exchanges)
    moe, _ = scenario({"num_chunks": 3}, dict(E=4, K=2, bias=True, shared=True, shared_gate=True), [2, 9],
                      tag="chunks")
    assert moe.dispatch.overlaps_shared(moe.shared_experts)
    # uneven split (E=5), non-gated relu2, routing weight on the input, biases, chunked
    scenario({"num_chunks": 2}, dict(E=5, K=2, activation="relu2", bias=True, weight_on="input"), [6, 4],
             tag="uneven-input")
    # top_k = E
    scenario({}, dict(E=3, K=3, bias=True), [4, 3], tag="topk=E")
    # redundant placement from skewed loads, chunked
    pl = placement.redundant(torch.tensor([100.0, 5, 1, 60]), 2, 2)
    assert pl.num_slots == 6 and len(pl.replicas(0)) == 2, pl
    scenario({"placement": pl, "num_chunks": 2}, dict(E=4, K=2, bias=True), [8, 5], tag="redundant")
    # zero rows: all tokens to expert 0 (rank 0); rank 1 receives nothing; T=0 on rank 1
    scenario({}, dict(E=4, K=1, bias=True), [6, 0], logits_fn=all_to_first, tag="zero-rows,T=0")
    scenario({"num_chunks": 2}, dict(E=4, K=2, bias=True), [0, 5], logits_fn=skewed_logits, tag="dead-experts")
    # T=0 on every rank (no hang, zero output)
    scenario({}, dict(E=4, K=2), [0, 0], tag="all-empty")
    # capacity: drops identical to the single-process layer (position and weight policies)
    scenario({}, dict(E=4, K=2, bias=True, capacity=0.6), [7, 5], tag="capacity-position")
    scenario({}, dict(E=4, K=2, bias=True, capacity=0.6, drop="weight", weight_on="output"), [7, 5],
             tag="capacity-weight")
    # capacity with chunks: each expert's rows are all in its chunk, in the global token order
    scenario({"num_chunks": 2}, dict(E=4, K=2, bias=True, capacity=0.6), [7, 5], tag="capacity-chunks")
    scenario({"num_chunks": 3}, dict(E=6, K=2, capacity=0.5, drop="weight"), [6, 7],
             tag="capacity-weight-chunks")
    # external shared experts on rank 0 (which holds no routed experts)
    scenario({"shared_experts": "external", "num_chunks": 2}, dict(E=4, K=2, bias=True, shared=True,
             shared_gate=True), [5, 6], tag="external-shared")
    # rebalance: measure loads, replicate the hottest, move weights; still exact (twice)
    moe, ref = scenario({}, dict(E=4, K=2, bias=True), [6, 6], logits_fn=skewed_logits, tag="pre-rebalance")
    new = rebalance(moe, num_redundant=2)
    assert new.num_redundant == 2 and len(new.replicas(0)) == 2, new
    xs, gs, ls = inputs(7, [6, 6], moe.dim, moe.num_experts, skewed_logits)
    compare(ref, moe, xs, gs, ls, rank, tag="rebalanced")
    # the optimizer step keeps replicas identical (their grads were summed)
    opt = torch.optim.SGD(moe.parameters(), lr=0.1)
    opt_ref = torch.optim.SGD(ref.parameters(), lr=0.1)
    opt.step()
    opt_ref.step()
    zero_grads(moe, ref)
    xs, gs, ls = inputs(8, [3, 7], moe.dim, moe.num_experts, skewed_logits)
    compare(ref, moe, xs, gs, ls, rank, tag="after-step")
    # rebalance with the optimizer: Adam's moments move with their experts (a new replica
    # copies its source's), so training continues exactly as the single-process layer's
    moe, ref = scenario({}, dict(E=4, K=2, bias=True), [6, 6], logits_fn=skewed_logits, tag="adam-0")
    opt = torch.optim.Adam(moe.parameters(), lr=0.05)
    opt_ref = torch.optim.Adam(ref.parameters(), lr=0.05)
    for it in range(2):
        opt.step()
        opt_ref.step()
        zero_grads(moe, ref)
        xs, gs, ls = inputs(20 + it, [5, 7], moe.dim, moe.num_experts, skewed_logits)
        compare(ref, moe, xs, gs, ls, rank, tag=f"adam-{it + 1}")
    opt.step()
    opt_ref.step()
    zero_grads(moe, ref)
    old_params = set(map(id, moe.experts.parameters()))
    rebalance(moe, num_redundant=2, optimizer=opt)
    held = {id(p) for g in opt.param_groups for p in g["params"]}
    assert not (old_params & held) and all(id(p) in held for p in moe.experts.parameters())
    for it in range(3):
        xs, gs, ls = inputs(30 + it, [6, 5], moe.dim, moe.num_experts, skewed_logits)
        compare(ref, moe, xs, gs, ls, rank, tag=f"adam-rebalanced-{it}")
        opt.step()
        opt_ref.step()
        zero_grads(moe, ref)
    # state it cannot move is refused before anything moves
    opt.state[moe.experts.down_proj]["odd"] = torch.zeros(3)
    try:
        rebalance(moe, optimizer=opt)
    except ValueError as exc:
        assert "'odd'" in str(exc), exc
    else:
        raise AssertionError("rebalance moved an optimizer state it cannot move")
    # inputs that need no grad on one rank: that rank still joins the backward exchanges
    moe = make_moe(5, E=4, K=2, bias=True)
    ref = copy.deepcopy(moe)
    apply_ep(moe)
    xs, gs, _ = inputs(5, [5, 4], moe.dim)
    run_ref(ref, xs, gs, None)
    x = xs[rank].clone().requires_grad_(rank == 0)
    (moe(x) * gs[rank]).sum().backward()
    for name in moe.experts.weight_names():
        for j, e in enumerate(moe.experts.local_experts):
            close(getattr(moe.experts, name).grad[j], getattr(ref.experts, name).grad[e], f"no-grad input: {name}")
    # another transport plugs in through the Dispatcher interface
    class Counting(AllToAllDispatcher):
        calls = 0

        def dispatch(self, x, layout, *, async_op=False, out=None):
            Counting.calls += 1
            return super().dispatch(x, layout, async_op=async_op)  # ignores out: the caller copies

    scenario({"dispatcher": Counting(), "num_chunks": 2}, dict(E=4, K=2), [4, 5], tag="custom-dispatcher")
    assert Counting.calls == 4, Counting.calls  # each chunk's rows out, and its output grads
    # a DeviceMesh works as the group
    from torch.distributed.device_mesh import init_device_mesh
    mesh = init_device_mesh("cpu", (2,), mesh_dim_names=("ep",))
    scenario({"group": mesh}, dict(E=4, K=2), [3, 4], tag="mesh")
    # mismatched configs are an error on every rank, not a hang
    moe = make_moe(0, E=4, K=2)
    with pytest.raises(ValueError, match="num_chunks"):
        apply_ep(moe, num_chunks=1 + rank)
    moe = make_moe(rank, E=4, K=2)  # different weights
    with pytest.raises(ValueError, match="weights_checksum"):
        apply_ep(moe)
    moe = make_moe(0, E=4 + rank, K=2)  # different config
    with pytest.raises(ValueError, match="disagree"):
        apply_ep(moe)
    # no-grad (inference) path
    moe = make_moe(3, E=4, K=2)
    ref = copy.deepcopy(moe)
    apply_ep(moe, num_chunks=2)
    xs, _, _ = inputs(3, [4, 6], moe.dim)
    with torch.no_grad():
        close(moe(xs[rank]), ref(torch.cat(xs))[sum(x.shape[0] for x in xs[:rank]):][: xs[rank].shape[0]],
              "no_grad output")


def token_scenarios(rank):
    """The token exchange (each token once per (chunk, rank), partial sums back): the same
    equalities as the row exchange, fp32 partials and partials in the input dtype."""
    tk = {"exchange": "tokens"}
    scenario(tk, dict(E=4, K=2, bias=True), [5, 7], tag="tokens-even")
    moe, _ = scenario({**tk, "num_chunks": 3}, dict(E=4, K=2, bias=True, shared=True, shared_gate=True),
                      [2, 9], tag="tokens-chunks-shared")
    assert moe.dispatch.overlaps_shared(moe.shared_experts)
    scenario({**tk, "num_chunks": 2}, dict(E=5, K=2, activation="relu2", bias=True, weight_on="input"),
             [6, 4], tag="tokens-uneven-input")
    scenario(tk, dict(E=3, K=3, bias=True), [4, 3], tag="tokens-topk=E")
    pl = placement.redundant(torch.tensor([100.0, 5, 1, 60]), 2, 2)
    scenario({**tk, "placement": pl, "num_chunks": 2}, dict(E=4, K=2, bias=True), [8, 5], tag="tokens-redundant")
    scenario(tk, dict(E=4, K=1, bias=True), [6, 0], logits_fn=all_to_first, tag="tokens-zero-rows,T=0")
    scenario({**tk, "num_chunks": 2}, dict(E=4, K=2, bias=True), [0, 5], logits_fn=skewed_logits,
             tag="tokens-dead-experts")
    scenario(tk, dict(E=4, K=2), [0, 0], tag="tokens-all-empty")
    scenario(tk, dict(E=4, K=2, bias=True, capacity=0.6), [7, 5], tag="tokens-capacity-position")
    scenario({**tk, "num_chunks": 3}, dict(E=6, K=2, capacity=0.5, drop="weight"), [6, 7],
             tag="tokens-capacity-weight-chunks")
    scenario({**tk, "shared_experts": "external", "num_chunks": 2},
             dict(E=4, K=2, bias=True, shared=True, shared_gate=True), [5, 6], tag="tokens-external-shared")
    scenario({**tk, "partials": "input"}, dict(E=4, K=3, bias=True), [5, 7], tag="tokens-partials-input")
    # fp64: the partial sums travel in fp64 ("float32" means at least fp32): equal to ~1e-12
    moe = make_moe(7, E=4, K=3, bias=True, backend="loop").double()
    ref = copy.deepcopy(moe)
    apply_ep(moe, exchange="tokens")
    xs, gs, _ = inputs(7, [5, 4], moe.dim)
    xs, gs = [x.double() for x in xs], [g.double() for g in gs]
    y_ref, gx_ref = run_ref(ref, xs, gs, None)
    y, gx = run_ep(moe, xs, gs, None, rank)
    a = 5 * rank
    for what, got, want in (("output", y, y_ref[a:a + xs[rank].shape[0]]),
                            ("x grad", gx, gx_ref[a:a + xs[rank].shape[0]])):
        err = (got - want).abs().max().item()
        assert err < 1e-12, f"tokens-fp64 {what}: {err:.3e}"
    # (the router computes in fp32 by design: its grad carries fp32 rounding either way)
    sync_replicated_grads(moe)
    want = ref.router.gate.weight.grad
    err = (moe.router.gate.weight.grad - want).abs().max().item()
    assert err < 1e-6 * want.abs().max().item(), f"tokens-fp64 router grad: {err:.3e}"
    # the grouped_mm backend ran above; the loop backend, and the triton kernels (TritonChunks
    # with routing weights; this group runs under TRITON_INTERPRET=1)
    scenario({**tk, "num_chunks": 2}, dict(E=4, K=3, bias=True, backend="loop"), [5, 4], tag="tokens-loop")
    try:
        from moekit.ops import TritonBackend
    except ImportError:  # pragma: no cover - Triton not installed
        return
    from moekit.ops.triton import chunked as triton_chunked

    calls = []
    real_chunk = triton_chunked.TritonChunks.forward
    triton_chunked.TritonChunks.forward = (
        lambda self, c, x, *a, **k: calls.append((c, k.get("weights") is not None)) or real_chunk(
            self, c, x, *a, **k))
    try:
        for chunks, dgrad in ((1, "split"), (2, "fused")):
            calls.clear()
            scenario({**tk, "num_chunks": chunks}, dict(E=4, K=3, bias=True, dim=16, hidden=8,
                                                        backend=TritonBackend.Config(dgrad=dgrad)),
                     [3, 2], tag=f"tokens-triton-chunks={chunks}")
            assert calls == [(c, True) for c in range(chunks)], calls
        calls.clear()
        scenario({**tk, "num_chunks": 2}, dict(E=4, K=2, capacity=0.6, dim=16, hidden=8,
                                               backend=TritonBackend.Config(dgrad="split")),
                 [5, 4], tag="tokens-triton-capacity")
    finally:
        triton_chunked.TritonChunks.forward = real_chunk
    # the exchange sends each token once per destination: with E=4, K=3 over 2 ranks (two
    # experts each) every token has an expert on each rank, so 5 tokens -> 10 rows, not 15
    moe = make_moe(6, E=4, K=3)
    apply_ep(moe, exchange="tokens")
    x = torch.randn(5, moe.dim)
    moe(x)
    assert [lay.num_send for lay in moe.dispatch.last_layouts] == [10], moe.dispatch.last_layouts


def scenarios_4(rank):
    scenario({"num_chunks": 2}, dict(E=8, K=3, bias=True), [3, 0, 5, 9], tag="w4-even")
    pl = placement.redundant(torch.tensor([50.0, 1, 2, 30, 3, 4]), 4, 3)
    scenario({"placement": pl}, dict(E=6, K=2, bias=True, weight_on="input"), [4, 6, 1, 5], tag="w4-redundant")
    scenario({"placement": pl, "num_chunks": 3}, dict(E=6, K=2), [4, 6, 0, 5], tag="w4-redundant-chunks")
    scenario({}, dict(E=6, K=2, bias=True, capacity=0.5), [5, 3, 6, 2], tag="w4-capacity")
    # uneven: 7 experts over 4 ranks; one rank gets only dead experts
    scenario({}, dict(E=7, K=2), [4, 4, 4, 4], logits_fn=skewed_logits, tag="w4-uneven-dead")
    # two external shared ranks (their grads summed by sync_replicated_grads), 5 experts on 2 ranks
    scenario({"shared_experts": "external", "num_shared_ranks": 2},
             dict(E=5, K=2, bias=True, shared=True), [3, 4, 0, 6], tag="w4-external-shared")
    # TP region: tp groups {0,1} and {2,3} hold replicated activations
    tp_scenario(rank)
    scenario({"exchange": "tokens", "num_chunks": 2}, dict(E=8, K=3, bias=True), [3, 0, 5, 9], tag="w4-tokens")
    scenario({"exchange": "tokens", "placement": pl}, dict(E=6, K=2, bias=True, weight_on="input"),
             [4, 6, 1, 5], tag="w4-tokens-redundant")
    scenario({"exchange": "tokens", "shared_experts": "external", "num_shared_ranks": 2},
             dict(E=6, K=2, shared=True), [3, 4, 5, 2], tag="w4-tokens-external-shared-2")


def scenarios_8(rank):
    Ts = [3, 0, 5, 2, 7, 1, 4, 6]
    scenario({"num_chunks": 2}, dict(E=16, K=4, bias=True), Ts, tag="w8-even")
    pl = placement.redundant(torch.tensor([40.0, 1, 2, 3, 30, 4, 5, 6, 7, 8, 20]), 8, 5)
    scenario({"placement": pl}, dict(E=11, K=3, bias=True), Ts, tag="w8-redundant-uneven")
    scenario({"shared_experts": "external"}, dict(E=12, K=2, shared=True), Ts, tag="w8-external-shared")


def tp_scenario(rank):
    W = dist.get_world_size()
    groups = [dist.new_group([0, 1]), dist.new_group([2, 3])]
    tg = rank // 2
    for chunks, Ts, exchange in ((1, [7, 4], "rows"), (2, [5, 0], "rows"), (2, [7, 4], "tokens")):
        moe = make_moe(11, E=8, K=2, bias=True, shared=True, shared_gate=True)
        ref = copy.deepcopy(moe)
        apply_ep(moe, tp_group=groups[tg], shared_experts="tp", num_chunks=chunks, exchange=exchange)
        assert not moe.dispatch.overlaps_shared(moe.shared_experts)  # they hold a collective
        xs, gs, _ = inputs(11, Ts, moe.dim)
        y_ref, gx_ref = run_ref(ref, xs, gs, None)
        x = xs[tg].clone().requires_grad_()
        y = moe(x)
        (y * gs[tg]).sum().backward()
        a = sum(Ts[:tg])
        tag = f"tp chunks={chunks} {exchange}"
        close(y.detach(), y_ref[a:a + Ts[tg]], f"{tag}: output")
        close(x.grad, gx_ref[a:a + Ts[tg]], f"{tag}: x grad")
        ep = moe.experts
        for name in ep.weight_names():
            for j, e in enumerate(ep.local_experts):
                close(getattr(ep, name).grad[j], getattr(ref.experts, name).grad[e], f"{tag}: {name}.grad[{e}]")
        with pytest.raises(ValueError, match="data-parallel"):
            sync_replicated_grads(moe)  # ambiguous inside a TP region: needs the DP group
        # router: replicated over TP, data-parallel over the TP groups
        for p, q in zip(moe.router.parameters(), ref.router.parameters()):
            g = p.grad.clone()
            dist.all_reduce(g)
            close(g / 2, q.grad, f"{tag}: router grad")
        # shared experts: shard i of TP; sum over the TP groups
        sh = moe.shared_experts
        lo, hi = sh.hidden_slice
        for name, sl in (("gate_proj", (slice(lo, hi),)), ("up_proj", (slice(lo, hi),)),
                         ("down_proj", (slice(None), slice(lo, hi))), ("expert_gate", (slice(None),))):
            g = getattr(sh.inner, name).weight.grad.clone()
            dist.all_reduce(g)
            if name == "expert_gate":
                g = g / 2  # replicated over TP as well
            else:
                # sum over the two TP groups of the same shard: remove the other shard's ranks
                mine = getattr(sh.inner, name).weight.grad.clone()
                gl = [torch.zeros_like(mine) for _ in range(W)]
                dist.all_gather(gl, mine)
                g = gl[rank % 2] + gl[rank % 2 + 2]
            close(g, getattr(ref.shared_experts, name).weight.grad[sl], f"{tag}: shared {name} grad")


# ----------------------------------------------------------------------------- harness
def _worker(rank, world, port, which):
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        {"2": scenarios_2, "2t": token_scenarios, "4": scenarios_4, "8": scenarios_8}[which](rank)
        dist.barrier()
    except BaseException:
        traceback.print_exc()
        raise
    finally:
        dist.destroy_process_group()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(world, which, deadline_s=150, env=None):
    old = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})  # the spawned processes start with it
    try:
        ctx = mp.spawn(_worker, args=(world, _free_port(), which), nprocs=world, join=False)
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k)
            else:
                os.environ[k] = v
    t0 = time.time()
    while not ctx.join(timeout=2):
        if time.time() - t0 > deadline_s:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
            pytest.fail(f"{world}-process expert-parallel test did not finish in {deadline_s}s (hang?)")


def test_ep_2_ranks():
    _spawn(2, "2", env={"TRITON_INTERPRET": "1"})  # the triton backend on CPU, for its scenario


def test_ep_tokens_2_ranks():
    _spawn(2, "2t", env={"TRITON_INTERPRET": "1"})


def test_ep_4_ranks():
    _spawn(4, "4")


def test_ep_8_ranks():
    _spawn(8, "8")


# ----------------------------------------------------------------------------- single process
def test_placements():
    p = placement.contiguous(8, 4)
    assert p.slots == ((0, 1), (2, 3), (4, 5), (6, 7)) and p.num_redundant == 0
    p = placement.contiguous(7, 3)
    assert p.slots == ((0, 1, 2), (3, 4), (5, 6))
    p = placement.contiguous(5, 3, num_shared_ranks=1)
    assert p.slots == ((), (0, 1, 2), (3, 4)) and p.shared_ranks == (0,)
    p = placement.redundant([10, 0, 0, 90], 2, 2)
    assert p.num_slots == 6 and len(p.replicas(3)) == 2 and len(p.replicas(0)) == 2
    assert sorted(p.slot_counts) == [3, 3]
    for r in p.slots:
        assert len(set(r)) == len(r)
    with pytest.raises(ValueError, match="on no rank"):
        placement.Placement(3, ((0,), (1,)))
    with pytest.raises(ValueError, match="num_shared_ranks"):
        placement.contiguous(4, 2, num_shared_ranks=2)
    with pytest.raises(ValueError, match="num_redundant"):
        placement.redundant([1, 1], 2, 5)


def test_apply_ep_needs_distributed():
    moe = make_moe(0, E=4, K=2)
    if dist.is_initialized():  # pragma: no cover
        pytest.skip("a process group is already initialized")
    with pytest.raises(RuntimeError, match="init_process_group"):
        apply_ep(moe)
