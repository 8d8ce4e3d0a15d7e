"""A/B of the decode launch configs at the qwen3 shape (D=2048, F=768, E=128, top-8): the
experts forward as the benchmark's decode rows time it (CUDA-graph replay, the routing plan
given), for each pair of a gated up projection tile (``decode_up_gated``: ``BM,BN,BK,warps,
stages``, BN per accumulator) and a fused down + combine tile (``BD,BF,warps,stages``), as
``TritonBackend.Config`` settings; the default configs first and last. Prints each time and
its share of the device copy rate measured in the same process, and the largest difference of
its output from the defaults' (the down + combine tile changes the order of the fp32 sums).

    PYTHONPATH=src python benchmarks/decode_ab.py --tokens 1 --out decode_ab.json
"""

import argparse
import itertools
import json

import torch
import triton.testing as tt

from moekit.bench_measure import _touched_weight_bytes, measure_ceilings
from moekit.ops import TritonBackend, moe_experts
from moekit.ops.triton_backend import DownCombineTile, GemmTile
from moekit.plan import make_plan

D, F, E, K = 2048, 768, 128, 8
UP = ["16,32,128,4,4", "16,64,128,4,4", "16,64,128,4,5", "16,64,128,8,4"]
DOWN_COMBINE = ["4,64,4,1", "4,128,8,1", "2,128,8,1", "4,128,8,2", "8,128,8,1"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    p.add_argument("--up", nargs="*", default=UP)
    p.add_argument("--down-combine", nargs="*", default=DOWN_COMBINE)
    p.add_argument("--rep-ms", type=int, default=60)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w1 = torch.randn(E, 2 * F, D, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, D, F, device=dev, dtype=torch.bfloat16) * 0.02
    ceil = measure_ceilings(dev)
    print(ceil, flush=True)
    rows = []
    for T in a.tokens:
        g = torch.Generator(device=dev).manual_seed(T)
        x = torch.randn(T, D, device=dev, dtype=torch.bfloat16, generator=g)
        ids = torch.stack([torch.randperm(E, device=dev, generator=g)[:K] for _ in range(T)])
        wts = torch.rand(T, K, device=dev, generator=g).softmax(-1)
        plan = make_plan(ids, E)
        nbytes = _touched_weight_bytes(ids, w1, w2)
        configs = [("default", TritonBackend.Config())]
        for u, d in itertools.product(a.up, a.down_combine):
            cfg = TritonBackend.Config(
                kind_tiles={"decode_up_gated": GemmTile(*map(int, u.split(",")))},
                down_combine_tile=DownCombineTile(*map(int, d.split(","))))
            configs.append((f"up={u} down_combine={d}", cfg))
        configs.append(("default (again)", TritonBackend.Config()))
        ref = None
        for name, cfg in configs:
            b = cfg.build()
            def fn(b=b, x=x, ids=ids, wts=wts, plan=plan):
                return moe_experts(x, w1, w2, ids, wts, backend=b, plan=plan)

            with torch.no_grad():
                y = fn()
                ms = tt.do_bench_cudagraph(fn, rep=a.rep_ms, return_mode="median")
            ref = y if ref is None else ref
            r = {"T": T, "config": name, "us": ms * 1e3, "weight_GBps": nbytes / ms / 1e6,
                 "of_copy": nbytes / ms / 1e6 / ceil["copy_gbps"],
                 "max_abs_diff": float((y.float() - ref.float()).abs().max())}
            rows.append(r)
            print(f"T={T} {name:44s} {r['us']:7.2f} us  {r['of_copy']:.1%} of copy  "
                  f"max diff {r['max_abs_diff']:.1e}", flush=True)
    if a.out:
        with open(a.out, "w") as f:
            json.dump({"ceilings": ceil, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
