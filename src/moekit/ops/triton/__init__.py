"""The ``triton`` experts backend: fused Triton kernels for ``moe_experts``.

Layers (DESIGN.md): ``kernels`` (``@triton.jit``) -> ``launchers`` (checks, launch configs) ->
``ops`` (``torch.library`` custom ops with fake implementations, the autograd function and
``fused_experts``). Importing this package registers the backend; it raises ImportError when
Triton is not installed (``pip install 'moekit[triton]'``), which the registry treats as "not
available". The backend runs on CUDA GPUs, and on CPU under Triton's interpreter
(``TRITON_INTERPRET=1``, how CI tests the kernels); ``auto`` picks it on CUDA only.
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

from ...plan import register_small_plan_builder
from ..api import Backend, register_backend
from .launchers import SMALL_PLAN_MAX_SLOTS, small_plan
from .ops import FusedExperts, fused_experts

__all__ = ["FusedExperts", "fused_experts", "triton_available"]

_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def triton_available(device: torch.device, dtype: torch.dtype) -> bool:
    if dtype not in _DTYPES:
        return False
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.is_available()
    return device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") == "1"


register_backend(
    Backend(
        "triton",
        triton_available,
        fused=fused_experts,
        why_unavailable=(
            "the triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 on CPU, for tests) and "
            "float32/float16/bfloat16"
        ),
    )
)
# decode-sized plans on CUDA in one launch (make_plan falls back to torch ops elsewhere)
register_small_plan_builder(small_plan, SMALL_PLAN_MAX_SLOTS)
