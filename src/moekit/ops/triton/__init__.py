"""The fused Triton kernels of the ``triton`` experts backend.

Layers: ``kernels`` and ``kernels_tma`` (``@triton.jit``; the latter read tiles through tensor
descriptors), ``kernels_decode`` -> ``launchers`` (the forward), ``decode`` (the decode forward and
plan), ``backward`` (the dgrad step) and ``weight_grads``,
all on ``launch_config`` (checks, launch configs, device facts, descriptors) -> ``custom_ops``
(``torch.library`` custom ops with fake implementations) -> ``ops`` (the autograd function and
``fused_experts``) and ``grouped_linear`` (the staged path's grouped linear layer). The backend
object that calls them, with its settings, is :class:`moekit.ops.triton_backend.TritonBackend`.
Importing this package raises ImportError when Triton is not installed (``pip install
'moekit[triton]'``); the backend then reports itself unavailable. The kernels run on CUDA GPUs,
and on CPU under Triton's interpreter (``TRITON_INTERPRET=1``, how CI tests them).
"""

from __future__ import annotations

import os

try:
    import triton
    import triton.language  # noqa: F401
except ImportError as exc:  # pragma: no cover - depends on the environment
    raise ImportError(
        "the triton experts backend needs Triton: pip install 'moekit[triton]'"
    ) from exc

import torch

from . import decode, launchers, stages
from .grouped_linear import triton_grouped_linear
from .ops import FusedExperts, fused_experts

__all__ = ["FusedExperts", "decode", "fused_experts", "launchers", "stages", "triton_available",
           "triton_grouped_linear"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the kernels run on ``device`` with ``dtype``: on CUDA, or on CPU under the
    interpreter, in float32/float16/bfloat16."""
    if dtype not in _DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"
