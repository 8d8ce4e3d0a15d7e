"""Functional experts: backends, stages (permute / up / down / combine) and ``moe_experts``."""

from .api import (
    _ensure_optional_backends,
    BACKEND_NAMES,
    Backend,
    available_backends,
    expert_down,
    expert_up,
    moe_experts,
    register_backend,
    resolve_backend,
    staged_backend,
)
from .stages import permute, row_weights, unpermute

_ensure_optional_backends()  # load optional backends now, not inside a traced forward

__all__ = [
    "BACKEND_NAMES",
    "Backend",
    "available_backends",
    "expert_down",
    "expert_up",
    "moe_experts",
    "permute",
    "register_backend",
    "resolve_backend",
    "row_weights",
    "staged_backend",
    "unpermute",
]
