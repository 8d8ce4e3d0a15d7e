"""The Config/build pattern shared by every moekit module, and validation helpers.

Each module ``M`` has a nested ``M.Config`` dataclass (a subclass of :class:`Config`) holding
what a user chooses. ``M.Config.build(**parent_fields)`` creates the module; fields that only
a parent knows (model ``dim``, ``num_experts``, ...) are passed there by the parent, never
repeated by the user. Validation runs in ``__post_init__`` (user fields) and in ``build``
(parent fields), and raises ``ValueError`` naming the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from typing import Any, ClassVar

import torch

__all__ = ["Config", "check_choice", "check_positive", "check_nonneg", "check_dtype"]


def _where(owner: str, name: str) -> str:
    return f"{owner}.{name}" if owner else name


def check_choice(owner: str, name: str, value: Any, allowed: Iterable[Any]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{_where(owner, name)}={value!r} is not supported; allowed: {allowed}")


def check_positive(owner: str, name: str, value: Any, *, integer: bool = True) -> None:
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        what = "a positive integer" if integer else "a positive number"
        raise ValueError(f"{_where(owner, name)}={value!r}; it must be {what}")


def check_nonneg(owner: str, name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value < 0:
        raise ValueError(f"{_where(owner, name)}={value!r}; it must be a number >= 0")


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
