"""Kernel timelines under the torch profiler, for the benchmarks: the union of kernel
intervals, one call's timeline split into communication (NCCL) and compute with how much of
the communication is hidden, and where a call makes the host wait for the GPU."""

from __future__ import annotations

import torch


def union(intervals):
    out = []
    for a, b in sorted(intervals):
        if out and a <= out[-1][1]:
            out[-1][1] = max(out[-1][1], b)
        else:
            out.append([a, b])
    return out


def timeline(fn, device) -> dict:
    """One call of ``fn`` under the torch profiler: the GPU kernels' intervals, split into
    communication (NCCL kernels) and compute (every other kernel), and how much of the
    communication time runs while some compute kernel runs (hidden). Times in ms."""
    from torch.profiler import ProfilerActivity, profile

    torch.cuda.synchronize(device)
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize(device)
    comm, comp, named = [], [], []
    for e in prof.events():
        if e.device_type != torch.autograd.DeviceType.CUDA or e.time_range.elapsed_us() <= 0:
            continue
        iv = (e.time_range.start, e.time_range.end)
        (comm if "nccl" in e.name.lower() else comp).append(iv)
        named.append((iv[0], iv[1], e.name))
    comp_u = union(comp)
    comm_u = union(comm)
    hidden = 0.0
    for a, b in comm_u:
        for c, d in comp_u:
            if d <= a:
                continue
            if c >= b:
                break
            hidden += min(b, d) - max(a, c)
    comm_ms = sum(b - a for a, b in comm_u) / 1e3
    span = (max(b for _, b in comp_u + comm_u) - min(a for a, _ in comp_u + comm_u)) / 1e3 if comp_u else 0.0
    # where the GPU runs nothing: the longest gaps, with the kernels on either side
    named.sort()
    gaps, end, prev = [], None, None
    for a, b, name in named:
        if end is not None and a > end:
            gaps.append(((a - end) / 1e3, prev[:50], name[:50]))
        if end is None or b > end:
            end, prev = b, name
    gaps.sort(reverse=True)
    per_kernel: dict = {}
    for a, b, name in named:
        k = per_kernel.setdefault(name[:60], [0, 0.0])
        k[0] += 1
        k[1] += (b - a) / 1e3
    top = sorted(per_kernel.items(), key=lambda kv: -kv[1][1])[:14]
    return {"idle_ms": sum(g[0] for g in gaps), "top_gaps": gaps[:8],
            "top_kernels": [(n, c, round(ms, 3)) for n, (c, ms) in top],
            "span_ms": span, "compute_ms": sum(b - a for a, b in comp_u) / 1e3, "comm_ms": comm_ms,
            "comm_hidden_ms": hidden / 1e3, "comm_hidden_fraction": hidden / 1e3 / comm_ms if comm_ms else None,
            "comm_kernels": len(comm), "compute_kernels": len(comp)}


def host_syncs(fn) -> list[str]:
    """Where one call of ``fn`` makes the host wait for the GPU (torch's sync debug mode; each
    such wait idles the GPU while the host enqueues the next kernels): ``file:line`` each."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            fn()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    return [f"{w.filename}:{w.lineno}" for w in caught if "synchroniz" in str(w.message).lower()]
