"""What moekit knows of a transformers MoE family, and the readers of an HF config it is built on.

* the experts layouts (:data:`LAYOUTS`) and what a block's forward returns (``RET_*``);
* :func:`hf_get` and the common config readers :func:`num_experts_of`, :func:`top_k_of`,
  :func:`activation_of`, and :func:`routing_from_config` (a generic family's routing guess);
* :class:`FamilySpec`: where a family keeps its router, experts and shared expert, and its
  routing from the HF config.

The named families are in :data:`moekit.hf.families.FAMILIES`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable

from .experts_impl import HIDDEN_ACT_NAMES

__all__ = [
    "CONCAT", "TRANSPOSED", "INTERLEAVED_TRANSPOSED", "DBRX_ROWS", "PER_EXPERT", "LAYOUTS",
    "RET_TENSOR", "RET_WEIGHTS", "RET_LOGITS", "RET_FLAT_LOGITS", "FamilySpec", "hf_get",
    "num_experts_of", "top_k_of", "activation_of", "routing_from_config",
]
CONCAT = "concat"  # gate_up_proj [E, 2F, D], down_proj [E, D, F]
TRANSPOSED = "transposed"  # gate_up_proj [E, D, 2F] (gate cols first), down_proj [E, F, D]
INTERLEAVED_TRANSPOSED = "interleaved_transposed"  # [E, D, 2F] with gate/up columns alternating
DBRX_ROWS = "dbrx_rows"  # mlp.w1 / v1 / w2 [E * F, D] each (gate, up, down transposed)
# one nn.Linear-style module per expert (``experts.expert_{i}.wi / wo``, non-gated), stacked once
# into moekit's [E, F, D] / [E, D, F] at patch time (extra: expert_key, expert_linears)
PER_EXPERT = "per_expert"
LAYOUTS = (CONCAT, TRANSPOSED, INTERLEAVED_TRANSPOSED, DBRX_ROWS, PER_EXPERT)

# what a block's forward returns
RET_TENSOR = "tensor"
RET_WEIGHTS = "tuple_weights"  # (y, topk weights [T, K])  (GPT-OSS)
RET_LOGITS = "tuple_logits"  # (y, router logits [T, E])  (Llama 4)
RET_FLAT_LOGITS = "tuple_flat_logits"  # (y.flatten(), router logits.flatten())  (ERNIE-VL)


def hf_get(cfg: Any, *names: str, default: Any = None) -> Any:
    """The first of ``names`` that ``cfg`` has and is not None."""
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    return default


def num_experts_of(cfg) -> int | None:
    return hf_get(cfg, "num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")


def top_k_of(cfg) -> int | None:
    return hf_get(cfg, "num_experts_per_tok", "moe_topk", "top_k", "moe_k")


def activation_of(cfg, owner: str, act: str | None = None) -> str:
    act = act or hf_get(cfg, "hidden_act", "hidden_activation", default="silu")
    if act not in HIDDEN_ACT_NAMES:
        raise ValueError(
            f"{owner}: hidden_act={act!r} has no moekit activation; supported: {sorted(HIDDEN_ACT_NAMES)}"
        )
    return HIDDEN_ACT_NAMES[act]


@dataclass(frozen=True)
class FamilySpec:
    """Where a family keeps things, and its routing (``routing(cfg) -> router kwargs``)."""

    name: str
    model_types: tuple[str, ...]
    block_classes: tuple[str, ...]
    router: str = "gate"
    router_linear: str = ""  # the gate Linear inside the router ("" = the router's own weight)
    expert_bias: str | None = None  # selection-only bias (default: router.e_score_correction_bias)
    expert_bias_row: bool = False  # stored [1, E] rather than [E]
    experts: str = "experts"
    shared: str | None = None
    shared_gate: str | None = None
    layout: str = CONCAT
    returns: str = RET_TENSOR
    expert_hidden: Callable[[Any], int] = lambda c: hf_get(
        c, "moe_intermediate_size", "intermediate_size"
    )
    shared_hidden: Callable[[Any], int] | None = None
    routing: Callable[[Any], dict] = lambda c: {}
    experts_kwargs: Callable[[Any], dict] = lambda c: {}
    check: Callable[[Any], str | None] = lambda c: None  # a reason the config is inexpressible
    router_in_fp32: bool = False  # the HF gate matmul runs in float32
    extra: dict = field(default_factory=dict)

    def with_(self, **changes) -> "FamilySpec":
        return replace(self, **changes)


def routing_from_config(cfg) -> dict:
    """A first guess at a generic family's routing from common config attribute names."""
    kw: dict = {}
    score = hf_get(cfg, "scoring_func", "score_func", "router_score_func")
    if score in ("softmax", "sigmoid"):
        kw["score_func"] = score
    norm = hf_get(cfg, "norm_topk_prob", "moe_renormalize", "route_norm")
    if norm is not None:
        kw["route_norm"] = bool(norm)
    scale = hf_get(cfg, "routed_scaling_factor", "router_scaling_factor", "route_scale")
    if scale is not None:
        kw["route_scale"] = float(scale)
    g, tg = hf_get(cfg, "n_group", "num_expert_group"), hf_get(cfg, "topk_group")
    if g is not None and tg is not None and g > 1:
        kw.update(num_expert_groups=int(g), num_limited_groups=int(tg))
    return kw
