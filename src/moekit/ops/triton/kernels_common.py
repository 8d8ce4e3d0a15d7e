"""Shared pieces of the ``@triton.jit`` kernels: the activations (forward, and forward with
derivative) and the row-tile schedule of the grouped GEMMs.

Row tiles follow the plan's sorted-by-expert layout: program ``m`` of a grouped GEMM finds its
expert from the running count of ``ceil(count_e / BLOCK_M)`` tiles (computed in the kernel) and
covers rows ``[start_e + local * BLOCK_M, ...)`` of that expert only, so a tile never
mixes experts and an expert's weights are read once per row tile (once in all for decode, where
an expert's rows fit one tile). Programs past the last real tile exit at once (the grid is a
static upper bound so that no host sync is needed).

Activation codes (``ACT``): 0 silu, 1 gelu (erf), 2 gelu_tanh, 3 gpt_oss (gated only),
4 relu2 (non-gated only in moekit, but the code is generic), 5 identity (forward only: the
up kernel as a plain gather GEMM).
"""

from __future__ import annotations

import triton
import triton.language as tl

ACT_CODES = {"silu": 0, "gelu": 1, "gelu_tanh": 2, "gpt_oss": 3, "relu2": 4, "identity": 5}


# ----------------------------------------------------------------------------- activations
@triton.jit
def _sigmoid(x):
    return 1.0 / (1.0 + tl.exp(-x))


@triton.jit
def _tanh(x):
    # tanh(x) = 1 - 2 / (exp(2x) + 1): saturates cleanly to +-1 (exp -> inf or 0)
    return 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)


@triton.jit
def _unary_fwd(h, ACT: tl.constexpr):
    """act(h) for the unary activations (fp32 in, fp32 out)."""
    if ACT == 0:
        out = h * _sigmoid(h)
    elif ACT == 1:
        out = 0.5 * h * (1.0 + tl.math.erf(h * 0.7071067811865476))
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        out = 0.5 * h * (1.0 + _tanh(inner))
    elif ACT == 5:  # identity: the up kernel as a plain gather GEMM
        out = h
    else:  # relu2
        r = tl.maximum(h, 0.0)
        out = r * r
    return out


@triton.jit
def _unary_fwd_bwd(h, ACT: tl.constexpr):
    """(act(h), act'(h)) for the unary activations."""
    if ACT == 0:
        s = _sigmoid(h)
        out = h * s
        d = s * (1.0 + h * (1.0 - s))
    elif ACT == 1:
        cdf = 0.5 * (1.0 + tl.math.erf(h * 0.7071067811865476))
        out = h * cdf
        d = cdf + h * 0.3989422804014327 * tl.exp(-0.5 * h * h)
    elif ACT == 2:
        inner = 0.7978845608028654 * (h + 0.044715 * h * h * h)
        t = _tanh(inner)
        out = 0.5 * h * (1.0 + t)
        d = 0.5 * (1.0 + t) + 0.5 * h * (1.0 - t * t) * 0.7978845608028654 * (
            1.0 + 3.0 * 0.044715 * h * h
        )
    else:  # relu2
        r = tl.maximum(h, 0.0)
        out = r * r
        d = 2.0 * r
    return out, d


@triton.jit
def _glu_fwd(g, u, ACT: tl.constexpr, ALPHA, LIMIT):
    if ACT == 3:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        out = (uc + 1.0) * (gc * _sigmoid(ALPHA * gc))
    else:
        out = _unary_fwd(g, ACT) * u
    return out


@triton.jit
def _glu_fwd_bwd(g, u, dout, ACT: tl.constexpr, ALPHA, LIMIT):
    """(glu(g, u), d/dg, d/du) given the upstream gradient ``dout``."""
    if ACT == 3:
        gc = tl.minimum(g, LIMIT)
        uc = tl.minimum(tl.maximum(u, -LIMIT), LIMIT)
        s = _sigmoid(ALPHA * gc)
        glu = gc * s
        out = (uc + 1.0) * glu
        dglu = s + gc * ALPHA * s * (1.0 - s)
        dg = tl.where(g <= LIMIT, dout * (uc + 1.0) * dglu, 0.0)
        du = tl.where((u >= -LIMIT) & (u <= LIMIT), dout * glu, 0.0)
    else:
        a, da = _unary_fwd_bwd(g, ACT)
        out = a * u
        dg = dout * u * da
        du = dout * a
    return out, dg, du


# ----------------------------------------------------------------------------- tile schedule
@triton.jit
def _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2: tl.constexpr, BLOCK_M: tl.constexpr):
    """Expert ``e`` and first row of row-tile ``pid_m`` (``e == E`` when past the last tile).

    The tile schedule is computed in the kernel from the per-expert counts (one vector load of
    E ints, a cumulative sum and a compare per program): no extra launches, no host sync."""
    es = tl.arange(0, E_P2)
    cnt = tl.load(COUNTS + es, mask=es < E, other=0)
    tiles = (cnt + BLOCK_M - 1) // BLOCK_M
    cum = tl.cumsum(tiles, 0)
    e = tl.sum((cum <= pid_m).to(tl.int32), 0)
    prev = tl.sum(tl.where(es < e, tiles, 0), 0)
    e_safe = tl.minimum(e, E - 1)
    end = tl.load(OFFSETS + e_safe)
    start = end - tl.load(COUNTS + e_safe)
    row0 = start + (pid_m - prev) * BLOCK_M
    return e, row0, end


@triton.jit
def _swizzle(pid, num_pid_m, num_pid_n, GROUP_M: tl.constexpr):
    in_group = GROUP_M * num_pid_n
    group_id = pid // in_group
    first_m = group_id * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % in_group) % size_m
    pid_n = (pid % in_group) // size_m
    return pid_m, pid_n


@triton.jit
def _row_tile(num_pid_m, num_pid_n, COUNTS, OFFSETS, E, n_cols, E_P2: tl.constexpr,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's tile of a row-tiled grouped GEMM: ``(e, rows64, mask_m, cols, mask_n,
    pid_n)`` (``e == E``: past the last tile, the caller returns; ``pid_n``: its column tile)."""
    pid_m, pid_n = _swizzle(tl.program_id(0), num_pid_m, num_pid_n, GROUP_M)
    e, row0, row_end = _find_tile(pid_m, COUNTS, OFFSETS, E, E_P2, BLOCK_M)
    rows = row0 + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return e, rows.to(tl.int64), rows < row_end, cols, cols < n_cols, pid_n


@triton.jit
def _rows_mainloop(a_ptrs, w_ptrs, mask_m, mask_n, n_k, w_step, PREC: tl.constexpr,
                   BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """``acc[BLOCK_M, BLOCK_N] = sum over k of A[:, k] W[k, :]`` (fp32), walking ``a_ptrs``
    (row tile, contiguous in k) and ``w_ptrs`` (``w_step`` per k block) over ``n_k``."""
    ks = tl.arange(0, BLOCK_K)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, n_k, BLOCK_K):
        mk = (k0 + ks) < n_k
        at = tl.load(a_ptrs, mask=mask_m[:, None] & mk[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=mk[:, None] & mask_n[None, :], other=0.0)
        acc = tl.dot(at, wt, acc, input_precision=PREC)
        a_ptrs += BLOCK_K
        w_ptrs += w_step
    return acc
