"""The up projection's GEMM (``h = x[tok] @ W_up.T`` at a training shape, bf16, alone) with x's
rows gathered by token in the GEMM's prologue (``up_forward``, TMA weight tiles), against
``gather_rows`` then the persistent TMA row GEMM (both operands through descriptors), and that
row GEMM on rows gathered already: what ``TritonBackend.Config.gather_x`` decides between.

    PYTHONPATH=src python benchmarks/gather_ab.py qwen3 olmoe gpt-oss mixtral deepseek-64e
"""

import sys

import torch

from moekit.ops.triton import launchers as L

from ab_common import ab, shape_inputs


def main(names):
    for name in names:
        s = shape_inputs(name)
        plan, N, D, F, E, x = s.plan, s.N, s.D, s.F, s.E, s.x
        w1 = torch.randn(E, 2 * F, D, device="cuda", dtype=torch.bfloat16) * D ** -0.5
        tok, counts, offsets = plan.token_ids_N, plan.counts_E, plan.offsets_E
        xp = L.gather_rows(x, tok)
        no_gather = {"tma": (1,), "gather_x": (0,)}
        ab({
            "up tma (gather in prologue)": lambda: L.up_forward(
                x, w1, None, tok, None, counts, offsets, "silu", True, tiles=no_gather)[0],
            "gather + rows tma": lambda: L.rows_gemm(L.gather_rows(x, tok), w1, None, counts, offsets),
            "rows tma on gathered x": lambda: L.rows_gemm(xp, w1, None, counts, offsets),
        }, 2 * N * D * 2 * F, name)


if __name__ == "__main__":
    main(sys.argv[1:] or ["qwen3", "olmoe", "gpt-oss", "mixtral", "deepseek-64e"])
