"""Expert parallelism: ``apply_ep(moe, group)`` and :class:`ExpertParallel`, the dispatch and
combine that it sets beside the layer's experts (``moe.dispatch``; the experts module stays the
layer's own ``GroupedExperts``, keeping only this rank's experts, and runs through its backend).

Forward of :class:`ExpertParallel` for one chunk of this rank's tokens
(legend: T tokens, K top-k, D model dim, Q = global slots plus one virtual slot per shared
rank, N = routed rows this rank sends, R = rows it receives, L = its local experts):

1. map each (token, k)'s logical expert to a global slot (a replica, for redundant experts:
   ``replica = (t*K + k + rank) % replicas``); with external shared experts append one more
   column per token that goes to a shared rank, weight 1;
2. sender plan over the Q slots (``make_plan``, dropless) and ``permute`` (the routing weight
   is applied here when ``routing_weight_on="input"``);
3. counts per slot (for all chunks at once) are all-gathered: every rank derives its send and
   receive split sizes (one collective and one host sync per forward);
4. dispatch (all_to_all_single) → receiver plan over its L local experts (the backend's
   ``make_plan``, one row per slot; capacity drops here, in the global token order: identical
   to the single-process layer) → the experts' backend on that plan (``moe_experts``: the
   fused kernels with the triton backend), back in the received order; on a shared rank: the
   shared experts instead;
5. combine (all_to_all_single back) and ``unpermute`` with the routing weights over K in a
   fixed order (deterministic; same arithmetic as the single-process layer).

With ``num_chunks > 1`` the tokens are split in chunks and the exchanges are asynchronous:
chunk i+1's dispatch is in flight while chunk i's GEMMs run (on CUDA, NCCL runs on its own
stream). The backward runs the chunks one after another.

Gradient conventions (see docs/parallel.md): expert weights hold the full gradient of the
layer fed all ranks' tokens (the sum over ranks happens in the all-to-all backward; no
factor of the world size). Replicas of a redundant expert get the sum of their gradients
(an all-reduce in the backward), so they stay identical. Router and local shared experts
are replicated (data parallel): each rank's gradient covers its own tokens; sum them over
the group (``sync_replicated_grads``) — or average, if each rank's loss is a mean.
"""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..experts import GroupedExperts
from ..moe import MoE
from ..ops.api import moe_experts
from ..ops.stages import permute, unpermute
from ..plan import RoutingPlan, capacity_for
from . import placement as placement_mod
from .dispatch import AllToAllDispatcher, Dispatcher, Layout
from .placement import Placement
from .tp import TPSharedExperts, tp_gather, tp_scatter

__all__ = ["ExpertParallel", "apply_ep", "rebalance", "sync_replicated_grads"]


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


class _ReplicaGradSum(torch.autograd.Function):
    """Identity on the local expert tensors; the backward sums the gradients of the replicas
    of each redundant expert over the group (one all-reduce), so every replica gets the
    gradient of the whole layer for that expert."""

    @staticmethod
    def forward(ctx, mod, *tensors):
        ctx.mod = mod
        return tuple(t.view_as(t) for t in tensors)

    @staticmethod
    def backward(ctx, *grads):
        mod = ctx.mod
        rows = mod._replica_rows  # [L] row in the hot buffer of each local slot, -1 if not hot
        H = mod._num_hot
        flat = []
        for g, shape in zip(grads, mod._param_shapes):
            g = torch.zeros(shape, device=rows.device, dtype=mod._grad_dtype) if g is None else g
            buf = g.new_zeros((H + 1,) + tuple(shape[1:]))
            idx = torch.where(rows < 0, H, rows)
            buf.index_add_(0, idx, g.to(buf.dtype))
            flat.append(buf[:H].reshape(-1))
        big = torch.cat(flat) if flat else None
        dist.all_reduce(big, group=mod.group)
        out, off = [], 0
        for g, shape in zip(grads, mod._param_shapes):
            n = H * math.prod(shape[1:])
            summed = big[off:off + n].view((H,) + tuple(shape[1:]))
            off += n
            g = torch.zeros(shape, device=rows.device, dtype=big.dtype) if g is None else g
            hot = rows >= 0
            g = torch.where(
                hot.view((-1,) + (1,) * (len(shape) - 1)),
                summed.index_select(0, rows.clamp(min=0)).to(g.dtype), g,
            ) if shape[0] > 0 else g
            out.append(g)
        return (None, *out)


class ExpertParallel(nn.Module):
    """Dispatch and combine of one rank of an expert-parallel group: the sibling of the MoE's
    experts (``moe.dispatch``, set by :func:`apply_ep`). The experts stay the layer's own
    :class:`~moekit.GroupedExperts`, holding only this rank's experts (``[L, ...]`` parameters
    with their names; ``experts.local_experts`` lists their logical ids), and run through
    their backend on the rows this rank receives (the fused kernels with the triton backend,
    forward and backward). ``forward(x_TD, topk_ids_TK, topk_weights_TK, experts)`` returns
    ``y_TD`` with the routing weights applied and summed over K, as ``experts`` would on one
    process; every rank must call it, also with no tokens (it joins the collectives)."""

    def __init__(
        self,
        experts: GroupedExperts,
        group,
        placement: Placement,
        *,
        num_chunks: int = 1,
        dispatcher: Dispatcher | None = None,
        shared_experts: nn.Module | None = None,
        shared_numel: int = 0,
        tp_group=None,
    ):
        super().__init__()
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.dispatcher = dispatcher or AllToAllDispatcher(group)
        self.num_chunks = num_chunks
        self.tp_group = tp_group
        self.num_experts = experts.num_experts
        self.last_plans: list[RoutingPlan] = []
        self.last_layouts: list[Layout] = []
        self.set_placement(placement, experts)
        self.shared_experts = shared_experts if self.is_shared_rank else None
        self._shared_numel = shared_numel

    # ----------------------------------------------------------- placement
    @property
    def is_shared_rank(self) -> bool:
        return self.rank in self.placement.shared_ranks

    def set_placement(self, placement: Placement, experts: GroupedExperts, tensors=None) -> None:
        """Install ``placement``: ``experts`` keeps only this rank's slots, taken from its own
        parameters (all experts, or the old placement's slots when ``tensors`` gives the new
        local weights in ``experts.weight_names()`` order)."""
        p = placement
        if p.world_size != self.world_size:
            raise ValueError(f"placement has {p.world_size} ranks; the group has {self.world_size}")
        if p.num_experts != self.num_experts:
            raise ValueError(f"placement has {p.num_experts} experts; the layer has {self.num_experts}")
        self.placement = p
        local = list(p.local_experts(self.rank))
        names = experts.weight_names()
        if tensors is None:
            tensors = []
            for name in names:
                full = getattr(experts, name)
                idx = torch.tensor(local, dtype=torch.long, device=full.device)
                tensors.append(full.detach().index_select(0, idx).clone())
        for name, t in zip(names, tensors):
            req = getattr(experts, name).requires_grad
            del experts._parameters[name]
            experts.register_parameter(name, nn.Parameter(t, requires_grad=req))
        experts.num_experts = len(local)
        experts.local_experts = local
        dev = experts.down_proj.device
        # extended slot space: per rank in order, its routed slots or one shared slot
        ext_of_slot, ext_counts, shared_ext = [], [], []
        q = 0
        for r in range(p.world_size):
            if r in p.shared_ranks:
                shared_ext.append(q)
                ext_counts.append(1)
                q += 1
            else:
                ext_of_slot.extend(range(q, q + len(p.slots[r])))
                ext_counts.append(len(p.slots[r]))
                q += len(p.slots[r])
        self.num_ext_slots = q
        self.ext_counts = ext_counts
        self.ext_starts = [sum(ext_counts[:r]) for r in range(p.world_size)]
        table = p.replica_table()  # [E, Rmax] global slot ids
        ext = torch.tensor(ext_of_slot, dtype=torch.long)
        self.register_buffer("_ext_table", ext[table].to(dev), persistent=False)
        self.register_buffer("_num_replicas", p.num_replicas().to(dev), persistent=False)
        self.register_buffer("_shared_ext", torch.tensor(shared_ext, dtype=torch.long, device=dev), persistent=False)
        self.has_redundancy = bool((p.num_replicas() > 1).any())
        hot = [e for e in range(p.num_experts) if len(p.replicas(e)) > 1]
        hot_row = {e: i for i, e in enumerate(hot)}
        self._num_hot = len(hot)
        self.register_buffer(
            "_replica_rows", torch.tensor([hot_row.get(e, -1) for e in local], dtype=torch.long, device=dev),
            persistent=False,
        )
        self._param_shapes = [tuple(getattr(experts, n).shape) for n in names]
        self._grad_dtype = experts.down_proj.dtype

    def extra_repr(self) -> str:
        return (
            f"rank={self.rank}/{self.world_size}, local_experts={list(self.placement.local_experts(self.rank))}, "
            f"num_experts={self.num_experts}, shared_rank={self.is_shared_rank}, num_chunks={self.num_chunks}"
        )

    # -------------------------------------------------------------- forward
    def forward(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        experts: GroupedExperts,
    ) -> torch.Tensor:
        if x_TD.dim() != 2 or x_TD.shape[1] != experts.dim:
            raise ValueError(f"x must be [T, {experts.dim}], got {tuple(x_TD.shape)}")
        if topk_ids_TK.shape != topk_weights_TK.shape or topk_ids_TK.shape[0] != x_TD.shape[0]:
            raise ValueError(
                f"topk_ids {tuple(topk_ids_TK.shape)} and topk_weights {tuple(topk_weights_TK.shape)} "
                f"must both be [T={x_TD.shape[0]}, K]"
            )
        T_full = x_TD.shape[0]
        if self.tp_group is not None:
            x_TD, topk_ids_TK, topk_weights_TK = tp_scatter(
                self.tp_group, x_TD, topk_ids_TK, topk_weights_TK
            )
        y_TD = self._forward_ep(x_TD, topk_ids_TK, topk_weights_TK, experts)
        if self.tp_group is not None:
            y_TD = tp_gather(self.tp_group, y_TD, T_full)
        return y_TD

    def _params(self, experts: GroupedExperts) -> list[torch.Tensor | None]:
        """(w_up, w_down, b_up, b_down) of the local experts; the replicas of redundant experts
        get the sum of their gradients over the group."""
        ps = [getattr(experts, n) for n in experts.weight_names()]
        if self.has_redundancy and torch.is_grad_enabled() and any(p.requires_grad for p in ps):
            ps = list(_ReplicaGradSum.apply(self, *ps))
        return ps + [None, None] if len(ps) == 2 else ps

    def _forward_ep(self, x_TD, ids_TK, w_TK, experts: GroupedExperts) -> torch.Tensor:
        T, K = ids_TK.shape
        dev = x_TD.device
        W, me = self.world_size, self.rank
        on_input = experts.config.routing_weight_on == "input"
        backend = experts.backend_for(dev, x_TD.dtype)
        weights = self._params(experts)

        # 1. logical expert -> extended slot (replica choice fixed by slot id and rank)
        ids = ids_TK.to(torch.long)
        if self._ext_table.shape[1] > 1:
            s = torch.arange(T * K, device=dev).view(T, K)
            rep = (s + me) % self._num_replicas[ids]
            q_TK = self._ext_table[ids, rep]
        else:
            q_TK = self._ext_table[ids, 0]
        if len(self.placement.shared_ranks):
            n_sh = len(self.placement.shared_ranks)
            q_sh = self._shared_ext[torch.arange(T, device=dev) % n_sh]
            q_TK = torch.cat([q_TK, q_sh.unsqueeze(1)], 1)
            w_TK = torch.cat([w_TK, w_TK.new_ones(T, 1)], 1)

        # 2. chunks, sender plans and rows
        C = self.num_chunks
        bounds = [(T * c) // C for c in range(C + 1)]
        plans, sends, wchunks = [], [], []
        for c in range(C):
            a, b = bounds[c], bounds[c + 1]
            p = backend.make_plan(q_TK[a:b], self.num_ext_slots)
            wc = w_TK[a:b]
            plans.append(p)
            wchunks.append(wc)
            sends.append(permute(x_TD[a:b], p, wc if on_input else None))
        self.last_plans = plans

        # 3. counts: [W, C, Q] on the host
        counts = self.dispatcher.exchange_counts(torch.stack([p.counts_E for p in plans]))
        st, nq = self.ext_starts, self.ext_counts
        layouts, recv_counts = [], []
        for c in range(C):
            cc = counts[:, c]  # [W, Q]
            send = [int(cc[me, st[r]:st[r] + nq[r]].sum()) for r in range(W)]
            mine = cc[:, st[me]:st[me] + nq[me]]  # [W, L or 1]
            recv = mine.sum(1).tolist()
            layouts.append(Layout(send=send, recv=recv))
            recv_counts.append(mine)
        self.last_layouts = layouts
        capacity = None
        if experts.capacity_factor is not None:
            routed = torch.ones(self.num_ext_slots, dtype=torch.bool)
            routed[self._shared_ext.cpu()] = False
            T_total = int(counts[:, :, routed].sum()) // K if K else 0
            capacity = capacity_for(T_total, K, self.num_experts, experts.capacity_factor)
        # routing weights travel only when the weight-drop policy needs them
        need_w = capacity is not None and experts.drop_policy == "weight" and not self.is_shared_rank

        # 4-5. pipeline: dispatch(c+1) in flight while chunk c computes
        overlap = C > 1
        disp = self.dispatcher
        recvd: list[Any] = [None] * C
        wrecv: list[Any] = [None] * C

        def start(c):
            recvd[c] = disp.dispatch(sends[c], layouts[c], async_op=overlap)
            if capacity is not None and experts.drop_policy == "weight":
                with torch.no_grad():
                    rw = wchunks[c].reshape(-1).index_select(0, plans[c].sorted_slots_N)
                    wrecv[c] = disp.dispatch(rw.float().unsqueeze(1), layouts[c])[0].squeeze(1)

        backs: list[Any] = [None] * C
        start(0)
        for c in range(C):
            if overlap and c + 1 < C:
                start(c + 1)
            x_recv, h = recvd[c]
            h.wait()
            recvd[c] = None
            y_recv = self._local(x_recv, recv_counts[c], capacity, wrecv[c] if need_w else None,
                                 experts, backend, weights)
            backs[c] = disp.combine(y_recv, layouts[c], async_op=overlap)
            if not overlap and c + 1 < C:
                start(c + 1)
        outs = []
        for c in range(C):
            y_back, h = backs[c]
            h.wait()
            outs.append(unpermute(y_back, plans[c], None if on_input else wchunks[c]))
        return outs[0] if C == 1 else torch.cat(outs, 0)

    def _local(self, x_RD, cnt_WL, capacity, w_R, experts, backend, weights) -> torch.Tensor:
        """This rank's experts on the received rows (sender-major order) -> [R, D]: each row
        is one routed slot (top-1, weight 1: the sender applies the routing weights), run
        through the experts' backend on the plan of the received rows."""
        if self.is_shared_rank:
            return self.shared_experts(x_RD)
        W, L = cnt_WL.shape
        if L == 0:
            return x_RD * 0  # keeps the dispatch in the graph (its backward is a collective)
        R = x_RD.shape[0]
        # the local expert of each received row; the plan's stable sort keeps, within an expert,
        # the global token order (sender-major), so capacity drops the rows the single-process
        # plan drops on all ranks' tokens concatenated
        ids_R1 = torch.repeat_interleave(
            torch.arange(L, device=x_RD.device).repeat(W), cnt_WL.reshape(-1).to(x_RD.device),
            output_size=R,
        ).view(R, 1)
        plan = backend.make_plan(
            ids_R1, L, capacity=capacity, drop_policy=experts.drop_policy,
            topk_weights_TK=None if w_R is None else w_R.view(R, 1),
        )
        w_up, w_down, b_up, b_down = weights
        return moe_experts(
            x_RD, w_up, w_down, ids_R1, x_RD.new_ones(R, 1), activation=experts.activation,
            gate_up_proj_bias=b_up, down_proj_bias=b_down, backend=backend, plan=plan,
        )


# ---------------------------------------------------------------------------- consistency
def _describe(moe: MoE, placement: Placement, num_chunks: int, tp_size: int, shared_mode: str,
              check_weights: bool) -> dict:
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
) -> MoE:
    """Turn ``moe`` (identical on every rank of ``group``) into its expert-parallel form, in
    place, and return it.

    * ``group``: a ProcessGroup (default: the world) or a 1-D DeviceMesh.
    * ``placement``: a :class:`Placement`, ``"contiguous"`` (even, or uneven when E does not
      divide) or ``"redundant"`` (needs ``tokens_per_expert``, global counts, and
      ``num_redundant`` extra slots).
    * ``num_chunks``: split each rank's tokens in chunks whose exchanges overlap the other
      chunks' GEMMs (1 = no overlap; incompatible with a capacity factor).
    * ``dispatcher``: the transport (default :class:`AllToAllDispatcher`).
    * ``shared_experts``: ``"local"`` (each rank runs them on its tokens), ``"external"``
      (the first ``num_shared_ranks`` ranks run them for every token and hold no routed
      experts), or ``"tp"`` (sharded over ``tp_group`` with an all-reduce).
    * ``tp_group``: inside a tensor-parallel region (activations replicated over the TP
      ranks): tokens are split over the TP ranks on entry and all-gathered on exit.
    * ``check_weights``: also compare a checksum of the weights between ranks.

    Raises ValueError, on every rank and before any forward, when the ranks disagree on the
    config, the arguments or (``check_weights``) the weights.
    """
    if not isinstance(moe, MoE):
        raise TypeError(f"apply_ep needs a moekit MoE, got {type(moe).__name__}")
    if moe.dispatch is not None:
        raise ValueError("apply_ep: this MoE is already expert-parallel")
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
    if moe.experts.capacity_factor is not None:
        if num_chunks > 1:
            raise ValueError(
                "num_chunks > 1 with a capacity factor: drops depend on the global token order, "
                "which chunking changes; use num_chunks=1 or a dropless layer"
            )
        if placement.num_redundant > 0:
            raise ValueError("redundant experts with a capacity factor are not supported; use a dropless layer")
    tp_size = 1 if tp_group is None else dist.get_world_size(tp_group)
    _check_same(group, _describe(moe, placement, num_chunks, tp_size, shared_experts, check_weights))

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
    )
    return moe


@torch.no_grad()
def rebalance(
    moe: MoE,
    tokens_per_expert: torch.Tensor | None = None,
    *,
    num_redundant: int | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> Placement:
    """Re-place the experts of an expert-parallel ``moe`` from measured loads: replicate the
    hottest ones (``num_redundant`` extra slots; default: as many as now) and move/copy
    their weights to their new ranks (one all-to-all per weight tensor). ``tokens_per_expert``
    are global counts; default: ``moe.tokens_per_expert`` summed over the group. Returns the
    new placement.

    The parameters are new tensors. With ``optimizer``, its per-parameter state moves with
    the weights (each state tensor shaped like the parameter, e.g. Adam's moments, goes where
    its expert's rows go, a new replica copying its source's; scalar state such as ``step``
    is kept) and its param groups point at the new parameters; experts' parameters the
    optimizer does not hold are left to the caller. Without it, rebuild the optimizer."""
    ep, experts = moe.dispatch, moe.experts
    if not isinstance(ep, ExpertParallel):
        raise ValueError("rebalance needs an expert-parallel MoE (call apply_ep first)")
    group, W, me = ep.group, ep.world_size, ep.rank
    if tokens_per_expert is None:
        tokens_per_expert = moe.tokens_per_expert.detach().clone().float()
        dist.all_reduce(tokens_per_expert, group=group)
    old = ep.placement
    R = old.num_redundant if num_redundant is None else num_redundant
    new = placement_mod.redundant(
        tokens_per_expert.cpu(), W, R, num_shared_ranks=len(old.shared_ranks)
    )
    _check_same(group, {"placement": new.describe()}, "rebalance")
    # source of each expert: the rank holding its first replica now
    src_of = {}
    for r in range(W):
        for i, e in enumerate(old.slots[r]):
            src_of.setdefault(e, (r, i))
    # rows I send to each rank (in that rank's new slot order) / receive from each rank
    send_idx = []
    send_splits = []
    for r in range(W):
        idx = [src_of[e][1] for e in new.slots[r] if src_of[e][0] == me]
        send_idx += idx
        send_splits.append(len(idx))
    recv_order = []  # for each src: my new slot positions it fills, in order
    recv_splits = []
    for s in range(W):
        pos = [j for j, e in enumerate(new.slots[me]) if src_of[e][0] == s]
        recv_order += pos
        recv_splits.append(len(pos))

    def move(t: torch.Tensor) -> torch.Tensor:
        """Slot rows of ``t`` (``[old local slots, ...]``) -> ``[new local slots, ...]``."""
        sidx = torch.tensor(send_idx, dtype=torch.long, device=t.device)
        out = t.new_empty((sum(recv_splits),) + tuple(t.shape[1:]))
        dist.all_to_all_single(out, t.detach().index_select(0, sidx).contiguous(), recv_splits,
                               send_splits, group=group)
        local = torch.empty_like(out)
        local[torch.tensor(recv_order, dtype=torch.long, device=t.device)] = out
        return local

    names = experts.weight_names()
    old_params = [getattr(experts, name) for name in names]
    held = _optimizer_index(optimizer, old_params)
    # every rank runs the same collectives: whether a parameter's state moves must agree
    _check_same(group, {"optimizer state": [sorted(held[i][1]) if i in held else None
                                            for i in range(len(names))]}, "rebalance")
    new_states = {i: {k: move(v) if k in moved else v for k, v in optimizer.state[old_params[i]].items()}
                  for i, (_, moved) in held.items()}
    ep.set_placement(new, experts, tensors=[move(p) for p in old_params])
    for i, (group_params, _) in held.items():
        p_old, p_new = old_params[i], getattr(experts, names[i])
        group_params[[q is p_old for q in group_params].index(True)] = p_new
        optimizer.state.pop(p_old, None)
        optimizer.state[p_new] = new_states[i]
    return new


def _optimizer_index(optimizer, params) -> dict[int, tuple[list, set[str]]]:
    """For each of ``params`` the optimizer holds: (its param group's list, the state keys
    whose tensors are shaped like the parameter and move with its rows). Raises on state it
    cannot move (a tensor of another shape)."""
    if optimizer is None:
        return {}
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    out = {}
    for i, p in enumerate(params):
        lists = [g["params"] for g in optimizer.param_groups if any(q is p for q in g["params"])]
        if not lists:
            continue
        moved = set()
        for k, v in optimizer.state.get(p, {}).items():
            if isinstance(v, torch.Tensor) and v.shape == p.shape:
                moved.add(k)
            elif isinstance(v, torch.Tensor) and v.dim() > 0:
                raise ValueError(
                    f"rebalance cannot move optimizer state {k!r} of shape {tuple(v.shape)} for an "
                    f"expert parameter of shape {tuple(p.shape)}: only state shaped like the "
                    "parameter (moved with its rows) or scalar state (kept) is supported"
                )
        out[i] = (lists[0], moved)
    return out


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
