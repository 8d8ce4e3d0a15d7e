"""A/B of the decode launch configs at the qwen3 shape (D=2048, F=768, E=128, top-8): the
experts forward as the benchmark's decode rows time it (CUDA-graph replay, the routing plan
given), for each pair of an up projection (a GEMM tile, ``decode_up_gated``: ``BM,BN,BK,warps,
stages``, BN per accumulator; or the matrix-vector products over every SM, ``up_gemv_tile``:
``BP,BD,per_sm,warps``) and a fused down + combine tile (``BD,BF,warps,stages``), as
``TritonBackend.Config`` settings; the default configs first and last. Prints each time and
its share of the device copy rate measured in the same process, and the largest difference of
its output from the defaults' (the tiles change the order of the fp32 sums). ``--alone`` also
times each up projection by itself (its weights' bytes against the copy rate).

    PYTHONPATH=src python benchmarks/decode_ab.py --tokens 1 --alone --out decode_ab.json
"""

import argparse
import itertools
import json

import torch
import triton.testing as tt

from moekit.bench_measure import _touched_weight_bytes, measure_ceilings
from moekit.ops import TritonBackend, moe_experts
from moekit.ops.triton_backend import DownCombineTile, GemmTile, UpGemvTile
from moekit.plan import make_plan

D, F, E, K = 2048, 768, 128, 8
UP = ["16,64,128,4,4"]
UP_GEMV = ["4,256,4,4", "4,512,4,4", "8,256,4,4", "2,512,4,4", "4,256,2,8", "8,512,2,8",
           "4,256,8,4", "2,256,8,2", "4,1024,2,8"]
DOWN_COMBINE = ["4,128,8,1"]


def _configs(a, T):
    """(name, settings) of every up x down + combine pair, the defaults first and last."""
    out = [("default", TritonBackend.Config())]
    ups = [("gemm", u, {"gemv_up_tokens": 0, "kind_tiles": {"decode_up_gated": GemmTile.parse(u)}})
           for u in a.up]
    ups += [("gemv", u, {"gemv_up_tokens": T, "up_gemv_tile": UpGemvTile.parse(u)}) for u in a.up_gemv]
    for (kind, u, kw), d in itertools.product(ups, a.down_combine):
        out.append((f"{kind}={u} down_combine={d}",
                    TritonBackend.Config(down_combine_tile=DownCombineTile.parse(d), **kw)))
    out.append(("default (again)", TritonBackend.Config()))
    return out


def _up_alone(a, x, w1, plan, nbytes_up, ceil, T):
    """Each up projection alone (CUDA graph): microseconds and share of the copy rate."""
    from moekit.ops.triton import decode, launchers
    from moekit.ops.triton_backend import parse_tiles

    rows = []
    runs = [(f"gemm={u}", lambda u=u: launchers.up_forward(
        x, w1, None, plan.token_ids_N, None, plan.counts_E, plan.offsets_E, "silu", True, False,
        tiles=parse_tiles(TritonBackend.Config(
            kind_tiles={"decode_up_gated": GemmTile.parse(u)}).tiles_spec())))
            for u in a.up]
    runs += [(f"gemv={u}", lambda u=u: decode.up_gemv(
        x, w1, None, plan.token_ids_N, plan.expert_ids_N, None, "silu", True,
        tiles=parse_tiles(TritonBackend.Config(up_gemv_tile=UpGemvTile.parse(u)).tiles_spec())))
        for u in a.up_gemv]
    for name, fn in runs:
        fn()
        ms = tt.do_bench_cudagraph(fn, rep=a.rep_ms, return_mode="median")
        r = {"T": T, "config": "up alone " + name, "us": ms * 1e3,
             "of_copy": nbytes_up / ms / 1e6 / ceil["copy_gbps"]}
        rows.append(r)
        print(f"T={T} up alone {name:34s} {r['us']:7.2f} us  {r['of_copy']:.1%} of copy", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    p.add_argument("--up", nargs="*", default=UP)
    p.add_argument("--up-gemv", nargs="*", default=UP_GEMV)
    p.add_argument("--alone", action="store_true", help="also time each up projection alone")
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
        ref = None
        if a.alone:
            rows += _up_alone(a, x, w1, plan, _touched_weight_bytes(ids, w1, w2[:, :0]), ceil, T)
        for name, cfg in _configs(a, T):
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
