"""``apply_ep``: turn a MoE into its expert-parallel form (after checking that every rank of the
group agrees), and ``sync_replicated_grads`` for the parameters every rank holds a copy of."""

from __future__ import annotations

import hashlib
import json

import torch
import torch.distributed as dist

from ..moe import MoE
from . import placement as placement_mod
from .dispatch import Dispatcher
from .ep import ExpertParallel, check_exchange
from .placement import Placement
from .tp import TPSharedExperts

__all__ = ["apply_ep", "sync_replicated_grads"]


def _resolve_group(group):
    try:
        from torch.distributed.device_mesh import DeviceMesh
    except ImportError:  # pragma: no cover
        DeviceMesh = ()
    if isinstance(group, DeviceMesh):
        if group.ndim != 1:
            raise ValueError(
                f"apply_ep needs a 1-D DeviceMesh (the expert-parallel dimension); got {group.ndim}-D: "
                "pass mesh['ep']"
            )
        return group.get_group()
    return group


# ---------------------------------------------------------------------------- consistency
def _describe(moe: MoE, placement: Placement, num_chunks: int, tp_size: int, shared_mode: str,
              check_weights: bool, exchange: str = "rows", partials: str = "float32") -> dict:
    def cfg(o):
        try:
            return json.dumps(o.to_dict(), sort_keys=True, default=str)
        except Exception:  # pragma: no cover - a custom config
            return repr(o)

    d = {
        "moe_class": type(moe).__name__,
        "config": cfg(moe.config),
        "placement": placement.describe(),
        "num_chunks": num_chunks,
        "exchange": exchange,
        "partials": partials,
        "tp_size": tp_size,
        "shared_experts": shared_mode,
        "params": {n: [list(p.shape), str(p.dtype)] for n, p in moe.named_parameters()},
    }
    if check_weights:
        with torch.no_grad():
            h = hashlib.sha256()
            for n, p in moe.named_parameters():
                h.update(n.encode())
                h.update(repr(float(p.detach().sum(dtype=torch.float64))).encode())
                h.update(repr(float(p.detach().abs().sum(dtype=torch.float64))).encode())
            d["weights_checksum"] = h.hexdigest()[:16]
    return d


def _check_same(group, desc: dict, what: str = "apply_ep") -> None:
    W = dist.get_world_size(group)
    gathered: list = [None] * W
    dist.all_gather_object(gathered, desc, group=group)
    ref = gathered[0]
    for r, d in enumerate(gathered):
        if d != ref:
            keys = sorted(k for k in set(ref) | set(d) if ref.get(k) != d.get(k))
            detail = "; ".join(f"{k}: rank 0 has {ref.get(k)!r}, rank {r} has {d.get(k)!r}" for k in keys)
            raise ValueError(
                f"{what}: the ranks of the expert-parallel group disagree ({detail}). Build the same "
                "MoE (same config and seed) and call apply_ep with the same arguments on every rank."
            )


# ---------------------------------------------------------------------------- public API
def apply_ep(
    moe: MoE,
    group=None,
    *,
    placement: Placement | str = "contiguous",
    num_chunks: int = 1,
    dispatcher: Dispatcher | None = None,
    shared_experts: str = "local",
    num_shared_ranks: int = 1,
    tp_group=None,
    tokens_per_expert: torch.Tensor | None = None,
    num_redundant: int = 0,
    check_weights: bool = True,
    exchange: str = "rows",
    partials: str = "float32",
) -> MoE:
    """Turn ``moe`` (identical on every rank of ``group``) into its expert-parallel form, in
    place, and return it: ``moe.experts`` keeps only this rank's experts (same module, same
    backend) and ``moe.dispatch`` becomes an :class:`ExpertParallel` that sends each routed
    row to the rank holding its expert and back.

    * ``group``: a ProcessGroup (default: the world) or a 1-D DeviceMesh.
    * ``placement``: a :class:`Placement`, ``"contiguous"`` (even, or uneven when E does not
      divide) or ``"redundant"`` (needs ``tokens_per_expert``, global counts, and
      ``num_redundant`` extra slots).
    * ``num_chunks``: split the exchanges in chunks, each holding one group of every rank's
      local experts, whose exchanges overlap the other chunks' GEMMs (1: the backward's
      last exchange still overlaps the weight grads).
    * ``dispatcher``: the transport (default :class:`AllToAllDispatcher`).
    * ``shared_experts``: ``"local"`` (each rank runs them on its tokens), ``"external"``
      (the first ``num_shared_ranks`` ranks run them for every token and hold no routed
      experts), or ``"tp"`` (sharded over ``tp_group`` with an all-reduce).
    * ``tp_group``: inside a tensor-parallel region (activations replicated over the TP
      ranks): tokens are split over the TP ranks on entry and all-gathered on exit.
    * ``check_weights``: also compare a checksum of the weights between ranks.
    * ``exchange``: ``"rows"`` sends one row per routed (token, expert); ``"tokens"`` sends
      each token once to each (chunk, rank) holding any of its experts and gets back one
      partial sum (``moekit/parallel/tokens.py``: fewer bytes whenever a token has several
      experts on one rank, as with top-8 over few ranks).
    * ``partials``: with ``exchange="tokens"``, the dtype the partial sums travel back in:
      ``"float32"`` (unrounded until the sender's sum; an fp64 layer's stay fp64) or
      ``"input"`` (the activations' dtype: half the bytes back, one more rounding).

    Raises ValueError, on every rank and before any forward, when the ranks disagree on the
    config, the arguments or (``check_weights``) the weights.
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"apply_ep needs a moekit MoE, got {type(moe).__name__}")
    if moe.dispatch is not None:
        raise ValueError("apply_ep: this MoE is already expert-parallel")
    if moe.config.zero_experts:
        raise ValueError(
            f"apply_ep: this MoE has zero_experts={moe.config.zero_experts} (zero-computation "
            "experts), which expert parallelism does not dispatch; run it on one process"
        )
    check_exchange(exchange, partials)
    if not dist.is_available() or not dist.is_initialized():
        raise RuntimeError("apply_ep needs torch.distributed initialized (init_process_group)")
    group = _resolve_group(group)
    tp_group = _resolve_group(tp_group)
    W = dist.get_world_size(group)
    E = moe.num_experts
    if isinstance(num_chunks, bool) or not isinstance(num_chunks, int) or num_chunks < 1:
        raise ValueError(f"num_chunks={num_chunks!r}; it must be an integer >= 1")
    if shared_experts not in ("local", "external", "tp"):
        raise ValueError(f"shared_experts={shared_experts!r}; allowed: ('local', 'external', 'tp')")
    if shared_experts != "local" and moe.shared_experts is None:
        raise ValueError(f"shared_experts={shared_experts!r} needs a MoE with shared experts")
    if shared_experts == "tp" and tp_group is None:
        raise ValueError('shared_experts="tp" needs tp_group')
    n_sh = num_shared_ranks if shared_experts == "external" else 0
    if isinstance(placement, str):
        if placement == "contiguous":
            placement = placement_mod.contiguous(E, W, num_shared_ranks=n_sh)
        elif placement == "redundant":
            if tokens_per_expert is None:
                raise ValueError('placement="redundant" needs tokens_per_expert (global counts per expert)')
            placement = placement_mod.redundant(tokens_per_expert, W, num_redundant, num_shared_ranks=n_sh)
        else:
            raise ValueError(f"placement={placement!r}; allowed: 'contiguous', 'redundant' or a Placement")
    if not isinstance(placement, Placement):
        raise TypeError(f"placement must be a Placement or a name, got {type(placement).__name__}")
    if placement.world_size != W:
        raise ValueError(f"placement is for {placement.world_size} ranks; the group has {W}")
    if len(placement.shared_ranks) != n_sh:
        raise ValueError(
            f"placement has {len(placement.shared_ranks)} shared ranks; shared_experts={shared_experts!r} "
            f"needs {n_sh}"
        )
    if moe.experts.capacity_factor is not None and placement.num_redundant > 0:
        raise ValueError("redundant experts with a capacity factor are not supported; use a dropless layer")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    _check_same(group, _describe(moe, placement, num_chunks, tp_size, shared_experts, check_weights,
                                 exchange, partials))

    ext_shared, shared_numel = None, 0
    if shared_experts == "external":
        ext_shared = moe.shared_experts
        shared_numel = sum(p.numel() for p in ext_shared.parameters())
        moe.shared_experts = None
    elif shared_experts == "tp":
        moe.shared_experts = TPSharedExperts(moe.shared_experts, tp_group)
    moe.dispatch = ExpertParallel(
        moe.experts, group, placement, num_chunks=num_chunks, dispatcher=dispatcher,
        shared_experts=ext_shared, shared_numel=shared_numel, tp_group=tp_group,
        exchange=exchange, partials=partials,
    )
    return moe


def sync_replicated_grads(moe: MoE, group=None, *, op: str = "sum") -> None:
    """All-reduce the gradients of the parameters every rank of the expert-parallel group
    holds a copy of — the router, local shared experts — over ``group`` (default: the
    layer's group): ``op="sum"`` when the loss is a sum over all ranks' tokens (then every
    gradient equals the single-process layer's), ``"mean"`` for a per-rank mean loss with
    equal token counts (data-parallel convention). External shared experts are summed over
    the shared ranks; routed experts need nothing (their gradients are already complete)."""
    ep = moe.dispatch
    if not isinstance(ep, ExpertParallel):
        raise ValueError("sync_replicated_grads needs an expert-parallel MoE")
    if group is None and ep.tp_group is not None:
        raise ValueError(
            "sync_replicated_grads: inside a TP region the router and the TP-sharded shared experts are "
            "replicated over the TP ranks and data-parallel over the TP groups: pass group= the data-parallel "
            "group (the ranks with the same TP rank)"
        )
    group = _resolve_group(group) if group is not None else ep.group
    if op not in ("sum", "mean"):
        raise ValueError(f"op={op!r}; allowed: 'sum', 'mean'")
    params = list(moe.router.parameters())
    if moe.shared_experts is not None:
        params += [p for p in moe.shared_experts.parameters()]
    if moe.output_bias is not None:  # the output bias and norm are replicated like the router
        params.append(moe.output_bias)
    if moe.output_norm is not None:
        params += list(moe.output_norm.parameters())
    for p in params:
        if not p.requires_grad:
            continue
        g = p.grad if p.grad is not None else torch.zeros_like(p)
        dist.all_reduce(g, group=group)
        if op == "mean":
            g /= dist.get_world_size(group)
        p.grad = g
    n_sh = len(ep.placement.shared_ranks)
    if n_sh > 1:
        # the shared experts live on the shared ranks only: sum them there (a full-group
        # all-reduce of a buffer that is zero elsewhere keeps every rank in step)
        numel = ep._shared_numel
        buf = torch.zeros(numel, device=moe.experts.down_proj.device, dtype=ep._grad_dtype)
        if ep.shared_experts is not None:
            buf = torch.cat([
                (p.grad if p.grad is not None else torch.zeros_like(p)).reshape(-1)
                for p in ep.shared_experts.parameters()
            ]).to(buf.dtype)
        dist.all_reduce(buf, group=ep.group)
        if ep.shared_experts is not None:
            off = 0
            for p in ep.shared_experts.parameters():
                n = p.numel()
                p.grad = buf[off:off + n].view_as(p).to(p.dtype)
                off += n
