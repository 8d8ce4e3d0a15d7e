"""A/B of the decode launch configs at the qwen3 shape (D=2048, F=768, E=128, top-8): the
experts forward as the benchmark's decode rows time it (CUDA-graph replay, the routing plan
given), for each pair of a gated up projection tile (``decode_up_gated``: ``BM,BN,BK,warps,
stages``, BN per accumulator) and a down projection: the fused down + combine kernel
(``BD,BF,warps,stages``) or, unfused (``fused_decode_tokens=0``), the row GEMM
(``decode_rows`` tile) then the combine; as ``TritonBackend.Config`` settings, the default
configs first and last. Prints each time and its share of the device copy rate measured in the
same process, and the largest difference of its output from the defaults' (the tiles change
the order of the fp32 sums). ``--alone`` also times each kernel by itself against the bytes of
the weights it reads. ``--copies N``: the calls of one timing cycle through N copies of the
weights (the H200's 50 MB L2 holds much of one qwen3 token's 75 MB of touched weights, or all
of one kernel's, so that replays of one copy read part of them from L2).

    PYTHONPATH=src python benchmarks/decode_ab.py --tokens 1 --alone --out decode_ab.json
"""

import argparse
import itertools
import json

import torch
import triton.testing as tt

from moekit.bench_measure import _touched_weight_bytes, measure_ceilings
from moekit.ops import TritonBackend, moe_experts
from moekit.ops.triton_backend import DownCombineTile, GemmTile, parse_tiles
from moekit.plan import make_plan

D, F, E, K = 2048, 768, 128, 8
UP = ["16,64,128,4,4"]
DOWN_COMBINE = ["4,128,8,1"]
ROWS = ["16,32,128,4,4", "16,64,128,4,4", "16,32,256,4,3", "16,64,64,4,6", "16,128,128,8,4",
        "16,32,128,4,6", "16,16,128,4,4"]


def _configs(a):
    """(name, settings) of every up x down pair, the defaults first and last."""
    out = [("default", TritonBackend.Config())]
    for u, d in itertools.product(a.up, a.down_combine):
        out.append((f"up={u} down_combine={d}", TritonBackend.Config(
            kind_tiles={"decode_up_gated": GemmTile.parse(u)}, down_combine_tile=DownCombineTile.parse(d))))
    for u, r in itertools.product(a.up, a.rows):
        out.append((f"up={u} rows={r} + combine", TritonBackend.Config(
            fused_decode_tokens=0,
            kind_tiles={"decode_up_gated": GemmTile.parse(u), "decode_rows": GemmTile.parse(r)})))
    out.append(("default (again)", TritonBackend.Config()))
    return out


class _Cycle:
    """The next of ``items`` at each call (a CUDA graph captures each call's choice)."""

    def __init__(self, items):
        self.items, self.i = items, -1

    def __call__(self):
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _alone(a, x, ws, ids, wts, plan, ceil, T):
    """Each decode kernel alone (CUDA graph): microseconds and its weights' share of the copy
    rate."""
    from moekit.ops.triton import decode, launchers

    w1, w2 = ws[0]
    nxt = _Cycle(ws)

    def tiles(**kw):
        return parse_tiles(TritonBackend.Config(**kw).tiles_spec())

    up_bytes = _touched_weight_bytes(ids, w1, w2[:, :0])
    down_bytes = _touched_weight_bytes(ids, w1[:, :0], w2)
    act = torch.randn(plan.num_rows, F, device=x.device, dtype=x.dtype)
    y = torch.randn(plan.num_rows, D, device=x.device, dtype=x.dtype)
    runs = [(f"up={u}", up_bytes, lambda u=u: launchers.up_forward(
        x, nxt()[0], None, plan.token_ids_N, None, plan.counts_E, plan.offsets_E, "silu", True, False,
        tiles=tiles(kind_tiles={"decode_up_gated": GemmTile.parse(u)}))) for u in a.up]
    runs += [(f"down_combine={d}", down_bytes, lambda d=d: decode.down_combine(
        act, nxt()[1], None, plan.inverse_TK, plan.expert_ids_N, wts,
        tiles=tiles(down_combine_tile=DownCombineTile.parse(d)))) for d in a.down_combine]
    runs += [(f"rows={r}", down_bytes, lambda r=r: launchers.rows_gemm(
        act, nxt()[1], None, plan.counts_E, plan.offsets_E,
        tiles(kind_tiles={"decode_rows": GemmTile.parse(r)}))) for r in a.rows]
    runs.append(("combine", 0, lambda: launchers.combine(y, plan.inverse_TK, wts, None)))
    rows = []
    for name, nbytes, fn in runs:
        fn()
        ms = tt.do_bench_cudagraph(fn, rep=a.rep_ms, return_mode="median")
        r = {"T": T, "config": "alone " + name, "us": ms * 1e3,
             "of_copy": nbytes / ms / 1e6 / ceil["copy_gbps"]}
        rows.append(r)
        print(f"T={T} alone {name:38s} {r['us']:7.2f} us  {r['of_copy']:.1%} of copy", flush=True)
    return rows


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--tokens", type=int, nargs="+", default=[1])
    p.add_argument("--up", nargs="*", default=UP)
    p.add_argument("--down-combine", nargs="*", default=DOWN_COMBINE)
    p.add_argument("--rows", nargs="*", default=ROWS)
    p.add_argument("--alone", action="store_true", help="also time each kernel alone")
    p.add_argument("--copies", type=int, default=4, help="weight copies the calls cycle through")
    p.add_argument("--rep-ms", type=int, default=60)
    p.add_argument("--out", default=None)
    a = p.parse_args()
    dev = torch.device("cuda")
    torch.manual_seed(0)
    w1 = torch.randn(E, 2 * F, D, device=dev, dtype=torch.bfloat16) * 0.02
    w2 = torch.randn(E, D, F, device=dev, dtype=torch.bfloat16) * 0.02
    ws = [(w1, w2)] + [(w1.clone(), w2.clone()) for _ in range(a.copies - 1)]
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
            rows += _alone(a, x, ws, ids, wts, plan, ceil, T)
        for name, cfg in _configs(a):
            b, nxt = cfg.build(), _Cycle(ws)

            def fn(b=b, x=x, ids=ids, wts=wts, plan=plan, nxt=nxt):
                return moe_experts(x, *nxt(), ids, wts, backend=b, plan=plan)

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
            json.dump({"ceilings": ceil, "copies": a.copies, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
