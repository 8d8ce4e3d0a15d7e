"""The token exchange of expert parallelism (``ExpertParallel(exchange="tokens")``): each token
travels once to each (chunk, rank) holding at least one of its experts, not once per routed
expert, and comes back as one partial sum.

The row exchange (``exchange="rows"``, ``rows.py``) sends one row per routed (token, expert):
with top-k routing over W ranks a token whose k experts sit on fewer than k ranks is sent
several times to the same rank (EP=2, top-8: about 4 copies to each rank). Here the sender
sends ``x[t]`` once per destination (DeepEP's dispatch), with a small metadata row: the
destination's local expert of each of the token's k slots (not there: the number of the
destination's experts in the chunk, the receiver plan's zero expert) and its routing weight.
The sender's plan and the metadata are made before the counts exchange's host sync
(``prepare_plan``), for every (token, destination), and cut to the rows sent after it. The
receiver runs its experts on the received tokens as on one process (the backend's
chunk runner: its plan, ``num_zero_experts=1`` marking the slots held elsewhere, the combine
with the routing weights) and sends back each token's partial sum over its local experts; the
sender adds the partials of its token's destinations (a fixed order: deterministic).

Legend: T tokens, K top-k, P = C*W destinations (chunk c, rank r: ``c*W + r``, the order of the
extended slots, ``slots.py``), N rows sent (token, destination), R rows received.

* Capacity: every expert's rows are in one chunk, in the global token order (senders in rank
  order, tokens in order): the receiver's plan drops what the single-process plan drops
  (the zero experts' slots do not count against a capacity).
* ``partials``: the dtype of the partial sums sent back (forward: the outputs, backward: the
  input grads): ``float32`` (or the activations' dtype if wider) keeps them unrounded until
  the sender's sum (the output then
  differs from the single-process layer's only by the fp32 summation order); ``"input"``
  sends them in the activations' dtype (half the bytes back, one more rounding).
* The routing weights travel in fp32 (fp64 for an fp64 router), and so do their grads, back
  in the backward beside the input grads (``[N, K]``).
"""

from __future__ import annotations

import torch

from ..plan import capacity_for, count_per_expert, prepare_plan
from .checks import raise_from_rows, status_row
from .dispatch import Layout
from .pipeline import Pipeline, run_node

__all__ = ["PARTIALS", "counts_width", "forward_tokens"]

PARTIALS = ("float32", "input")


def counts_width(num_chunks: int, world_size: int) -> int:
    """Entries of one rank's counts row: tokens and routed slots per destination (a rank's T is
    the sum of its routed slots over K)."""
    return 2 * num_chunks * world_size


class _TokenRun:
    """One forward (and backward) of the token exchange on this rank: the sender's gathers and
    sums around the pipeline (``pipeline.py``) that runs the exchanges and the local experts."""

    def __init__(self, backend, plan, pipe: Pipeline, dest_TK: torch.Tensor, dtype, num_params,
                 w_dtype):
        self.backend, self.plan, self.pipe, self.side = backend, plan, pipe, pipe.side
        self.dest_TK = dest_TK  # [T, K] the destination of each routed slot
        self.dtype, self.num_params = dtype, num_params  # of the activations; of the experts
        self.w_dtype = w_dtype  # of the routing weights

    def _sum(self, parts_ND: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """Each token's partial sums over its destinations, in a fixed order."""
        with torch.no_grad():
            return self.backend.unpermute(parts_ND, self.plan, out_dtype=dtype)

    def forward(self, x_TD, w_TK, x_side):
        # (the routing weights travel in the metadata; the node returns their grads)
        with torch.no_grad():
            send_ND = self.backend.permute(x_TD, self.plan)
        y_ND, y_side = self.pipe.run_forward(send_ND, x_side)
        return self._sum(y_ND, x_TD.dtype), y_side

    def backward(self, g_TD, g_side, needs):
        dt = self.dtype
        with torch.no_grad():
            g_ND = self.backend.permute(g_TD.to(dt), self.plan)
        dx_ND, dx_side, grads, side_grads, dw_NK = self.pipe.run_backward(
            g_ND, g_side, needs[:self.num_params])
        dx_TD = self._sum(dx_ND, dt)
        K = self.dest_TK.shape[1]
        rows_TK = self.plan.inverse_TK.gather(1, self.dest_TK)  # the sent row of each slot
        dw_TK = dw_NK[rows_TK, torch.arange(K, device=dw_NK.device)].to(self.w_dtype)
        return (dx_TD, dw_TK, dx_side, *grads, *side_grads)


def forward_tokens(ep, x_TD, ids_TK, w_TK, experts, local_shared=None) -> torch.Tensor:
    """``y_TD`` of ``ep`` (an :class:`~moekit.parallel.ep.ExpertParallel` with
    ``exchange="tokens"``) for this rank's tokens; the arguments as its ``_forward_ep``'s."""
    T, K = ids_TK.shape
    dev, dt = x_TD.device, x_TD.dtype
    woi = experts.config.routing_weight_on == "input"
    backend = experts.backend_for(dev, dt)
    C, W, me = ep.num_chunks, ep.world_size, ep.rank
    S = ep._slots(C, dev)
    P = C * W

    # 1. each slot's destination, and the tokens and routed slots per destination
    q_TK, _ = ep._ext_slots(ids_TK, w_TK, S)
    dest_TK = torch.take(S.dest, q_TK)
    hit = torch.zeros(T, P + 1, dtype=torch.bool, device=dev).scatter_(1, dest_TK, True)[:, :P]
    mine = torch.cat([hit.sum(0), count_per_expert(dest_TK[:, :K], P)])  # counts_width(C, W)

    # 2. the sender's plan over destinations: rows by destination, then token (the destinations
    # a token does not need are the plan's zero expert P, cut once the counts say how many
    # rows are sent), and the metadata of each row: the destination's local expert of each
    # routed slot (held elsewhere: the destination group's size, its zero expert) and the
    # slot's routing weight (fp32, or fp64 for an fp64 router, as int32 bits). Queued before
    # the counts exchange's host sync: only views of them after it.
    prep = prepare_plan(torch.where(hit, S.destinations, P), P, num_zero_experts=1)
    tok, d_N = prep.plan.token_ids_N, prep.plan.expert_ids_N
    wdt = torch.float64 if w_TK.dtype == torch.float64 else torch.float32
    here = dest_TK[:, :K].index_select(0, tok) == d_N.unsqueeze(1)
    lid_NK = torch.where(here, torch.take(S.local, q_TK[:, :K].index_select(0, tok)),
                         torch.take(S.group_size, d_N).unsqueeze(1))
    w_NK = torch.where(here, w_TK.detach().to(wdt).index_select(0, tok), 0.0)
    meta_NM = torch.cat([lid_NK, w_NK.view(torch.int32)], 1)

    # 3. those counts on the host: the forward's one host sync, with every rank's
    # fail-together status
    counts, headers = ep.dispatcher.exchange_counts(mine.view(1, -1), status_row(None, x_TD, K))
    raise_from_rows(ep.group, headers, None)
    rows = [r[0] for r in counts.tolist()]
    layouts = [Layout(send=[rows[me][c * W + r] for r in range(W)],
                      recv=[rows[r][c * W + me] for r in range(W)]) for c in range(C)]
    slots_c = [sum(rows[r][P + c * W + me] for r in range(W)) for c in range(C)]  # received
    plan = prep.finish(sum(rows[me][:P]))
    ep._keep(plan, layouts)

    # 4. the metadata travels first (small), then the receiver's plan arguments per chunk
    kw: list[dict] = []
    ids_c: list = []
    pdt = torch.promote_types(dt, torch.float32) if ep.partials == "float32" else dt
    at = 0
    capacity = None
    if experts.capacity_factor is not None:  # (a rank's T: its routed slots over K)
        T_total = sum(sum(r[P:]) for r in rows) // K if K else 0
        capacity = capacity_for(T_total, K, ep.num_experts, experts.capacity_factor)
    for c, lay in enumerate(layouts):
        with torch.no_grad():
            got = ep.dispatcher.dispatch(meta_NM[at:at + lay.num_send], lay)[0]
        at += lay.num_send
        if ep.is_shared_rank:
            ids_c.append(None)
            kw.append({"out_dtype": pdt})
            continue
        ids_c.append(got[:, :K].to(torch.int64))
        k = {"weights": got[:, K:].contiguous().view(wdt), "num_zero_experts": 1,
             "num_real_slots": slots_c[c], "out_dtype": pdt}
        if capacity is not None:
            k.update(capacity=capacity, drop_policy=experts.drop_policy)
        kw.append(k)

    # 5. dispatch -> local experts -> combine, chunk by chunk (pipeline.py)
    pipe, params, side_params = ep._pipeline(
        layouts, S, backend, experts, ids_c.__getitem__, kw, local_shared, sum(slots_c),
        weight_on_input=woi, out_dtype=pdt, routing_cols=K, routing_dtype=wdt)
    run = _TokenRun(backend, plan, pipe, dest_TK[:, :K], dt, len(params), w_TK.dtype)
    y_TD, y_shared = run_node(run, [x_TD, w_TK, x_TD if pipe.side else None], params, side_params)
    return y_TD if y_shared is None else y_TD + y_shared
