"""SharedExperts vs the per-token reference: forward and grads, with and without the gate."""

from __future__ import annotations

import pytest
import torch

from moekit import SharedExperts

from reference import assert_close, assert_tolerance_rule, shared_ref


def build(hidden=7, dim=13, **kw):
    torch.manual_seed(0)
    s = SharedExperts.Config(hidden_dim=hidden, **kw).build(dim=dim)
    with torch.no_grad():
        for p in s.parameters():
            p.normal_(0, 0.4)
    return s


def params(s, dtype):
    def g(lin):
        return None if lin is None else lin.weight.detach().to(dtype, copy=True).requires_grad_(True)
    return [g(s.gate_proj), g(s.up_proj), g(s.down_proj), g(s.expert_gate)]


@pytest.mark.parametrize("use_gate", [False, True])
@pytest.mark.parametrize("activation,gated", [("silu", None), ("gelu", None), ("gpt_oss", None),
                                              ("relu2", None), ("silu", False)])
def test_shared_vs_reference_fp32(use_gate, activation, gated):
    s = build(activation=activation, gated=gated, use_gate=use_gate)
    x = torch.randn(9, 13, requires_grad=True)
    y = s(x)
    assert y.shape == x.shape
    g = torch.randn_like(y)
    y.backward(g)
    xr = x.detach().double().requires_grad_(True)
    P = params(s, torch.float64)
    y_ref = shared_ref(xr, *P, activation=activation)
    (y_ref * g.double()).sum().backward()
    assert_close(y, y_ref, 2e-5, "y")
    assert_close(x.grad, xr.grad, 2e-5, "grad x")
    for lin, p in zip((s.gate_proj, s.up_proj, s.down_proj, s.expert_gate), P):
        assert (lin is None) == (p is None)
        if lin is not None:
            assert_close(lin.weight.grad, p.grad, 2e-5)


@pytest.mark.parametrize("use_gate", [False, True])
def test_shared_bf16_tolerance_rule(use_gate):
    s = build(use_gate=use_gate).to(torch.bfloat16)
    x0 = torch.randn(16, 13, dtype=torch.float64)
    g = torch.randn(16, 13, dtype=torch.float64)
    x = x0.bfloat16().requires_grad_(True)
    y = s(x)
    (y.double() * g).sum().backward()
    out = {"y": y, "x": x.grad, **{f"w{i}": lin.weight.grad for i, lin in
                                   enumerate((s.gate_proj, s.up_proj, s.down_proj, s.expert_gate))
                                   if lin is not None}}

    def ref(dtype):
        xr = x0.to(dtype).requires_grad_(True)
        P = params(s, dtype)
        yr = shared_ref(xr, *P)
        (yr.double() * g).sum().backward()
        return {"y": yr, "x": xr.grad, **{f"w{i}": p.grad for i, p in enumerate(P) if p is not None}}

    plain, truth = ref(torch.bfloat16), ref(torch.float64)
    for k in out:
        assert_tolerance_rule(out[k], plain[k], truth[k], 2e-3, k)


def test_shared_gate_scales_output():
    s = build(use_gate=True)
    with torch.no_grad():
        s.expert_gate.weight.zero_()  # sigmoid(0) = 0.5
    s2 = SharedExperts.Config(hidden_dim=7).build(dim=13)
    s2.load_state_dict({k: v for k, v in s.state_dict().items() if not k.startswith("expert_gate")})
    x = torch.randn(4, 13)
    torch.testing.assert_close(s(x), 0.5 * s2(x))


def test_shared_zero_tokens_and_3d():
    s = build()
    assert s(torch.randn(0, 13)).shape == (0, 13)
    x = torch.randn(2, 3, 13)
    torch.testing.assert_close(s(x), s(x.reshape(6, 13)).reshape(2, 3, 13))


def test_shared_init_weights():
    s = SharedExperts.Config(hidden_dim=256, use_gate=True).build(dim=256)
    s.init_weights(init_std=0.05)
    assert abs(s.gate_proj.weight.std().item() - 0.02) < 0.02 * 0.05
    assert abs(s.down_proj.weight.std().item() - 0.05) < 0.05 * 0.05
    assert abs(s.up_proj.weight.std().item() - 0.05) < 0.05 * 0.05  # torchtitan: w3 like w2
    assert abs(s.expert_gate.weight.std().item() - 0.02) < 0.02 * 0.25  # only 256 values
    s.init_weights(init_std=0.05, out_std=0.01)
    assert abs(s.up_proj.weight.std().item() - 0.01) < 0.01 * 0.05
    assert abs(s.down_proj.weight.std().item() - 0.01) < 0.01 * 0.05
    assert s.gate_proj.bias is None and s.down_proj.bias is None
    plain = SharedExperts.Config(hidden_dim=256, activation="relu2").build(dim=256)
    plain.init_weights(init_std=0.05)  # non-gated: up is the first projection -> 0.02
    assert abs(plain.up_proj.weight.std().item() - 0.02) < 0.02 * 0.05
