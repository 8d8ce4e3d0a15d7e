"""The row exchange of expert parallelism (``ExpertParallel(exchange="rows")``, the default):
:func:`forward_rows` sends one row per routed (token, expert) to the rank holding the expert
(the token exchange, one row per token and destination, is ``tokens.py``).

Forward (legend: T tokens, K top-k, D model dim, C chunks, Q = extended slots: every rank's
slots plus one per shared rank and chunk, N = rows this rank sends, R = rows it receives, L =
its local experts):

1. map each (token, k)'s logical expert to an extended slot (``ExpertParallel._ext_slots``
   over the tables of :class:`~moekit.parallel.slots.Slots`: numbered chunk by chunk, chunk
   c holding the slots ``[L*c//C, L*(c+1)//C)`` of every rank, then rank by rank; a
   replica, for redundant experts: ``replica = (t*K + k + rank) % replicas``); with
   external shared experts one more column per token goes to a shared rank, weight 1, in
   the chunk of the token's position;
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
"""

from __future__ import annotations

import torch

from ..plan import capacity_for
from .checks import raise_from_rows, status_row
from .dispatch import Layout, to_device

__all__ = ["forward_rows"]


def forward_rows(ep, x_TD, ids_TK, w_TK, experts, local_shared=None) -> torch.Tensor:
    """``y_TD`` of ``ep`` (an :class:`~moekit.parallel.ep.ExpertParallel` with
    ``exchange="rows"``) for this rank's tokens; the arguments as its ``_forward_ep``'s."""
    K = ids_TK.shape[1]
    dev = x_TD.device
    on_input = experts.config.routing_weight_on == "input"
    backend = experts.backend_for(dev, x_TD.dtype)
    C, W, me = ep.num_chunks, ep.world_size, ep.rank
    S = ep._slots(C, dev)

    # 1. logical expert -> extended slot (and the shared column)
    q_TK, w_TK = ep._ext_slots(ids_TK, w_TK, S)

    # 2. one sender plan over the slots: rows chunk-major, then by rank
    plan = backend.make_plan(q_TK, S.num_slots, check_ids=False)  # (from the slot tables)
    send = backend.permute(x_TD, plan, w_TK if on_input else None)
    # the receiver's weight-drop policy needs the routing weights of the rows it gets
    send_w = None
    if experts.capacity_factor is not None and experts.drop_policy == "weight":
        send_w = w_TK.reshape(-1).index_select(0, plan.sorted_slots_N).float().unsqueeze(1)

    # 3. counts [W, Q] on the host (one host sync), with every rank's fail-together status;
    # from here to the experts' first GEMM the device waits for the host: few ops
    counts, headers = ep.dispatcher.exchange_counts(plan.counts_E.view(1, -1),
                                                    status_row(None, x_TD, K))
    raise_from_rows(ep.group, headers, None)
    rows = [r[0] for r in counts.tolist()]  # (plain lists: host-tensor ops cost more)
    mine = [(S.starts[c][me], S.starts[c][me] + S.counts[c][me]) for c in range(C)]
    layouts = []
    for c, (a, b) in enumerate(mine):
        st, n = S.starts[c], S.counts[c]
        layouts.append(Layout(send=[sum(rows[me][st[r]:st[r] + n[r]]) for r in range(W)],
                              recv=[sum(row[a:b]) for row in rows]))
    ep._keep(plan, layouts)
    kw: list[dict] = [{} for _ in range(C)]
    if experts.capacity_factor is not None and not ep.is_shared_rank:
        routed = sum(map(sum, rows)) - sum(row[q] for row in rows for q in S.shared_slots)
        capacity = capacity_for(routed // K if K else 0, K, ep.num_experts,
                                experts.capacity_factor)
        for c in range(C):
            kw[c] = {"capacity": capacity, "drop_policy": experts.drop_policy}
    at = 0
    for c in range(C):
        if send_w is not None:
            with torch.no_grad():
                rw = ep.dispatcher.dispatch(send_w[at:at + layouts[c].num_send], layouts[c])[0]
            if not ep.is_shared_rank:
                kw[c]["row_weights"] = rw
        at += layouts[c].num_send

    # each received row's expert [R, 1]: every sender's rows of the chunk's group, by
    # expert (their counts go to the device in one copy; None on a shared rank)
    reps = None
    if not ep.is_shared_rank:  # (slices of the host tensor: a list to tensor costs more)
        need = [counts[:, 0, a:b].reshape(-1) for a, b in mine]
        reps = to_device(need[0] if C == 1 else torch.cat(need), dev).split(
            [W * (b - a) for a, b in mine])

    def recv_ids(c):
        return None if reps is None else torch.repeat_interleave(
            S.recv_base[c], reps[c], dim=0, output_size=layouts[c].num_recv)

    # 4-5. dispatch -> local experts -> combine, chunk by chunk (pipeline.py)
    pipe, params, side_params = ep._pipeline(
        layouts, S, backend, experts, recv_ids, kw, local_shared,
        sum(lay.num_recv for lay in layouts))
    y_send, y_shared = pipe.apply(send, params, x_TD if pipe.side else None, side_params)
    y_TD = backend.unpermute(y_send, plan, None if on_input else w_TK)
    return y_TD if y_shared is None else y_TD + y_shared
