"""Host cost of the EP forward on CPU (gloo): median ms per forward / forward+backward and aten
op counts (profiler cpu_op events), plain layer vs EP rows vs EP tokens, world 1 and 2.

    PYTHONPATH=src python3 benchmarks/ep_host.py [--iters 200] [--worlds 1,2]
"""
import argparse
import copy
import json
import os
import socket
import statistics
import sys
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moekit import GroupedExperts, MoE, TokenChoiceTopKRouter
from moekit.parallel import apply_ep

D, F, E, K, T = 64, 32, 16, 4, 64


def build(seed=0):
    torch.manual_seed(seed)
    cfg = MoE.Config(dim=D, hidden_dim=F, num_experts=E,
                     router=TokenChoiceTopKRouter.Config(top_k=K, score_func="softmax", route_norm=True),
                     experts=GroupedExperts.Config(activation="silu"))
    return cfg.build()


def med(fn, iters, barrier):
    rs = [med1(fn, iters, barrier) for _ in range(3)]
    return min(r[0] for r in rs), min(r[1] for r in rs)


def med1(fn, iters, barrier):
    for _ in range(20):
        fn()
    ts = []
    for _ in range(iters):
        if barrier:
            dist.barrier()
        t0, c0 = time.perf_counter(), time.thread_time()
        fn()
        ts.append((time.perf_counter() - t0, time.thread_time() - c0))
    return (statistics.median(t for t, _ in ts) * 1e3, statistics.median(c for _, c in ts) * 1e3)


def ops(fn):
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    evs = [e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CPU]
    evs.sort(key=lambda e: e.time_range.start)
    def top(e):
        p = e.cpu_parent
        while p is not None:
            if p.name.startswith("aten::") or "gloo" in p.name:
                return False
            p = p.cpu_parent
        return True
    aten = [e for e in evs if e.name.startswith("aten::") and top(e)]
    # ops after the counts gather (the host sync) until the first expert GEMM
    gather = [e for e in evs if "all_gather" in e.name or "allgather" in e.name]
    after = None
    if gather:
        t_sync = gather[0].time_range.end
        gemm = [e for e in aten if e.time_range.start > t_sync and e.name in (
            "aten::_grouped_mm",)]
        if gemm:
            t_g = gemm[0].time_range.start
            # top-level-ish: count aten ops starting in between
            after = sum(1 for e in aten if t_sync < e.time_range.start < t_g)
        before = sum(1 for e in aten if e.time_range.start < gather[0].time_range.start)
    else:
        before = None
    return len(aten), before, after


def worker(rank, W, port, iters, q):
    try:
        worker1(rank, W, port, iters, q)
    except BaseException:
        import traceback
        traceback.print_exc()
        q.put(None)
        os._exit(1)


def worker1(rank, W, port, iters, q):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=W)
    res = {}
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, D, generator=g)
    dy = torch.randn(T, D, generator=g)
    base = build()
    layers = {"plain": copy.deepcopy(base)}
    for ex in ("rows", "tokens"):
        m = copy.deepcopy(base)
        apply_ep(m, exchange=ex)
        layers[f"ep-{ex}"] = m
    for name, m in layers.items():
        barrier = name != "plain" and W > 1
        xr = x.clone().requires_grad_()

        def fwd():
            return m(xr)

        def fwdbwd():
            m(xr).backward(dy)

        def fwd_ng():
            with torch.no_grad():
                return m(x)

        n_fwd = ops(fwd)
        n_fb = ops(fwdbwd)
        f, fb, ng = med(fwd, iters, barrier), med(fwdbwd, iters, barrier), med(fwd_ng, iters, barrier)
        res[name] = dict(fwd_ms=f[0], fwdbwd_ms=fb[0], nograd_ms=ng[0],
                         fwd_cpu=f[1], fwdbwd_cpu=fb[1], nograd_cpu=ng[1],
                         fwd_ops=n_fwd[0], before_sync=n_fwd[1], sync_to_gemm=n_fwd[2],
                         fwdbwd_ops=n_fb[0])
    if rank == 0:
        q.put(res)
    dist.barrier()
    dist.destroy_process_group()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--worlds", default="1,2")
    a = ap.parse_args()
    out = {}
    for W in map(int, a.worlds.split(",")):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        s.close()
        ctx = mp.get_context("spawn")
        q = ctx.SimpleQueue()
        ps = [ctx.Process(target=worker, args=(r, W, port, a.iters, q)) for r in range(W)]
        for p in ps:
            p.start()
        r = q.get()
        if r is None:
            for p in ps:
                p.kill()
            sys.exit("a worker failed")
        for p in ps:
            p.join()
        out[W] = r
    print(f"{'W':>2} {'layer':<10} {'fwd ms':>7} {'(cpu)':>6} {'nograd':>7} {'(cpu)':>6} {'fwd+bwd':>8} {'(cpu)':>6} "
          f"{'fwd ops':>8} {'pre-sync':>8} {'sync->gemm':>10} {'f+b ops':>8}")
    for W, r in out.items():
        for name, v in r.items():
            print(f"{W:>2} {name:<10} {v['fwd_ms']:7.3f} {v['fwd_cpu']:6.3f} {v['nograd_ms']:7.3f} {v['nograd_cpu']:6.3f} "
                  f"{v['fwdbwd_ms']:8.3f} {v['fwdbwd_cpu']:6.3f} "
                  f"{v['fwd_ops']:8d} {str(v['before_sync']):>8} {str(v['sync_to_gemm']):>10} "
                  f"{v['fwdbwd_ops']:8d}")
    json.dump(out, sys.stderr if False else open(os.environ.get("EPH_OUT", "/dev/null"), "w"))


if __name__ == "__main__":
    main()
