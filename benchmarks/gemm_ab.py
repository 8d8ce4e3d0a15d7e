"""A/B of the forward GEMM kernels' launch configs at training shapes: the gated up projection
(``up_kernel``: token gather + gate/up GEMM + SwiGLU) and the row GEMM (``rows_gemm_kernel``:
the down projection), each timed alone (do_bench medians, the configs alternated twice).
Configs are ``BM,BN,BK,warps,stages``, passed as the launchers' ``tiles`` overrides (BN per
accumulator for the gated kernel). ``--tma`` times each config with its tiles read through tensor
descriptors (``TritonBackend.Config.tma=True``), one program per tile and persistent, beside
the pointer loads (``tma=False``); the
kind ``rows_t`` is the backward's input grad (``dh @ gate_up``, the weight seen transposed).

    PYTHONPATH=src python benchmarks/gemm_ab.py --shapes qwen3 olmoe --tma --out ab.json
"""

import argparse
import json

import torch

from moekit.ops.triton import launchers as L
from moekit.ops.triton import weight_grads as W

from ab_common import ab, shape_inputs, tile

UP = ["128,128,64,8,3", "128,128,64,8,4", "128,128,32,8,4", "64,128,64,4,4", "128,64,64,4,4",
      "256,64,64,8,3"]
ROWS = ["128,256,64,8,3", "128,256,64,8,4", "128,128,64,8,4", "256,128,64,8,3", "128,256,32,8,5"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["qwen3", "olmoe"])
    p.add_argument("--up", nargs="*", default=UP)
    p.add_argument("--rows", nargs="*", default=ROWS)
    p.add_argument("--rows-t", nargs="*", default=[], help="configs of the input-grad row GEMM")
    p.add_argument("--cublas", action="store_true", help="also the row GEMM by torch grouped_mm")
    p.add_argument("--tma", action="store_true", help="each config with and without descriptors")
    p.add_argument("--gluon", action="store_true", help="also the row GEMMs by the Gluon kernel")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for name in a.shapes:
        s = shape_inputs(name)
        plan, N, D, F, E, x, dh, act = s.plan, s.N, s.D, s.F, s.E, s.x, s.dh, s.act
        w1 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
        w2 = torch.randn(E, D, F, device="cuda", dtype=torch.bfloat16) * F ** -0.5
        kinds = [
            ("up_gated", a.up, 2 * N * D * 2 * F,
             lambda t: L.up_forward(x, w1, None, plan.token_ids_N, None, plan.counts_E,
                                    plan.offsets_E, "silu", True, tiles=t)[1]),
            ("rows", a.rows, 2 * N * D * F,
             lambda t: L.rows_gemm(act, w2, None, plan.counts_E, plan.offsets_E, tiles=t)),
            ("rows_t", a.rows_t, 2 * N * D * 2 * F,
             lambda t: L.rows_gemm(dh, w1.transpose(1, 2), None, plan.counts_E, plan.offsets_E,
                                   tiles=t)),
        ]
        for kind, cfgs, flops, fn in kinds:
            if not cfgs and not (a.gluon and kind != "up_gated"):
                continue
            key = "rows" if kind == "rows_t" else kind
            variants = {}
            modes = {"": {}}
            if a.tma:
                modes = {" ptr": {"tma": (0,)}, " tma": {"tma": (1,), "persistent": (0,)},
                         " tma persistent": {"tma": (1,), "persistent": (1,)}}
                if kind == "up_gated":
                    modes = {" ptr": {"tma": (0,)}, " tma": {"tma": (1,)}}
            for c in cfgs:
                for suffix, extra in modes.items():
                    t = {key: tile(c), "gluon": (0,), **extra}
                    variants[c + suffix] = lambda fn=fn, t=t: fn(t)
            if kind != "up_gated" and a.gluon:  # the default Triton config, then Gluon
                variants["triton default"] = lambda fn=fn: fn({"gluon": (0,)})
                variants["gluon"] = lambda fn=fn: fn({"gluon": (1,)})
            if kind == "rows" and a.cublas:  # the same GEMM by torch's grouped GEMM (cuBLAS)
                w2_t = w2.transpose(1, 2)
                variants["grouped_mm"] = lambda w=w2_t: W.grouped_mm(act, w, plan.offsets_E)
            if kind == "rows_t" and a.cublas:
                variants["grouped_mm"] = lambda: W.grouped_mm(dh, w1, plan.offsets_E)
            rows += [dict(r, shape=name, kernel=kind) for r in ab(variants, flops, f"{name} {kind}")]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
