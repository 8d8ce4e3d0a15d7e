"""What a launch needs: launch configs by shape, input checks, device facts and tensor
descriptors (shared by ``launchers``, ``backward`` and ``weight_grads``).

Configs are chosen by shape (no autotuning at run time, so the first call costs one compile per
kernel and the timings are reproducible): a *decode* config when the average rows per expert
is small (each touched expert's weights are then read once: its rows fit one tile, and narrow
column tiles spread the weight read over every SM), the Hopper training config otherwise.
Under the interpreter (``TRITON_INTERPRET=1``) small tiles keep the CPU tests quick.
The launchers that pick a config take ``tiles``, the overrides of ``TritonBackend.Config``
(``moekit.ops.triton_settings.parse_tiles`` of its ``tiles_spec()``): ``"gemm"`` the training
row-GEMM config (gated kernels take half of BN per accumulator), a kind (``"up_gated"``,
``"up"``, ``"rows"``, ``"dgrad"``, optionally prefixed ``"decode_"``) the training / decode
config of that kind (BN per accumulator), ``"dw"`` the weight-grad config and
``"down_combine"`` the fused decode down+combine config; ``"tma"`` and ``"persistent"`` the
tensor-descriptor settings.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch
import triton

try:  # host-side tensor descriptors (TMA); absent from Triton before 3.4
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # pragma: no cover - depends on the installed Triton
    TensorDescriptor = None

__all__ = ["GemmConfig", "TensorDescriptor", "interpreting"]


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class GemmConfig:
    BLOCK_M: int
    BLOCK_N: int
    BLOCK_K: int
    num_warps: int = 4
    num_stages: int = 3
    GROUP_M: int = 8


_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _prec(dtype: torch.dtype) -> str:
    # fp32 stays fp32 (no tf32): "fp32 where practical" means exact enough for parity tests
    return "ieee" if dtype == torch.float32 else "tf32"


def _override(tiles: dict | None, key: str) -> GemmConfig | None:
    """The launch-config override ``key`` of ``tiles`` (see the module docstring), or None."""
    v = tiles.get(key) if tiles else None
    return None if v is None else GemmConfig(*v)


def _gemm_config(n_rows: int, n_experts: int, out_cols: int, kind: str, dtype,
                 tiles: dict | None = None) -> GemmConfig:
    """Config for the row-tiled grouped GEMMs. ``kind``: "up_gated", "up", "rows", "dgrad"."""
    if interpreting():
        return GemmConfig(16, 16, 16, 4, 1, 4)
    avg = n_rows / max(1, n_experts)
    regime = "decode_" if avg <= 64 else ""
    o = _override(tiles, f"{regime}{kind}")
    if o is not None:  # one kind exactly as given (BN = columns per accumulator)
        return GemmConfig(o.BLOCK_M, o.BLOCK_N, o.BLOCK_K, o.num_warps, o.num_stages, 1 if regime else 8)
    if avg <= 64:
        # decode / tiny batches: rows of an expert fit one tile; narrow column tiles so that
        # enough programs stream the weights (each weight byte is read once). H100, qwen3
        # decode (CUDA graph): gated BN 32 instead of 16 per accumulator at 64 rows (T=8),
        # 188 -> 178 us, the same at T=1 and T=64.
        # H200, qwen3 decode T=1 (8 rows; CUDA graph, plan given, with the down + combine tile
        # below): gated BN 64 per accumulator instead of 32, 24.28 -> 24.0 us (96 programs
        # each streaming twice the weights); T=8 and T=64 unchanged with 32
        bm = 16 if avg <= 16 else (32 if avg <= 32 else 64)
        if kind == "up_gated":
            bn = 64 if n_rows <= 16 else 32
        else:
            bn = 32 if n_rows <= 64 else 64
        return GemmConfig(bm, bn, 128, 4, 4, 1)
    if dtype == torch.float32:
        return GemmConfig(64, 64, 32, 4, 3, 8)
    o = _override(tiles, "gemm")
    if o is not None:
        if kind in ("up_gated", "dgrad"):  # two accumulators / a heavy epilogue: half the columns
            return GemmConfig(o.BLOCK_M, max(16, o.BLOCK_N // 2), o.BLOCK_K, o.num_warps, o.num_stages)
        return o
    if kind == "dgrad":
        # one accumulator, but the epilogue holds the gate and up pre-activation tiles too
        return GemmConfig(128, 128, 64, 8, 3, 8)
    if kind == "up_gated":
        # two accumulators (gate and up) of 128x128: one 128x256 tile of the [gate; up] output
        return GemmConfig(128, 128, 64, 8, 3, 8)
    return GemmConfig(128, 256, 64, 8, 3, 8)


def _dw_config(dtype, tiles: dict | None = None) -> tuple[int, int, int, int, int]:
    if interpreting():
        return 16, 16, 16, 4, 1
    if dtype == torch.float32:
        return 64, 64, 32, 4, 3
    o = _override(tiles, "dw")
    if o is not None:
        return o.BLOCK_M, o.BLOCK_N, o.BLOCK_K, o.num_warps, o.num_stages
    # H200, bf16, the two dW GEMMs timed alone (benchmarks/dw_ab.py): 128x256x64 w8 s3 against
    # 128x128x64 w8 s4: qwen3 3.59 -> 3.19 ms, olmoe 4.49 -> 3.92, gpt-oss 8.95 -> 8.02
    return 128, 256, 64, 8, 3


def _check(name: str, t: torch.Tensor, dim: int, dtype=None, device=None) -> None:
    if t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if dtype is not None and t.dtype != dtype:
        raise TypeError(f"{name} has dtype {t.dtype}, expected {dtype}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, expected {device}")


def _rows_contig(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()




def _max_tiles(n_rows: int, n_experts: int, block_m: int) -> int:
    # sum_e ceil(c_e / BM) <= N / BM + (number of non-empty experts)
    return n_rows // block_m + min(n_experts, n_rows)


def _e_p2(n_experts: int) -> int:
    return max(2, triton.next_power_of_2(int(n_experts)))


# the TMA up projection gathers x's rows first from this output width on (qwen3's 768 and
# olmoe's 1024 columns keep the gather in the GEMM's prologue)
GATHER_X_MIN_COLS = 2048


def _tma_wanted(tiles: dict | None, t: torch.Tensor, n_rows: int, n_experts: int) -> bool:
    """Whether a row GEMM reads its tiles through tensor descriptors: the ``tma`` setting
    (``TritonBackend.Config.tma``) when given; by default (None) at training sizes, in 16-bit
    floats, on GPUs of compute capability 9 or newer."""
    v = tiles.get("tma") if tiles else None
    if TensorDescriptor is None:
        if v == (1,):
            raise RuntimeError("TritonBackend.Config.tma=True needs Triton >= 3.4 "
                               "(triton.tools.tensor_descriptor); pip install -U triton")
        return False
    if v is not None:
        if v == (1,) and t.device.type == "cuda" and _major(t.device) < 9:
            raise ValueError("TritonBackend.Config.tma=True needs a GPU of compute capability >= 9 "
                             f"(TMA); {t.device} has {_major(t.device)}; use tma=None or False")
        return v == (1,)
    return (t.device.type == "cuda" and not interpreting() and t.dtype != torch.float32
            and n_rows / max(1, n_experts) > 64 and _major(t.device) >= 9)


def _gather_x(tiles: dict | None, out_cols: int, D: int, x_TD: torch.Tensor) -> bool:
    """Whether the TMA up projection (or gather GEMM) gathers x's rows into a temporary first:
    the ``gather_x`` setting (``TritonBackend.Config.gather_x``) when given, by default (None)
    where the GEMM's output is at least ``GATHER_X_MIN_COLS`` columns wide; never where the
    rows' width breaks a descriptor's 16-byte alignment."""
    v = tiles.get("gather_x") if tiles else None
    want = out_cols >= GATHER_X_MIN_COLS if v is None else v == (1,)
    return want and (D * x_TD.element_size()) % 16 == 0


def _persistent(tiles: dict | None, grid: tuple[int], device: torch.device) -> tuple[bool, tuple[int]]:
    """``(persistent, grid)`` of the TMA row GEMM: one program per SM (at most one per tile)
    when ``TritonBackend.Config.persistent`` (the default), else one program per tile."""
    if tiles and tiles.get("persistent") == (0,):
        return False, grid
    return True, (min(grid[0], _num_sms(device)),)


def _aligned(t: torch.Tensor, inner: int) -> bool:
    """A tensor descriptor's requirements on ``t`` with ``inner`` as its contiguous dim: unit
    stride there, 16-byte aligned base and other strides."""
    size = t.element_size()
    return (t.stride(inner) == 1 and t.data_ptr() % 16 == 0
            and all((s * size) % 16 == 0 for i, s in enumerate(t.stride()) if i != inner % t.dim()))


def _weight_descriptor(w_EOI: torch.Tensor, block_n: int, block_k: int, halves: bool = False):
    """``(descriptor, k_contig)`` of a ``[E, O, I]`` weight view for ``kernels_tma._w_tile``, or
    None when neither O nor I is contiguous and aligned. ``halves`` (a gated ``[E, 2F, I]``
    weight, I contiguous): the weight seen as ``[E, 2, F, I]``, so that one ``[1, 2, BN, BK]``
    copy brings a gate tile and its up tile (``up_tma_kernel``'s ``ONE_ACC``)."""
    E, O, I = w_EOI.shape
    if _aligned(w_EOI, 2):
        if halves:
            s0, s1, _ = w_EOI.stride()
            return TensorDescriptor(w_EOI, [E, 2, O // 2, I], [s0, O // 2 * s1, s1, 1],
                                    [1, 2, block_n, block_k]), True
        return TensorDescriptor(w_EOI, [E, O, I], list(w_EOI.stride()), [1, block_n, block_k]), True
    if _aligned(w_EOI, 1):
        w_EIO = w_EOI.transpose(1, 2)
        return TensorDescriptor(w_EIO, [E, I, O], list(w_EIO.stride()), [1, block_k, block_n]), False
    return None


@functools.cache
def _major_of(index: int) -> int:
    return torch.cuda.get_device_capability(index)[0]


@functools.cache
def _num_sms_of(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter)."""
    if device.type != "cuda":
        return 4
    return _num_sms_of(device.index if device.index is not None else torch.cuda.current_device())


def _major(device: torch.device) -> int:
    """Compute capability major of a CUDA device (cached: this is asked on every call)."""
    return _major_of(device.index if device.index is not None else torch.cuda.current_device())
