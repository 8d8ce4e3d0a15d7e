"""Expert-parallel benchmark and bf16 equality check (one process per GPU, NCCL).

    NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 \\
    PYTHONPATH=src torchrun --nproc-per-node=2 benchmarks/bench_ep.py --out $OUT/ep.json

What it measures, at the DeepSeek-V3 expert shape by default (T=8192 tokens per rank,
D=7168, F=2048, 64 experts per rank, top-8, bf16):

1. equality: the EP layer (all experts spread over the ranks) against the same layer on one
   GPU fed all ranks' tokens, in bf16, and both against an fp32 copy: output, input grad and
   every local expert's weight grads (max abs error, and the error ratio to bf16-vs-fp32
   of the single-GPU layer: the DESIGN tolerance rule is ratio <= 2);
2. the single-GPU layer with ``experts_per_rank`` experts on ``T`` tokens (every rank runs
   its own copy at the same time): forward and forward+backward time;
3. the EP layer with ``experts_per_rank * W`` experts, ``T`` tokens per rank, for each
   ``--exchange`` (``rows``: one row per routed (token, expert); ``tokens``: each token once
   per (chunk, rank), partial sums back in each ``--partials`` dtype) and ``--chunks`` value:
   forward and forward+backward time;
4. the all-to-all alone with the split sizes of a real forward (dispatch + combine), and its
   share of the EP layer's time (forward: 2 exchanges; forward+backward: 4).

Tokens/s are per GPU: ``T / step time``. Works for any number of ranks (torchrun
--nproc-per-node=N); on CPU (``--device cpu``, gloo) it runs as a smoke test.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import time

import torch
import torch.distributed as dist

import moekit
from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.parallel import apply_ep, rebalance


def build(E, args, device, dtype, seed=0):
    torch.manual_seed(seed)
    cfg = MoE.Config(
        dim=args.dim, hidden_dim=args.hidden, num_experts=E,
        router=TokenChoiceTopKRouter.Config(top_k=args.topk, score_func="softmax", route_norm=True),
        experts=GroupedExperts.Config(activation="silu", backend=args.backend),
        shared_experts=SharedExperts.Config(hidden_dim=args.shared) if args.shared else None,
    )
    with torch.device(device):
        moe = cfg.build()
    return moe.to(dtype)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def timeit(fn, device, warmup, iters, group=None):
    for _ in range(warmup):
        fn()
    sync(device)
    if group is not None:
        dist.barrier(group=group)
    t0 = time.perf_counter()
    for _ in range(iters):
        fn()
    sync(device)
    dt = (time.perf_counter() - t0) / iters
    # the slowest rank sets the pace
    t = torch.tensor([dt], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def balanced_logits(T, E, K, rank, device, seed=7):
    """Router logits whose top-k gives every expert exactly ``T*K/E`` of each rank's rows: slot
    k of token t is expert ``sigma[(t + k*E//K) % E]`` (distinct within a token) for a random
    permutation ``sigma`` of the experts, the same on every rank, so a token's experts are
    spread over the ranks as random routing spreads them; the logits of the picked experts
    are random (their routing weights vary)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    sigma = torch.randperm(E, generator=gen)
    t = torch.arange(T).unsqueeze(1) + rank * T
    ids = sigma[(t + torch.arange(K).unsqueeze(0) * (E // K)) % E]
    logits = torch.full((T, E), -20.0)
    logits.scatter_(1, ids, torch.rand(T, K, generator=gen) * 4)
    return logits.to(device)


def step_fns(moe, x, g, logits=None):
    kw = {} if logits is None else {"router_logits": logits}

    def fwd():
        with torch.no_grad():
            moe(x, **kw)

    def fwdbwd():
        xx = x.detach().requires_grad_()
        y = moe(xx, **kw)
        y.backward(g)
        for p in moe.parameters():
            p.grad = None

    return fwd, fwdbwd


def maxerr(a, b):
    return float((a.float() - b.float()).abs().max()) if a.numel() else 0.0


def equality(args, device, rank, W):
    """EP bf16 vs single-GPU bf16 vs fp32, at a realistic size, all three with the same router
    logits (random, given): the routing is identical everywhere, so the comparison isolates the
    experts and the exchanges (without it the router GEMM, run on a different number of rows,
    can differ in its last bits and flip a near-tie top-k choice)."""
    E = args.experts_per_rank * W
    T = args.eq_tokens
    moe = build(E, args, device, torch.bfloat16, seed=1)
    ref = copy.deepcopy(moe)
    ref32 = None
    if args.eq_fp32:
        ref32 = copy.deepcopy(moe).float()
        ref32.experts.config = ref32.experts.config.replace(backend="loop")  # grouped_mm: no fp32 on CUDA
    checksum = safe_apply_ep(moe)
    gen = torch.Generator(device=device).manual_seed(123)
    xs = torch.randn(W * T, args.dim, generator=gen, device=device)
    gs = torch.randn(W * T, args.dim, generator=gen, device=device)
    ls = torch.randn(W * T, E, generator=gen, device=device)
    out = {}
    res = {}
    for name, m, dt in (("ref_bf16", ref, torch.bfloat16), ("ref_fp32", ref32 or ref, torch.float32 if ref32 else torch.bfloat16)):
        if m is ref and name == "ref_fp32":  # no fp32 copy (memory): compare with the bf16 layer only
            res[name] = res["ref_bf16"]
            continue
        x = xs.detach().to(dt).clone().requires_grad_()
        y = m(x, router_logits=ls)
        y.backward(gs.to(dt))
        res[name] = (y.detach(), x.grad, {n: p.grad for n, p in m.experts.named_parameters()})
        del y, x
    sl = slice(rank * T, (rank + 1) * T)
    loc = torch.tensor(moe.experts.local_experts, device=device)
    for exch, part, C in ep_configs(args, (1, 2)):
        moe.dispatch.exchange, moe.dispatch.partials, moe.dispatch.num_chunks = exch, part, C
        key = config_name(exch, part, C)
        for p in moe.parameters():
            p.grad = None
        x = xs[sl].detach().to(torch.bfloat16).clone().requires_grad_()
        y = moe(x, router_logits=ls[sl])
        y.backward(gs[sl].to(torch.bfloat16))
        for what, ep_t, ref_t, f32_t in [
            ("output", y.detach(), res["ref_bf16"][0][sl], res["ref_fp32"][0][sl]),
            ("x_grad", x.grad, res["ref_bf16"][1][sl], res["ref_fp32"][1][sl]),
        ] + [
            (f"{n}_grad", p.grad, res["ref_bf16"][2][n][loc], res["ref_fp32"][2][n][loc])
            for n, p in moe.experts.named_parameters()
        ]:
            e_ep_ref = maxerr(ep_t, ref_t)
            e_ep_32 = maxerr(ep_t, f32_t)
            e_ref_32 = maxerr(ref_t, f32_t)
            t = torch.tensor([e_ep_ref, e_ep_32, e_ref_32], device=device, dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            e_ep_ref, e_ep_32, e_ref_32 = t.tolist()
            out[f"{key}/{what}"] = {
                "max_abs_err_ep_vs_1gpu_bf16": e_ep_ref,
                "max_abs_err_ep_bf16_vs_fp32": e_ep_32,
                "max_abs_err_1gpu_bf16_vs_fp32": e_ref_32,
                "ratio_to_1gpu_bf16_error": e_ep_32 / e_ref_32 if e_ref_32 > 0 else None,
                "ref_max_abs": float(f32_t.abs().max()),
            }
        del y, x
    del moe, ref, ref32, res
    if device.type == "cuda":
        torch.cuda.empty_cache()
    ratios = [v["ratio_to_1gpu_bf16_error"] for v in out.values() if v["ratio_to_1gpu_bf16_error"] is not None]
    return {"tokens_per_rank": T, "num_experts": E, "weights_checksum_matched": checksum,
            "max_ratio_to_1gpu_bf16_error": max(ratios) if ratios else None,
            "max_abs_err_ep_vs_1gpu_bf16": max(v["max_abs_err_ep_vs_1gpu_bf16"] for v in out.values()),
            # the row exchange: the same routing, the same kernels on the same rows: the output
            # must be the same bits (a transport that corrupts a few rows can keep the error
            # ratio near 1); the token exchange sums partials per rank (another fp32 order)
            "output_bitwise_equal_to_1gpu": all(v["max_abs_err_ep_vs_1gpu_bf16"] == 0.0
                                                for k, v in out.items()
                                                if k.endswith("/output") and k.startswith("rows")),
            "max_ratio_per_config": {
                key: max(v["ratio_to_1gpu_bf16_error"] or 0 for k, v in out.items()
                         if k.startswith(key + "/"))
                for key in {k.rsplit("/", 1)[0] for k in out}},
            "detail": out}


def ep_configs(args, chunks):
    """(exchange, partials, chunks) of every EP configuration to run."""
    out = []
    for exch in args.exchange.split(","):
        for part in (args.partials.split(",") if exch == "tokens" else ["float32"]):
            out += [(exch, part, C) for C in chunks]
    return out


def config_name(exch, part, C) -> str:
    return f"{exch}/chunks={C}" + (f"/partials={part}" if exch == "tokens" else "")


def _union(intervals):
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
    comp_u = _union(comp)
    comm_u = _union(comm)
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


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


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


def safe_apply_ep(moe, **kw):
    """apply_ep with the weights checksum; if only the checksum disagrees (it should not:
    same seed, same kernels), record it and go on without it."""
    try:
        apply_ep(moe, **kw)
        return True
    except ValueError as e:
        if "weights_checksum" not in str(e):
            raise
        apply_ep(moe, check_weights=False, **kw)
        return False


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tokens", type=int, default=8192)
    ap.add_argument("--dim", type=int, default=7168)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--experts-per-rank", type=int, default=64)
    ap.add_argument("--experts-total", type=int, default=0,
                    help="total experts of the EP layer (overrides --experts-per-rank: total // world)")
    ap.add_argument("--eq-fp32", type=int, default=1, help="also compare with an fp32 copy (memory: 2x the layer in fp32)")
    ap.add_argument("--topk", type=int, default=8)
    ap.add_argument("--chunks", default="1,2,4")
    ap.add_argument("--exchange", default="rows,tokens", help="exchanges to time: rows, tokens")
    ap.add_argument("--partials", default="float32,input", help="the token exchange's partials dtypes")
    ap.add_argument("--backend", default="grouped_mm")
    ap.add_argument("--shared", type=int, default=0,
                    help="hidden size of the layer's shared experts (DeepSeek-V3: 2048; 0: none)")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--redundant", type=int, default=0, help="also time a redundant placement with this many extra slots")
    ap.add_argument("--balanced", type=int, default=0,
                    help="1: router logits that give every expert the same rows (no load imbalance between ranks)")
    ap.add_argument("--eq-tokens", type=int, default=4096, help="tokens per rank of the equality check (0: skip)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--out", default=None)
    args = ap.parse_args()

    for k, v in (("NCCL_NVLS_ENABLE", "0"), ("TORCH_SYMM_MEM_DISABLE_MULTICAST", "1"), ("NVSHMEM_DISABLE_NVLS", "1")):
        os.environ.setdefault(k, v)
    cuda = args.device == "cuda"
    local = int(os.environ.get("LOCAL_RANK", 0))
    if cuda:
        torch.cuda.set_device(local)
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, W = dist.get_rank(), dist.get_world_size()
    if args.experts_total:
        if args.experts_total % W:
            raise SystemExit(f"--experts-total {args.experts_total} must divide by the world size {W}")
        args.experts_per_rank = args.experts_total // W
    device = torch.device(f"cuda:{local}" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    if args.backend == "auto" and cuda and "triton" in moekit.ops.available_backends(device, dtype):
        args.backend = "triton"
    log = (lambda *a: print(*a, flush=True)) if rank == 0 else (lambda *a: None)
    T, D = args.tokens, args.dim
    result = {
        "shape": {"tokens_per_rank": T, "dim": D, "hidden": args.hidden, "experts_per_rank": args.experts_per_rank,
                  "top_k": args.topk, "dtype": str(dtype), "backend": args.backend,
                  "shared_hidden": args.shared},
        "world_size": W,
        "env": {"torch": torch.__version__, "device": torch.cuda.get_device_name(device) if cuda else platform.processor(),
                "nccl": ".".join(map(str, torch.cuda.nccl.version())) if cuda else None,
                "NCCL_NVLS_ENABLE": os.environ.get("NCCL_NVLS_ENABLE"),
                "triton": _triton_version(), "moekit_commit": os.environ.get("MOEKIT_COMMIT")},
    }
    t_start = time.time()

    if args.eq_tokens > 0:
        result["equality_bf16"] = equality(args, device, rank, W)
        eq = result["equality_bf16"]
        log("equality bf16: max |EP - 1gpu| =", eq["max_abs_err_ep_vs_1gpu_bf16"],
            "; max ratio of EP-vs-fp32 error to 1gpu-vs-fp32 error =", eq["max_ratio_to_1gpu_bf16_error"],
            "; weights checksum matched:", eq["weights_checksum_matched"],
            "; output bitwise equal to 1 GPU:", eq["output_bitwise_equal_to_1gpu"])

    gen = torch.Generator(device=device).manual_seed(1000 + rank)
    x = torch.randn(T, D, generator=gen, device=device, dtype=dtype)
    g = torch.randn(T, D, generator=gen, device=device, dtype=dtype)
    rows = []

    # 1 GPU: experts_per_rank experts, T tokens (every rank runs its own copy)
    moe = build(args.experts_per_rank, args, device, dtype)
    result["shape"]["balanced_routing"] = bool(args.balanced)
    fwd, fb = step_fns(moe, x, g, balanced_logits(T, args.experts_per_rank, args.topk, 0, device)
                       if args.balanced else None)
    t_f = timeit(fwd, device, args.warmup, args.iters)
    t_fb = timeit(fb, device, args.warmup, args.iters)
    rows.append({"mode": "1gpu", "experts": args.experts_per_rank, "chunks": None, "fwd_ms": t_f * 1e3,
                 "fwdbwd_ms": t_fb * 1e3})
    if cuda:
        rows[-1]["timeline_fwdbwd"] = timeline(fb, device)
    log(f"1gpu: fwd {t_f * 1e3:.2f} ms, fwd+bwd {t_fb * 1e3:.2f} ms")
    del moe, fwd, fb
    if cuda:
        torch.cuda.empty_cache()

    # EP: experts_per_rank * W experts
    E = args.experts_per_rank * W
    moe = build(E, args, device, dtype)
    safe_apply_ep(moe)
    ep = moe.dispatch
    for exch, part, C in ep_configs(args, [int(c) for c in args.chunks.split(",")]):
        ep.exchange, ep.partials, ep.num_chunks = exch, part, C
        fwd, fb = step_fns(moe, x, g, balanced_logits(T, E, args.topk, rank, device)
                           if args.balanced else None)
        t_f = timeit(fwd, device, args.warmup, args.iters)
        t_fb = timeit(fb, device, args.warmup, args.iters)
        row = {"mode": f"ep{W}", "exchange": exch, "partials": part if exch == "tokens" else None,
               "experts": E, "chunks": C, "fwd_ms": t_f * 1e3, "fwdbwd_ms": t_fb * 1e3}
        if cuda:
            row["timeline_fwdbwd"] = timeline(fb, device)
            row["host_syncs_fwdbwd"] = host_syncs(fb)
        rows.append(row)
        log(f"ep{W} {config_name(exch, part, C)}: fwd {t_f * 1e3:.2f} ms, fwd+bwd {t_fb * 1e3:.2f} ms "
            f"host syncs: {row.get('host_syncs_fwdbwd', '')}")

    # the all-to-all alone, with the split sizes of a real forward (one chunk), per exchange
    base = rows[0]
    result["all_to_all"] = {}
    for exch in args.exchange.split(","):
        ep.exchange, ep.num_chunks = exch, 1
        with torch.no_grad():
            moe(x, **({"router_logits": balanced_logits(T, E, args.topk, rank, device)}
                      if args.balanced else {}))
        lay = ep.last_layouts[0]
        send = torch.randn(lay.num_send, D, device=device, dtype=dtype)
        recv = torch.empty(lay.num_recv, D, device=device, dtype=dtype)
        disp = ep.dispatcher

        def a2a():  # through the layer's own dispatcher
            with torch.no_grad():
                disp.dispatch(send, lay, out=recv)
                disp.combine(recv, lay, out=send)

        t_a2a = timeit(a2a, device, args.warmup, args.iters)  # dispatch + combine
        remote = sum(s for r, s in enumerate(lay.send) if r != rank)
        bytes_remote = remote * D * send.element_size()
        r1 = next(r for r in rows if r.get("exchange") == exch)
        # rows received per rank (the row exchange: each rank's expert rows, its load; the
        # token exchange: tokens): the slowest rank sets the pace of every exchange
        got = torch.tensor([lay.num_recv], device=device)
        every = [torch.zeros_like(got) for _ in range(W)]
        dist.all_gather(every, got)
        result.setdefault("rows_received_per_rank", {})[exch] = [int(t) for t in every]
        result["all_to_all"][exch] = {
            "dispatch_plus_combine_ms": t_a2a * 1e3,
            "rows_sent_per_rank": lay.num_send,
            "rows_to_other_ranks": remote,
            "bytes_to_other_ranks_per_exchange": bytes_remote,
            "algbw_GBps_per_exchange": bytes_remote / (t_a2a / 2) / 1e9,
            "share_of_ep_fwd_no_overlap": t_a2a / (r1["fwd_ms"] / 1e3),
            "share_of_ep_fwdbwd_no_overlap": 2 * t_a2a / (r1["fwdbwd_ms"] / 1e3),
        }
    ep.exchange = args.exchange.split(",")[0]
    # redundant experts: replicate the hottest from the measured loads, then time again
    if args.redundant > 0:
        moe.reset_load()
        with torch.no_grad():
            moe(x)
        new = rebalance(moe, num_redundant=args.redundant)
        ep.num_chunks = 1
        fwd, fb = step_fns(moe, x, g)
        t_f = timeit(fwd, device, args.warmup, args.iters)
        t_fb = timeit(fb, device, args.warmup, args.iters)
        rows.append({"mode": f"ep{W}+r{args.redundant}", "experts": E, "chunks": 1, "fwd_ms": t_f * 1e3,
                     "fwdbwd_ms": t_fb * 1e3, "slots_per_rank": new.slot_counts})
        log(f"ep{W} redundant={args.redundant}: fwd {t_f * 1e3:.2f} ms, fwd+bwd {t_fb * 1e3:.2f} ms")
        moe.dispatch.num_chunks = 1

    for r in rows:
        r["tokens_per_s_per_gpu_fwd"] = T / (r["fwd_ms"] / 1e3)
        r["tokens_per_s_per_gpu_fwdbwd"] = T / (r["fwdbwd_ms"] / 1e3)
        r["vs_1gpu_fwd"] = base["fwd_ms"] / r["fwd_ms"]
        r["vs_1gpu_fwdbwd"] = base["fwdbwd_ms"] / r["fwdbwd_ms"]
    result["rows"] = rows
    best = max(r["vs_1gpu_fwdbwd"] for r in rows if r["mode"] != "1gpu")
    best_f = max(r["vs_1gpu_fwd"] for r in rows if r["mode"] != "1gpu")
    result["target"] = {"per_gpu_throughput_vs_1gpu_min": 0.9, "best_fwdbwd": best, "best_fwd": best_f,
                        "met_fwdbwd": best >= 0.9, "met_fwd": best_f >= 0.9}
    result["wall_s"] = time.time() - t_start
    if cuda:
        result["max_memory_GiB"] = torch.cuda.max_memory_allocated(device) / 2**30
    if rank == 0:
        hdr = (f"{'mode':<6}{'exchange':>18}{'E':>5}{'chunks':>7}{'fwd ms':>9}{'tok/s/GPU fwd':>15}"
               f"{'fwd+bwd ms':>12}{'tok/s/GPU f+b':>15}{'vs 1gpu f+b':>12}")
        print(hdr)
        for r in rows:
            ex = (r.get("exchange") or "-") + (f"/{r['partials']}" if r.get("partials") else "")
            print(f"{r['mode']:<6}{ex:>18}{r['experts']:>5}{str(r['chunks']):>7}{r['fwd_ms']:>9.2f}"
                  f"{r['tokens_per_s_per_gpu_fwd']:>15.0f}{r['fwdbwd_ms']:>12.2f}"
                  f"{r['tokens_per_s_per_gpu_fwdbwd']:>15.0f}{r['vs_1gpu_fwdbwd']:>12.2f}")
        print("rows received per rank:", result["rows_received_per_rank"])
        for exch, a in result["all_to_all"].items():
            print(f"all-to-all ({exch}) dispatch+combine {a['dispatch_plus_combine_ms']:.2f} ms, "
                  f"{a['rows_sent_per_rank']} rows ({a['algbw_GBps_per_exchange']:.0f} GB/s to the other "
                  f"ranks); share of EP fwd {a['share_of_ep_fwd_no_overlap']:.1%}, of fwd+bwd "
                  f"{a['share_of_ep_fwdbwd_no_overlap']:.1%}")
        print("target (EP per-GPU >= 90% of 1 GPU):", result["target"])
        for r in rows:
            if "timeline_fwdbwd" in r:
                tl = r["timeline_fwdbwd"]
                print(f"timeline {r['mode']} {r.get('exchange')}/{r.get('partials')} chunks={r['chunks']}: span {tl['span_ms']:.2f} ms, compute "
                      f"{tl['compute_ms']:.2f}, all-to-all {tl['comm_ms']:.2f} of which under compute "
                      f"{tl['comm_hidden_ms']:.2f} ({(tl['comm_hidden_fraction'] or 0):.0%}), nothing running "
                      f"{tl['idle_ms']:.2f}; longest gaps {tl['top_gaps'][:5]}; kernels {tl['top_kernels']}")
        if args.out:
            os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
            with open(args.out, "w") as f:
                json.dump(result, f, indent=1)
            print("wrote", args.out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
