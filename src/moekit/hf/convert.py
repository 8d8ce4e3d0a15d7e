"""Checkpoint conversion between transformers MoE layouts and moekit's.

``from_hf_state_dict(sd, hf_config)`` rewrites every sparse MoE block of a transformers state
dict into the names and layout of a patched model (``...mlp.router.gate.weight``,
``...mlp.experts.gate_up_proj [E, 2F, D]``, ``...mlp.shared_experts.*``); other keys pass
through untouched. ``to_hf_state_dict(sd, hf_config, layout=...)`` does the reverse.

Layouts understood, each decided by the key names and the family of ``hf_config`` (never by
a tensor's shape: with D == F a transposed ``down_proj`` has the right shape and the wrong
values):

* per-expert ModuleList: ``experts.{i}.w1/w3/w2.weight`` (Mixtral's original names: w1 gate,
  w3 up, w2 down) or ``experts.{i}.gate_proj/up_proj/down_proj.weight`` (optional ``.bias``);
* fused transformers v5: ``experts.gate_up_proj [E, 2F, D]`` (gate rows first) and
  ``experts.down_proj [E, D, F]``;
* fused transposed (Llama 4): ``[E, D, 2F]`` and ``[E, F, D]``;
* GPT-OSS: transposed with gate/up columns interleaved, with biases.

Round trips are exact (bit-identical values, same dtypes), except the rows LongCat-Flash's
``gate_up_proj`` holds for its zero-computation experts and never reads: moekit has no place
for them, and ``to_hf_state_dict`` writes them as zeros (``unpatch`` and ``hf_state_dict`` of
a patched model keep them).
"""

from __future__ import annotations

import torch

from .derive import config_from_hf, generic_spec_from_config, text_config
from .families import spec_for_model_type
from .layout import (
    FP32,
    FP32_ROW,
    LEADING,
    PARTS,
    ROW,
    SAME,
    block_param_map,
    to_hf,
    to_moekit,
)

__all__ = ["from_hf_state_dict", "to_hf_state_dict", "PER_EXPERT_NAMES"]

# (gate, up, down) names of the per-expert layouts, tried in this order
PER_EXPERT_NAMES = (("w1", "w3", "w2"), ("gate_proj", "up_proj", "down_proj"))


def _spec_and_cfg(hf_config, layout):
    cfg = text_config(hf_config)
    spec = spec_for_model_type(getattr(cfg, "model_type", None)) or generic_spec_from_config(cfg)
    if spec.extra.get("block_router") is not None:
        raise ValueError(
            f"{spec.name}: its blocks route differently from layer to layer (e.g. DeepSeek-V4's "
            "hash layers), which one converted layout cannot hold; patch the loaded model instead"
        )
    if layout is not None:
        spec = spec.with_(layout=layout)
    return spec, config_from_hf(cfg, spec=spec)


def _conv_kind(kind: str) -> str:
    # state dicts keep the expert-bias dtype as it is (load_state_dict casts into the buffer)
    return {FP32: SAME, FP32_ROW: ROW}.get(kind, kind)


def from_hf_state_dict(state_dict: dict, hf_config, *, layout: str | None = None) -> dict:
    """A transformers state dict -> the state dict of the same model after ``moekit.hf.patch``.

    ``layout`` overrides the fused experts layout of the family (``"concat"``,
    ``"transposed"``, ``"interleaved_transposed"``); per-expert keys are recognised by name.
    """
    spec, moe_cfg = _spec_and_cfg(hf_config, layout)
    entries = block_param_map(spec, moe_cfg)
    E = moe_cfg.num_experts
    gated = moe_cfg.experts.is_gated
    router_suffix = f".{entries[0].hf}"  # the gate weight, e.g. ".gate.weight"
    out: dict = {}
    consumed: set = set()
    prefixes = []
    for k in state_dict:
        if not k.endswith(router_suffix):
            continue
        p = k[: -len(router_suffix)]
        ex = f"{p}.{spec.experts}"
        if (
            f"{ex}.gate_up_proj" in state_dict
            or f"{ex}.up_proj" in state_dict
            or f"{ex}.mlp.w1" in state_dict  # DBRX's rows
            or any(f"{ex}.0.{n[2]}.weight" in state_dict for n in PER_EXPERT_NAMES)
        ):
            prefixes.append(p)
    for p in prefixes:
        ex = f"{p}.{spec.experts}"
        per_expert = next(
            (n for n in PER_EXPERT_NAMES if f"{ex}.0.{n[2]}.weight" in state_dict), None
        )
        for en in entries:
            hk, mk = f"{p}.{en.hf}", f"{p}.{en.moekit}"
            if en.hf.startswith(spec.experts + ".") and per_expert is not None:
                continue
            if hk not in state_dict:
                raise KeyError(f"{p}: expected {hk!r} in the state dict ({spec.name} layout)")
            part = to_moekit(_conv_kind(en.kind), state_dict[hk], E)
            # PARTS (DBRX's w1, v1) are the halves of one tensor, in entry order
            out[mk] = torch.cat([out[mk], part], dim=1) if en.kind in PARTS and mk in out else part
            consumed.add(hk)
        if per_expert is not None:
            g, u, d = per_expert
            keys = {}

            def stack(name, suffix="weight"):
                ks = [f"{ex}.{i}.{name}.{suffix}" for i in range(E)]
                if suffix == "bias" and ks[0] not in state_dict:
                    return None
                missing = [k for k in ks if k not in state_dict]
                if missing:
                    raise KeyError(f"{p}: per-expert layout is missing {missing[:3]}")
                consumed.update(ks)
                return torch.stack([state_dict[k] for k in ks])

            if gated:
                keys["experts.gate_up_proj"] = torch.cat([stack(g), stack(u)], dim=1)
                gb, ub = stack(g, "bias"), stack(u, "bias")
                if gb is not None:
                    keys["experts.gate_up_proj_bias"] = torch.cat([gb, ub], dim=1)
            else:
                keys["experts.up_proj"] = stack(u)
                ub = stack(u, "bias")
                if ub is not None:
                    keys["experts.up_proj_bias"] = ub
            keys["experts.down_proj"] = stack(d)
            db = stack(d, "bias")
            if db is not None:
                keys["experts.down_proj_bias"] = db
            for k, v in keys.items():
                out[f"{p}.{k}"] = v
    for k, v in state_dict.items():
        if k not in consumed:
            out[k] = v
    return out


def to_hf_state_dict(
    state_dict: dict,
    hf_config,
    *,
    layout: str = "fused",
    expert_names: tuple[str, str, str] = ("gate_proj", "up_proj", "down_proj"),
    fused_layout: str | None = None,
) -> dict:
    """The state dict of a patched model -> transformers names and layout.

    ``layout="fused"`` writes the family's fused layout (``fused_layout`` overrides it);
    ``layout="per_expert"`` writes ``experts.{i}.{gate,up,down}.weight`` with ``expert_names``
    (e.g. ``("w1", "w3", "w2")`` for Mixtral's original checkpoints).
    """
    if layout not in ("fused", "per_expert"):
        raise ValueError(f"layout={layout!r}; allowed: 'fused', 'per_expert'")
    spec, moe_cfg = _spec_and_cfg(hf_config, fused_layout)
    entries = block_param_map(spec, moe_cfg)
    E = moe_cfg.num_experts
    gated = moe_cfg.experts.is_gated
    up = "gate_up_proj" if gated else "up_proj"
    prefixes = [
        k[: -len(".router.gate.weight")]
        for k in state_dict
        if k.endswith(".router.gate.weight")
        and f"{k[: -len('.router.gate.weight')]}.experts.{up}" in state_dict
    ]
    out: dict = {}
    consumed: set = set()
    for p in prefixes:
        for en in entries:
            hk, mk = f"{p}.{en.hf}", f"{p}.{en.moekit}"
            if layout == "per_expert" and en.moekit.startswith("experts."):
                continue
            if mk not in state_dict:
                raise KeyError(f"{p}: expected {mk!r} in the state dict")
            # LongCat's never-read zero-expert rows of gate_up_proj come back as zeros
            tail = moe_cfg.zero_experts if en.kind == LEADING else None
            out[hk] = to_hf(_conv_kind(en.kind), state_dict[mk], tail=tail).contiguous()
            consumed.add(mk)
        if layout == "per_expert":
            g, u, d = expert_names
            ex = f"{p}.{spec.experts}"
            w_up = state_dict[f"{p}.experts.{up}"]
            consumed.add(f"{p}.experts.{up}")
            Fh = w_up.shape[1] // 2 if gated else w_up.shape[1]
            parts = {g: w_up[:, :Fh], u: w_up[:, Fh:]} if gated else {u: w_up}
            parts[d] = state_dict[f"{p}.experts.down_proj"]
            consumed.add(f"{p}.experts.down_proj")
            b_up = state_dict.get(f"{p}.experts.{up}_bias")
            bparts = {}
            if b_up is not None:
                consumed.add(f"{p}.experts.{up}_bias")
                bparts = {g: b_up[:, :Fh], u: b_up[:, Fh:]} if gated else {u: b_up}
                bparts[d] = state_dict[f"{p}.experts.down_proj_bias"]
                consumed.add(f"{p}.experts.down_proj_bias")
            for i in range(E):
                for name in [g, u, d] if gated else [u, d]:
                    out[f"{ex}.{i}.{name}.weight"] = parts[name][i].contiguous()
                    if bparts:
                        out[f"{ex}.{i}.{name}.bias"] = bparts[name][i].contiguous()
    for k, v in state_dict.items():
        if k not in consumed:
            out[k] = v
    return out
