"""Where a model benchmark's training step goes: for each family and experts mode (as
``bench_model.py`` builds them), the step's time without the profiler, then under the torch
profiler the GPU's busy time (the union of the kernels' intervals) and the kernel time by
category, with moekit's own and the unnamed kernels listed for the ``moekit`` mode.

    PYTHONPATH=src python benchmarks/profile_model.py --families qwen3_moe gpt_oss
"""

import argparse
import collections
import json
import os
import sys
import tempfile
import time

import torch
from kernel_timeline import union

from moekit.bench_model import FAMILIES, MODES, _set_mode, build_model

# kernel-name substrings -> category (the first match wins)
CATEGORIES = [
    ("moekit", ("up_tma", "up_kernel", "rows_gemm", "rows_ws", "weight_grad_ws", "dw_kernel",
                "dw_tma", "combine", "act_bwd", "gather_rows", "down_dgrad", "dgrad",
                "zero_empty", "bias_grad", "plan_kernel")),
    ("attention", ("flash", "fmha", "attention", "Attention", "cudnn")),
    ("dense gemm", ("gemm", "Gemm", "sm90_xmma", "cutlass", "nvjet", "cublas")),
    ("sort/scan/index", ("sort", "Sort", "scan", "Scan", "index", "Index", "scatter", "topk",
                         "TopK", "radix")),
    ("elementwise/reduce", ("elementwise", "reduce", "Reduce", "vectorized", "unrolled")),
]


def category(name: str) -> str:
    for cat, keys in CATEGORIES:
        if any(k in name for k in keys):
            return cat
    return "other"


def kernels(prof) -> list[dict]:
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "trace.json")
        prof.export_chrome_trace(path)
        with open(path) as f:
            events = json.load(f)["traceEvents"]
    return [e for e in events if e.get("ph") == "X" and e.get("cat") == "kernel"]


def busy_ms(events: list[dict]) -> float:
    """The union of the kernels' intervals, in ms."""
    return sum(b - a for a, b in union((e["ts"], e["ts"] + e["dur"]) for e in events)) / 1e3


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=["qwen3_moe"], choices=sorted(FAMILIES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("needs a CUDA GPU")
    import moekit.hf  # noqa: F401 - registers experts_implementation="moekit"

    for fam in a.families:
        model = build_model(fam, layers=2, vocab=32768, dtype=torch.bfloat16, device="cuda")
        ids = torch.randint(0, 32768, (4, 2048), device="cuda")

        def step():
            model(ids, labels=ids, use_cache=False).loss.backward()
            for q in model.parameters():
                q.grad = None

        def timed(n):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(n):
                step()
            torch.cuda.synchronize()
            return (time.perf_counter() - t0) / n * 1e3

        for mode in a.modes:
            undo = _set_mode(model, mode)
            try:
                timed(3)  # warm-up
                plain = timed(a.steps)
                acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
                with torch.profiler.profile(activities=acts) as prof:
                    profiled = timed(a.steps)
            finally:
                undo()
            ev = kernels(prof)
            by = collections.Counter()
            for e in ev:
                by[category(e["name"])] += e["dur"] / 1e3 / a.steps
            print(f"{fam} {mode:10s} step {plain:6.1f} ms (profiled {profiled:6.1f}), GPU busy "
                  f"{busy_ms(ev) / a.steps:6.1f}, kernels: "
                  + ", ".join(f"{k} {v:.1f}" for k, v in by.most_common()), flush=True)
            if mode == "moekit":
                top = collections.Counter()
                for e in ev:
                    if category(e["name"]) in ("moekit", "other"):
                        top[e["name"][:60]] += e["dur"] / 1e3 / a.steps
                print("    moekit and other kernels, ms per step: "
                      + "; ".join(f"{k} {v:.2f}" for k, v in top.most_common(12)), flush=True)
        model = None
        torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
