"""The experts benchmark's measurements: the timers (``_time_ms``, CUDA-graph replays
``_graph_ms``), peak and saved memory, the measured matmul and copy ceilings, the fp32
reference, one row of an experts implementation (``_bench_experts_g``) or of a whole MoE
layer (``_bench_layer``, ``layer_config``), and the per-kernel profile. Driven by
``moekit.benchmark``.
"""

from __future__ import annotations

import contextlib
import statistics
import time

import torch

from .bench_impls import Shape, _get_impl
from .ops import moe_experts
from .plan import make_plan


# ----------------------------------------------------------------------------- timing
def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _graph_ms(fn, device, rep_ms: int) -> float | None:
    """Median time of CUDA-graph replays of ``fn``, or None where it cannot be captured."""
    if device.type != "cuda":
        return None
    import triton.testing as tt

    try:
        with torch.cuda.stream(torch.cuda.Stream()):
            return float(tt.do_bench_cudagraph(fn, rep=rep_ms, return_mode="median"))
    except Exception:  # noqa: BLE001 - a host sync inside: not capturable
        torch.cuda.synchronize()
        return None


def _time_ms(fn, device, *, rep_ms: int = 100) -> float:
    if device.type == "cuda":
        import triton.testing as tt

        return float(tt.do_bench(fn, warmup=max(10, rep_ms // 4), rep=rep_ms, return_mode="median"))
    fn()
    times = []
    t_end = time.perf_counter() + rep_ms / 1000.0
    while len(times) < 3 or (time.perf_counter() < t_end and len(times) < 50):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000.0)
    return statistics.median(times)


def _time_fwd_bwd(row: dict, fb, shape: Shape, device, rep_ms: int) -> None:
    """Time ``fb`` (one forward+backward), measure its peak memory above what is allocated
    before it (CUDA), and fill the row's fwd_bwd_ms, peak_mem_gib and TFLOP/s columns
    (forward 6*T*K*D*F, backward twice that)."""
    row["fwd_bwd_ms"] = _time_ms(fb, device, rep_ms=rep_ms)
    row["peak_mem_gib"] = None
    if device.type == "cuda":
        _sync(device)
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        base = torch.cuda.memory_allocated(device)
        grads = fb()
        _sync(device)
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) - base) / 2**30
        del grads
    row["fwd_tflops"] = shape.fwd_flops / row["fwd_ms"] / 1e9
    row["fwd_bwd_tflops"] = 3 * shape.fwd_flops / row["fwd_bwd_ms"] / 1e9


def measure_ceilings(device) -> dict:
    """Measured bf16 matmul TFLOP/s (8192^3) and device copy GB/s (read + write)."""
    if device.type != "cuda":
        return {"matmul_tflops": None, "copy_gbps": None, "note": "no GPU: ceilings not measured"}
    n = 8192
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    ms = _time_ms(lambda: a @ b, device)
    src = torch.randn(1 << 29, device=device, dtype=torch.bfloat16)  # 1 GiB
    dst = torch.empty_like(src)
    ms_c = _time_ms(lambda: dst.copy_(src), device)
    return {"matmul_tflops": 2 * n ** 3 / ms / 1e9, "copy_gbps": 2 * src.numel() * 2 / ms_c / 1e6}


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double().cpu(), b.detach().double().cpu()
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def _touched_weight_bytes(ids, w1, w2) -> int:
    n = int(torch.unique(ids).numel())
    return n * (w1[0].numel() + w2[0].numel()) * w1.element_size()


# ----------------------------------------------------------------------------- one row
def _reference(shape: Shape, inputs, slice_tokens: int):
    x, w1, w2, ids, wts = inputs
    s = min(slice_tokens, shape.T)
    leaves = [x[:s].detach().float().requires_grad_(True)]
    y = moe_experts(leaves[0], w1.float(), w2.float(), ids[:s], wts[:s].float(), activation="silu",
                    backend="loop")
    return {"slice": s, "y": y.detach(), "y_leaf": leaves[0], "y_out": y}


def layer_config(shape: Shape, backend: str, *, small_groups: bool = False):
    """The MoE.Config of a layer row: DeepSeek-V3's routing (with its shared expert) for the
    deepseek shapes, Qwen3's otherwise, resized to ``shape`` and run on ``backend``;
    ``small_groups`` shrinks DeepSeek's expert groups to 4 (2 kept) for tiny CPU shapes."""
    from . import presets

    cfg = presets.deepseek_v3() if shape.name.startswith("deepseek") else presets.qwen3_30b_a3b()
    cfg.num_experts, cfg.dim, cfg.hidden_dim = shape.E, shape.D, shape.F
    cfg.experts.backend = backend
    cfg.router.top_k = shape.K
    if getattr(cfg.router, "num_expert_groups", None):
        cfg.router.num_expert_groups = min(cfg.router.num_expert_groups, shape.E)
        if small_groups:
            cfg.router.num_expert_groups, cfg.router.num_limited_groups = 4, 2
    return cfg


def _bench_layer(shape: Shape, backend: str, device, dtype, *, rep_ms):
    cfg = layer_config(shape, backend, small_groups=device.type == "cpu")
    moe = cfg.build().to(device=device, dtype=dtype)
    x = torch.randn(shape.T, shape.D, device=device, dtype=dtype, requires_grad=True)
    g = torch.randn_like(x)
    params = [p for p in moe.parameters() if p.requires_grad]
    row = {"shape": shape.name, "impl": f"moekit-layer-{backend}", "T": shape.T, "D": shape.D,
           "F": shape.F, "E": shape.E, "K": shape.K, "kind": "layer", "rel_err": None}
    with torch.no_grad():
        row["fwd_ms"] = _time_ms(lambda: moe(x), device, rep_ms=rep_ms)

    def fb():
        return torch.autograd.grad(moe(x), [x] + params, g)

    fb()
    _time_fwd_bwd(row, fb, shape, device, rep_ms)
    row["has_shared_expert"] = cfg.shared_experts is not None
    return row


# ----------------------------------------------------------------------------- experts row
def _bench_experts_g(shape, impl, dev, dtype, inputs, ref, g_full, *, rep_ms):
    x, w1, w2, ids, wts = inputs
    f = _get_impl(impl)
    row = {"shape": shape.name, "impl": impl, "T": shape.T, "D": shape.D, "F": shape.F,
           "E": shape.E, "K": shape.K, "kind": shape.kind}
    s = ref["slice"]
    with torch.no_grad():
        y = f(x, w1, w2, ids, wts)
    row["rel_err"] = _rel(y[:s].float(), ref["y"])
    del y
    with torch.no_grad():
        row["fwd_ms"] = _time_ms(lambda: f(x, w1, w2, ids, wts), dev, rep_ms=rep_ms)
    if shape.kind == "decode":
        # decode is launch-bound: also time CUDA-graph replays where the impl is capturable
        # (no host sync), and moekit with the routing plan made outside the timed region
        row["weight_bytes"] = _touched_weight_bytes(ids, w1, w2)
        with torch.no_grad():
            row["fwd_ms_graph"] = _graph_ms(lambda: f(x, w1, w2, ids, wts), dev, rep_ms)
            if impl.startswith("moekit"):
                plan = make_plan(ids, shape.E)
                g_fn = lambda: f(x, w1, w2, ids, wts, plan=plan)
                row["fwd_ms_plan_given"] = _time_ms(g_fn, dev, rep_ms=rep_ms)
                row["fwd_ms_plan_given_graph"] = _graph_ms(g_fn, dev, rep_ms)
        best = min(v for v in (row["fwd_ms"], row.get("fwd_ms_graph"), row.get("fwd_ms_plan_given"),
                               row.get("fwd_ms_plan_given_graph")) if v)
        row["weight_gbps"] = row["weight_bytes"] / best / 1e6
    fb = _fwd_bwd_fn(f, inputs, g_full)
    grads = fb()
    row["grad_rel_err"] = _rel(grads[0][:s].float(), ref["dx"])
    del grads
    _time_fwd_bwd(row, fb, shape, dev, rep_ms)
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2, wts)]
    row["saved_mem_gib"] = _saved_mem_gib(
        lambda: f(leaves[0], leaves[1], leaves[2], ids, leaves[3]), dev)
    return row


def _fwd_bwd_fn(f, inputs, g_full):
    """One forward+backward of impl ``f`` on ``inputs``, returning the gradients of x, both
    weights and the routing weights."""
    x, w1, w2, ids, wts = inputs
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2, wts)]

    def fb():
        out = f(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        return torch.autograd.grad(out, leaves, g_full)

    return fb


def retime_rounds(rows: list[dict], shape: Shape, device, inputs, g_full, rounds: int,
                  rep_ms: int, timed_as=None) -> None:
    """Time the forward and the forward+backward of every row of ``shape`` (its impls, one
    after the other) ``rounds - 1`` more times, the impls in turn in each round, so that a
    drift of the GPU's clocks (they fall as it warms up under these GEMMs) touches every impl
    alike; each row keeps its samples (``fwd_ms_rounds``, ``fwd_bwd_ms_rounds``) and their
    median becomes its ``fwd_ms`` / ``fwd_bwd_ms`` (and TFLOP/s). ``timed_as(row)``: the impl
    and the context (e.g. settings in the environment) to time a row under; default: its
    ``impl`` as it is."""
    live = [r for r in rows if "error" not in r and r.get("fwd_bwd_ms")]
    for r in live:
        r["fwd_ms_rounds"], r["fwd_bwd_ms_rounds"] = [r["fwd_ms"]], [r["fwd_bwd_ms"]]
    x, w1, w2, ids, wts = inputs
    for _ in range(rounds - 1):
        for r in live:
            impl, context = timed_as(r) if timed_as else (r["impl"], contextlib.nullcontext())
            f = _get_impl(impl)
            with context:
                with torch.no_grad():
                    r["fwd_ms_rounds"].append(_time_ms(lambda: f(x, w1, w2, ids, wts), device, rep_ms=rep_ms))
                r["fwd_bwd_ms_rounds"].append(_time_ms(_fwd_bwd_fn(f, inputs, g_full), device, rep_ms=rep_ms))
    for r in live:
        r["fwd_ms"] = statistics.median(r["fwd_ms_rounds"])
        r["fwd_bwd_ms"] = statistics.median(r["fwd_bwd_ms_rounds"])
        r["fwd_tflops"] = shape.fwd_flops / r["fwd_ms"] / 1e9
        r["fwd_bwd_tflops"] = 3 * shape.fwd_flops / r["fwd_bwd_ms"] / 1e9


def _saved_mem_gib(fwd, device) -> float | None:
    """Memory a training forward leaves allocated for its backward (its output and the
    tensors autograd saved), in GiB: what each MoE layer of a model holds until its backward."""
    if device.type != "cuda":
        return None
    _sync(device)
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated(device)
    out = fwd()
    _sync(device)
    saved = (torch.cuda.memory_allocated(device) - base) / 2**30
    del out
    return saved


def _profile(shape, impl, dev, dtype, inputs, g_full) -> str:
    """CUDA time per kernel over one forward+backward (torch.profiler), as text."""
    from torch.profiler import ProfilerActivity, profile

    fb = _fwd_bwd_fn(_get_impl(impl), inputs, g_full)
    fb()
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fb()
        _sync(dev)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    return f"## profile {shape.name} {impl} (3 x forward+backward)\n{table}"
