"""A/B of the forward GEMM kernels' launch configs at training shapes: the gated up projection
(``up_kernel``: token gather + gate/up GEMM + SwiGLU) and the row GEMM (``rows_gemm_kernel``:
the down projection), each timed alone (do_bench medians, the configs alternated twice).
Configs are ``BM,BN,BK,warps,stages`` as ``MOEKIT_TRITON_UP_GATED_CONFIG`` /
``MOEKIT_TRITON_ROWS_CONFIG`` take them (BN per accumulator for the gated kernel).

    PYTHONPATH=src python benchmarks/gemm_ab.py --shapes qwen3 olmoe --out ab.json
"""

import argparse
import json
import os

import torch
import triton

from moekit.ops.triton import launchers as L
from moekit.plan import make_plan

SHAPES = {"qwen3": (16384, 2048, 768, 128, 8), "olmoe": (16384, 2048, 1024, 64, 8),
          "gpt-oss": (16384, 2880, 2880, 32, 4), "mixtral": (8192, 4096, 14336, 8, 2)}
UP = ["128,128,64,8,3", "128,128,64,8,4", "128,128,32,8,4", "64,128,64,4,4", "128,64,64,4,4",
      "256,64,64,8,3"]
ROWS = ["128,256,64,8,3", "128,256,64,8,4", "128,128,64,8,4", "256,128,64,8,3", "128,256,32,8,5"]


def _timed(fn, var, cfg):
    old = os.environ.get(var)
    os.environ[var] = cfg
    try:
        out = fn()
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median"), out
    finally:
        os.environ.pop(var, None) if old is None else os.environ.__setitem__(var, old)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["qwen3", "olmoe"])
    p.add_argument("--up", nargs="*", default=UP)
    p.add_argument("--rows", nargs="*", default=ROWS)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for name in a.shapes:
        T, D, F, E, K = SHAPES[name]
        g = torch.Generator(device="cpu").manual_seed(0)
        ids = torch.randn(T, E, generator=g).topk(K, -1).indices.cuda()
        plan = make_plan(ids, E)
        N = T * K
        x = torch.randn(T, D, device="cuda", dtype=torch.bfloat16)
        w1 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
        w2 = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * F ** -0.5
        act = torch.randn(N, F, device="cuda", dtype=torch.bfloat16)
        kinds = [
            ("up_gated", "MOEKIT_TRITON_UP_GATED_CONFIG", a.up, 2 * N * D * 2 * F,
             lambda: L.up_forward(x, w1, None, plan.token_ids_N, None, plan.counts_E,
                                  plan.offsets_E, "silu", True)[1]),
            ("rows", "MOEKIT_TRITON_ROWS_CONFIG", a.rows, 2 * N * D * F,
             lambda: L.rows_gemm(act, w2, None, plan.counts_E, plan.offsets_E)),
        ]
        for kind, var, cfgs, flops, fn in kinds:
            res, outs = {}, {}
            for _ in range(2):
                for c in cfgs:
                    ms, outs[c] = _timed(fn, var, c)
                    res.setdefault(c, []).append(ms)
            for c, ms in res.items():
                best = min(ms)
                diff = (outs[c].float() - outs[cfgs[0]].float()).abs().max().item()
                rows.append(dict(shape=name, kernel=kind, config=c, ms=best, runs=ms,
                                 tflops=flops / best / 1e9, max_abs_diff=diff))
                print(f"{name:8s} {kind:9s} {c:16s} {best:7.3f} ms {flops / best / 1e9:6.1f} TF/s "
                      f"runs {['%.3f' % m for m in ms]} maxdiff={diff:.1e}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
