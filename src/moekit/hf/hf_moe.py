"""The module standing in for a transformers sparse MoE block after ``patch``."""

from __future__ import annotations

import torch
from torch import nn

from ..moe import MoE
from .family_spec import RET_FLAT_LOGITS, RET_LOGITS, RET_TENSOR, RET_WEIGHTS
from .layout import expert_index, get_path, to_hf

__all__ = ["HFMoE"]


def _record_router_logits(logits: torch.Tensor) -> None:
    """Hand ``logits`` to transformers' output collector when it asks for router logits
    (``output_router_logits=True``); the hook it would have put on the HF router is gone."""
    try:
        from transformers.utils.output_capturing import _active_collector
    except ImportError:  # pragma: no cover - older transformers: no collector
        return
    collected = _active_collector.get()
    if collected is not None and "router_logits" in collected:
        collected["router_logits"].append(logits)


class HFMoE(MoE):
    """A :class:`moekit.MoE` standing in for a transformers sparse MoE block: takes the block's
    input, returns what the block returned (a tensor, or GPT-OSS's ``(y, topk weights)`` / Llama
    4's ``(y, router logits)`` / ERNIE-VL's both flattened), and reports router logits to
    ``output_router_logits``."""

    hf_returns: str = RET_TENSOR
    hf_flat_output: bool = False  # the block returns [T, D] rows (Llama 4)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs):  # noqa: D401
        moe_kwargs = {
            k: kwargs[k] for k in ("input_ids", "token_mask", "router_logits") if k in kwargs
        }
        y, r = self.forward_with_routing(hidden_states, **moe_kwargs)  # r inside the autograd graph
        if self.hf_flat_output:
            y = y.reshape(-1, y.shape[-1])
        if r is not None:
            _record_router_logits(r.logits)
        if self.hf_returns == RET_WEIGHTS:
            return y, r.topk_weights.to(y.dtype)
        if self.hf_returns == RET_LOGITS:
            return y, r.logits
        if self.hf_returns == RET_FLAT_LOGITS:
            return y.reshape(-1), r.logits.reshape(-1)
        return y

    def hf_tensors(self, which: str = "data") -> dict[str, torch.Tensor]:
        """This module's tensors (``which="data"``) or gradients (``"grad"``) under the original
        block's names and layout (relative to the block), e.g. to compare with the original.
        A per-expert module's gradient that is all zeros is left out, as the original leaves
        the gradient of an expert that no token reached at None."""
        out = {}
        for en in self.__dict__.get("_hf_entries", []):
            _, _, cur = get_path(self, en.moekit)
            t = cur.detach() if which == "data" else cur.grad
            if t is not None:
                t = self.to_hf_tensor(en, t, grad=which == "grad")
                if which == "grad" and expert_index(en.kind) is not None and not t.any():
                    continue
                out[en.hf] = t
        return out

    def to_hf_tensor(self, en, t: torch.Tensor, grad: bool = False) -> torch.Tensor:
        """``t`` (the tensor of entry ``en``, or its gradient) in the original block's layout
        and dtype; rows the block holds and never reads (LongCat's zero-expert rows of
        ``gate_up_proj``) come back as they were, or as zeros in a gradient."""
        tail = self.__dict__.get("_hf_tails", {}).get(en.hf)
        if tail is not None and grad:
            tail = tail.shape[0]
        return to_hf(en.kind, t, self.__dict__["_hf_dtypes"][en.hf], tail)

    @property
    def hf_block(self) -> nn.Module | None:
        """The original transformers block (its tensors are placeholders while patched)."""
        return self.__dict__.get("_hf_block")
