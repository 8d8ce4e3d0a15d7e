"""The triton experts backend on a CUDA GPU: bf16 at realistic shapes under the tolerance
rule, and torch.compile(fullgraph=True) over moe_experts. Skipped without CUDA (run them with
the device tool: ``PYTHONPATH=src python -m pytest -m gpu tests/test_triton_gpu.py``)."""

from __future__ import annotations

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
]
triton = pytest.importorskip("triton")

from moekit.ops import TritonBackend, moe_experts  # noqa: E402 - after the skips above


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


def _scale(t):
    return max(1.0, t.double().abs().max().item())


def _inputs(T, D, F, E, K, gated, dtype, bias, seed, skew=False):
    g = torch.Generator(device="cpu").manual_seed(seed)
    H = 2 * F if gated else F
    x = torch.randn(T, D, generator=g)
    w1 = torch.randn(E, H, D, generator=g) * D ** -0.5
    w2 = torch.randn(E, D, F, generator=g) * F ** -0.5
    b1 = torch.randn(E, H, generator=g) * 0.1 if bias else None
    b2 = torch.randn(E, D, generator=g) * 0.1 if bias else None
    scores = torch.randn(T, E, generator=g)
    if skew:  # a few hot experts, some empty
        scores[:, : E // 4] += 3.0
        scores[:, -2:] -= 100.0
    top = scores.topk(K, dim=-1)
    ids, wts = top.indices, torch.softmax(top.values, -1)
    f32 = [t if t is None else t.cuda() for t in (x, w1, w2, b1, b2, wts)]
    low = [t if t is None else t.cuda().to(dtype) for t in (x, w1, w2, b1, b2, wts)]
    return ids.cuda(), f32, low


def _run(backend, ids, ts, act, woi):
    x, w1, w2, b1, b2, wts = [t if t is None else t.detach().clone().requires_grad_(True) for t in ts]
    y = moe_experts(x, w1, w2, ids, wts, activation=act, gate_up_proj_bias=b1, down_proj_bias=b2,
                    backend=backend, weight_on_input=woi)
    g = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(3)).cuda().to(y.dtype)
    leaves = [t for t in (x, w1, w2, b1, b2, wts) if t is not None]
    grads = torch.autograd.grad(y, leaves, g)
    return [y.detach()] + list(grads)


CASES = [
    # (T, D, F, E, K, act, gated, bias, woi, skew)
    (4096, 2048, 768, 128, 8, "silu", True, False, False, False),  # qwen3-like
    (2048, 1024, 512, 32, 4, "gpt_oss", True, True, False, True),  # gpt-oss-like, hot experts
    (1024, 1024, 1536, 8, 2, "silu", True, False, False, False),  # mixtral-like
    (1000, 1000, 360, 16, 1, "relu2", False, False, True, False),  # odd dims, weight on input
    (513, 768, 256, 64, 8, "gelu_tanh", True, True, False, True),
    (64, 2048, 768, 128, 8, "silu", True, False, False, False),  # decode-sized
    (1, 2048, 768, 128, 8, "silu", True, False, False, False),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-D{c[1]}-F{c[2]}-E{c[3]}-K{c[4]}-{c[5]}")
@pytest.mark.parametrize("dtype", [torch.bfloat16])
def test_bf16_tolerance_rule(case, dtype):
    T, D, F, E, K, act, gated, bias, woi, skew = case
    ids, f32, low = _inputs(T, D, F, E, K, gated, dtype, bias, seed=T + D, skew=skew)
    truth = _run("loop", ids, f32, act, woi)
    plain = _run("grouped_mm", ids, low, act, woi)
    fast = _run("triton", ids, low, act, woi)
    names = ["y", "dx", "dw_up", "dw_down"] + (["db_up", "db_down"] if bias else []) + ["dtopk"]
    for name, a, p, t in zip(names, fast, plain, truth):
        assert torch.isfinite(a).all(), name
        e_a, e_p, s = _err(a, t), _err(p, t), _scale(t)
        assert e_a <= 2 * e_p + 2e-3 * s, f"{name}: triton err {e_a:.3e} > 2 * plain {e_p:.3e} + atol"


def test_deterministic():
    ids, _, low = _inputs(2048, 1024, 512, 64, 8, True, torch.bfloat16, False, seed=5)
    a = _run("triton", ids, low, "silu", False)
    b = _run("triton", ids, low, "silu", False)
    for x, y in zip(a, b):
        assert torch.equal(x, y)


def test_empty_and_t0():
    ids, _, low = _inputs(0, 256, 128, 8, 2, True, torch.bfloat16, True, seed=1)
    out = _run("triton", ids, low, "silu", False)
    assert out[0].shape == (0, 256)
    assert all(torch.count_nonzero(g) == 0 for g in out[1:])


def test_compile_fullgraph():
    ids, _, low = _inputs(512, 512, 256, 16, 4, True, torch.bfloat16, True, seed=2)
    x, w1, w2, b1, b2, wts = [t.detach().clone().requires_grad_(True) for t in low]

    def f(x, w1, w2, b1, b2, ids, wts):
        return moe_experts(x, w1, w2, ids, wts, activation="silu", gate_up_proj_bias=b1,
                           down_proj_bias=b2, backend="triton")

    cf = torch.compile(f, fullgraph=True)
    y_c = cf(x, w1, w2, b1, b2, ids, wts)
    y_e = f(x, w1, w2, b1, b2, ids, wts)
    torch.testing.assert_close(y_c, y_e)
    g = torch.randn_like(y_c)
    gc = torch.autograd.grad(y_c, [x, w1, w2, b1, b2, wts], g)
    ge = torch.autograd.grad(y_e, [x, w1, w2, b1, b2, wts], g)
    for a, b in zip(gc, ge):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("pdl", ["0", "1"])
@pytest.mark.parametrize("T,bias,woi", [(1, False, False), (1, True, False), (3, True, True)])
def test_decode_fused_down_combine(pdl, T, bias, woi):
    """Inference at decode sizes (down + combine in one kernel, optionally launched as a
    programmatic dependent of the up kernel) under the tolerance rule, and bit-identical when
    replayed from a CUDA graph."""
    from moekit.plan import make_plan

    triton_b = TritonBackend.Config(fused_decode_tokens=4, pdl=pdl == "1")
    ids, f32, low = _inputs(T, 2048, 768, 128, 8, True, torch.bfloat16, bias, seed=T + 7)

    def fwd(backend, ts, plan=None):
        x, w1, w2, b1, b2, wts = ts
        with torch.no_grad():
            return moe_experts(x, w1, w2, ids, wts, activation="silu", gate_up_proj_bias=b1,
                               down_proj_bias=b2, backend=backend, weight_on_input=woi, plan=plan)

    truth, plain, fast = fwd("loop", f32), fwd("grouped_mm", low), fwd(triton_b, low)
    e_a, e_p, s = _err(fast, truth), _err(plain, truth), _scale(truth)
    assert e_a <= 2 * e_p + 2e-3 * s, f"triton err {e_a:.3e} > 2 * plain {e_p:.3e} + atol"
    plan = make_plan(ids, 128)
    fwd(triton_b, low, plan)  # compiled before the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fwd(triton_b, low, plan)
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(out, fast)


@pytest.mark.parametrize("T,K,E", [(1, 8, 128), (8, 8, 128), (64, 8, 128), (128, 8, 256), (5, 4, 32)])
def test_small_plan_on_cuda(monkeypatch, T, K, E):
    """The triton backend's plan on CUDA at decode sizes (one launch) equals make_plan's
    torch-op plan field by field."""
    from moekit.ops.triton import decode
    from moekit.plan import make_plan

    ids = torch.randn(T, E, device="cuda").topk(K, dim=-1).indices
    calls = []
    real = decode.small_plan
    monkeypatch.setattr(decode, "small_plan", lambda *a: calls.append(1) or real(*a))
    fast = TritonBackend().make_plan(ids, E)
    assert calls == [1]
    ref = make_plan(ids, E)
    for f in ("sorted_slots_N", "token_ids_N", "expert_ids_N", "counts_E", "offsets_E",
              "inverse_TK", "num_dropped"):
        a, b = getattr(fast, f), getattr(ref, f)
        assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b), f


@pytest.mark.parametrize("case", [CASES[0], CASES[1], CASES[3]], ids=["qwen3", "gpt_oss", "woi"])
def test_split_dgrad_bf16(monkeypatch, case):
    """The split dgrad (here through its environment override, MOEKIT_TRITON_DGRAD=split, as
    the benchmark's sweeps set it) under the same tolerance rule as the fused dgrad."""
    monkeypatch.setenv("MOEKIT_TRITON_DGRAD", "split")
    test_bf16_tolerance_rule(case, torch.bfloat16)


@pytest.mark.parametrize("dgrad", ["fused", "split"])
def test_interleaved_gate_up_bf16(dgrad):
    """GPT-OSS's interleaved gate/up layout (bias, hot experts) under the tolerance rule."""
    from reference import interleave_gate_up

    ids, f32, low = _inputs(2048, 1024, 512, 32, 4, True, torch.bfloat16, True, seed=17, skew=True)

    def il(ts):
        x, w1, w2, b1, b2, wts = ts
        return [x, interleave_gate_up(w1), w2, interleave_gate_up(b1), b2, wts]

    def run(backend, ts):
        x, w1, w2, b1, b2, wts = [t.detach().clone().requires_grad_(True) for t in il(ts)]
        y = moe_experts(x, w1, w2, ids, wts, activation="gpt_oss", gate_up_proj_bias=b1,
                        down_proj_bias=b2, backend=backend, gate_up_interleaved=True)
        g = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(3)).cuda().to(y.dtype)
        return [y.detach()] + list(torch.autograd.grad(y, [x, w1, w2, b1, b2, wts], g))

    truth, plain = run("loop", f32), run("grouped_mm", low)
    fast = run(TritonBackend.Config(dgrad=dgrad), low)
    names = ["y", "dx", "dw_up", "dw_down", "db_up", "db_down", "dtopk"]
    for name, a, p, t in zip(names, fast, plain, truth):
        e_a, e_p, s = _err(a, t), _err(p, t), _scale(t)
        assert e_a <= 2 * e_p + 2e-3 * s, f"{name}: triton err {e_a:.3e} > 2 * plain {e_p:.3e} + atol"


@pytest.mark.parametrize("F", [512, 2048], ids=["triton-dw", "cublas-dw"])
def test_transformers_gpt_oss_layout_bf16(F):
    """transformers' GPT-OSS storage: both weights ``(in, out)`` passed as transposed views,
    gate/up interleaved, biases; F = 2048 takes the cuBLAS weight-grad path. Tolerance rule
    against the staged grouped_mm path, and the weight grads come back in the parameters'
    layout (contiguous, no copy)."""
    from reference import interleave_gate_up

    ids, f32, low = _inputs(2048, 1024, F, 16, 4, True, torch.bfloat16, True, seed=23, skew=True)

    def run(backend, ts):
        x, w1, w2, b1, b2, wts = ts
        params = [x, interleave_gate_up(w1).transpose(1, 2).contiguous(),
                  w2.transpose(1, 2).contiguous(), interleave_gate_up(b1), b2, wts]
        leaves = [t.detach().clone().requires_grad_(True) for t in params]
        x, w1t, w2t, b1, b2, wts = leaves
        y = moe_experts(x, w1t.transpose(1, 2), w2t.transpose(1, 2), ids, wts,
                        activation="gpt_oss", gate_up_proj_bias=b1, down_proj_bias=b2,
                        backend=backend, gate_up_interleaved=True)
        g = torch.randn(y.shape, generator=torch.Generator(device="cpu").manual_seed(3)).cuda().to(y.dtype)
        return [y.detach()] + list(torch.autograd.grad(y, leaves, g))

    truth, plain, fast = run("loop", f32), run("grouped_mm", low), run("triton", low)
    assert fast[2].is_contiguous() and fast[3].is_contiguous()
    names = ["y", "dx", "dw_up", "dw_down", "db_up", "db_down", "dtopk"]
    for name, a, p, t in zip(names, fast, plain, truth):
        e_a, e_p, s = _err(a, t), _err(p, t), _scale(t)
        assert e_a <= 2 * e_p + 2e-3 * s, f"{name}: triton err {e_a:.3e} > 2 * plain {e_p:.3e} + atol"


@pytest.mark.parametrize("case", [CASES[0], CASES[2], CASES[3]], ids=["qwen3", "mixtral", "woi"])
def test_tensor_descriptors_match_pointer_loads(case):
    """tma=True (the default on Hopper at training sizes) and tma=False read the same tiles in
    the same order: the same bits, forward and backward."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("tensor descriptors (TMA) need compute capability >= 9")
    T, D, F, E, K, act, gated, bias, woi, skew = case
    ids, _, low = _inputs(T, D, F, E, K, gated, torch.bfloat16, bias, seed=11, skew=skew)
    for dgrad in ("fused", "split"):
        a = _run(TritonBackend.Config(tma=True, dgrad=dgrad), ids, low, act, woi)
        b = _run(TritonBackend.Config(tma=False, dgrad=dgrad), ids, low, act, woi)
        for i, (x, y) in enumerate(zip(a, b)):
            assert torch.equal(x, y), (dgrad, i, (x.double() - y.double()).abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("transposed", [False, True], ids=["eoi", "transposed"])
def test_gluon_weight_grad(dtype, transposed):
    """The warp-specialized Gluon weight-grad kernel (Hopper) against fp32 per-expert products,
    beside torch's grouped GEMM under the tolerance rule: uneven experts (row blocks that run
    into the next expert), experts without rows (exact zeros), O and I not multiples of the
    tile (clipped stores), and the transposed layout."""
    from moekit.ops.triton import gluon_rules
    from moekit.ops.triton import weight_grads as W

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs compute capability 9")
    counts = torch.tensor([300, 0, 1, 250, 0, 449, 64], device="cuda", dtype=torch.int32)
    offsets = counts.cumsum(0, dtype=torch.int32)
    N, O, I = int(counts.sum()), 200, 264
    g = torch.Generator(device="cpu").manual_seed(5)
    lm, rm = (torch.randn(N, n, generator=g).cuda().to(dtype) for n in (O, I))
    # auto: not at 152 rows per expert (below GLUON_MIN_ROWS_PER_EXPERT); True: wherever it can run
    assert gluon_rules.gluon_wanted({"gluon": (1,)}, lm, rm, 7)
    assert not gluon_rules.gluon_wanted(None, lm, rm, 7)
    truth = torch.stack([a.double().T @ b.double() for a, b in
                         zip(lm.split(counts.tolist()), rm.split(counts.tolist()))])
    fast = W._dw_gluon(lm, rm, counts, offsets, transposed)
    plain = W._dw_cublas(lm, rm, counts, offsets, dtype, transposed)
    assert fast.shape == (7, O, I) and fast.dtype == dtype
    if transposed:
        assert fast.transpose(1, 2).is_contiguous()
    assert torch.count_nonzero(fast[[1, 4]]) == 0
    e_a, e_p, s = _err(fast, truth), _err(plain, truth), _scale(truth)
    assert e_a <= 2 * e_p + 2e-3 * s, f"gluon err {e_a:.3e} > 2 * cuBLAS {e_p:.3e} + atol"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", ["left", "right"])
@pytest.mark.parametrize("transposed", [False, True], ids=["eoi", "transposed"])
def test_gluon_gather_weight_grad(dtype, side, transposed):
    """The Gluon weight grad with one operand's rows gathered by token in its loader (the
    left: ``gout[tok].T @ a``; the right: ``dH.T @ x[tok]``, computed transposed) against fp64
    per-expert products, beside ``dw_kernel`` under the tolerance rule: uneven experts (row
    blocks running into the next expert), experts without rows (exact zeros), widths of 8 but
    not 16 (the copies' smallest alignment) off the tile, both output layouts."""
    from moekit.ops.triton import gluon_rules
    from moekit.ops.triton import weight_grads as W

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs compute capability 9")
    counts = torch.tensor([300, 0, 1, 250, 0, 449, 64], device="cuda", dtype=torch.int32)
    offsets = counts.cumsum(0, dtype=torch.int32)
    E, N, T, O, I = 7, int(counts.sum()), 411, 200, 264
    g = torch.Generator(device="cpu").manual_seed(8)
    tok = torch.randint(0, T, (N,), generator=g).cuda()
    src = torch.randn(T, O if side == "left" else I, generator=g).cuda().to(dtype)
    other = torch.randn(N, I if side == "left" else O, generator=g).cuda().to(dtype)
    gathered = src.index_select(0, tok)
    lm, rm = (gathered, other) if side == "left" else (other, gathered)
    # auto: not at 152 rows per expert, nor with a weight-grad tile given; True: wherever it runs
    assert gluon_rules.gluon_gather_wanted({"gluon": (1,)}, src, other, N, E)
    assert not gluon_rules.gluon_gather_wanted(None, src, other, N, E)
    assert gluon_rules.gluon_gather_wanted(None, src, other, 1024 * E, E)
    assert not gluon_rules.gluon_gather_wanted({"dw": (128, 256, 64, 8, 3)}, src, other, 1024 * E, E)
    assert not gluon_rules.gluon_gather_wanted({"gluon": (0,)}, src, other, N, E)
    truth = torch.stack([a.double().T @ b.double() for a, b in
                         zip(lm.split(counts.tolist()), rm.split(counts.tolist()))])
    args = ((src, tok, other, None) if side == "left" else (other, None, src, tok))
    fast = W.weight_grad(*args, None, False, counts, offsets, dtype, False, transposed=transposed,
                         tiles={"gluon": (1,)})[0]
    plain = W.weight_grad(*args, None, False, counts, offsets, dtype, False, transposed=transposed,
                          tiles={"gluon": (0,)})[0]
    assert fast.shape == (E, O, I) and fast.dtype == dtype
    assert (fast.transpose(1, 2) if transposed else fast).is_contiguous()
    assert torch.count_nonzero(fast[[1, 4]]) == 0
    e_a, e_p, s = _err(fast, truth), _err(plain, truth), _scale(truth)
    assert e_a <= 2 * e_p + 2e-3 * s, f"gluon gather err {e_a:.3e} > 2 * triton {e_p:.3e} + atol"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("layout", ["eoi", "eio"])
def test_gluon_rows_gemm(dtype, layout):
    """The Gluon ping-pong row GEMM (Hopper) against fp64 per-expert products, beside the Triton
    row GEMM under the tolerance rule: uneven experts (partial last row tiles, rows of the next
    expert in the tile), experts without rows, O and I not multiples of the tile, and both
    weight layouts (I contiguous; O contiguous, as the input grad's ``gate_up.transpose``)."""
    from moekit.ops.triton import gluon_rules, launchers

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs compute capability 9")
    counts = torch.tensor([300, 0, 1, 250, 0, 449, 64, 129], device="cuda", dtype=torch.int32)
    offsets = counts.cumsum(0, dtype=torch.int32)
    E, N, O, I = counts.shape[0], int(counts.sum()), 200, 264
    g = torch.Generator(device="cpu").manual_seed(6)
    a = torch.randn(N, I, generator=g).cuda().to(dtype)
    if layout == "eoi":
        w = (torch.randn(E, O, I, generator=g) * I ** -0.5).cuda().to(dtype)
    else:
        w = (torch.randn(E, I, O, generator=g) * I ** -0.5).cuda().to(dtype).transpose(1, 2)
    # auto: from 1024 rows per expert, the I-contiguous weight only (the down projection);
    # True: both layouts, any size
    big = a.new_empty(1024 * E, I)
    assert gluon_rules.gluon_rows_wanted(None, big, w) == (layout == "eoi")
    assert not gluon_rules.gluon_rows_wanted({"rows": (128, 128, 64, 8, 3)}, big, w)
    assert not gluon_rules.gluon_rows_wanted(None, a, w)
    assert gluon_rules.gluon_rows_wanted({"gluon": (1,)}, a, w)
    assert not gluon_rules.gluon_rows_wanted({"gluon": (0,)}, a, w)
    truth = torch.cat([x.double() @ w[e].double().T for e, x in enumerate(a.split(counts.tolist()))])
    fast = launchers.rows_gemm(a, w, None, counts, offsets, {"gluon": (1,)})
    plain = launchers.rows_gemm(a, w, None, counts, offsets, {"gluon": (0,)})
    assert fast.shape == (N, O) and fast.dtype == dtype
    e_a, e_p, s = _err(fast, truth), _err(plain, truth), _scale(truth)
    assert e_a <= 2 * e_p + 2e-3 * s, f"gluon err {e_a:.3e} > 2 * triton {e_p:.3e} + atol"


@pytest.mark.parametrize("case,dw", [(CASES[0], "auto"), (CASES[1], "grouped_mm"),
                                     (CASES[2], "grouped_mm")], ids=["qwen3", "gpt-oss", "mixtral"])
def test_gluon_on_and_off_in_the_layer(case, dw):
    """The layer with the Gluon kernels (``gluon=True``: the plain row GEMMs, and the weight
    grads over gathered copies) and without them (``gluon=False``: Triton, cuBLAS): both under
    the tolerance rule against the fp32 loop."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon kernel needs compute capability 9")
    T, D, F, E, K, act, gated, bias, woi, skew = case
    ids, f32, low = _inputs(T, D, F, E, K, gated, torch.bfloat16, bias, seed=7, skew=skew)
    truth = _run("loop", ids, f32, act, woi)
    plain = _run("grouped_mm", ids, low, act, woi)
    on = _run(TritonBackend.Config(dw=dw, gluon=True), ids, low, act, woi)
    off = _run(TritonBackend.Config(dw=dw, gluon=False), ids, low, act, woi)
    names = ["y", "dx", "dw_up", "dw_down"] + (["db_up", "db_down"] if bias else []) + ["dtopk"]
    for name, a, b, p, t in zip(names, on, off, plain, truth):
        e_a, e_b, e_p, s = _err(a, t), _err(b, t), _err(p, t), _scale(t)
        assert max(e_a, e_b) <= 2 * e_p + 2e-3 * s, f"{name}: gluon {e_a:.3e} / off {e_b:.3e} vs plain {e_p:.3e}"
