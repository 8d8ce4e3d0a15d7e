"""A/B of the Triton weight-grad kernel's launch configs (``BO,BI,BK,warps,stages``, passed as
the launchers' ``tiles`` overrides) at training shapes: the two dW GEMMs of one backward, timed
alone (do_bench medians, the configs alternated twice), and the same weight grads over gathered
contiguous copies (the copy's time counted: ``copy+`` rows); outputs compared with the first
config's. ``--tma``: each config also with the sorted operand through a tensor descriptor
(``TritonBackend.Config.tma``); ``--cublas``: torch grouped_mm over gathered copies too;
``--gluon``: the warp-specialized Gluon kernel over the same gathered copies (Hopper) and with
the gathered operand's rows copied in its loader (``gluon gather``: no copy). The
down projection's dW is timed as the layer runs it by default (the recomputed activation carries
the routing weight, so no operand is scaled). Prints a table; with --out writes it as JSON.

    PYTHONPATH=src python benchmarks/dw_ab.py --shapes qwen3 olmoe --configs 128,128,64,8,4 128,256,64,8,3
    PYTHONPATH=src python benchmarks/dw_ab.py --configs 128,256,64,8,3 --cublas --gluon
"""

import argparse
import json

import torch

from moekit.ops.triton import weight_grads as W

from ab_common import SHAPES, ab, shape_inputs, tile

DEFAULT_CONFIGS = ["128,128,64,8,4", "128,256,64,8,3"]


def _gathered(fa, tiles, use_grouped_mm=False):
    """The same weight grad over gathered (and pre-scaled) contiguous copies: the copy's time
    is counted."""
    l_src, l_tok, r_src, r_tok, roww, scale_left, counts, offsets = fa
    lm = W._gather_rows(l_src, l_tok, roww if scale_left else None)
    rm = W._gather_rows(r_src, r_tok, None if scale_left else roww)
    return W.weight_grad(lm, None, rm, None, None, scale_left, counts, offsets, torch.bfloat16,
                         False, use_grouped_mm, tiles=tiles)[0]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=list(SHAPES))
    p.add_argument("--configs", nargs="+", default=DEFAULT_CONFIGS)
    p.add_argument("--tma", action="store_true", help="each config with and without descriptors")
    p.add_argument("--cublas", action="store_true", help="also torch grouped_mm on gathered copies")
    p.add_argument("--gluon", action="store_true", help="also the Gluon kernel on gathered copies")
    p.add_argument("--out", default=None)
    a = p.parse_args()
    rows = []
    for name in a.shapes:
        s = shape_inputs(name)
        plan, N, D, F, x, dh, act = s.plan, s.N, s.D, s.F, s.x, s.dh, s.act
        gy = torch.randn(s.T, D, device="cuda", dtype=torch.bfloat16)
        args = {"dW_up": (dh, None, x, plan.token_ids_N, None, False, plan.counts_E, plan.offsets_E),
                "dW_down": (gy, plan.token_ids_N, act, None, None, True, plan.counts_E, plan.offsets_E)}
        modes = {" ptr": {"tma": (0,)}, " tma": {"tma": (1,)}} if a.tma else {"": {}}
        for which, fa in args.items():
            variants = {}
            for c in a.configs:
                for suffix, extra in modes.items():
                    variants[c + suffix] = lambda fa=fa, t={"dw": tile(c), **extra}: W.weight_grad(
                        *fa, torch.bfloat16, False, tiles=t)[0]
            last = {"dw": tile(a.configs[-1]), "tma": (0,)}
            variants[f"copy+{a.configs[-1]}"] = lambda fa=fa, t=last: _gathered(fa, t)
            if a.cublas:
                variants["grouped_mm"] = lambda fa=fa: W.weight_grad(
                    *fa, torch.bfloat16, False, use_grouped_mm=True, tiles={"gluon": (0,)})[0]
            if a.gluon:
                variants["gluon copy+"] = lambda fa=fa: _gathered(fa, {"gluon": (1,)}, True)
                variants["gluon gather"] = lambda fa=fa: W.weight_grad(
                    *fa, torch.bfloat16, False, tiles={"gluon": (1,)})[0]
            flops = 2 * N * D * (2 * F if which == "dW_up" else F)
            rows += [dict(r, shape=name) for r in ab(variants, flops, f"{name} {which}")]
    if a.out:
        with open(a.out, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
