"""Expert parallelism: :class:`ExpertParallel`, the dispatch and combine that ``apply_ep``
(``moekit/parallel/apply.py``) sets beside the layer's experts (``moe.dispatch``; the experts
module stays the layer's own ``GroupedExperts``, keeping only this rank's experts, and runs
through its backend).

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

import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..experts import GroupedExperts
from ..ops.api import moe_experts
from ..ops.stages import permute, unpermute
from ..plan import RoutingPlan, capacity_for
from .checks import exchange_device, raise_from_rows, raise_on_every_rank, status_row
from .dispatch import AllToAllDispatcher, Dispatcher, Layout
from .placement import Placement
from .tp import tp_gather, tp_scatter

__all__ = ["ExpertParallel"]


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
        if self.tp_group is not None:  # its gather comes before the counts exchange
            raise_on_every_rank(self.group, None, x_TD, topk_ids_TK.shape[1])
            x_TD, topk_ids_TK, topk_weights_TK = tp_scatter(
                self.tp_group, x_TD, topk_ids_TK, topk_weights_TK
            )
        y_TD = self._forward_ep(x_TD, topk_ids_TK, topk_weights_TK, experts)
        if self.tp_group is not None:
            y_TD = tp_gather(self.tp_group, y_TD, T_full)
        return y_TD

    def fail_together(self, error: BaseException, x: torch.Tensor | None) -> None:
        """This rank failed on its input before its forward: join the forward's first
        collective (the counts exchange, with zero counts and a failed status), so that every
        rank raises (:mod:`moekit.parallel.checks`); raises ``error`` here."""
        if self.tp_group is not None:  # a tensor-parallel gather comes first
            raise_on_every_rank(self.group, error, x, None)
        dev = exchange_device(self.group)
        counts = torch.zeros(self.num_chunks, self.num_ext_slots, dtype=torch.int64, device=dev)
        _, headers = self.dispatcher.exchange_counts(counts, status_row(error, x, None))
        raise_from_rows(self.group, headers, error)
        raise error  # (raise_from_rows raised already: this rank's status says it failed)

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

        # 3. counts: [W, C, Q] on the host, with every rank's fail-together status
        counts, headers = self.dispatcher.exchange_counts(
            torch.stack([p.counts_E for p in plans]), status_row(None, x_TD, K))
        raise_from_rows(self.group, headers, None)
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
