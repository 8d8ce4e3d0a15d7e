"""Expert parallelism: :class:`ExpertParallel`, the dispatch and combine that ``apply_ep``
(``moekit/parallel/apply.py``) sets beside the layer's experts (``moe.dispatch``; the experts
module stays the layer's own ``GroupedExperts``, keeping only this rank's experts, and runs
through its backend), and the exchange choice (``EXCHANGES``, :func:`check_exchange`).

Here: the layer's state and the parts both exchanges share: the placement
(``set_placement``), the extended slots of each (token, k) (``_ext_slots``, over the tables of
``slots.py``), the pipeline of one forward (``_pipeline``, ``pipeline.py``), the local expert
weights (``_params``; the replicas' gradient sum is ``replica_grads.py``) and the fail-together
path (``fail_together``). The forward of each exchange is its own module: ``rows.py``
(:func:`~moekit.parallel.rows.forward_rows`, one row per routed (token, expert)) and
``tokens.py`` (:func:`~moekit.parallel.tokens.forward_tokens`, each token once per
destination).

Gradient conventions (see docs/parallel.md): expert weights hold the full gradient of the
layer fed all ranks' tokens (the sum over ranks happens in the all-to-all backward; no
factor of the world size). Replicas of a redundant expert get the sum of their gradients
(an all-reduce in the backward), so they stay identical. Router and local shared experts
are replicated (data parallel): each rank's gradient covers its own tokens; sum them over
the group (``sync_replicated_grads``) — or average, if each rank's loss is a mean.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from ..experts import GroupedExperts
from ..ops.chunked import AutogradChunks, module_fn
from ..plan import RoutingPlan
from .checks import exchange_device, raise_from_rows, raise_on_every_rank, status_row
from .dispatch import AllToAllDispatcher, Dispatcher, Layout
from .pipeline import Pipeline
from .placement import Placement
from .replica_grads import _ReplicaGradSum
from .rows import forward_rows
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
        return forward_rows(self, x_TD, ids_TK, w_TK, experts, local_shared)
