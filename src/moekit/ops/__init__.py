"""Functional experts: backends, stages (permute / up / down / combine) and ``moe_experts``."""

from .api import check_expert_args, expert_down, expert_up, moe_experts
from .backends import (
    auto_backend,
    available_backends,
    backend_names,
    register_backend,
    resolve_backend,
)
from .experts_backend import ExpertsBackend
from .stages import permute, row_weights, unpermute
from .torch_backends import GroupedMMBackend, LoopBackend
from .triton_backend import TritonBackend

try:  # the kernels, imported now rather than inside a traced forward (needs Triton)
    from . import triton as _triton  # noqa: F401
except ImportError:
    pass

__all__ = [
    "ExpertsBackend",
    "GroupedMMBackend",
    "LoopBackend",
    "TritonBackend",
    "auto_backend",
    "available_backends",
    "backend_names",
    "check_expert_args",
    "expert_down",
    "expert_up",
    "moe_experts",
    "permute",
    "register_backend",
    "resolve_backend",
    "row_weights",
    "unpermute",
]
