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
import json
import os
import platform
import time

import torch
import torch.distributed as dist
from ep_layer import (
    balanced_logits,
    build,
    config_name,
    ep_configs,
    equality,
    safe_apply_ep,
    step_fns,
)
from kernel_timeline import host_syncs, timeline

import moekit
from moekit.parallel import rebalance


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


def _triton_version() -> str | None:
    try:
        import triton
    except ImportError:
        return None
    return triton.__version__


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
