"""The ``triton`` experts backend object and its settings (``TritonBackend.Config``).

This module does not import Triton: the kernels (``moekit.ops.triton``) are imported when a
:class:`TritonBackend` is built and Triton is installed. Every switch of the kernels' code
paths is a typed field of ``TritonBackend.Config`` (recorded by ``to_dict()``) and travels as
an argument from ``TritonBackend.fused`` down to the launchers. Environment variables
(``MOEKIT_TRITON_*``, :data:`ENV_VARS`) override fields only through
``TritonBackend.Config.from_env()`` / ``with_env_overrides()``, which the backend registered
as ``"triton"`` uses for its defaults: that is how the benchmark's sweeps reach them. The
settings' types (tiles, ``parse_tiles``, the environment variables) are in ``triton_settings``.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..activations import activation_params
from ..routing_plan import RoutingPlan
from .experts_backend import ExpertsBackend
from .stages import check_permute, check_unpermute
from .triton_settings import (
    _DGRAD,
    _DW,
    _KIND_KEYS,
    ENV_VARS,
    TILE_KINDS,
    DownCombineTile,
    GemmTile,
    _as,
    _from_env,
    _tile_spec,
    parse_tiles,
)

__all__ = ["ENV_VARS", "TILE_KINDS", "DownCombineTile", "GemmTile", "TritonBackend", "parse_tiles"]

class TritonBackend(ExpertsBackend):
    """Fused Triton kernels (``moekit.ops.triton``): the whole experts call in 3 kernels
    forward and 5-6 backward, a Triton grouped linear for the staged path, and the routing
    plan in one launch at decode sizes on CUDA. Runs on CUDA GPUs, and on CPU under Triton's
    interpreter (``TRITON_INTERPRET=1``, for tests)."""

    name = "triton"
    why_unavailable = (
        "the triton backend needs Triton (pip install 'moekit[triton]'), a CUDA GPU (or "
        "TRITON_INTERPRET=1 on CPU, for tests) and float32/float16/bfloat16"
    )

    @dataclass(kw_only=True)
    class Config(ExpertsBackend.Config):
        """Settings of the fused kernels (docs/architecture.md has a table of them)."""

        dgrad: str = "auto"  # backward's first step: one fused kernel, or split in two (Triton or cuBLAS GEMM)
        dw: str = "auto"  # weight grads (and the plain row GEMMs): Triton or torch grouped_mm
        recompute_act: bool | None = None  # None: wherever the dgrad is split
        inplace_dgrad: bool = True  # eager backward writes dH over the saved pre-activation
        fused_decode_tokens: int = 1  # inference at <= this many tokens: down + combine fused
        pdl: bool = True  # decode: programmatic dependent launch (CUDA, SM >= 9)
        tma: bool | None = None  # GEMM tiles through tensor descriptors; None: auto
        persistent: bool = True  # TMA row GEMMs: one program per SM walking the tiles
        gather_x: bool | None = None  # TMA up / gather GEMM: x's rows gathered first; None: wide outputs
        gluon: bool | None = None  # Gluon (Hopper) kernels: weight grads (gathered copies or gather
        # in the loader), plain row GEMMs; None: where measured faster (gluon_rules)
        gemm_tile: GemmTile | None = None  # training row-GEMM tile (BN halved for 2 accumulators)
        kind_tiles: dict[str, GemmTile] = field(default_factory=dict)  # per kind, BN per accumulator
        dw_tile: GemmTile | None = None  # weight-grad kernel tile
        down_combine_tile: DownCombineTile | None = None  # fused decode down + combine

        def __post_init__(self) -> None:
            super().__post_init__()
            o = "TritonBackend.Config"
            if self.dgrad not in _DGRAD:
                raise ValueError(f"{o}.dgrad={self.dgrad!r} is not supported; allowed: {_DGRAD}")
            if self.dw not in _DW:
                raise ValueError(f"{o}.dw={self.dw!r} is not supported; allowed: {_DW}")
            for name in ("recompute_act", "tma", "gather_x", "gluon"):
                v = getattr(self, name)
                if v is not None and not isinstance(v, bool):
                    raise TypeError(f"{o}.{name}={v!r}; allowed: None (auto), True, False")
            for name in ("inplace_dgrad", "pdl", "persistent"):
                if not isinstance(getattr(self, name), bool):
                    raise TypeError(f"{o}.{name}={getattr(self, name)!r}; it must be True or False")
            n = self.fused_decode_tokens
            if isinstance(n, bool) or not isinstance(n, int) or n < 0:
                raise ValueError(f"{o}.fused_decode_tokens={n!r}; it must be an integer >= 0")
            self.gemm_tile = _as(GemmTile, o, "gemm_tile", self.gemm_tile)
            self.dw_tile = _as(GemmTile, o, "dw_tile", self.dw_tile)
            self.down_combine_tile = _as(DownCombineTile, o, "down_combine_tile", self.down_combine_tile)
            if not isinstance(self.kind_tiles, dict):
                raise TypeError(f"{o}.kind_tiles must be a dict kind -> GemmTile, got {self.kind_tiles!r}")
            for k in self.kind_tiles:
                if k not in _KIND_KEYS:
                    raise ValueError(f"{o}.kind_tiles has key {k!r}; allowed: {_KIND_KEYS}")
            self.kind_tiles = {k: _as(GemmTile, o, f"kind_tiles[{k!r}]", v) for k, v in self.kind_tiles.items()}

        def tiles_spec(self) -> str:
            """The launch-config overrides as one string (see :func:`parse_tiles`)."""
            parts = [f"{k}={_tile_spec(t)}" for k, t in sorted(self.kind_tiles.items())]
            for key, t in (("gemm", self.gemm_tile), ("dw", self.dw_tile),
                           ("down_combine", self.down_combine_tile)):
                if t is not None:
                    parts.append(f"{key}={_tile_spec(t)}")
            if self.tma is not None:
                parts.append(f"tma={int(self.tma)}")
            if not self.persistent:
                parts.append("persistent=0")
            if self.gather_x is not None:
                parts.append(f"gather_x={int(self.gather_x)}")
            if self.gluon is not None:
                parts.append(f"gluon={int(self.gluon)}")
            return ";".join(parts)

        def with_env_overrides(self, environ=None) -> TritonBackend.Config:
            """A copy with every field whose ``MOEKIT_TRITON_*`` variable (:data:`ENV_VARS`) is
            set taken from the environment (for benchmark sweeps)."""
            env = os.environ if environ is None else environ
            changes: dict[str, Any] = {}
            kinds = dict(self.kind_tiles)
            for name, var in ENV_VARS.items():
                text = env.get(var)
                if not text:
                    continue
                if name.startswith("kind_tiles."):
                    kinds[name.split(".", 1)[1]] = _from_env(name, var, text)
                else:
                    changes[name] = _from_env(name, var, text)
            if kinds != self.kind_tiles:
                changes["kind_tiles"] = kinds
            return dataclasses.replace(self, **changes) if changes else self

        @classmethod
        def from_env(cls, environ=None) -> TritonBackend.Config:
            """The default settings with the environment's overrides."""
            return cls().with_env_overrides(environ)

    @classmethod
    def with_env_defaults(cls) -> TritonBackend:
        """The backend with the default settings and the environment's overrides (the one
        registered as ``"triton"``); one object per combination of the variables' values, so
        that choosing the backend by name costs a few dictionary reads per call."""
        if torch.compiler.is_compiling():  # traced once: no cache to consult
            return cls(cls.Config.from_env())
        return _backend_for_env(_env_values())

    def __init__(self, config: TritonBackend.Config | None = None):
        super().__init__(config)
        self.tiles = self.config.tiles_spec()
        self._kernels  # noqa: B018 - imports the kernels now, not first inside a traced forward

    @property
    def _kernels(self):
        """The kernels package ``moekit.ops.triton``, or None without Triton (not kept on the
        object, so that backends copy and pickle with the modules that hold them)."""
        try:
            from . import triton as kernels_pkg
        except ImportError:
            return None
        return kernels_pkg

    def available(self, device: torch.device, dtype: torch.dtype) -> bool:
        return self._kernels is not None and self._kernels.triton_available(device, dtype)

    def grouped_linear(self, x_NI, w_EOI, plan, bias_EO=None):
        from .triton.grouped_linear import triton_grouped_linear

        return triton_grouped_linear(x_NI, w_EOI, plan, bias_EO, config=self.config, tiles=self.tiles)

    def fused(self, x_TD, gate_up_proj, down_proj, plan, topk_weights_TK, **kw) -> torch.Tensor:
        return self._kernels.fused_experts(x_TD, gate_up_proj, down_proj, plan, topk_weights_TK,
                                           settings=self.config, tiles=self.tiles, **kw)

    def experts(self, x_TD, gate_up_proj, down_proj, plan, topk_weights_TK, *, activation, **kw):
        """The fused kernels for the activations they compile (``gpt_oss`` with any
        ``alpha``/``limit``: the constants are kernel arguments); any other activation with
        parameters (e.g. a clamped SwiGLU ``silu(limit=..)``), or that the kernels do not
        compile (``relu``), runs the staged path over this
        backend's grouped linear, with the activation in PyTorch."""
        base, params = activation_params(activation)
        if not params and base in self._kernels.launchers.K.ACT_CODES:
            return self.fused(x_TD, gate_up_proj, down_proj, plan, topk_weights_TK,
                              activation=base, **kw)
        if base == "gpt_oss":
            return self.fused(x_TD, gate_up_proj, down_proj, plan, topk_weights_TK,
                              activation=base, alpha=params["alpha"], limit=params["limit"], **kw)
        return self.staged_experts(x_TD, gate_up_proj, down_proj, plan, topk_weights_TK,
                                   activation=activation, **kw)

    def permute(self, x_TD, plan, topk_weights_TK=None):
        """One gather pass (Triton), its backward the combine kernel."""
        if torch.compiler.is_compiling():
            return super().permute(x_TD, plan, topk_weights_TK)
        check_permute(x_TD, plan, topk_weights_TK)
        return self._kernels.stages.permute(x_TD, plan, topk_weights_TK)

    def unpermute(self, y_ND, plan, topk_weights_TK=None, *, out_dtype=None):
        """The combine kernel (Triton), its backward one gather pass and the weight grad's dot;
        without grad, the kernel writes ``out_dtype`` itself (no pass to cast)."""
        if torch.compiler.is_compiling():
            return super().unpermute(y_ND, plan, topk_weights_TK, out_dtype=out_dtype)
        check_unpermute(y_ND, plan, topk_weights_TK)
        grad = torch.is_grad_enabled() and (y_ND.requires_grad or (
            topk_weights_TK is not None and topk_weights_TK.requires_grad))
        if out_dtype is not None and out_dtype != y_ND.dtype and not grad:
            return self._kernels.launchers.combine(y_ND, plan.inverse_TK, topk_weights_TK, None,
                                                   out_dtype)[0]
        y = self._kernels.stages.unpermute(y_ND, plan, topk_weights_TK)
        return y if out_dtype is None else y.to(out_dtype)

    def chunk_runner(self, weights, *, activation: str, train: bool, total_rows: int,
                     weight_on_input: bool = False):
        """For training with an activation the kernels compile (routing weights, if any, on
        the output): the fused kernels chunk by chunk, the weight grads made once over all
        chunks (``moekit.ops.triton.chunked``); otherwise the default runner."""
        base, params = activation_params(activation)
        fused = (not params and base in self._kernels.launchers.K.ACT_CODES) or base == "gpt_oss"
        if train and fused and not weight_on_input:
            from .triton.chunked import TritonChunks

            return TritonChunks(self, weights, activation=activation, total_rows=total_rows)
        return super().chunk_runner(weights, activation=activation, train=train,
                                    total_rows=total_rows, weight_on_input=weight_on_input)

    def make_plan(self, topk_ids_TK, num_experts, *, capacity_factor=None, drop_policy="position",
                  topk_weights_TK=None, capacity=None, num_zero_experts=0,
                  num_real_slots=None, check_ids=True) -> RoutingPlan:
        """Dropless plans of at most ``decode.SMALL_PLAN_MAX_SLOTS`` slots on CUDA come from
        one kernel launch (``decode.small_plan``: the same plan, bit for bit; at decode
        sizes the dozen small torch ops of ``make_plan`` cost more host time than the experts'
        kernels); other plans, and bad arguments, go to ``make_plan``."""
        if (capacity_factor is None and capacity is None and num_zero_experts == 0
                and topk_ids_TK.device.type == "cuda"
                and self._kernels is not None and topk_ids_TK.dim() == 2
                and topk_ids_TK.dtype in (torch.int32, torch.int64)
                and 0 < topk_ids_TK.numel() <= self._kernels.decode.SMALL_PLAN_MAX_SLOTS
                and type(num_experts) is int and num_experts > 0
                and not torch.compiler.is_compiling()):
            return self._kernels.decode.small_plan(topk_ids_TK, num_experts).record_ids(topk_ids_TK)
        return super().make_plan(topk_ids_TK, num_experts, capacity_factor=capacity_factor,
                                 drop_policy=drop_policy, topk_weights_TK=topk_weights_TK,
                                 capacity=capacity, num_zero_experts=num_zero_experts,
                                 num_real_slots=num_real_slots, check_ids=check_ids)


# os.environ's encoded mapping, read directly: 17 os.environ.get calls cost ~14 us, too much
# for a per-call choice of the backend by name at decode sizes (1 us this way)
_ENV_DATA = getattr(os.environ, "_data", None)
_ENV_KEYS = (tuple(os.environ.encodekey(v) for v in ENV_VARS.values())
             if _ENV_DATA is not None and hasattr(os.environ, "encodekey") else None)


def _env_values() -> tuple:
    if _ENV_KEYS is not None:
        return tuple(map(_ENV_DATA.get, _ENV_KEYS))
    return tuple(map(os.environ.get, ENV_VARS.values()))  # pragma: no cover - other Pythons


@functools.lru_cache(maxsize=16)
def _backend_for_env(values: tuple) -> TritonBackend:
    """(``values`` only keys the cache: the settings are read from the environment.)"""
    return TritonBackend(TritonBackend.Config.from_env())
