"""The experts backends built on torch alone: :class:`LoopBackend` (a per-expert loop, every
device and dtype) and :class:`GroupedMMBackend` (torch's grouped GEMM). Both implement
``grouped_linear`` of the interface in ``experts_backend.py`` (:class:`ExpertsBackend`) and
have no fused entry: their experts run the staged path.
"""

from __future__ import annotations

from dataclasses import dataclass

from .experts_backend import ExpertsBackend
from .reference import grouped_linear_loop
from .torch_mm import grouped_linear_mm, grouped_mm_available

__all__ = ["GroupedMMBackend", "LoopBackend"]


class LoopBackend(ExpertsBackend):
    """A plain per-expert loop: slow and obviously correct, on every device and dtype."""

    name = "loop"

    @dataclass(kw_only=True)
    class Config(ExpertsBackend.Config):
        pass

    def available(self, device, dtype) -> bool:
        return True

    def grouped_linear(self, x_NI, w_EOI, plan, bias_EO=None):
        return grouped_linear_loop(x_NI, w_EOI, plan.counts_E, bias_EO)


class GroupedMMBackend(ExpertsBackend):
    """torch's grouped GEMM (``torch.nn.functional.grouped_mm``), forward and backward."""

    name = "grouped_mm"
    why_unavailable = (
        "torch grouped_mm runs float32/bfloat16/float16 on CPU and bfloat16 on CUDA GPUs with "
        "SM>=80; use backend='loop' (or 'triton') otherwise"
    )

    @dataclass(kw_only=True)
    class Config(ExpertsBackend.Config):
        pass

    def available(self, device, dtype) -> bool:
        return grouped_mm_available(device, dtype)

    def grouped_linear(self, x_NI, w_EOI, plan, bias_EO=None):
        return grouped_linear_mm(
            x_NI, w_EOI, plan.offsets_E, bias_EO=bias_EO, expert_ids_N=plan.expert_ids_N,
            counts_E=plan.counts_E,
        )
