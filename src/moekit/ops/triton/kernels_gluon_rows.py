"""Warp-specialized row GEMM for Hopper, in Gluon, with ping-pong consumers.

``y[rows of e] = a[rows of e] @ w[e].T`` for rows sorted by expert, ``a [N, I]`` contiguous rows,
``w [E, O, I]`` with I contiguous or O contiguous (e.g. ``gate_up.transpose(1, 2)`` for the input
grad), ``y [N, O]``; no bias. Where ``gluon_rules.gluon_rows_wanted`` sends it: by default the
forward's down projection of fine-grained experts, whose short main loops leave the epilogue
most to hide.

One persistent program per SM walks the output tiles ``(row tile of an expert, O tile)``. A loader
partition streams ``a``'s row tile and ``w[e]``'s tile through TMA into a ring of shared-memory
stages (the weight through an ``[E, O, I]`` descriptor, so tiles clip at each expert's edge); two
consumer partitions (one warp group each) take alternate tiles: while one runs its main loop
(``wgmma``), the other writes its finished tile out. The consumers take their main loops in turn
(the ``turn`` barriers): a consumer waits on the stages' ready barriers only after the other has
waited on all of its own, which keeps the barriers' phase parities unambiguous. A full row tile
leaves by a TMA store; the last, partial tile of an expert by masked stores (its rows past the
expert's end are the next expert's and are not written).

Imported only where it is used (``launchers.rows_gemm``): it needs ``triton.experimental.gluon``
and runs on compute capability 9 only. H200, bf16, the GEMM alone (``benchmarks/gemm_ab.py
--gluon``, ``benchmarks/results/H200-s11-gemm-ab-gluon.json``): Qwen3's down projection 0.722
against 0.790 ms for the Triton TMA kernel, OLMoE's 0.915 against 0.958.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)

from .kernels_gluon import tma_desc
from .launch_config import _e_p2, _max_tiles

__all__ = ["rows_gemm_ws"]

BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GROUP_M = 128, 128, 64, 4, 8
CONSUMER_WARPS, LOADER_WARPS = 4, 4


@gluon.jit
def _add(a, b):
    return a + b


@gluon.jit
def _row_tiles(COUNTS, E, E_P2: gl.constexpr, BM: gl.constexpr, NW: gl.constexpr):
    """The experts ``[E_P2]``, their row tiles and the running count of those."""
    layout: gl.constexpr = gl.BlockedLayout([1], [32], [NW], [0])
    es = gl.arange(0, E_P2, layout=layout)
    tiles = (gl.load(COUNTS + es, mask=es < E, other=0) + BM - 1) // BM
    return es, tiles, gl.associative_scan(tiles, 0, _add)


@gluon.jit
def _tile(t, es, tiles, cum, COUNTS, OFFSETS, E, O, BM: gl.constexpr, BN: gl.constexpr,
          GM: gl.constexpr):
    """Output tile ``t``: its expert, first row, the expert's end row and first column. GM row
    tiles share each column tile (L2 reuse of the weight tiles)."""
    num_m = gl.sum(tiles, 0)
    num_n = gl.cdiv(O, BN)
    first_m = (t // (GM * num_n)) * GM
    size_m = gl.minimum(num_m - first_m, GM)
    pid_m = first_m + (t % (GM * num_n)) % size_m
    pid_n = (t % (GM * num_n)) // size_m
    e = gl.minimum(gl.sum((cum <= pid_m).to(gl.int32), 0), E - 1)
    before = gl.sum(gl.where(es < e, tiles, 0), 0)
    end = gl.load(OFFSETS + e)
    start = end - gl.load(COUNTS + e)
    return e, start + (pid_m - before) * BM, end, pid_n * BN


@gluon.jit
def _loader(a_desc, w_desc, COUNTS, OFFSETS, E, O, I, a_bufs, w_bufs, ready, empty,
            E_P2: gl.constexpr, K_CONTIG: gl.constexpr, GM: gl.constexpr, BN: gl.constexpr):
    BM: gl.constexpr = a_desc.block_type.shape[0]
    BK: gl.constexpr = a_desc.block_type.shape[1]
    NB: gl.constexpr = a_bufs.shape[0]
    es, tiles, cum = _row_tiles(COUNTS, E, E_P2, BM, gl.num_warps())
    total = gl.sum(tiles, 0) * gl.cdiv(O, BN)
    it = 0
    for t in range(gl.program_id(0), total, gl.num_programs(0)):
        e, row0, end, n0 = _tile(t, es, tiles, cum, COUNTS, OFFSETS, E, O, BM, BN, GM)
        for k in range(0, I, BK):
            s = it % NB
            mbarrier.wait(empty.index(s), ((it // NB) & 1) ^ 1)  # the stage's last MMA is done
            bar = ready.index(s)
            mbarrier.expect(bar, a_desc.block_type.nbytes + w_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(a_desc, [row0, k], bar, a_bufs.index(s))
            if K_CONTIG:
                tma.async_copy_global_to_shared(w_desc, [e, n0, k], bar, w_bufs.index(s))
            else:
                tma.async_copy_global_to_shared(w_desc, [e, k, n0], bar, w_bufs.index(s))
            it += 1


@gluon.jit
def _consumer(y_desc, Y, stride_y, COUNTS, OFFSETS, E, O, I, a_bufs, w_bufs, c_smem, ready,
              empty, turn, E_P2: gl.constexpr, K_CONTIG: gl.constexpr, GM: gl.constexpr,
              NW: gl.constexpr, CID: gl.constexpr):
    BM: gl.constexpr = y_desc.block_type.shape[0]
    BN: gl.constexpr = y_desc.block_type.shape[1]
    BK: gl.constexpr = a_bufs.shape[2]
    NB: gl.constexpr = a_bufs.shape[0]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, BN, 16])
    st_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    CH: gl.constexpr = 4 * NW
    es, tiles, cum = _row_tiles(COUNTS, E, E_P2, BM, NW)
    total = gl.sum(tiles, 0) * gl.cdiv(O, BN)
    n_k = gl.cdiv(I, BK)
    pid = gl.program_id(0)
    P = gl.num_programs(0)
    cs = c_smem.index(CID)
    mine = 0
    for t in range(pid + CID * P, total, 2 * P):
        e, row0, end, n0 = _tile(t, es, tiles, cum, COUNTS, OFFSETS, E, O, BM, BN, GM)
        it = ((t - pid) // P) * n_k  # stages the loader filled before this tile
        # consumer 0 starts; each then waits for the other's main loop to have taken its stages
        mbarrier.wait(turn.index(CID), (mine & 1) ^ (1 - CID))
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
        prev = 0
        for k in range(0, I, BK):
            s = it % NB
            mbarrier.wait(ready.index(s), (it // NB) & 1)
            if K_CONTIG:
                w = w_bufs.index(s).reshape([BN, BK]).permute((1, 0))
            else:
                w = w_bufs.index(s).reshape([BK, BN])
            acc = warpgroup_mma(a_bufs.index(s), w, acc, is_async=True)
            # one MMA stays in flight; the one before it has finished: free its stage
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index(prev), pred=k > 0)
            prev = s
            it += 1
        mbarrier.arrive(turn.index(1 - CID))
        mine += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(prev))
        tma.store_wait(0)  # this consumer's previous store has left its c_smem
        cs.store(acc.to(y_desc.dtype))
        fence_async_shared()
        if row0 + BM <= end:
            tma.async_copy_shared_to_global(y_desc, [row0, n0], cs)
        else:  # the expert's last row tile: only its own rows
            gl.thread_barrier()
            for r in gl.static_range(0, BM, CH):
                v = cs.slice(r, CH).load(st_layout)
                rows = row0 + r + gl.arange(0, CH, layout=gl.SliceLayout(1, st_layout))
                cols = n0 + gl.arange(0, BN, layout=gl.SliceLayout(0, st_layout))
                ptrs = Y + rows.to(gl.int64)[:, None] * stride_y + cols[None, :]
                gl.store(ptrs, v, mask=(rows < end)[:, None] & (cols < O)[None, :])
            gl.thread_barrier()
    tma.store_wait(0)


@gluon.jit
def rows_ws_kernel(a_desc, w_desc, y_desc, Y, stride_y, COUNTS, OFFSETS, E, O, I,
                   E_P2: gl.constexpr, K_CONTIG: gl.constexpr, GM: gl.constexpr,
                   NB: gl.constexpr, LW: gl.constexpr, num_warps: gl.constexpr):
    BN: gl.constexpr = y_desc.block_type.shape[1]
    a_bufs = gl.allocate_shared_memory(a_desc.dtype, [NB] + a_desc.block_type.shape, a_desc.layout)
    w_bufs = gl.allocate_shared_memory(w_desc.dtype, [NB] + w_desc.block_type.shape, w_desc.layout)
    c_smem = gl.allocate_shared_memory(y_desc.dtype, [2] + y_desc.block_type.shape, y_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NB):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    gl.warp_specialize([
        (_consumer, (y_desc, Y, stride_y, COUNTS, OFFSETS, E, O, I, a_bufs, w_bufs, c_smem, ready,
                     empty, turn, E_P2, K_CONTIG, GM, num_warps, 0)),
        (_consumer, (y_desc, Y, stride_y, COUNTS, OFFSETS, E, O, I, a_bufs, w_bufs, c_smem, ready,
                     empty, turn, E_P2, K_CONTIG, GM, num_warps, 1)),
        (_loader, (a_desc, w_desc, COUNTS, OFFSETS, E, O, I, a_bufs, w_bufs, ready, empty, E_P2,
                   K_CONTIG, GM, BN)),
    ], [num_warps, LW], [224, 32])


def rows_gemm_ws(a_NI: torch.Tensor, w_EOI: torch.Tensor, counts_E: torch.Tensor,
                 offsets_E: torch.Tensor, num_sms: int) -> torch.Tensor:
    """``y[rows of e] = a[rows of e] @ w[e].T`` (``[N, O]``, a's dtype). ``a_NI``: contiguous
    rows, bf16 or fp16, 16-byte aligned; ``w_EOI``: I or O contiguous with the other strides
    16-byte aligned; O a multiple of 8; ``counts_E``/``offsets_E``: int32 rows per expert and
    their running end."""
    N, I = a_NI.shape
    E, O, _ = w_EOI.shape
    y = a_NI.new_empty(N, O)
    k_contig = w_EOI.stride(2) == 1
    if k_contig:
        w_desc = tma_desc(w_EOI, [E, O, I], list(w_EOI.stride()), [1, BLOCK_N, BLOCK_K])
    else:
        w_EIO = w_EOI.transpose(1, 2)
        w_desc = tma_desc(w_EIO, [E, I, O], list(w_EIO.stride()), [1, BLOCK_K, BLOCK_N])
    a_desc = tma_desc(a_NI, [N, I], [a_NI.stride(0), 1], [BLOCK_M, BLOCK_K])
    y_desc = tma_desc(y, [N, O], [O, 1], [BLOCK_M, BLOCK_N])
    tiles = _max_tiles(N, E, BLOCK_M) * triton.cdiv(O, BLOCK_N)
    rows_ws_kernel[(max(1, min(num_sms, tiles)),)](
        a_desc, w_desc, y_desc, y, y.stride(0), counts_E, offsets_E, E, O, I,
        E_P2=_e_p2(E), K_CONTIG=k_contig, GM=GROUP_M, NB=STAGES,
        LW=LOADER_WARPS, num_warps=CONSUMER_WARPS,
    )
    return y
