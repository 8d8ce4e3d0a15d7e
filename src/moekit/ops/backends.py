"""The experts-backend registry: backends chosen by name or by config.

``register_backend(name, config_or_factory)`` adds a name; ``backend_names()`` lists the
names; ``default_backend(name)`` builds the backend registered under a name;
``resolve_backend(spec, device, dtype)`` turns a name, a config or a backend into the
backend to run, :func:`auto_backend` holds ``"auto"``'s choice, and
:func:`available_backends` lists the names whose backend runs on a device and dtype.

The interface, :class:`ExpertsBackend`, is in ``experts_backend.py``; the backends built on
torch, :class:`LoopBackend` and :class:`GroupedMMBackend`, in ``torch_backends.py``. This
module re-exports the three, so ``moekit.ops.backends`` still gives every backend name.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from .experts_backend import ExpertsBackend
from .torch_backends import GroupedMMBackend, LoopBackend

__all__ = [
    "ExpertsBackend",
    "GroupedMMBackend",
    "LoopBackend",
    "auto_backend",
    "available_backends",
    "backend_names",
    "register_backend",
    "resolve_backend",
]


def _triton_defaults() -> ExpertsBackend:
    from .triton_backend import TritonBackend

    return TritonBackend.with_env_defaults()


# name -> a config, or a zero-argument factory returning one (or a backend)
_REGISTRY: dict[str, Any] = {
    "loop": LoopBackend.Config,
    "grouped_mm": GroupedMMBackend.Config,
    "triton": _triton_defaults,
}


def register_backend(name: str, backend: ExpertsBackend.Config | Callable[[], Any]) -> None:
    """Make ``name`` a backend choice (``GroupedExperts.Config(backend=name)``,
    ``moe_experts(..., backend=name)``): ``backend`` is an ``ExpertsBackend.Config`` (the
    settings to use) or a zero-argument callable returning a config or a backend. Replaces
    an earlier registration of the same name; ``"auto"`` is reserved."""
    if not isinstance(name, str) or not name:
        raise ValueError(f"register_backend: name={name!r}; it must be a non-empty string")
    if name == "auto":
        raise ValueError("register_backend: 'auto' is reserved (it picks among the backends)")
    if not (isinstance(backend, ExpertsBackend.Config) or callable(backend)):
        raise TypeError(
            f"register_backend({name!r}, ...): expected an ExpertsBackend.Config or a factory "
            f"returning one, got {type(backend).__name__}"
        )
    _REGISTRY[name] = backend


def backend_names() -> tuple[str, ...]:
    """Every name a backend can be chosen by: ``"auto"`` and the registered ones."""
    return ("auto", *_REGISTRY)


def _build(spec: Any, what: str) -> ExpertsBackend:
    if isinstance(spec, ExpertsBackend):
        return spec
    if isinstance(spec, ExpertsBackend.Config):
        return spec.build()
    if isinstance(spec, type) and issubclass(spec, ExpertsBackend.Config):
        return spec().build()
    if callable(spec):
        return _build(spec(), what)
    raise TypeError(f"{what} gave {type(spec).__name__}; expected an ExpertsBackend.Config or backend")


def default_backend(name: str) -> ExpertsBackend:
    """The backend registered under ``name``, with its default settings."""
    if name not in _REGISTRY:
        raise ValueError(f"backend={name!r} is unknown; allowed: {backend_names()}")
    return _build(_REGISTRY[name], f"the backend registered as {name!r}")


def auto_backend(device: torch.device, dtype: torch.dtype) -> ExpertsBackend:
    """``"auto"``'s choice: triton on a CUDA GPU where it runs the dtype, else grouped_mm where
    torch's grouped GEMM runs the device and dtype, else the loop. (The triton backend under
    the interpreter on CPU is for tests, never an automatic choice.)"""
    device = torch.device(device)
    if device.type == "cuda":
        b = default_backend("triton")
        if b.available(device, dtype):
            return b
    b = default_backend("grouped_mm")
    return b if b.available(device, dtype) else default_backend("loop")


def resolve_backend(
    spec: str | ExpertsBackend.Config | ExpertsBackend, device: torch.device, dtype: torch.dtype
) -> ExpertsBackend:
    """The backend to run for ``spec`` (a name, a backend config or a backend) on
    ``device``/``dtype``; raises ValueError when it cannot run there, saying why."""
    if isinstance(spec, str):
        b = auto_backend(device, dtype) if spec == "auto" else default_backend(spec)
    elif isinstance(spec, (ExpertsBackend, ExpertsBackend.Config)):
        b = _build(spec, "backend")
    else:
        raise TypeError(
            f"backend must be a name {backend_names()}, an ExpertsBackend.Config or an "
            f"ExpertsBackend; got {type(spec).__name__}"
        )
    if not b.available(torch.device(device), dtype):
        raise ValueError(f"backend={b.name!r} cannot run on {device} with {dtype}: {b.why_unavailable}")
    return b


def available_backends(device: torch.device, dtype: torch.dtype = torch.float32) -> list[str]:
    """The registered names whose default backend runs on ``device`` with ``dtype``."""
    return [n for n in _REGISTRY if default_backend(n).available(torch.device(device), dtype)]
