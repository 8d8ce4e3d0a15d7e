"""Where the time of a full MoE layer goes on a GPU (and of the decode-sized experts call).

    PYTHONPATH=src python benchmarks/profile_layer.py --out /tmp/prof [--shape qwen3] [--compile]

Prints and writes ``<out>/layer-profile.txt``: forward+backward ms of the whole layer and of
its parts measured separately (experts only on the same routing, router only), of variants
(gate matmul in the input dtype, no aux loss, torch.compile), the host time to issue one
forward+backward against its GPU time, and torch.profiler tables (CUDA time per kernel, CPU
time per op). With ``--decode``: per-kernel CUDA time of the experts at T = 1, 8, 64 (plan
given) and the CUDA-graph replay time.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from moekit.benchmark import SHAPES, _graph_ms, _time_ms, layer_config, sweep_env
from moekit.ops import moe_experts
from moekit.plan import make_plan

DEV = torch.device("cuda")
DTYPE = torch.bfloat16


def _sync():
    if DEV.type == "cuda":
        torch.cuda.synchronize()


def _acts():
    from torch.profiler import ProfilerActivity

    return [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if DEV.type == "cuda" else [])


def _layer(shape, *, backend="triton", **cfg_overrides):
    cfg = layer_config(shape, backend)
    for k, v in cfg_overrides.items():
        target = cfg.router if k.startswith("router.") else cfg
        setattr(target, k.split(".")[-1], v)
    return cfg.build().to(DEV, DTYPE)


def _fb(moe, x, g):
    params = [p for p in moe.parameters() if p.requires_grad]

    def fb():
        return torch.autograd.grad(moe(x), [x] + params, g)

    return fb


def _issue_ms(fn, n=5) -> float:
    """Host time to issue ``fn`` (no sync inside the timed region, unless ``fn`` syncs)."""
    fn()
    _sync()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t = (time.perf_counter() - t0) / n * 1e3
    _sync()
    return t


def profile_layer(shape, rep_ms, do_compile, log):
    T, D = shape.T, shape.D
    x = torch.randn(T, D, device=DEV, dtype=DTYPE, requires_grad=True)
    g = torch.randn_like(x)
    moe = _layer(shape)
    fb = _fb(moe, x, g)
    res = {"layer": _time_ms(fb, DEV, rep_ms=rep_ms)}
    res["layer (host issue time)"] = _issue_ms(fb)

    with torch.no_grad():
        r = moe.router(x)
    ids, wts = r.topk_ids, r.topk_weights.detach().requires_grad_(True)
    ex = [p for p in moe.experts.parameters()]

    def fb_experts():
        y = moe.experts(x, ids, wts)
        return torch.autograd.grad(y, [x, wts] + ex, g)

    res["experts only (same routing)"] = _time_ms(fb_experts, DEV, rep_ms=rep_ms)

    def fb_router():
        rr = moe.router(x)
        return torch.autograd.grad(rr.topk_weights.sum(), [x] + list(moe.router.parameters()))

    res["router only"] = _time_ms(fb_router, DEV, rep_ms=rep_ms)
    for name, kw in [("router_dtype=None", {"router.router_dtype": None}),
                     ("no aux loss", {"load_balance_coeff": 0.0, "seq_aux_loss_coeff": 0.0})]:
        m2 = _layer(shape, **kw)
        m2.load_state_dict(moe.state_dict())
        res[f"layer, {name}"] = _time_ms(_fb(m2, x, g), DEV, rep_ms=rep_ms)
        del m2
    if do_compile:
        cm = torch.compile(moe)
        t0 = time.perf_counter()
        _fb(cm, x, g)()
        _sync()
        log(f"compile took {time.perf_counter() - t0:.1f} s")
        res["layer, torch.compile"] = _time_ms(_fb(cm, x, g), DEV, rep_ms=rep_ms)
    lines = [f"## {shape.name} layer: forward+backward ms"]
    lines += [f"{k:40s} {v:8.3f}" for k, v in res.items()]
    from torch.profiler import profile

    fb()
    _sync()
    with profile(activities=_acts()) as prof:
        for _ in range(3):
            fb()
        _sync()
    ka = prof.key_averages()
    lines.append("\n### CUDA time per kernel (3 x forward+backward)")
    lines.append(ka.table(sort_by="self_cuda_time_total", row_limit=40, max_name_column_width=70))
    lines.append("\n### CPU time per op")
    lines.append(ka.table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=70))
    return "\n".join(lines)


def _decode_calls(shape):
    """``{T: (call, ids)}`` for T = 1, 8, 64: the triton experts forward with the plan given."""
    E, D, F, K = shape.E, shape.D, shape.F, shape.K
    w1 = torch.randn(E, 2 * F, D, device=DEV, dtype=DTYPE) * D ** -0.5
    w2 = torch.randn(E, D, F, device=DEV, dtype=DTYPE) * F ** -0.5
    calls = {}
    for T in (1, 8, 64):
        x = torch.randn(T, D, device=DEV, dtype=DTYPE)
        ids = torch.randn(T, E, device=DEV).topk(K, dim=-1).indices
        wts = torch.rand(T, K, device=DEV, dtype=DTYPE)
        plan = make_plan(ids, E)

        def f(x=x, ids=ids, wts=wts, plan=plan):
            with torch.no_grad():
                return moe_experts(x, w1, w2, ids, wts, activation="silu", backend="triton", plan=plan)

        calls[T] = (f, ids)
    return calls


def _graph_or_plain_ms(f, rep_ms) -> float:
    """CUDA-graph replay time, else (not capturable) the plain time as a negative number."""
    f()
    g = _graph_ms(f, DEV, rep_ms)
    return g if g is not None else -_time_ms(f, DEV, rep_ms=rep_ms)


def profile_decode(shape, rep_ms, log, sweep=()):
    from torch.profiler import profile

    calls = _decode_calls(shape)
    lines = [f"## decode at {shape.name} (T, graph ms, kernels)"]
    if sweep:
        lines.append(_decode_sweep(calls, rep_ms, sweep))
    for T, (f, ids) in calls.items():
        gms = _graph_or_plain_ms(f, rep_ms)
        how, gms = ("graph" if gms > 0 else "plain (not capturable)"), abs(gms)
        _sync()
        with profile(activities=_acts()) as prof:
            for _ in range(20):
                f()
            _sync()
        n = int(torch.unique(ids).numel())
        gb = n * 3 * shape.F * shape.D * 2 / 1e9
        lines.append(f"T={T}: {n} experts, {gb * 1e3:.1f} MB, {how} {gms * 1e3:.1f} us "
                     f"= {gb / (gms / 1e3):.0f} GB/s")
        for e in prof.key_averages():
            us = getattr(e, "self_device_time_total", 0) / max(1, e.count)
            if us > 0:
                lines.append(f"    {e.key[:60]:60s} {us:8.2f} us x{e.count // 20}")
    return "\n".join(lines)


def _decode_sweep(calls, rep_ms, sweep) -> str:
    """CUDA-graph time of the decode calls under each sweep entry (``VAR=VALUE``, several joined
    by ``;``; see ``moekit.benchmark.sweep_env``)."""
    out = ["### decode sweep: graph us at T=" + ", ".join(str(t) for t in calls)]
    for setting in ("", *sweep):
        try:
            with sweep_env(setting):
                us = [_graph_or_plain_ms(f, rep_ms) * 1e3 for f, _ in calls.values()]
        except Exception as exc:  # noqa: BLE001 - a config that does not compile or launch: report it, go on
            out.append(f"{setting:70s} error: {exc!r}"[:300])
            continue
        out.append(f"{setting or 'default':70s} " + " ".join(f"{u:8.1f}" for u in us)
                   + ("  (negative: no CUDA graph, plain time)" if min(us) < 0 else ""))
    return "\n".join(out)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default="/tmp/prof")
    p.add_argument("--shape", default="qwen3-30b-a3b-layer")
    p.add_argument("--rep-ms", type=int, default=50)
    p.add_argument("--compile", action="store_true")
    p.add_argument("--decode", action="store_true")
    p.add_argument("--no-layer", action="store_true")
    p.add_argument("--decode-sweep", nargs="*", default=(),
                   help="env settings VAR=VAL[;VAR=VAL] to time the decode call under")
    p.add_argument("--cpu-smoke", action="store_true", help="tiny shapes on the CPU (fp32, interpreter)")
    a = p.parse_args()
    global DEV, DTYPE
    by_name = {s.name: s for s in SHAPES}
    if a.cpu_smoke:
        from moekit.benchmark import CPU_SHAPES

        DEV, DTYPE = torch.device("cpu"), torch.float32
        by_name = {s.name: s for s in CPU_SHAPES}
        by_name["qwen3-30b-a3b"] = by_name[next(n for n in by_name if "layer" not in n)]
        a.shape = next(n for n in by_name if "layer" in n)
    parts = []
    if not a.no_layer:
        parts.append(profile_layer(by_name[a.shape], a.rep_ms, a.compile, print))
        print(parts[-1], flush=True)
    if a.decode:
        parts.append(profile_decode(by_name["qwen3-30b-a3b"], a.rep_ms, print, tuple(a.decode_sweep)))
        print(parts[-1], flush=True)
    Path(a.out).mkdir(parents=True, exist_ok=True)
    (Path(a.out) / "layer-profile.txt").write_text("\n\n".join(parts))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
