"""The Config/build pattern shared by every moekit module, and validation helpers.

Each module ``M`` has a nested ``M.Config`` dataclass (a subclass of :class:`Config`) holding
what a user chooses. ``M.Config.build(**parent_fields)`` creates the module; fields that only
a parent knows (model ``dim``, ``num_experts``, ...) are passed there by the parent, never
repeated by the user. Validation runs in ``__post_init__`` (user fields) and in ``build``
(parent fields), and raises ``ValueError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

__all__ = [
    "Config",
    "check_bool",
    "check_choice",
    "check_dtype",
    "check_finite",
    "check_nonneg",
    "check_nonneg_int",
    "check_positive",
]


def _where(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{_where(owner, name)}={value!r} is not supported; allowed: {allowed}")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(owner: str, name: str, value: Any) -> None:
    """A real number that is neither NaN nor infinite."""
    if not _is_number(value) or not math.isfinite(value):
        raise ValueError(f"{_where(owner, name)}={value!r}; it must be a finite number (not NaN or inf)")


def check_positive(owner: str, name: str, value: Any, *, integer: bool = True) -> None:
    if integer:
        if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
            raise ValueError(f"{_where(owner, name)}={value!r}; it must be a positive integer")
        return
    if not _is_number(value) or not math.isfinite(value) or value <= 0:
        raise ValueError(f"{_where(owner, name)}={value!r}; it must be a finite positive number")


def check_nonneg(owner: str, name: str, value: Any) -> None:
    if not _is_number(value) or not math.isfinite(value) or value < 0:
        raise ValueError(f"{_where(owner, name)}={value!r}; it must be a finite number >= 0")


def check_nonneg_int(owner: str, name: str, value: Any) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 0:
        raise ValueError(f"{_where(owner, name)}={value!r}; it must be an integer >= 0")


def check_bool(owner: str, name: str, value: Any) -> None:
    """``True`` or ``False`` (not a truthy string such as ``"no"``)."""
    if not isinstance(value, bool):
        raise TypeError(f"{_where(owner, name)}={value!r}; it must be True or False")


def check_dtype(owner: str, name: str, value: Any, allowed: Iterable[torch.dtype]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{_where(owner, name)}={value!r} is not supported; allowed: {allowed}")


@dataclasses.dataclass(kw_only=True)
class Config:
    """Base of every nested module config.

    Subclasses set ``_module`` (the class that ``build`` creates) by being declared inside it
    and listing it through ``Module.__init_subclass__`` below; ``build(**parent_fields)`` calls
    ``Module(self, **parent_fields)``.
    """

    _module: ClassVar[type | None] = None

    def build(self, **parent_fields: Any):
        if self._module is None:
            raise TypeError(f"{type(self).__qualname__} is not attached to a module class")
        # fields may have been assigned since the config was made: validate them again
        post_init = getattr(self, "__post_init__", None)
        if post_init is not None:
            post_init()
        return self._module(self, **parent_fields)

    def replace(self, **changes: Any):
        """A copy with some fields changed (validated again)."""
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


class Module(torch.nn.Module):
    """An ``nn.Module`` with a nested ``Config``; subclasses define ``Config`` inside."""

    Config: ClassVar[type[Config]]

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        cfg = cls.__dict__.get("Config")
        if cfg is not None:
            cfg._module = cls

    def init_weights(self, init_std: float = 0.02) -> None:  # pragma: no cover - overridden
        raise NotImplementedError(f"{type(self).__name__}.init_weights")
