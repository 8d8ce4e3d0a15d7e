"""The experts-backend interface: backends chosen by name or by config, the registry (any
name), ``auto``'s choice, a custom backend in the layer, and the routing plan of the loop
backend never touching Triton. (The triton backend's settings are tested under the
interpreter in test_triton_kernels.py; a custom backend under expert parallelism in
test_parallel.py.)"""

from __future__ import annotations

import sys
from dataclasses import dataclass

import pytest
import torch

from moekit import GroupedExperts, MoE, TokenChoiceTopKRouter
from moekit.ops import (
    ExpertsBackend,
    GroupedMMBackend,
    LoopBackend,
    TritonBackend,
    auto_backend,
    backend_names,
    moe_experts,
    register_backend,
    resolve_backend,
)
from moekit.ops import backends as backends_mod
from moekit.plan import make_plan

from reference import moe_experts_ref


class Recording(LoopBackend):
    """A custom backend: a fused entry that records its calls and runs the staged loop."""

    name = "recording"

    @dataclass(kw_only=True)
    class Config(LoopBackend.Config):
        scale: float = 1.0

        def __post_init__(self) -> None:
            super().__post_init__()
            if self.scale <= 0:
                raise ValueError(f"Recording.Config.scale={self.scale!r}; it must be > 0")

    def __init__(self, config=None):
        super().__init__(config)
        self.calls: list[tuple[int, int, int]] = []

    def fused(self, x_TD, w_up, w_down, plan, topk_weights_TK, **kw):
        self.calls.append((x_TD.shape[0], plan.num_experts, plan.top_k))
        return self.staged_experts(x_TD, w_up, w_down, plan, topk_weights_TK, **kw) * self.config.scale


@pytest.fixture
def registry(monkeypatch):
    """A copy of the backend registry for the test (registrations are undone after it)."""
    monkeypatch.setattr(backends_mod, "_REGISTRY", dict(backends_mod._REGISTRY))
    return backends_mod._REGISTRY


def _case(T=9, D=8, F=6, E=4, K=2, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g)
    wu = torch.randn(E, 2 * F, D, generator=g) / D**0.5
    wd = torch.randn(E, D, F, generator=g) / F**0.5
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)])
    w = torch.rand(T, K, generator=g) + 0.1
    return x, wu, wd, ids, w


def test_names_configs_and_objects_resolve_to_backends():
    cpu = torch.device("cpu")
    assert isinstance(resolve_backend("loop", cpu, torch.float32), LoopBackend)
    assert isinstance(resolve_backend(GroupedMMBackend.Config(), cpu, torch.float32), GroupedMMBackend)
    b = LoopBackend()
    assert resolve_backend(b, cpu, torch.float32) is b
    assert set(backend_names()) >= {"auto", "loop", "grouped_mm", "triton"}
    with pytest.raises(ValueError, match=r"backend='nope' is unknown; allowed: \('auto', 'loop'"):
        resolve_backend("nope", cpu, torch.float32)
    with pytest.raises(TypeError, match="backend must be a name"):
        resolve_backend(3, cpu, torch.float32)
    with pytest.raises(ValueError, match="cannot run on cpu with torch.int32"):
        resolve_backend("grouped_mm", cpu, torch.int32)
    with pytest.raises(TypeError, match="takes a LoopBackend.Config"):
        LoopBackend(GroupedMMBackend.Config())


def test_auto_choice():
    cpu = torch.device("cpu")
    assert isinstance(auto_backend(cpu, torch.float32), GroupedMMBackend)
    assert isinstance(auto_backend(cpu, torch.float64), LoopBackend)  # grouped_mm has no float64


def test_grouped_experts_config_takes_names_and_backend_configs():
    cfg = GroupedExperts.Config(backend=TritonBackend.Config(dgrad="split", fused_decode_tokens=4))
    d = cfg.to_dict()["backend"]
    assert d["name"] == "triton" and d["dgrad"] == "split" and d["fused_decode_tokens"] == 4
    assert GroupedExperts.Config(backend=LoopBackend.Config()).to_dict()["backend"] == {"name": "loop"}
    with pytest.raises(ValueError, match=r"GroupedExperts.Config.backend='nope' is not supported; allowed: \('auto'"):
        GroupedExperts.Config(backend="nope")
    with pytest.raises(TypeError, match="must be a backend name"):
        GroupedExperts.Config(backend=LoopBackend())
    with pytest.raises(ValueError, match="dgrad='both'"):
        TritonBackend.Config(dgrad="both")


def test_register_backend_any_name(registry):
    with pytest.raises(ValueError, match="'auto' is reserved"):
        register_backend("auto", LoopBackend.Config)
    with pytest.raises(TypeError, match="expected an ExpertsBackend.Config"):
        register_backend("x", 3)
    register_backend("my.experts/v2", Recording.Config(scale=2.0))
    assert "my.experts/v2" in backend_names()
    x, wu, wd, ids, w = _case()
    y = moe_experts(x, wu, wd, ids, w, backend="my.experts/v2")
    torch.testing.assert_close(y, 2 * moe_experts_ref(x, wu, wd, ids, w), rtol=1e-5, atol=1e-5)


def test_custom_backend_runs_the_layer(registry):
    """A backend registered under a new name is a config choice of GroupedExperts and MoE: its
    fused entry runs the experts (forward and backward equal the loop backend's)."""
    register_backend("recording", Recording.Config)
    cfg = MoE.Config(dim=8, hidden_dim=6, num_experts=4, router=TokenChoiceTopKRouter.Config(top_k=2),
                     experts=GroupedExperts.Config(backend="recording", use_bias=True))
    moe = cfg.build()
    ref = MoE.Config(**{**cfg.__dict__, "experts": cfg.experts.replace(backend="loop")}).build()
    ref.load_state_dict(moe.state_dict())
    x = torch.randn(7, 8)
    y, y_ref = moe(x), ref(x)
    torch.testing.assert_close(y, y_ref, rtol=0, atol=0)
    y.square().sum().backward()
    y_ref.square().sum().backward()
    for (n, p), q in zip(moe.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=0, atol=0, msg=n)
    backend = moe.experts.backend_for(x.device, x.dtype)
    assert isinstance(backend, Recording) and backend.calls == [(7, 4, 2)]


def test_loop_plan_never_touches_triton(monkeypatch):
    """make_plan, the loop backend's plan and a loop layer run with Triton unimportable (any
    import of it would raise)."""
    for mod in [m for m in sys.modules if m == "triton" or m.startswith(("triton.", "moekit.ops.triton."))]:
        monkeypatch.setitem(sys.modules, mod, None)
    monkeypatch.setitem(sys.modules, "triton", None)
    monkeypatch.setitem(sys.modules, "moekit.ops.triton", None)
    ids = torch.tensor([[0, 2], [1, 2], [2, 0]])
    ref = make_plan(ids, 3)
    plan = LoopBackend().make_plan(ids, 3)
    assert torch.equal(plan.sorted_slots_N, ref.sorted_slots_N) and torch.equal(plan.counts_E, ref.counts_E)
    ex = GroupedExperts.Config(backend="loop").build(dim=8, hidden_dim=4, num_experts=3)
    x = torch.randn(3, 8)
    assert ex(x, ids, torch.ones(3, 2)).shape == (3, 8)
    # the triton backend reports itself unavailable, saying what to install
    assert not TritonBackend().available(torch.device("cpu"), torch.float32)
    with pytest.raises(ValueError, match="pip install 'moekit\\[triton\\]'"):
        resolve_backend("triton", torch.device("cpu"), torch.float32)


def test_plan_capacity_argument():
    """capacity= gives the rows per expert directly (expert parallelism's received rows use
    the capacity of the whole layer's batch): the same plan as the equivalent factor."""
    ids = torch.tensor([[0], [0], [1], [0], [1], [0]])
    w = torch.tensor([[0.1], [0.9], [0.5], [0.7], [0.2], [0.3]])
    for policy in ("position", "weight"):
        a = make_plan(ids, 2, capacity=2, drop_policy=policy, topk_weights_TK=w)
        b = make_plan(ids, 2, capacity_factor=2 / 3, drop_policy=policy, topk_weights_TK=w)
        assert a.capacity == b.capacity == 2
        for f in ("sorted_slots_N", "counts_E", "inverse_TK", "num_dropped"):
            assert torch.equal(getattr(a, f), getattr(b, f)), (policy, f)
    with pytest.raises(ValueError, match="not both"):
        make_plan(ids, 2, capacity=2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="capacity=-1"):
        make_plan(ids, 2, capacity=-1)


def test_backend_base_is_abstract():
    b = ExpertsBackend()
    with pytest.raises(NotImplementedError):
        b.available(torch.device("cpu"), torch.float32)
    with pytest.raises(NotImplementedError):
        b.grouped_linear(torch.zeros(0, 2), torch.zeros(1, 2, 2), make_plan(torch.zeros(0, 1, dtype=torch.long), 1))
