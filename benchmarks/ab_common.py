"""Shared by the kernel A/B scripts (``dw_ab.py``, ``gemm_ab.py``): time a few variants of one
call, alternated, as do_bench medians, and compare their outputs with the first variant's."""

from types import SimpleNamespace

import torch
import triton

from moekit.plan import make_plan

# the training shapes (T, D, F, E, K) the A/B scripts take by name
SHAPES = {"qwen3": (16384, 2048, 768, 128, 8), "qwen3-t8192": (8192, 2048, 768, 128, 8),
          "olmoe": (16384, 2048, 1024, 64, 8),
          "gpt-oss": (16384, 2880, 2880, 32, 4), "mixtral": (8192, 4096, 14336, 8, 2),
          "deepseek-64e": (8192, 7168, 2048, 64, 8)}


def tile(spec: str) -> tuple[int, ...]:
    """``"BM,BN,BK,warps,stages"`` -> ints (a launch config as the launchers' ``tiles`` take it)."""
    return tuple(int(v) for v in spec.split(","))


def ab(variants: dict, flops: float, label: str, reps: int = 2) -> list[dict]:
    """``variants``: name -> zero-argument callable returning the output tensor. Each is timed
    ``reps`` times, the variants alternated; the best median is kept."""
    res, outs = {}, {}
    for _ in range(reps):
        for v, fn in variants.items():
            outs[v] = fn()
            res.setdefault(v, []).append(
                triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"))
    first = next(iter(variants))
    rows = []
    for v, ms in res.items():
        best = min(ms)
        diff = (outs[v].float() - outs[first].float()).abs().max().item()
        rows.append(dict(label=label, variant=v, ms=best, runs=ms, tflops=flops / best / 1e9,
                         max_abs_diff=diff))
        print(f"{label:22s} {v:26s} {best:7.3f} ms {flops / best / 1e9:6.1f} TF/s "
              f"runs {['%.3f' % m for m in ms]} maxdiff={diff:.1e}", flush=True)
    return rows


def routed_plan(T: int, E: int, K: int):
    """The routing plan of a random top-K routing of T tokens over E experts, on the GPU."""
    g = torch.Generator(device="cpu").manual_seed(0)
    return make_plan(torch.randn(T, E, generator=g).topk(K, -1).indices.cuda(), E)


def shape_inputs(name: str) -> SimpleNamespace:
    """What both A/B scripts time at a training shape: its dims (T, D, F, E, K and N = T*K), a
    random top-K routing plan, and random bf16 operands ``x [T, D]``, ``dh [N, 2F]``,
    ``act [N, F]``."""
    T, D, F, E, K = SHAPES[name]
    N = T * K
    bf16 = {"device": "cuda", "dtype": torch.bfloat16}
    return SimpleNamespace(T=T, D=D, F=F, E=E, K=K, N=N, plan=routed_plan(T, E, K),
                           x=torch.randn(T, D, **bf16), dh=torch.randn(N, 2 * F, **bf16),
                           act=torch.randn(N, F, **bf16))
