"""How a transformers block's tensors correspond to a patched block's: the transforms between
the two layouts (:func:`to_moekit`, :func:`to_hf`), the map of one family's block
(:func:`block_param_map`), tensor paths inside a module (:func:`get_path`), and
:class:`PatchError`, raised for a block that moekit cannot express."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from ..moe import MoE
from .family_spec import (
    CONCAT,
    DBRX_ROWS,
    INTERLEAVED_TRANSPOSED,
    PER_EXPERT,
    TRANSPOSED,
    FamilySpec,
)

__all__ = [
    "PatchError", "Entry", "block_param_map", "to_moekit", "to_hf", "get_path", "find_tensor",
    "SAME", "TRANS", "INTERLEAVE_T", "INTERLEAVE_BIAS", "FP32", "FP32_ROW", "ROW", "PARTS",
    "ROWS_GATE", "ROWS_UP", "ROWS_T", "LEADING", "expert_kind", "expert_index",
]


class PatchError(ValueError):
    """A block that moekit cannot express exactly (the message names the block and why)."""


# kinds of correspondence between an HF tensor and a moekit tensor
SAME, TRANS, INTERLEAVE_T, INTERLEAVE_BIAS, FP32, FP32_ROW, ROW = (
    "same",
    "transpose",
    "interleave_t",
    "interleave_bias",
    "fp32",  # a float32 buffer in moekit, any dtype in HF
    "fp32_row",  # the same, stored [1, E] in HF (ERNIE's moe_statics)
    "row",  # [1, E] <-> [E], dtype kept (state-dict conversion of fp32_row)
)
# DBRX keeps each projection as one [E * F, D] matrix: w1 (gate) and v1 (up) become the two
# halves of gate_up_proj [E, 2F, D] (PARTS: their order there), w2 the down projection
ROWS_GATE, ROWS_UP, ROWS_T = "rows_gate", "rows_up", "rows_t"
PARTS = (ROWS_GATE, ROWS_UP)
# a per-expert module's weight [O, I] <-> row i of moekit's stacked [E, O, I] (kind "expert:i";
# the rows are stacked once, into a new Parameter, when the block is patched)
_EXPERT = "expert:"


def expert_kind(i: int) -> str:
    return f"{_EXPERT}{i}"


def expert_index(kind: str) -> int | None:
    """The expert of a per-expert kind (:func:`expert_kind`), None for every other kind."""
    return int(kind[len(_EXPERT):]) if kind.startswith(_EXPERT) else None


# LongCat-Flash allocates gate_up_proj rows for its zero-computation experts too and never
# reads them: moekit holds the first E rows; the rest (the "tail") travel beside the module
LEADING = "leading_rows"


def to_moekit(kind: str, t: torch.Tensor, num_experts: int | None = None) -> torch.Tensor:
    """The moekit tensor of HF tensor ``t`` (for the :data:`PARTS` kinds its part
    ``[E, F, D]``; ``num_experts`` is needed by the DBRX row kinds)."""
    if kind == SAME or expert_index(kind) is not None:  # one expert's row of the stack
        return t
    if kind == LEADING:
        return t[:num_experts]
    if kind in PARTS:
        return t.reshape(num_experts, -1, t.shape[-1])
    if kind == ROWS_T:  # [E * F, D] -> [E, D, F]
        return t.reshape(num_experts, -1, t.shape[-1]).transpose(1, 2)
    if kind == TRANS:  # [E, I, O] -> [E, O, I] view
        return t.transpose(1, 2)
    if kind == INTERLEAVE_T:  # [E, D, 2F] gate/up columns alternating -> [E, 2F, D] gate first
        tt = t.transpose(1, 2)
        return torch.cat([tt[:, 0::2], tt[:, 1::2]], dim=1)
    if kind == INTERLEAVE_BIAS:  # [E, 2F] alternating -> gate first
        return torch.cat([t[:, 0::2], t[:, 1::2]], dim=1)
    if kind == FP32:
        return t.float()
    if kind == FP32_ROW:
        return t.reshape(-1).float()
    if kind == ROW:
        return t.reshape(-1)
    raise AssertionError(kind)


def to_hf(
    kind: str, t: torch.Tensor, dtype: torch.dtype | None = None, tail=None
) -> torch.Tensor:
    """The HF tensor of moekit tensor ``t``; for :data:`LEADING`, ``tail`` is the HF rows
    moekit does not hold (a tensor, or their number: zero rows)."""
    if kind == SAME:
        return t
    if expert_index(kind) is not None:  # stacked [E, O, I] -> the expert's [O, I]
        return t[expert_index(kind)]
    if kind == LEADING:
        if tail is None:
            raise ValueError("to_hf(LEADING, ...) needs the rows moekit does not hold (tail)")
        if isinstance(tail, int):
            tail = t.new_zeros((tail,) + tuple(t.shape[1:]))
        return torch.cat([t, tail.to(t.device, t.dtype)])
    if kind in PARTS:  # gate_up [E, 2F, D] -> its gate or up rows [E * F, D]
        f = t.shape[1] // 2
        half = t[:, :f] if kind == ROWS_GATE else t[:, f:]
        return half.reshape(-1, t.shape[-1])
    if kind == ROWS_T:  # [E, D, F] -> [E * F, D]
        return t.transpose(1, 2).reshape(-1, t.shape[1])
    if kind == TRANS:
        return t.transpose(1, 2)
    if kind == INTERLEAVE_T:
        E, H, D = t.shape
        f = H // 2
        return (
            torch.stack([t[:, :f], t[:, f:]], dim=2).reshape(E, H, D).transpose(1, 2).contiguous()
        )
    if kind == INTERLEAVE_BIAS:
        E, H = t.shape
        f = H // 2
        return torch.stack([t[:, :f], t[:, f:]], dim=2).reshape(E, H)
    if kind == FP32:
        return t if dtype is None else t.to(dtype)
    if kind == FP32_ROW:
        return (t if dtype is None else t.to(dtype)).reshape(1, -1)
    if kind == ROW:
        return t.reshape(1, -1)
    raise AssertionError(kind)


@dataclass(frozen=True)
class Entry:
    hf: str  # path inside the HF block
    moekit: str  # path inside the moekit MoE
    kind: str


def block_param_map(spec: FamilySpec, moe_cfg: MoE.Config) -> list[Entry]:
    """HF block tensor path <-> moekit MoE tensor path, and how one becomes the other."""
    r, e = spec.router, spec.experts
    rl = f"{r}.{spec.router_linear}" if spec.router_linear else r
    rc, ec = moe_cfg.router, moe_cfg.experts
    out = [Entry(f"{rl}.weight", "router.gate.weight", SAME)]
    if rc.use_router_bias:
        out.append(Entry(f"{rl}.bias", "router.gate.bias", SAME))
    if rc.routing == "hash":
        if not spec.extra.get("hash_table"):
            raise PatchError(f"{spec.name}: hash routing without a token -> experts table")
        out.append(Entry(f"{r}.{spec.extra['hash_table']}", "router.hash_table", SAME))
    if rc.use_expert_bias:
        eb = spec.expert_bias or f"{r}.e_score_correction_bias"
        out.append(Entry(eb, "router.expert_bias", FP32_ROW if spec.expert_bias_row else FP32))
    for key, path in (("output_bias", ""), ("output_norm", ".weight")):
        if spec.extra.get(key) and getattr(moe_cfg, "output_norm_eps" if path else key):
            out.append(Entry(spec.extra[key] + path, key + path, SAME))
    up = "gate_up_proj" if ec.is_gated else "up_proj"
    if spec.layout == PER_EXPERT:
        if ec.is_gated or ec.use_bias or moe_cfg.shared_experts is not None:
            raise PatchError(f"{spec.name}: per-expert modules are read as non-gated, no biases")
        key, (up_hf, down_hf) = spec.extra["expert_key"], spec.extra["expert_linears"]
        for i in range(moe_cfg.num_experts):
            m = f"{e}.{key.format(i)}"
            out.append(Entry(f"{m}.{up_hf}.weight", f"experts.{up}", expert_kind(i)))
            out.append(Entry(f"{m}.{down_hf}.weight", "experts.down_proj", expert_kind(i)))
        return out
    if spec.extra.get("zero_expert_rows") and moe_cfg.zero_experts:
        if spec.layout != CONCAT or not ec.is_gated or ec.use_bias or moe_cfg.shared_experts:
            raise PatchError(
                f"{spec.name}: zero-expert rows need the gated fused layout, without biases or "
                "shared experts"
            )
        return out + [
            Entry(f"{e}.gate_up_proj", "experts.gate_up_proj", LEADING),
            Entry(f"{e}.down_proj", "experts.down_proj", SAME),
        ]
    if spec.layout == DBRX_ROWS:
        if not ec.is_gated or ec.use_bias or moe_cfg.shared_experts is not None:
            raise PatchError(f"{spec.name}: the per-expert row layout is gated, without biases")
        m = f"{e}.mlp"
        return out + [
            Entry(f"{m}.w1", "experts.gate_up_proj", ROWS_GATE),
            Entry(f"{m}.v1", "experts.gate_up_proj", ROWS_UP),
            Entry(f"{m}.w2", "experts.down_proj", ROWS_T),
        ]
    w_kind = {CONCAT: SAME, TRANSPOSED: TRANS, INTERLEAVED_TRANSPOSED: INTERLEAVE_T}[spec.layout]
    if spec.layout == INTERLEAVED_TRANSPOSED and not ec.is_gated:
        raise PatchError(f"{spec.name}: an interleaved gate/up layout needs gated experts")
    up_hf, down_hf = spec.extra.get("expert_paths", (f"{e}.{up}", f"{e}.down_proj"))
    out.append(Entry(up_hf, f"experts.{up}", w_kind))
    out.append(Entry(down_hf, "experts.down_proj", SAME if spec.layout == CONCAT else TRANS))
    if ec.use_bias:
        b_kind = INTERLEAVE_BIAS if spec.layout == INTERLEAVED_TRANSPOSED else SAME
        out.append(Entry(f"{e}.{up}_bias", f"experts.{up}_bias", b_kind))
        out.append(Entry(f"{e}.down_proj_bias", "experts.down_proj_bias", SAME))
    if moe_cfg.shared_experts is not None:
        s = spec.shared
        sc = moe_cfg.shared_experts
        names = (
            ["gate_up_proj", "down_proj"]
            if sc.fused_gate_up
            else ["gate_proj", "up_proj", "down_proj"]
            if sc.is_gated
            else ["up_proj", "down_proj"]
        )
        out += [Entry(f"{s}.{n}.weight", f"shared_experts.{n}.weight", SAME) for n in names]
        if sc.use_bias:
            out += [Entry(f"{s}.{n}.bias", f"shared_experts.{n}.bias", SAME) for n in names]
        if moe_cfg.shared_experts.use_gate:
            out.append(
                Entry(f"{spec.shared_gate}.weight", "shared_experts.expert_gate.weight", SAME)
            )
    return out


def get_path(root: nn.Module, path: str):
    mod_path, _, leaf = path.rpartition(".")
    mod = root.get_submodule(mod_path) if mod_path else root
    return mod, leaf, getattr(mod, leaf, None)


def find_tensor(root: nn.Module, path: str):
    try:
        t = get_path(root, path)[2]
    except AttributeError:
        return None
    return t if isinstance(t, torch.Tensor) else None
