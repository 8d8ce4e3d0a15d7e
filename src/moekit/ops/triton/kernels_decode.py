"""The decode ``@triton.jit`` kernels (a token or a few, inference): the down projection fused
with the combine, and the routing plan in one program. Legend as in ``kernels``.
"""

from __future__ import annotations

import triton
import triton.language as tl


# ----------------------------------------------------------------------------- decode: down + combine
@triton.jit
def down_combine_kernel(
    A, W, B, INV, EIDS, WTS, OUT,
    Dm, F, num_pid_d,
    stride_an, stride_we, stride_wd, stride_wf, stride_be, stride_ot,
    K: tl.constexpr, K_P2: tl.constexpr, HAS_W: tl.constexpr, HAS_BIAS: tl.constexpr,
    PDL: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_F: tl.constexpr,
):
    """Decode: ``out[t] = sum_k w[t,k] * (a[inv[t,k]] @ down[e_k].T + b[e_k])`` for one token
    and one block of output columns, the down projection and the combine in one kernel (no
    [N, D] rows buffer, one launch less). The program's ``K * BLOCK_D`` weight rows (slot k,
    column d) are streamed together as one ``[K * BLOCK_D, BLOCK_F]`` tile per step, the next
    step's tiles requested before the current ones are used, so that enough bytes are in flight
    to stream the weights with about one program per SM; the per-slot sums are added in a
    fixed order (deterministic). Each token reads its own experts' weights: the path for very
    few tokens. ``PDL``: launched as a programmatic dependent of the up kernel; the routing
    and the first weight tile are read before waiting for it (only ``A`` is its output)."""
    pid = tl.program_id(0)
    t64 = (pid // num_pid_d).to(tl.int64)
    js = tl.arange(0, K_P2 * BLOCK_D)  # row j = slot k, column d
    k_j = js // BLOCK_D
    d_j = (pid % num_pid_d) * BLOCK_D + js % BLOCK_D
    r_j = tl.load(INV + t64 * K + k_j, mask=k_j < K, other=-1)
    ok = (r_j >= 0) & (d_j < Dm)
    r64 = tl.where(r_j >= 0, r_j, 0).to(tl.int64)
    e64 = tl.load(EIDS + r64, mask=ok, other=0).to(tl.int64)
    fs = tl.arange(0, BLOCK_F)
    w_ptrs = W + (e64 * stride_we + d_j.to(tl.int64) * stride_wd)[:, None] + fs[None, :] * stride_wf
    a_ptrs = A + r64[:, None] * stride_an + fs[None, :]
    acc = tl.zeros((K_P2 * BLOCK_D,), dtype=tl.float32)
    wt = tl.load(w_ptrs, mask=ok[:, None] & (fs < F)[None, :], other=0.0)
    if PDL:
        tl.extra.cuda.gdc_wait()
    at = tl.load(a_ptrs, mask=ok[:, None] & (fs < F)[None, :], other=0.0)
    for f0 in range(0, F, BLOCK_F):
        # the next step's tiles are requested before this step's are used
        mf = (f0 + BLOCK_F + fs) < F
        w_ptrs += BLOCK_F * stride_wf
        a_ptrs += BLOCK_F
        w_nxt = tl.load(w_ptrs, mask=ok[:, None] & mf[None, :], other=0.0)
        a_nxt = tl.load(a_ptrs, mask=ok[:, None] & mf[None, :], other=0.0)
        acc += tl.sum(wt.to(tl.float32) * at.to(tl.float32), axis=1)
        wt = w_nxt
        at = a_nxt
    if HAS_BIAS:
        acc += tl.load(B + e64 * stride_be + d_j, mask=ok, other=0.0).to(tl.float32)
    if HAS_W:
        acc = acc * tl.load(WTS + t64 * K + k_j, mask=ok, other=0.0).to(tl.float32)
    out = tl.sum(tl.reshape(acc, (K_P2, BLOCK_D)), axis=0)
    ds = (pid % num_pid_d) * BLOCK_D + tl.arange(0, BLOCK_D)
    tl.store(OUT + t64 * stride_ot + ds, out.to(OUT.dtype.element_ty), mask=ds < Dm)


# ----------------------------------------------------------------------------- decode: the routing plan
@triton.jit
def small_plan_kernel(
    IDS, COUNTS, OFFSETS, SORTED, TOKS, EXPS, INV, DROPPED, VALID,
    n, E, K,
    BLOCK: tl.constexpr, CHUNK: tl.constexpr, E_CHUNK: tl.constexpr,
):
    """A dropless RoutingPlan of ``n = T*K <= BLOCK`` slots in one program (decode sizes, where
    the plan's dozen small torch ops cost more host time than the experts' kernels).

    Slot ``i``'s row is the number of slots with a smaller expert id plus the earlier slots
    with the same id: a stable counting sort by comparisons (``n * n`` of them, in chunks),
    identical to ``make_plan``'s stable sort. Ids outside ``[0, E)`` clear ``VALID`` (the
    caller asserts it) and are left out of every output, so nothing is written out of bounds."""
    i = tl.arange(0, BLOCK)
    mi = i < n
    ids64 = tl.load(IDS + i, mask=mi, other=0).to(tl.int64)
    ok = (ids64 >= 0) & (ids64 < E)
    ids = ids64.to(tl.int32)
    tl.store(VALID, (tl.sum((mi & ~ok).to(tl.int32), 0) == 0).to(tl.int32))
    tl.store(DROPPED, tl.zeros((), dtype=tl.int64))
    key = tl.where(mi & ok, ids, E)  # invalid and padding slots sort last
    row = tl.zeros((BLOCK,), dtype=tl.int32)
    for j0 in range(0, n, CHUNK):
        j = j0 + tl.arange(0, CHUNK)
        idj = tl.load(IDS + j, mask=j < n, other=0).to(tl.int64)
        kj = tl.where((j < n) & (idj >= 0) & (idj < E), idj, E).to(tl.int32)
        before = (kj[None, :] < key[:, None]) | ((kj[None, :] == key[:, None]) & (j[None, :] < i[:, None]))
        row += tl.sum(before.to(tl.int32), 1)
    keep = mi & ok
    row64 = row.to(tl.int64)
    tl.store(INV + i, tl.where(keep, row64, -1), mask=mi)
    tl.store(SORTED + row64, i.to(tl.int64), mask=keep)
    tl.store(TOKS + row64, (i // K).to(tl.int64), mask=keep)
    tl.store(EXPS + row64, ids64, mask=keep)
    total = 0
    for e0 in range(0, E, E_CHUNK):
        es = e0 + tl.arange(0, E_CHUNK)
        c = tl.sum(((key[None, :] == es[:, None]) & keep[None, :]).to(tl.int32), 1)
        tl.store(COUNTS + es, c, mask=es < E)
        tl.store(OFFSETS + es, tl.cumsum(c, 0) + total, mask=es < E)
        total += tl.sum(c, 0)
