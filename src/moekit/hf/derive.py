"""The :class:`moekit.MoE.Config` of a transformers model's sparse block, from its config:
exact for the families of :data:`moekit.hf.families.FAMILIES`, a guess from common attribute
names for the others (:func:`generic_spec_from_config`; ``patch`` verifies it on the block)."""

from __future__ import annotations

import torch

from ..experts import GroupedExperts
from ..moe import MoE
from ..router import TokenChoiceTopKRouter
from ..shared import SharedExperts
from .families import spec_for_model_type
from .family_spec import (
    FamilySpec,
    activation_of,
    hf_get,
    num_experts_of,
    routing_from_config,
    top_k_of,
)
from .layout import PatchError

__all__ = ["config_from_hf", "generic_spec_from_config", "text_config"]


def text_config(hf_config):
    get = getattr(hf_config, "get_text_config", None)
    return get() if get is not None else hf_config


def config_from_hf(
    hf_config,
    *,
    backend: str = "auto",
    spec: FamilySpec | None = None,
    _num_experts: int | None = None,
    _top_k: int | None = None,
) -> MoE.Config:
    """The :class:`moekit.MoE.Config` of one sparse block of a transformers model config.

    Named families (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3, GPT-OSS, Llama 4) are
    exact; other families get a guess from common attribute names (``patch`` verifies it
    against the block). Raises :class:`PatchError` naming the reason when the family's block
    cannot be expressed (e.g. router jitter noise, a non-default GPT-OSS ``swiglu_limit``).
    """
    cfg = text_config(hf_config)
    model_type = getattr(cfg, "model_type", None)
    spec = spec or spec_for_model_type(model_type) or generic_spec_from_config(cfg)
    owner = f"{spec.name} ({type(cfg).__name__})"
    reason = spec.check(cfg)
    if reason:
        raise PatchError(f"{owner}: cannot be expressed by moekit.MoE: {reason}")
    E = _num_experts or spec.extra.get("num_experts", num_experts_of)(cfg)
    K = _top_k or spec.extra.get("top_k", top_k_of)(cfg)
    D = cfg.hidden_size
    Fh = spec.expert_hidden(cfg)
    if E is None or K is None or Fh is None:
        raise PatchError(f"{owner}: config has no number of experts / top-k / expert hidden size")
    try:
        hidden_act = spec.extra.get("hidden_act")
        act = activation_of(cfg, owner, hidden_act(cfg) if hidden_act else None)
        router = TokenChoiceTopKRouter.Config(
            top_k=int(K),
            router_dtype=torch.float32 if spec.router_in_fp32 else None,
            **spec.routing(cfg),
        )
        ekw = {"activation": act, **spec.experts_kwargs(cfg)}
        experts = GroupedExperts.Config(backend=backend, **ekw)
        shared = None
        if spec.shared is not None and spec.shared_hidden(cfg):
            shared = SharedExperts.Config(
                hidden_dim=int(spec.shared_hidden(cfg)),
                activation=_shared_activation(spec, cfg) or act,
                gated=spec.extra.get("shared_gated"),
                use_gate=spec.shared_gate is not None,
                fused_gate_up=bool(spec.extra.get("shared_fused")),
                use_bias=bool(spec.extra.get("shared_bias", lambda c: False)(cfg)),
            )
        return MoE.Config(
            dim=int(D),
            hidden_dim=int(Fh),
            num_experts=int(E),
            router=router,
            experts=experts,
            shared_experts=shared,
            zero_experts=int(spec.extra.get("zero_experts", lambda c: 0)(cfg)),
            **spec.extra.get("moe_kwargs", lambda c: {})(cfg),  # e.g. an output bias or norm
        )
    except ValueError as e:  # a moekit config check: the block is not expressible
        raise PatchError(f"{owner}: {e}") from e


def _shared_activation(spec: FamilySpec, cfg) -> str | None:
    """The shared experts' activation: a name, or a function of the config, or None."""
    a = spec.extra.get("shared_activation")
    return a(cfg) if callable(a) else a


def generic_spec_from_config(cfg) -> FamilySpec:
    """A spec for a family not in the map, from common config attribute names only."""
    routing = routing_from_config(cfg)
    shared_hidden = hf_get(cfg, "shared_expert_intermediate_size")
    if shared_hidden is None and hf_get(cfg, "n_shared_experts", "num_shared_experts"):
        n = hf_get(cfg, "n_shared_experts", "num_shared_experts")
        shared_hidden = hf_get(cfg, "moe_intermediate_size", "intermediate_size") * n
    return FamilySpec(
        name=str(getattr(cfg, "model_type", "generic")),
        model_types=(),
        block_classes=(),
        shared="shared_experts" if shared_hidden else None,
        shared_hidden=(lambda c, h=shared_hidden: h) if shared_hidden else None,
        routing=lambda c, kw=routing: dict(kw),
        router_in_fp32=bool(routing.get("num_expert_groups"))
        or routing.get("score_func") == "sigmoid",
    )
