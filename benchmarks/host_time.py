"""Host time against GPU time of one experts forward+backward, per impl (same routing and
weights as the benchmark): ``do_bench``'s median (the call timed alone, as the benchmark does),
the GPU time with the host's work hidden behind a queue of matmuls issued just before the call
(events around the call alone), and the host time to issue the call (no sync). Where the host
time approaches the GPU time, the GPU waits for the launches.

    PYTHONPATH=src python benchmarks/host_time.py --shapes qwen3-30b-a3b mixtral-8x7b
"""

import argparse
import statistics
import time

import torch
import triton.testing as tt

from moekit.bench_impls import SHAPES, _get_impl, make_inputs
from moekit.bench_measure import _fwd_bwd_fn


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", nargs="+", default=["qwen3-30b-a3b"], choices=[s.name for s in SHAPES])
    p.add_argument("--impls", nargs="+", default=["moekit-triton", "hf-grouped_mm"])
    p.add_argument("--reps", type=int, default=7)
    a = p.parse_args()
    dev = torch.device("cuda")
    m = torch.randn(8192, 8192, device=dev, dtype=torch.bfloat16)
    start, mid, end = (torch.cuda.Event(enable_timing=True) for _ in range(3))
    start.record()
    for _ in range(20):
        m @ m
    end.record()
    torch.cuda.synchronize()
    matmul_ms = start.elapsed_time(end) / 20
    for shape in [s for s in SHAPES if s.name in a.shapes]:
        inputs = make_inputs(shape, dev, torch.bfloat16)
        g = torch.randn(shape.T, shape.D, device=dev, dtype=torch.bfloat16)
        for impl in a.impls:
            fb = _fwd_bwd_fn(_get_impl(impl), inputs, g)
            for _ in range(3):
                fb()
            torch.cuda.synchronize()
            alone = tt.do_bench(fb, warmup=50, rep=300, return_mode="median")
            host, hidden = [], []
            for _ in range(a.reps):
                torch.cuda.synchronize()
                t0 = time.perf_counter()
                r = fb()
                host.append((time.perf_counter() - t0) * 1e3)
                del r
                torch.cuda.synchronize()
                for _ in range(int(2 * alone / matmul_ms) + 2):  # GPU work queued ahead
                    m @ m
                mid.record()
                r = fb()
                end.record()
                torch.cuda.synchronize()
                hidden.append(mid.elapsed_time(end))
                del r
            print(f"{shape.name:16s} {impl:14s} timed alone {alone:7.2f} ms | GPU time, host hidden "
                  f"{statistics.median(hidden):7.2f} ms | host time to issue {statistics.median(host):6.2f} ms",
                  flush=True)


if __name__ == "__main__":
    main()
