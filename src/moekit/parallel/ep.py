"""Expert parallelism: :class:`ExpertParallel`, the dispatch and combine that ``apply_ep``
(``moekit/parallel/apply.py``) sets beside the layer's experts (``moe.dispatch``; the experts
module stays the layer's own ``GroupedExperts``, keeping only this rank's experts, and runs
through its backend).

Forward of :class:`ExpertParallel` (legend: T tokens, K top-k, D model dim, C chunks, Q =
extended slots: every rank's slots plus one per shared rank and chunk, N = rows this rank
sends, R = rows it receives, L = its local experts):

1. map each (token, k)'s logical expert to an extended slot (:class:`Slots`: numbered
   chunk by chunk, chunk c holding the slots ``[L*c//C, L*(c+1)//C)`` of every rank, then
   rank by rank; a replica, for redundant experts: ``replica = (t*K + k + rank) %
   replicas``); with external shared experts one more column per token goes to a shared
   rank, weight 1, in the chunk of the token's position;
2. one sender plan over the Q slots (``make_plan``, dropless) and ``permute`` (the routing
   weight is applied here when ``routing_weight_on="input"``): the rows are chunk-major,
   then rank-major;
3. counts per slot are all-gathered: every rank derives each chunk's send and receive split
   sizes (one collective and the forward's one host sync);
4. the pipeline (``pipeline.py``): each chunk's dispatch (all_to_all_single) -> the local
   experts of the chunk's group on the received rows (the backend's chunk runner: its plan,
   one row per slot, capacity drops in the global token order, identical to the
   single-process layer; the fused kernels with the triton backend) -> its combine, the
   chunks' exchanges travelling while other chunks compute; on a shared rank: the shared
   experts instead;
5. ``unpermute`` with the routing weights over K in a fixed order (deterministic; same
   arithmetic as the single-process layer).

Gradient conventions (see docs/parallel.md): expert weights hold the full gradient of the
layer fed all ranks' tokens (the sum over ranks happens in the all-to-all backward; no
factor of the world size). Replicas of a redundant expert get the sum of their gradients
(an all-reduce in the backward), so they stay identical. Router and local shared experts
are replicated (data parallel): each rank's gradient covers its own tokens; sum them over
the group (``sync_replicated_grads``) — or average, if each rank's loss is a mean.
"""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from ..experts import GroupedExperts
from ..ops.chunked import AutogradChunks, module_fn
from ..plan import RoutingPlan, capacity_for
from .checks import exchange_device, raise_from_rows, raise_on_every_rank, status_row
from .dispatch import AllToAllDispatcher, Dispatcher, Layout, to_device
from .pipeline import Pipeline
from .placement import Placement
from .slots import Slots
from .tokens import PARTIALS, counts_width, forward_tokens
from .tp import tp_gather, tp_scatter

__all__ = ["EXCHANGES", "ExpertParallel", "check_exchange"]

EXCHANGES = ("rows", "tokens")


def check_exchange(exchange: str, partials: str) -> None:
    """``exchange`` and ``partials`` are allowed values (else a ValueError naming them)."""
    if exchange not in EXCHANGES:
        raise ValueError(f"exchange={exchange!r}; allowed: {EXCHANGES}")
    if partials not in PARTIALS:
        raise ValueError(f"partials={partials!r}; allowed: {PARTIALS}")


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
        exchange: str = "rows",
        partials: str = "float32",
    ):
        super().__init__()
        check_exchange(exchange, partials)
        self.exchange, self.partials = exchange, partials
        self.group = group
        self.world_size = dist.get_world_size(group)
        self.rank = dist.get_rank(group)
        self.dispatcher = dispatcher or AllToAllDispatcher(group)
        self.num_chunks = num_chunks
        self.tp_group = tp_group
        self.num_experts = experts.num_experts
        self.last_plans: list[RoutingPlan] = []  # the sender plan of the last forward
        self.last_layouts: list[Layout] = []  # per chunk
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
        self._slot_tables: dict[int, Slots] = {}  # per number of chunks
        self.register_buffer("_num_replicas", p.num_replicas().to(dev), persistent=False)
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
            f"num_experts={self.num_experts}, shared_rank={self.is_shared_rank}, num_chunks={self.num_chunks}, "
            f"exchange={self.exchange}" + (f", partials={self.partials}" if self.exchange == "tokens" else "")
        )

    # -------------------------------------------------------------- forward
    def forward(
        self,
        x_TD: torch.Tensor,
        topk_ids_TK: torch.Tensor,
        topk_weights_TK: torch.Tensor,
        experts: GroupedExperts,
        shared_experts: nn.Module | None = None,
    ) -> torch.Tensor:
        """``shared_experts``: the layer's own (local) shared experts, added to the output and
        computed while the first exchange of each direction travels (see
        :meth:`overlaps_shared`); None leaves them to the caller."""
        if shared_experts is not None and not self.overlaps_shared(shared_experts):
            raise ValueError("these shared experts cannot run inside the expert-parallel pipeline "
                             "(overlaps_shared is False): add their output outside it")
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
        y_TD = self._forward_ep(x_TD, topk_ids_TK, topk_weights_TK, experts, shared_experts)
        if self.tp_group is not None:
            y_TD = tp_gather(self.tp_group, y_TD, T_full)
        return y_TD

    def overlaps_shared(self, module: nn.Module | None) -> bool:
        """Whether the layer's local shared experts ``module`` can run inside the pipeline,
        beside the first exchange of each direction: a module of this rank's own, outside a
        tensor-parallel region (whose sharded shared experts hold a collective of their own)."""
        return module is not None and self.tp_group is None and not self.is_shared_rank

    def fail_together(self, error: BaseException, x: torch.Tensor | None) -> None:
        """This rank failed on its input before its forward: join the forward's first
        collective (the counts exchange, with zero counts and a failed status), so that every
        rank raises (:mod:`moekit.parallel.checks`); raises ``error`` here."""
        if self.tp_group is not None:  # a tensor-parallel gather comes first
            raise_on_every_rank(self.group, error, x, None)
        dev = exchange_device(self.group)
        if self.exchange == "tokens":
            q = counts_width(self.num_chunks, self.world_size)
        else:
            q = self._slots(self.num_chunks, torch.device("cpu")).num_slots
        counts = torch.zeros(1, q, dtype=torch.int64, device=dev)
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

    def _keep(self, plan: RoutingPlan, layouts: list[Layout]) -> None:
        """``last_plans`` and ``last_layouts`` of this forward (without nn.Module's setattr)."""
        object.__setattr__(self, "last_plans", [plan])
        object.__setattr__(self, "last_layouts", layouts)

    def _slots(self, C: int, dev: torch.device) -> Slots:
        t = self._slot_tables.get(C)
        if t is None or t.ext_table.device != dev:
            t = self._slot_tables[C] = Slots.build(self.placement, self.rank, C, dev)
        return t

    def _ext_slots(self, ids_TK, w_TK, S: Slots):
        """``(q_TK, w_TK)``: the extended slot of each (token, k) — its chunk (the group of
        its slot), its rank, its slot (a replica chosen by slot id and rank) — and, with
        external shared experts, one more column per token to a shared rank, weight 1."""
        T, K = ids_TK.shape
        dev = ids_TK.device
        C = self.num_chunks
        ids = ids_TK if ids_TK.dtype == torch.long else ids_TK.to(torch.long)
        if S.ext_table.shape[1] > 1:
            s = torch.arange(T * K, device=dev).view(T, K)
            rep = (s + self.rank) % self._num_replicas[ids]
            q_TK = S.ext_table[ids, rep]
        else:  # (the table's one column)
            q_TK = torch.take(S.ext_table, ids)
        if S.shared_ext.shape[1]:  # one more row per token, to a shared rank, weight 1
            t = torch.arange(T, device=dev)
            q_sh = S.shared_ext[(t * C) // max(T, 1), t % S.shared_ext.shape[1]]
            q_TK = torch.cat([q_TK, q_sh.unsqueeze(1)], 1)
            w_TK = torch.cat([w_TK, w_TK.new_ones(T, 1)], 1)
        return q_TK, w_TK

    def _pipeline(self, layouts, S: Slots, backend, experts: GroupedExperts, recv_ids, kw,
                  local_shared: nn.Module | None, total_rows: int, *, weight_on_input=False,
                  **pipe_kw) -> tuple[Pipeline, list, list]:
        """``(pipeline, params, side params)`` of one forward: this rank's local compute (its
        experts through the backend's chunk runner over ``total_rows`` rows; on an external
        shared rank its shared experts on every received row) and the layer's local shared
        experts ``local_shared``, computed while the exchanges travel."""
        train = torch.is_grad_enabled()
        if self.is_shared_rank:
            params = list(self.shared_experts.parameters())
            runner = AutogradChunks(module_fn(self.shared_experts), params, train=train,
                                    slice_params=False)
        else:
            params = self._params(experts)
            runner = backend.chunk_runner(params, activation=experts.activation, train=train,
                                          total_rows=total_rows, weight_on_input=weight_on_input)
        side, side_params = None, []
        if local_shared is not None:
            side_params = list(local_shared.parameters())
            side = AutogradChunks(module_fn(local_shared), side_params, train=train,
                                  slice_params=False)
        pipe = Pipeline(self.dispatcher, layouts, S.groups, runner, recv_ids, kw, side, **pipe_kw)
        return pipe, params, side_params

    def _forward_ep(self, x_TD, ids_TK, w_TK, experts: GroupedExperts,
                    local_shared: nn.Module | None = None) -> torch.Tensor:
        if self.exchange == "tokens":
            return forward_tokens(self, x_TD, ids_TK, w_TK, experts, local_shared)
        K = ids_TK.shape[1]
        dev = x_TD.device
        on_input = experts.config.routing_weight_on == "input"
        backend = experts.backend_for(dev, x_TD.dtype)
        C, W, me = self.num_chunks, self.world_size, self.rank
        S = self._slots(C, dev)

        # 1. logical expert -> extended slot (and the shared column)
        q_TK, w_TK = self._ext_slots(ids_TK, w_TK, S)

        # 2. one sender plan over the slots: rows chunk-major, then by rank
        plan = backend.make_plan(q_TK, S.num_slots, check_ids=False)  # (from the slot tables)
        send = backend.permute(x_TD, plan, w_TK if on_input else None)
        # the receiver's weight-drop policy needs the routing weights of the rows it gets
        send_w = None
        if experts.capacity_factor is not None and experts.drop_policy == "weight":
            send_w = w_TK.reshape(-1).index_select(0, plan.sorted_slots_N).float().unsqueeze(1)

        # 3. counts [W, Q] on the host (one host sync), with every rank's fail-together status;
        # from here to the experts' first GEMM the device waits for the host: few ops
        counts, headers = self.dispatcher.exchange_counts(plan.counts_E.view(1, -1),
                                                          status_row(None, x_TD, K))
        raise_from_rows(self.group, headers, None)
        rows = [r[0] for r in counts.tolist()]  # (plain lists: host-tensor ops cost more)
        mine = [(S.starts[c][me], S.starts[c][me] + S.counts[c][me]) for c in range(C)]
        layouts = []
        for c, (a, b) in enumerate(mine):
            st, n = S.starts[c], S.counts[c]
            layouts.append(Layout(send=[sum(rows[me][st[r]:st[r] + n[r]]) for r in range(W)],
                                  recv=[sum(row[a:b]) for row in rows]))
        self._keep(plan, layouts)
        kw: list[dict] = [{} for _ in range(C)]
        if experts.capacity_factor is not None and not self.is_shared_rank:
            routed = sum(map(sum, rows)) - sum(row[q] for row in rows for q in S.shared_slots)
            capacity = capacity_for(routed // K if K else 0, K, self.num_experts,
                                    experts.capacity_factor)
            for c in range(C):
                kw[c] = {"capacity": capacity, "drop_policy": experts.drop_policy}
        at = 0
        for c in range(C):
            if send_w is not None:
                with torch.no_grad():
                    rw = self.dispatcher.dispatch(send_w[at:at + layouts[c].num_send], layouts[c])[0]
                if not self.is_shared_rank:
                    kw[c]["row_weights"] = rw
            at += layouts[c].num_send

        # each received row's expert [R, 1]: every sender's rows of the chunk's group, by
        # expert (their counts go to the device in one copy; None on a shared rank)
        reps = None
        if not self.is_shared_rank:  # (slices of the host tensor: a list to tensor costs more)
            need = [counts[:, 0, a:b].reshape(-1) for a, b in mine]
            reps = to_device(need[0] if C == 1 else torch.cat(need), dev).split(
                [W * (b - a) for a, b in mine])

        def recv_ids(c):
            return None if reps is None else torch.repeat_interleave(
                S.recv_base[c], reps[c], dim=0, output_size=layouts[c].num_recv)

        # 4-5. dispatch -> local experts -> combine, chunk by chunk (pipeline.py)
        pipe, params, side_params = self._pipeline(
            layouts, S, backend, experts, recv_ids, kw, local_shared,
            sum(lay.num_recv for lay in layouts))
        y_send, y_shared = pipe.apply(send, params, x_TD if pipe.side else None, side_params)
        y_TD = backend.unpermute(y_send, plan, None if on_input else w_TK)
        return y_TD if y_shared is None else y_TD + y_shared
