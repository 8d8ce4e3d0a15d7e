"""Warp-specialized weight-grad GEMM for Hopper, in Gluon (Triton's lower-level language).

``dW[e] = L[rows of e].T @ R[rows of e]`` for rows sorted by expert, ``L [N, O]`` and
``R [N, I]``, ``dW [E, O, I]`` (or stored transposed, ``[E, I, O]`` contiguous).

One persistent program per SM walks the output tiles ``(expert, O tile, I tile)``; in each, a
loader partition streams blocks of the expert's rows of L and R into a ring of shared-memory
stages, and the default partition (two warp groups) multiplies them with asynchronous
``wgmma`` while the next stages load, then writes the tile through TMA (an ``[E, O, I]``
descriptor, so stores clip at each expert's O and I). Two loaders:

* one warp, both operands by TMA (contiguous copies, e.g. the gathered copies that the cuBLAS
  path builds too);
* four warps, L's rows gathered by token (``L = G[tok]``) with ``cp.async`` while R comes by
  TMA: no gathered copy. The weight grads with R gathered (``dH.T @ x[tok]``) run as
  ``(x[tok].T @ dH).T`` with the tile stored transposed: gathering the 128-wide operand keeps
  the loader ahead (gathering R's 256-wide tiles was slower than a copy, H200: 2.06 ms against
  1.55 at Qwen3's shape).

The last block of an expert's rows runs into the next expert's rows: a gathered tile has those
rows zero-filled; in a tile that came by TMA the consumer zeroes them in shared memory before
its MMA. Experts without rows get zeros.

Imported only where it is used (``weight_grads``): it needs ``triton.experimental.gluon``
(Triton >= 3.5) and runs on compute capability 9 (``wgmma``) only. H200, bf16, against torch's
grouped GEMM (cuBLAS) on the same gathered operands, the copies counted (``benchmarks/dw_ab.py
--cublas --gluon``, ``benchmarks/results/H200-s10-dw-ab.json``): Mixtral's up projection 5.77
against 6.50 ms, Qwen3's 1.50 against 1.62, GPT-OSS's 3.59 against 3.91.
"""

from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.ampere import async_copy
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

__all__ = ["tma_desc", "weight_grad_ws"]

BLOCK_M, BLOCK_N, BLOCK_K, STAGES, GROUP_M, NUM_WARPS = 128, 256, 64, 3, 8, 8
# the gathering loader's warps (each thread keeps 88 registers, the consumers' 8 warps the rest)
GATHER_WARPS = 4


@gluon.jit
def _tile(t, COUNTS, OFFSETS, O, I, BM: gl.constexpr, BN: gl.constexpr, GM: gl.constexpr):
    """Output tile ``t``: its expert, first O and I indices, and the expert's rows
    ``[start, end)``. Tiles go expert by expert; within one, GM O tiles share each I tile."""
    num_m = gl.cdiv(O, BM)
    num_n = gl.cdiv(I, BN)
    per_e = num_m * num_n
    e = t // per_e
    local = t % per_e
    first_m = (local // (GM * num_n)) * GM
    size_m = gl.minimum(num_m - first_m, GM)
    pid_m = first_m + (local % (GM * num_n)) % size_m
    pid_n = (local % (GM * num_n)) // size_m
    end = gl.load(OFFSETS + e)
    start = end - gl.load(COUNTS + e)
    return e, pid_m * BM, pid_n * BN, start, end


@gluon.jit
def _loader(l_desc, r_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs, ready, empty,
            GM: gl.constexpr):
    BK: gl.constexpr = l_desc.block_type.shape[0]
    BM: gl.constexpr = l_desc.block_type.shape[1]
    BN: gl.constexpr = r_desc.block_type.shape[1]
    NB: gl.constexpr = l_bufs.shape[0]
    it = 0
    for t in range(gl.program_id(0), E * gl.cdiv(O, BM) * gl.cdiv(I, BN), gl.num_programs(0)):
        e, m0, n0, start, end = _tile(t, COUNTS, OFFSETS, O, I, BM, BN, GM)
        for r0 in range(start, end, BK):
            s = it % NB
            mbarrier.wait(empty.index(s), ((it // NB) & 1) ^ 1)  # the stage's last MMA is done
            bar = ready.index(s)
            mbarrier.expect(bar, l_desc.block_type.nbytes + r_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(l_desc, [r0, m0], bar, l_bufs.index(s))
            tma.async_copy_global_to_shared(r_desc, [r0, n0], bar, r_bufs.index(s))
            it += 1


@gluon.jit
def _gather_loader(G, stride_g, TOK, r_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs, ready,
                   empty, GM: gl.constexpr, LW: gl.constexpr):
    """As :func:`_loader`, with L's rows gathered by token (``G[TOK[row]]``) by ``cp.async`` from
    LW warps (rows past the expert's end and columns past O zero-filled) and R's through TMA.
    Each stage's ready barrier counts the TMA copy and every thread's copies."""
    BK: gl.constexpr = l_bufs.shape[1]
    BM: gl.constexpr = l_bufs.shape[2]
    BN: gl.constexpr = r_bufs.shape[2]
    NB: gl.constexpr = l_bufs.shape[0]
    blk: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BM, BM // 8], [LW, 1], [1, 0])
    rl = gl.arange(0, BK, layout=gl.SliceLayout(1, blk))
    cl = gl.arange(0, BM, layout=gl.SliceLayout(0, blk))
    it = 0
    for t in range(gl.program_id(0), E * gl.cdiv(O, BM) * gl.cdiv(I, BN), gl.num_programs(0)):
        e, m0, n0, start, end = _tile(t, COUNTS, OFFSETS, O, I, BM, BN, GM)
        cols = m0 + cl
        cm = cols < O // 8 * 8  # O and G's row stride are multiples of 8 (the host checks):
        g_cols = G + cols       # said so, for 16-byte copies
        tok = gl.load(TOK + start + rl, mask=start + rl < end, other=0)
        for r0 in range(start, end, BK):
            rows = r0 + rl
            # the next block's tokens, loaded while this one's copies are issued
            nxt = gl.load(TOK + rows + BK, mask=rows + BK < end, other=0)
            s = it % NB
            mbarrier.wait(empty.index(s), ((it // NB) & 1) ^ 1)
            bar = ready.index(s)
            mbarrier.expect(bar, r_desc.block_type.nbytes)
            tma.async_copy_global_to_shared(r_desc, [r0, n0], bar, r_bufs.index(s))
            async_copy.async_copy_global_to_shared(
                l_bufs.index(s), g_cols[None, :] + tok.to(gl.int64)[:, None] * (stride_g // 8 * 8),
                mask=(rows < end)[:, None] & cm[None, :])
            async_copy.mbarrier_arrive(bar, increment_count=False)
            tok = nxt
            it += 1


@gluon.jit
def _zero_rows_past(buf, r0, end, layout: gl.constexpr):
    """Zero the rows of a ``[BK, C]`` stage from row ``end`` on (``r0`` its first row)."""
    v = buf.load(layout)
    rows = r0 + gl.arange(0, buf.shape[0], layout=gl.SliceLayout(1, layout))
    buf.store(gl.where((rows < end)[:, None], v, gl.zeros_like(v)))
    fence_async_shared()
    gl.thread_barrier()


@gluon.jit
def _consumer(dw_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs, c_smem, ready, empty,
              GM: gl.constexpr, NW: gl.constexpr, GATHER: gl.constexpr, TRANS_OUT: gl.constexpr):
    BM: gl.constexpr = l_bufs.shape[2]
    BN: gl.constexpr = r_bufs.shape[2]
    BK: gl.constexpr = l_bufs.shape[1]
    NB: gl.constexpr = l_bufs.shape[0]
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[NW, 1],
                                                         instr_shape=[16, BN, 16])
    row_layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NW, 1], [1, 0])
    it = 0
    for t in range(gl.program_id(0), E * gl.cdiv(O, BM) * gl.cdiv(I, BN), gl.num_programs(0)):
        e, m0, n0, start, end = _tile(t, COUNTS, OFFSETS, O, I, BM, BN, GM)
        acc = gl.zeros((BM, BN), dtype=gl.float32, layout=acc_layout)
        prev = 0
        for r0 in range(start, end, BK):
            s = it % NB
            mbarrier.wait(ready.index(s), (it // NB) & 1)
            lt = l_bufs.index(s)
            # rows of the next expert: zeroed in the tile that came by TMA (a gathered tile
            # has them zero-filled already)
            if r0 + BK > end:
                if GATHER:
                    _zero_rows_past(r_bufs.index(s), r0, end, row_layout)
                else:
                    _zero_rows_past(lt, r0, end, row_layout)
            acc = warpgroup_mma(lt.permute((1, 0)), r_bufs.index(s), acc, is_async=True)
            # one MMA stays in flight; the one before it has finished: free its stage
            acc = warpgroup_mma_wait(num_outstanding=1, deps=(acc,))
            mbarrier.arrive(empty.index(prev), pred=r0 > start)
            prev = s
            it += 1
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc,))
        mbarrier.arrive(empty.index(prev), pred=end > start)
        tma.store_wait(0)  # the previous tile's store has left c_smem
        if TRANS_OUT:  # the tile transposed, into dW laid out [E, I, O]
            c_smem.reshape([BN, BM]).permute((1, 0)).store(acc.to(dw_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dw_desc, [e, n0, m0], c_smem)
        else:
            c_smem.reshape([BM, BN]).store(acc.to(dw_desc.dtype))
            fence_async_shared()
            tma.async_copy_shared_to_global(dw_desc, [e, m0, n0], c_smem)
    tma.store_wait(0)


@gluon.jit
def weight_grad_ws_kernel(l_desc, r_desc, dw_desc, G, stride_g, TOK, COUNTS, OFFSETS, E, O, I,
                          GM: gl.constexpr, NB: gl.constexpr, GATHER: gl.constexpr,
                          TRANS_OUT: gl.constexpr, LW: gl.constexpr, num_warps: gl.constexpr):
    l_bufs = gl.allocate_shared_memory(l_desc.dtype, [NB] + l_desc.block_type.shape, l_desc.layout)
    r_bufs = gl.allocate_shared_memory(r_desc.dtype, [NB] + r_desc.block_type.shape, r_desc.layout)
    c_smem = gl.allocate_shared_memory(dw_desc.dtype, dw_desc.block_type.shape, dw_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [NB, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(NB):
        mbarrier.init(ready.index(i), count=LW * 32 + 1 if GATHER else 1)
        mbarrier.init(empty.index(i), count=1)
    if GATHER:
        gl.warp_specialize([
            (_consumer, (dw_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs, c_smem, ready, empty,
                         GM, num_warps, GATHER, TRANS_OUT)),
            (_gather_loader, (G, stride_g, TOK, r_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs,
                              ready, empty, GM, LW)),
        ], [LW], [88])
    else:
        gl.warp_specialize([
            (_consumer, (dw_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs, c_smem, ready, empty,
                         GM, num_warps, GATHER, TRANS_OUT)),
            (_loader, (l_desc, r_desc, COUNTS, OFFSETS, E, O, I, l_bufs, r_bufs, ready, empty,
                       GM)),
        ], [1], [40])


def tma_desc(t: torch.Tensor, shape, strides, block) -> TensorDescriptor:
    """A Gluon tensor descriptor over ``t`` (bf16 or fp16) with the default NVMMA shared layout
    of its ``block``."""
    dt = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    return TensorDescriptor(t, shape, strides, block, gl.NVMMASharedLayout.get_default_for(block, dt))


def weight_grad_ws(l_NO: torch.Tensor, r_NI: torch.Tensor, counts_E: torch.Tensor,
                   offsets_E: torch.Tensor, num_sms: int, l_tok: torch.Tensor | None = None,
                   out_transposed: bool = False) -> torch.Tensor:
    """``dW[e] = L[rows of e].T @ R[rows of e]`` in L's dtype: ``[E, O, I]`` contiguous, or with
    ``out_transposed`` the transpose of a contiguous ``[E, I, O]``. ``l_NO``, ``r_NI``: rows
    contiguous, bf16 or fp16, widths and row strides multiples of 8 (TMA's and the copies' 16
    bytes); ``counts_E``, ``offsets_E``: int32 rows per expert and their running end.
    ``l_tok``: L's rows are ``l_NO[l_tok]``, gathered in the kernel (``l_NO`` then has a row per
    token, ``l_tok`` a token per sorted row)."""
    for t in (l_NO, r_NI):
        if t.stride(1) != 1 or t.stride(0) % 8 or t.shape[1] % 8:
            raise ValueError(f"weight_grad_ws needs rows contiguous with widths and row strides "
                             f"multiples of 8, got shape {tuple(t.shape)}, strides {t.stride()}")
    O, I = l_NO.shape[1], r_NI.shape[1]
    N = r_NI.shape[0]
    E = counts_E.shape[0]
    dw = l_NO.new_empty((E, I, O) if out_transposed else (E, O, I))
    if N == 0:
        return (dw.zero_().transpose(1, 2) if out_transposed else dw.zero_())
    l_desc = tma_desc(l_NO, list(l_NO.shape), [l_NO.stride(0), 1], [BLOCK_K, BLOCK_M])
    r_desc = tma_desc(r_NI, list(r_NI.shape), [r_NI.stride(0), 1], [BLOCK_K, BLOCK_N])
    if out_transposed:
        dw_desc = tma_desc(dw, [E, I, O], [O * I, O, 1], [1, BLOCK_N, BLOCK_M])
    else:
        dw_desc = tma_desc(dw, [E, O, I], [O * I, I, 1], [1, BLOCK_M, BLOCK_N])
    tiles = E * triton.cdiv(O, BLOCK_M) * triton.cdiv(I, BLOCK_N)
    weight_grad_ws_kernel[(min(num_sms, tiles),)](
        l_desc, r_desc, dw_desc, l_NO, l_NO.stride(0), l_tok if l_tok is not None else counts_E,
        counts_E, offsets_E, E, O, I,
        GM=GROUP_M, NB=STAGES, GATHER=l_tok is not None, TRANS_OUT=out_transposed,
        LW=GATHER_WARPS, num_warps=NUM_WARPS,
    )
    return dw.transpose(1, 2) if out_transposed else dw
