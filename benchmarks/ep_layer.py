"""The expert-parallel benchmark's layer (``bench_ep.py``): building the MoE layer, router
logits that balance the experts, the timed step functions, the EP configurations to run, and the
bf16 equality of the EP layer against the same layer on one GPU and against fp32."""

from __future__ import annotations

import copy

import torch
import torch.distributed as dist

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.parallel import apply_ep


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


def ep_configs(args, chunks):
    """(exchange, partials, chunks) of every EP configuration to run."""
    out = []
    for exch in args.exchange.split(","):
        for part in (args.partials.split(",") if exch == "tokens" else ["float32"]):
            out += [(exch, part, C) for C in chunks]
    return out


def config_name(exch, part, C) -> str:
    return f"{exch}/chunks={C}" + (f"/partials={part}" if exch == "tokens" else "")


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
