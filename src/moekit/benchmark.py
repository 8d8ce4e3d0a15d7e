"""The experts benchmark: moekit's backends and their peers, same routing, same weights, one
process.

``run(out_dir, ...)`` times every (shape, impl) pair, writes ``<out_dir>/<device>.json`` (``meta``:
device, versions, date, measured bf16 matmul and copy ceilings; ``rows``: one dict per pair with
``shape, impl, fwd_ms, fwd_bwd_ms, fwd_tflops, fwd_bwd_tflops, peak_mem_gib, rel_err, device``
and a few extras) and a bar chart ``<out_dir>/<device>.png`` beside it. ``main(argv)`` is the
command line (``python benchmarks/bench_experts.py --help``; ``moekit bench`` calls it too).

Impls: ``moekit-triton`` (the fused kernels), ``moekit-grouped_mm`` (torch grouped_mm stages),
``hf-grouped_mm`` / ``hf-batched_mm`` (transformers' ``integrations.moe`` experts functions, on
the same ``[E, 2F, D]`` weights: they use the non-transposed layout), ``hf-eager`` (a replica of
transformers' per-expert eager loop), ``scattermoe`` (when ``import scattermoe`` works: put its
package on ``sys.path``; it is not a dependency). FLOPs: forward ``6*T*K*D*F``, backward twice
that. Peak memory is measured above the inputs (weights, x, routing), over one forward+backward
that returns the gradients. ``rel_err`` is ``|y - ref| / |ref|`` (Frobenius) on the first
``slice_tokens`` tokens against an fp32 per-expert loop on upcast inputs; ``grad_rel_err`` the
same for dx. Without a GPU it runs tiny CPU shapes (and says so): a smoke test, not a benchmark.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import statistics
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .ops import moe_experts
from .plan import make_plan

__all__ = ["CPU_SHAPES", "IMPLS", "SHAPES", "Shape", "main", "measure_ceilings", "run"]


@dataclass(frozen=True)
class Shape:
    name: str
    T: int
    D: int
    F: int
    E: int
    K: int
    kind: str = "train"  # "train" | "decode" | "layer"

    @property
    def fwd_flops(self) -> float:
        return 6.0 * self.T * self.K * self.D * self.F


SHAPES = [  # in the order they run (the cheap, most-asked-for first)
    Shape("qwen3-30b-a3b", 16384, 2048, 768, 128, 8),
    Shape("qwen3-decode-T1", 1, 2048, 768, 128, 8, "decode"),
    Shape("qwen3-decode-T8", 8, 2048, 768, 128, 8, "decode"),
    Shape("qwen3-decode-T64", 64, 2048, 768, 128, 8, "decode"),
    Shape("qwen3-30b-a3b-layer", 16384, 2048, 768, 128, 8, "layer"),
    Shape("mixtral-8x7b", 8192, 4096, 14336, 8, 2),
    Shape("deepseek-v3-64e", 8192, 7168, 2048, 64, 8),
    Shape("gpt-oss-20b", 16384, 2880, 2880, 32, 4),
    Shape("olmoe", 16384, 2048, 1024, 64, 8),
    Shape("deepseek-v3-64e-layer", 8192, 7168, 2048, 64, 8, "layer"),
]
CPU_SHAPES = [
    Shape("tiny-cpu", 64, 64, 32, 8, 2),
    Shape("tiny-cpu-decode-T1", 1, 64, 32, 8, 2, "decode"),
    Shape("tiny-cpu-layer", 64, 64, 32, 8, 2, "layer"),
]
IMPLS = ["moekit-triton", "moekit-grouped_mm", "hf-grouped_mm", "hf-batched_mm", "hf-eager",
         "scattermoe", "moekit-loop"]


# ----------------------------------------------------------------------------- inputs
def make_inputs(shape: Shape, device, dtype, seed: int = 0):
    g = torch.Generator(device="cpu").manual_seed(seed)
    T, D, Fh, E, K = shape.T, shape.D, shape.F, shape.E, shape.K

    def rnd(*s, std=1.0):
        return (torch.randn(*s, generator=g) * std).to(device=device, dtype=dtype)

    x = rnd(T, D)
    w1 = rnd(E, 2 * Fh, D, std=D ** -0.5)
    w2 = rnd(E, D, Fh, std=Fh ** -0.5)
    scores = torch.randn(T, E, generator=g)
    top = scores.topk(K, dim=-1)
    ids = top.indices.to(device)
    wts = torch.softmax(top.values, dim=-1).to(device=device, dtype=dtype)
    return x, w1, w2, ids, wts


# ----------------------------------------------------------------------------- impls
def _moekit(backend: str):
    def f(x, w1, w2, ids, wts, plan=None):
        return moe_experts(x, w1, w2, ids, wts, activation="silu", backend=backend, plan=plan)
    return f


class _HFExperts(torch.nn.Module):
    """Just the attributes transformers' experts functions read (non-transposed, gated, no bias)."""

    def __init__(self, w1, w2):
        super().__init__()
        self.gate_up_proj, self.down_proj = w1, w2
        self.num_experts = w1.shape[0]
        self.has_gate, self.has_bias, self.is_transposed = True, False, False
        self.is_concatenated = True
        self.has_post_expert_norm = False
        self._is_expert_parallel = False
        self.act_fn = F.silu

    def _apply_gate(self, h):
        gate, up = h.chunk(2, dim=-1)
        return self.act_fn(gate) * up


def _hf(name: str):
    from transformers.integrations import moe as hf_moe  # noqa: WPS433

    fn = getattr(hf_moe, f"{name}_experts_forward")

    def f(x, w1, w2, ids, wts, plan=None):
        return fn(_HFExperts(w1, w2), x, ids, wts)
    return f


def _hf_eager(x, w1, w2, ids, wts, plan=None):
    """transformers' eager experts loop (Qwen3MoeExperts / MixtralExperts style)."""
    E = w1.shape[0]
    out = torch.zeros_like(x)
    mask = F.one_hot(ids, num_classes=E).permute(2, 1, 0)  # [E, K, T]
    hit = torch.greater(mask.sum(dim=(-1, -2)), 0).nonzero()
    for e in hit:
        e = int(e[0])
        k_idx, tok = torch.where(mask[e])
        cur = x[tok]
        gate, up = F.linear(cur, w1[e]).chunk(2, dim=-1)
        cur = F.linear(F.silu(gate) * up, w2[e]) * wts[tok, k_idx, None]
        out = out.index_add(0, tok, cur.to(out.dtype))
    return out


def _scattermoe():
    from scattermoe.parallel_experts import parallel_linear  # noqa: WPS433

    def f(x, w1, w2, ids, wts, plan=None):
        E = w1.shape[0]
        K = ids.shape[1]
        with torch.no_grad():  # as scattermoe's own flatten_sort_count
            flat = ids.flatten()
            sorted_e, sorted_idx = torch.sort(flat)
            offs = torch.bincount(flat, minlength=E).cumsum(-1)
        # the GLU is applied here (not by scattermoe's GLUMLP, which wants [up; gate] rows), so
        # our [gate; up] weights are used as they are: no reordered copy inside the timing
        h = parallel_linear(x, w1.permute(0, 2, 1), K, sorted_e, sorted_idx, offs, grouped_out=True)
        gate, up = h.chunk(2, dim=-1)
        h = F.silu(gate) * up
        return parallel_linear(h, w2.permute(0, 2, 1), 1, sorted_e, sorted_idx, offs,
                               grouped_in=True, gates=wts.to(h.dtype))
    return f


def _get_impl(name: str) -> Callable:
    if name == "moekit-triton":
        return _moekit("triton")
    if name == "moekit-grouped_mm":
        return _moekit("grouped_mm")
    if name == "moekit-loop":
        return _moekit("loop")
    if name == "hf-grouped_mm":
        return _hf("grouped_mm")
    if name == "hf-batched_mm":
        return _hf("batched_mm")
    if name == "hf-eager":
        return _hf_eager
    if name == "scattermoe":
        return _scattermoe()
    raise ValueError(f"impl={name!r} is unknown; allowed: {IMPLS}")


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


# ----------------------------------------------------------------------------- driver
def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")
    return "cpu"


def _versions() -> dict:
    """Every version a row depends on: python, torch, triton, transformers, moekit (and its
    git commit when run from a checkout), ScatterMoE (the commit its folder records, if any)."""
    import moekit

    v = {"torch": torch.__version__, "python": sys.version.split()[0], "moekit": moekit.__version__}
    for mod in ("triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            v[mod] = None
    root = Path(moekit.__file__).resolve().parents[2]
    v["moekit_commit"] = os.environ.get("MOEKIT_COMMIT")  # a copy of the tree may carry a stale .git
    try:
        v["moekit_commit"] = v["moekit_commit"] or subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import scattermoe

        commit = Path(scattermoe.__file__).parent / "COMMIT"
        v["scattermoe"] = commit.read_text().strip() if commit.exists() else "unknown commit"
    except Exception:  # noqa: BLE001 - optional peer
        v["scattermoe"] = None
    return v


def _default_impls(device, shape: Shape) -> list[str]:
    if device.type != "cuda":
        impls = ["moekit-grouped_mm", "moekit-loop", "hf-grouped_mm", "hf-eager"]
        if os.environ.get("TRITON_INTERPRET") == "1":
            impls.insert(0, "moekit-triton")
        return impls
    impls = ["moekit-triton", "moekit-grouped_mm", "hf-grouped_mm", "scattermoe"]
    if shape.kind == "decode":
        impls += ["hf-batched_mm"] + (["hf-eager"] if shape.T <= 8 else [])
    elif shape.E <= 8:
        impls += ["hf-eager"]  # a python loop over experts: only where there are few
    return impls


@contextlib.contextmanager
def sweep_env(spec: str):
    """Apply one sweep entry (settings joined by ``;``, each as ``_sweep_setting`` reads it) to
    the environment for the duration of the block, then restore what was there."""
    settings = dict(_sweep_setting(part) for part in spec.split(";") if part)
    old = {var: os.environ.get(var) for var in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for var, v in old.items():
            if v is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = v


def _sweep_setting(part: str) -> tuple[str, str]:
    """One ``--sweep`` setting: ``BM,BN,BK,warps,stages`` (row GEMMs), ``dw:BO,BI,BK,warps,stages``
    (weight grads) or ``VAR=VALUE`` (any environment setting)."""
    if part.startswith("dw:"):
        return "MOEKIT_TRITON_DW_CONFIG", part[3:]
    if "=" in part:
        var, val = part.split("=", 1)
        return var, val
    return "MOEKIT_TRITON_CONFIG", part


def run(
    out_dir: str | os.PathLike = "benchmarks/results",
    *,
    shapes: list[str] | None = None,
    impls: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    rep_ms: int = 100,
    slice_tokens: int = 256,
    sweep: list[str] | None = None,
    sweep_shapes: list[str] | None = None,
    profile: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run the benchmark; write ``<out_dir>/<device>.json`` and ``.png``; return the rows.

    ``shapes``/``impls`` filter by name (default: all shapes and the impls that make sense on
    this device). Without a GPU it runs ``CPU_SHAPES`` in fp32 and says so. ``sweep`` is a
    list of settings to time moekit-triton under at the first training shape (see
    ``_sweep_setting``; several joined by ``;``).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        log("benchmark: no GPU here: running tiny CPU shapes in fp32 (a smoke test, not a benchmark)")
        dtype = torch.float32
        table = CPU_SHAPES
    else:
        table = SHAPES
    todo = [s for s in table if shapes is None or s.name in shapes]
    ceil = measure_ceilings(dev)
    log(f"ceilings on {_device_name(dev)}: {ceil}")
    rows: list[dict] = []
    prof_txt: list[str] = []
    for shape in todo:
        if shape.kind == "layer":
            for backend in ("triton", "grouped_mm"):
                if impls is not None and f"moekit-{backend}" not in impls:
                    continue
                if backend == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                    continue
                try:
                    r = _bench_layer(shape, backend, dev, dtype, rep_ms=rep_ms)
                except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
                    r = {"shape": shape.name, "impl": f"moekit-layer-{backend}", "error": repr(exc)[:300]}
                    log(traceback.format_exc()[-1500:])
                r["device"] = _device_name(dev)
                rows.append(r)
                log(_fmt(r))
            write_results(out_dir, _meta(dev, dtype, ceil), rows, png=False)
            continue
        inputs = make_inputs(shape, dev, dtype)
        ref = _reference(shape, inputs, slice_tokens)
        # fp32 reference dx on the slice for the same output grad as the timed backward
        g_full = torch.randn(shape.T, shape.D, device=dev, dtype=dtype,
                             generator=torch.Generator(device=dev).manual_seed(7))
        ref["dx"] = torch.autograd.grad(ref["y_out"], ref["y_leaf"], g_full[: ref["slice"]].float())[0]
        for impl in (impls or _default_impls(dev, shape)):
            if impl == "hf-batched_mm" and shape.T * shape.K * 3 * shape.D * shape.F * 2 > 8 * 2**30:
                continue
            r = _one(shape, impl, dev, dtype, inputs, ref, g_full, rep_ms, log)
            rows.append(r)
        if sweep and shape.kind == "train" and shape.name in (sweep_shapes or [todo[0].name]):
            for cfg in sweep:
                with sweep_env(cfg):
                    r = _one(shape, "moekit-triton", dev, dtype, inputs, ref, g_full, rep_ms, log)
                r["impl"] = f"moekit-triton[{cfg}]"
                r["sweep"] = True
                rows.append(r)
        if profile and shape.name in profile and dev.type == "cuda":
            prof_txt.append(_profile(shape, "moekit-triton", dev, dtype, inputs, g_full))
            log(prof_txt[-1])
        del inputs, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write_results(out_dir, _meta(dev, dtype, ceil), rows, png=False)  # partial results survive
    meta = _meta(dev, dtype, ceil)
    write_results(out_dir, meta, rows)
    if prof_txt:
        (Path(out_dir) / f"{meta['device']}-profile.txt").write_text("\n\n".join(prof_txt))
    log(table_text(rows, meta))
    return rows


def _meta(dev, dtype, ceil) -> dict:
    return {"device": _device_name(dev), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "dtype": str(dtype).replace("torch.", ""), "ceilings": ceil, "versions": _versions(),
            "cpu_smoke_test": dev.type != "cuda",
            "flops": "forward 6*T*K*D*F, forward+backward 18*T*K*D*F",
            "peak_mem": "max allocated during one forward+backward, minus what was allocated before",
            "saved_mem": "allocated after a training forward (output + tensors saved for backward), "
                         "minus what was allocated before"}


def _one(shape, impl, dev, dtype, inputs, ref, g_full, rep_ms, log) -> dict:
    try:
        r = _bench_experts_g(shape, impl, dev, dtype, inputs, ref, g_full, rep_ms=rep_ms)
    except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
        r = {"shape": shape.name, "impl": impl, "error": repr(exc)[:300]}
        log(traceback.format_exc()[-1500:])
    r["device"] = _device_name(dev)
    log(_fmt(r))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


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
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2, wts)]

    def fb():
        out = f(leaves[0], leaves[1], leaves[2], ids, leaves[3])
        return torch.autograd.grad(out, leaves, g_full)

    grads = fb()
    row["grad_rel_err"] = _rel(grads[0][:s].float(), ref["dx"])
    del grads
    _time_fwd_bwd(row, fb, shape, dev, rep_ms)
    row["saved_mem_gib"] = _saved_mem_gib(
        lambda: f(leaves[0], leaves[1], leaves[2], ids, leaves[3]), dev)
    return row


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

    x, w1, w2, ids, wts = inputs
    f = _get_impl(impl)
    leaves = [t.detach().requires_grad_(True) for t in (x, w1, w2, wts)]

    def fb():
        return torch.autograd.grad(f(leaves[0], leaves[1], leaves[2], ids, leaves[3]), leaves, g_full)

    fb()
    _sync(dev)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(3):
            fb()
        _sync(dev)
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=14, max_name_column_width=60)
    return f"## profile {shape.name} {impl} (3 x forward+backward)\n{table}"


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:<24} {r['impl']:<34} ERROR {r['error'][:120]}"

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    extra = ""
    if "weight_gbps" in r:
        extra = (f" weight GB/s {f(r['weight_gbps'], '.0f')} (graph {f(r.get('fwd_ms_graph'), '.3f')}"
                 f" plan-given {f(r.get('fwd_ms_plan_given'), '.3f')}"
                 f" plan-given-graph {f(r.get('fwd_ms_plan_given_graph'), '.3f')} ms)")
    return (f"{r['shape']:<24} {r['impl']:<34} fwd {f(r['fwd_ms'], '8.3f')} ms  fwd+bwd "
            f"{f(r.get('fwd_bwd_ms'), '8.3f')} ms  {f(r.get('fwd_bwd_tflops'), '6.1f')} TF/s  mem "
            f"{f(r.get('peak_mem_gib'), '6.2f')} GiB  saved {f(r.get('saved_mem_gib'), '5.2f')} GiB  "
            f"err {f(r.get('rel_err'), '.1e')}" + extra)


def table_text(rows: list[dict], meta: dict) -> str:
    lines = [f"# {meta['device']} {meta['dtype']} {meta['date'][:10]} ceilings {meta['ceilings']}"]
    lines += [_fmt(r) for r in rows]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (for docs/performance.md)."""
    head = ("| shape | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak GiB | "
            "rel err |\n|---|---|---:|---:|---:|---:|---:|---:|")
    out = [head]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['impl']} | error | | | | | |")
            continue

        def f(k, spec, r=r):
            v = r.get(k)
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        out.append(f"| {r['shape']} | {r['impl']} | {f('fwd_ms', '.3f')} | {f('fwd_bwd_ms', '.3f')} | "
                   f"{f('fwd_tflops', '.0f')} | {f('fwd_bwd_tflops', '.0f')} | {f('peak_mem_gib', '.2f')} | "
                   f"{f('rel_err', '.1e')} |")
    return "\n".join(out)


def write_results(out_dir, meta: dict, rows: list[dict], png: bool = True) -> tuple[Path, Path | None]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = meta["device"]
    jpath = out / f"{stem}.json"
    for r in rows:
        for k in ("shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
                  "peak_mem_gib", "rel_err", "device"):
            r.setdefault(k, None)
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    ppath = out / f"{stem}.png"
    if not png:
        return jpath, None
    try:
        plot(rows, meta, ppath)
    except ImportError:
        ppath = None
    return jpath, ppath


def plot(rows: list[dict], meta: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r and not r.get("sweep")]
    shapes = list(dict.fromkeys(r["shape"] for r in good))
    impls = list(dict.fromkeys(r["impl"] for r in good))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(shapes)), 5))
    width = 0.8 / max(1, len(impls))
    for ax, key, title in ((axes[0], "fwd_bwd_ms", "forward+backward (ms, lower is better)"),
                           (axes[1], "fwd_ms", "forward (ms, lower is better)")):
        for i, impl in enumerate(impls):
            xs, hs = [], []
            for j, s in enumerate(shapes):
                r = next((r for r in good if r["shape"] == s and r["impl"] == impl), None)
                v = None if r is None else r.get(key)
                if v:
                    xs.append(j + i * width)
                    hs.append(v)
            ax.bar(xs, hs, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"moekit experts benchmark: {meta['device']} {meta['dtype']} {meta['date'][:10]}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def check_args(a: argparse.Namespace) -> None:
    """Every option of ``main`` against what this machine will run (ValueError naming the
    option and the allowed values), before anything is measured."""
    try:
        dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {a.device!r} is not a device name; use cuda or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
    table = SHAPES if dev.type == "cuda" else CPU_SHAPES
    names = [s.name for s in table]
    where = "on a GPU" if dev.type == "cuda" else "without a GPU (the GPU shapes need CUDA)"
    for opt in ("shapes", "sweep_shapes", "profile"):
        bad = [n for n in (getattr(a, opt) or []) if n not in names]
        if bad:
            raise ValueError(f"--{opt.replace('_', '-')}: unknown shape(s) {bad}; allowed {where}: {names}")
    bad = [i for i in (a.impls or []) if i not in IMPLS]
    if bad:
        raise ValueError(f"--impls: unknown implementation(s) {bad}; allowed: {IMPLS}")
    for opt in ("shapes", "impls"):
        if getattr(a, opt) == []:
            raise ValueError(f"--{opt} was given without a name; leave it out for all")
    if a.rep_ms <= 0:
        raise ValueError(f"--rep-ms must be > 0, got {a.rep_ms}")
    for spec in a.sweep or []:
        for part in spec.split(";"):
            _check_sweep_part(part)
    if a.peers is not None and not Path(a.peers).is_dir():
        raise ValueError(f"--peers {a.peers!r} is not a folder")
    from .cli import CLIError, check_writable_dir

    try:
        check_writable_dir(a.out)
    except CLIError as e:
        raise ValueError(str(e)) from None


def _check_sweep_part(part: str) -> None:
    cfg = part[3:] if part.startswith("dw:") else part
    if "=" in part and not part.startswith("dw:"):
        var = part.split("=", 1)[0]
        if not var.isidentifier():
            raise ValueError(f"--sweep: {part!r} is not VAR=VALUE")
        return
    fields = cfg.split(",")
    if len(fields) != 5 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
        raise ValueError(
            f"--sweep: {part!r} is not a triton config 'BM,BN,BK,warps,stages' (or 'dw:BO,BI,BK,warps,stages', "
            "or VAR=VALUE): five positive integers"
        )


def main(argv: list[str] | None = None, *, default_out: str = "benchmarks/results",
         parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> int:
    """``parser_class``: the ArgumentParser to use (the ``moekit`` command passes one whose
    errors are one line)."""
    p = parser_class(prog="moekit bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=default_out, help="output folder (default %(default)s)")
    p.add_argument("--shapes", nargs="*", default=None, help="shape names (default: all)")
    p.add_argument("--impls", nargs="*", default=None, help=f"impls (default: by device); of {IMPLS}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--rep-ms", type=int, default=100, help="timing budget per measurement")
    p.add_argument("--sweep", nargs="*", default=None,
                   help="settings to time moekit-triton under at the first training shape: triton configs "
                        "'BM,BN,BK,warps,stages' (row GEMMs), 'dw:BO,BI,BK,warps,stages' (weight grads) or "
                        "VAR=VALUE, several joined by ';'")
    p.add_argument("--sweep-shapes", nargs="*", default=None, help="shapes for --sweep (default: first)")
    p.add_argument("--profile", nargs="*", default=None, help="shapes to profile moekit-triton at")
    p.add_argument("--peers", default=None, help="folder to put on sys.path (e.g. .peers for scattermoe)")
    a = p.parse_args(argv)
    try:
        check_args(a)
    except ValueError as e:
        p.error(str(e))
    if a.peers:
        sys.path.insert(0, a.peers)
    run(a.out, shapes=a.shapes, impls=a.impls, device=a.device, rep_ms=a.rep_ms, sweep=a.sweep,
        sweep_shapes=a.sweep_shapes, profile=a.profile)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
