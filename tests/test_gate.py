"""moekit.ops.gate: the fp32 gate matmul for bf16 inputs (tensor-core GEMM with fp32
accumulation forward; two-term bf16 split of the fp32 logit grad backward). On CPU the same
autograd function runs with an fp32 matmul in place of ``torch.mm(out_dtype=)``; the CUDA
path is checked in the GPU cases at the end (device tool)."""

from __future__ import annotations

import pytest
import torch

from moekit.ops import gate as G


def _inputs(T=64, D=96, E=16, seed=0, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=g).to(torch.bfloat16)
    w = (torch.randn(E, D, generator=g) * 0.05).to(torch.bfloat16)
    b = (torch.randn(E, generator=g) * 0.1).to(torch.bfloat16)
    gy = torch.randn(T, E, generator=g) * 1e-3
    return [t.to(device) for t in (x, w, b, gy)]


def _truth(x, w, b, gy):
    xd, wd, bd = (t.double().requires_grad_(True) for t in (x, w, b))
    y = xd @ wd.t() + bd
    return [y.detach()] + list(torch.autograd.grad(y, [xd, wd, bd], gy.double()))


def _check(x, w, b, gy):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    y = G.fp32_gate_logits(*leaves)
    assert y.dtype == torch.float32
    grads = torch.autograd.grad(y, leaves, gy)
    ty, tdx, tdw, tdb = _truth(x, w, b, gy)
    # forward: exact products, fp32 accumulation over D terms
    assert ((y.double() - ty).abs() <= 1e-6 * ty.abs().max()).all()
    for name, got, ref, t in zip(("dx", "dw", "db"), grads, (tdx, tdw, tdb), (x, w, b)):
        assert got.dtype == t.dtype, name
        # the grads are rounded once to bf16: within one bf16 rounding (2**-8 relative) of the
        # exact grad, plus the split's 2**-16 relative error on the fp32 logit grad
        tol = 2.0 ** -8 * ref.abs() + 2.0 ** -14 * ref.abs().max()
        assert ((got.double() - ref).abs() <= tol).all(), name


def test_split_is_two_bf16_terms_within_2e_minus_16():
    g = torch.randn(1000, dtype=torch.float32) * torch.logspace(-8, 3, 1000)
    hi, lo = G._split(g, torch.bfloat16)
    assert hi.dtype == lo.dtype == torch.bfloat16
    r = (g.double() - hi.double() - lo.double()).abs()
    assert (r <= 2.0 ** -16 * g.double().abs()).all()
    # a single bf16 rounding is not enough: the split does strictly better somewhere
    assert ((g.double() - hi.double()).abs() > 2.0 ** -12 * g.double().abs()).any()


def test_fp32_gate_matches_float64_on_cpu():
    _check(*_inputs())


def test_applies_only_to_bf16_on_cuda():
    x, w, _, _ = _inputs()
    assert not G.fp32_gate_applies(x, w)  # CPU: the router keeps its fp32 F.linear
    assert not G.fp32_gate_applies(x.float(), w.float())


gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.mark.gpu
@gpu
def test_fp32_gate_on_cuda():
    """DESIGN.md's tolerance rule against the fp32 GEMM of the upcast operands (what
    ``router_dtype=float32`` means), both against float64."""
    x, w, b, gy = _inputs(T=4096, D=2048, E=128, device="cuda")
    assert G.fp32_gate_applies(x, w)
    truth = _truth(x, w, b, gy)
    fast_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    plain_leaves = [t.detach().clone().requires_grad_(True) for t in (x, w, b)]
    fast_y = G.fp32_gate_logits(*fast_leaves)
    xp, wp, bp = plain_leaves
    plain_y = torch.nn.functional.linear(xp.float(), wp.float(), bp.float())
    fast = [fast_y.detach()] + list(torch.autograd.grad(fast_y, fast_leaves, gy))
    plain = [plain_y.detach()] + list(torch.autograd.grad(plain_y, plain_leaves, gy))
    for name, a, p, t in zip(("y", "dx", "dw", "db"), fast, plain, truth):
        assert a.dtype == p.dtype, name
        e_a = (a.double() - t).abs().max().item()
        e_p = (p.double() - t).abs().max().item()
        assert e_a <= 2 * e_p + 1e-6 * t.abs().max().item(), f"{name}: {e_a:.3e} vs plain {e_p:.3e}"


@pytest.mark.gpu
@gpu
def test_router_uses_it_and_matches_upcast_linear():
    from moekit.router import TokenChoiceTopKRouter

    r = TokenChoiceTopKRouter.Config(top_k=4).build(dim=256, num_experts=32).cuda().to(torch.bfloat16)
    x = torch.randn(512, 256, device="cuda", dtype=torch.bfloat16)
    ref = torch.nn.functional.linear(x.float(), r.gate.weight.float())
    torch.testing.assert_close(r.compute_logits(x), ref, rtol=1e-5, atol=1e-5)
