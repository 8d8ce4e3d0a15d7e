"""The settings types of the ``triton`` backend: the launch-config tiles (``GemmTile``,
``DownCombineTile``) with their text form, ``parse_tiles`` (the launch-config overrides as the
custom ops carry them) and the environment variables that override ``TritonBackend.Config``'s
fields for benchmark sweeps (``ENV_VARS``, ``_from_env``). No Triton import.
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["ENV_VARS", "TILE_KINDS", "DownCombineTile", "GemmTile", "parse_tiles"]

# the row-GEMM kinds a tile can be given for, in training and (``decode_``) at decode sizes
TILE_KINDS = ("up_gated", "up", "rows", "dgrad")
_KIND_KEYS = TILE_KINDS + tuple(f"decode_{k}" for k in TILE_KINDS)
_DGRAD = ("auto", "fused", "split", "grouped_mm")
_DW = ("auto", "triton", "grouped_mm")


def _ints(owner: str, values, n: int) -> tuple[int, ...]:
    vals = tuple(values)
    if len(vals) != n or any(isinstance(v, bool) or not isinstance(v, int) or v <= 0 for v in vals):
        raise ValueError(f"{owner}: expected {n} positive integers, got {values!r}")
    return vals


class _Tile:
    """A launch config: positive integer fields, also written as their comma-separated text
    (``_spec`` names them)."""

    _spec: ClassVar[str]

    def __post_init__(self) -> None:
        _ints(type(self).__name__, dataclasses.astuple(self), len(dataclasses.fields(self)))

    @classmethod
    def parse(cls, text: str, what: str | None = None):
        """From the text form, e.g. ``"128,256,64,8,3"``."""
        n = len(dataclasses.fields(cls))
        parts = [p.strip() for p in str(text).split(",")]
        if len(parts) != n or not all(p.isdigit() and int(p) > 0 for p in parts):
            raise ValueError(
                f"{what or cls.__name__}={text!r}: expected {n} positive integers '{cls._spec}'")
        return cls(*map(int, parts))


@dataclass(frozen=True)
class GemmTile(_Tile):
    """A launch config of a row-tiled grouped GEMM (or, for the weight grads, ``block_m`` =
    output rows, ``block_n`` = output columns). Gated kernels take ``block_n`` per accumulator."""

    _spec: ClassVar[str] = "BM,BN,BK,warps,stages"
    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 3


@dataclass(frozen=True)
class DownCombineTile(_Tile):
    """The launch config of the fused decode down projection + combine kernel."""

    _spec: ClassVar[str] = "BD,BF,warps,stages"
    block_d: int
    block_f: int
    num_warps: int = 4
    num_stages: int = 1


def _as(tile_cls, owner: str, name: str, v):
    if v is None or isinstance(v, tile_cls):
        return v
    if isinstance(v, (tuple, list)):
        return tile_cls(*v)
    raise TypeError(f"{owner}.{name} must be a {tile_cls.__name__} (or a tuple of its ints), got {v!r}")


def _tile_spec(t) -> str:
    return ",".join(str(v) for v in dataclasses.astuple(t))


@functools.lru_cache(maxsize=64)
def parse_tiles(spec: str) -> dict[str, tuple[int, ...]]:
    """The launch-config overrides of a :meth:`TritonBackend.Config.tiles_spec` string: key
    (``gemm``, a kind of ``TILE_KINDS`` with or without ``decode_``, ``dw``, ``down_combine``)
    -> ints. The custom ops take the string (plain arguments); the launchers the dict."""
    out = {}
    for part in spec.split(";") if spec else ():
        key, vals = part.split("=")
        out[key] = tuple(int(v) for v in vals.split(","))
    return out


_BOOL_ENV = {"0": False, "1": True}
# field -> environment variable that overrides it (for benchmark sweeps)
ENV_VARS = {
    "dgrad": "MOEKIT_TRITON_DGRAD",
    "dw": "MOEKIT_TRITON_DW",
    "recompute_act": "MOEKIT_TRITON_RECOMPUTE_ACT",
    "inplace_dgrad": "MOEKIT_TRITON_INPLACE_DGRAD",
    "fused_decode_tokens": "MOEKIT_TRITON_FUSED_DECODE_T",
    "pdl": "MOEKIT_TRITON_PDL",
    "tma": "MOEKIT_TRITON_TMA",
    "persistent": "MOEKIT_TRITON_PERSISTENT",
    "gather_x": "MOEKIT_TRITON_GATHER_X",
    "gluon": "MOEKIT_TRITON_GLUON",
    "gemm_tile": "MOEKIT_TRITON_CONFIG",
    "dw_tile": "MOEKIT_TRITON_DW_CONFIG",
    "down_combine_tile": "MOEKIT_TRITON_DOWN_COMBINE_CONFIG",
    **{f"kind_tiles.{k}": f"MOEKIT_TRITON_{k.upper()}_CONFIG" for k in _KIND_KEYS},
}


def _from_env(name: str, var: str, text: str) -> Any:
    where = f"{var}={text!r}"
    if name in ("dgrad", "dw"):
        allowed = _DGRAD if name == "dgrad" else _DW
        if text not in allowed:
            raise ValueError(f"{where}; allowed: {allowed}")
        return text
    if name in ("recompute_act", "tma", "gather_x", "gluon"):
        if text not in ("auto", "0", "1"):
            raise ValueError(f"{where}; allowed: 'auto', '0', '1'")
        return None if text == "auto" else text == "1"
    if name in ("inplace_dgrad", "pdl", "persistent"):
        if text not in _BOOL_ENV:
            raise ValueError(f"{where}; it must be 0 or 1")
        return _BOOL_ENV[text]
    if name == "fused_decode_tokens":
        if not text.isdigit():
            raise ValueError(f"{where}; it must be a non-negative integer")
        return int(text)
    if name == "down_combine_tile":
        return DownCombineTile.parse(text, var)
    return GemmTile.parse(text, var)
