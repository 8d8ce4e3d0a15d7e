"""Load balancing: auxiliary losses, the aux-loss-free expert bias rule, load statistics.

All losses take an optional ``token_mask_T`` (True/1 for real tokens, False/0 for padding):
masked tokens count neither in the routed fractions nor in the mean probabilities.

* :func:`switch_aux_loss` (Switch Transformer / GShard, as Mixtral and OLMoE use it, batch
  level): ``E * sum_e f_e * P_e`` with ``f_e`` the fraction of routed slots that went to
  expert e and ``P_e`` the mean over tokens of the token's normalised score for e.
* :func:`sequence_aux_loss` (DeepSeek-V3's complementary sequence-wise loss): the same
  product per sequence, ``f_e`` scaled by ``E / K``, averaged over sequences.
* :func:`z_loss` (ST-MoE): mean over tokens of ``logsumexp(logits)**2``.

:func:`attach_aux_loss` makes a loss reach the gradient through the layer's output without
changing what the layer returns (Megatron-Core's trick): the output passes through an
identity whose backward also sends gradient 1 into the loss.
:func:`expert_bias_update` is DeepSeek-V3's sign rule: raise the selection bias of
under-loaded experts by ``rate``, lower that of over-loaded ones. :func:`in_backward` tells the
layer when activation checkpointing recomputes its forward, so that loads are counted once.
"""

from __future__ import annotations

import torch

from .config import check_finite
from .plan import count_per_expert

__all__ = [
    "attach_aux_loss",
    "count_tokens_per_expert",
    "expert_bias_update",
    "in_backward",
    "load_stats",
    "sequence_aux_loss",
    "switch_aux_loss",
    "z_loss",
]


def _check_routing(what: str, scores: torch.Tensor | None, ids: torch.Tensor | None, lead: tuple,
                   num_experts: int | None = None) -> None:
    """Shapes and dtypes of routing tensors: ``scores`` floating ``[*lead, E]``, ``ids`` integer
    ``[*lead, K]`` with values in ``[0, E)`` (values checked on CPU only: no device sync)."""
    names = "".join("TBS"[i] if len(lead) == 1 else "BS"[i] for i in range(len(lead)))
    for name, t, floating in (("scores/logits", scores, True), ("topk_ids", ids, False)):
        if t is None:
            continue
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{what}: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != len(lead) + 1 or tuple(t.shape[:-1]) != tuple(lead):
            raise ValueError(
                f"{what}: {name} must be [{', '.join(names)}, {'E' if floating else 'K'}] with "
                f"{names}={lead[0] if len(lead) == 1 else tuple(lead)}, got {tuple(t.shape)}"
            )
        if floating != t.is_floating_point():
            kind = "a floating" if floating else "an integer"
            raise TypeError(f"{what}: {name} must be {kind} tensor, got {t.dtype}")
    E = num_experts if num_experts is not None else (None if scores is None else scores.shape[-1])
    if (ids is not None and E is not None and ids.numel() and ids.device.type == "cpu"
            and not torch.compiler.is_compiling()):
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= E:
            raise ValueError(f"{what}: topk_ids must lie in [0, {E}); found values in [{lo}, {hi}]")


def _mask_T(token_mask_T: torch.Tensor | None, T: int, device) -> torch.Tensor:
    if token_mask_T is None:
        return torch.ones(T, dtype=torch.float32, device=device)
    m = token_mask_T.reshape(-1)
    if m.shape[0] != T:
        raise ValueError(f"token_mask has {m.shape[0]} entries, expected one per token ({T})")
    return m.to(device=device, dtype=torch.float32)


def _normalised(scores_TE: torch.Tensor) -> torch.Tensor:
    s = scores_TE.float()
    return s / (s.sum(dim=-1, keepdim=True) + 1e-20)


def count_tokens_per_expert(
    topk_ids_TK: torch.Tensor, num_experts: int, token_mask_T: torch.Tensor | None = None
) -> torch.Tensor:
    """Routed slots per expert, ``[E]`` float32 (padding tokens excluded)."""
    lead = tuple(topk_ids_TK.shape[:1]) if isinstance(topk_ids_TK, torch.Tensor) else ()
    _check_routing("count_tokens_per_expert", None, topk_ids_TK, lead, num_experts)
    T, K = topk_ids_TK.shape
    if token_mask_T is None:
        return count_per_expert(topk_ids_TK, num_experts).float()
    m = _mask_T(token_mask_T, T, topk_ids_TK.device)
    return count_per_expert(topk_ids_TK, num_experts, m.unsqueeze(1).expand(T, K))


def switch_aux_loss(
    scores_TE: torch.Tensor,
    topk_ids_TK: torch.Tensor,
    token_mask_T: torch.Tensor | None = None,
    tokens_per_expert_E: torch.Tensor | None = None,
) -> torch.Tensor:
    """``tokens_per_expert_E``: :func:`count_tokens_per_expert` of the same ids and mask when the
    caller has it already (the MoE layer counts them for its load statistics); else counted here."""
    if not isinstance(scores_TE, torch.Tensor) or scores_TE.dim() != 2:
        raise ValueError(f"switch_aux_loss: scores must be [T, E], got {getattr(scores_TE, 'shape', scores_TE)}")
    _check_routing("switch_aux_loss", scores_TE, topk_ids_TK, tuple(scores_TE.shape[:1]))
    T, E = scores_TE.shape
    K = topk_ids_TK.shape[1]
    m = _mask_T(token_mask_T, T, scores_TE.device)
    n = m.sum().clamp(min=1.0)
    if tokens_per_expert_E is None:
        tokens_per_expert_E = count_tokens_per_expert(topk_ids_TK, E, token_mask_T)
    elif tokens_per_expert_E.shape != (E,):
        raise ValueError(
            f"tokens_per_expert_E has shape {tuple(tokens_per_expert_E.shape)}; expected ({E},), "
            "one count per expert"
        )
    f = tokens_per_expert_E.float() / (n * K)
    P = (_normalised(scores_TE) * m.unsqueeze(1)).sum(0) / n
    return E * (f * P).sum()


def sequence_aux_loss(
    scores_BSE: torch.Tensor, topk_ids_BSK: torch.Tensor, token_mask_BS: torch.Tensor | None = None
) -> torch.Tensor:
    if not isinstance(scores_BSE, torch.Tensor) or scores_BSE.dim() != 3:
        raise ValueError(f"sequence_aux_loss: scores must be [B, S, E], got {getattr(scores_BSE, 'shape', scores_BSE)}")
    _check_routing("sequence_aux_loss", scores_BSE, topk_ids_BSK, tuple(scores_BSE.shape[:2]))
    B, S, E = scores_BSE.shape
    K = topk_ids_BSK.shape[-1]
    if token_mask_BS is not None and token_mask_BS.numel() != B * S:
        raise ValueError(f"sequence_aux_loss: token_mask has {token_mask_BS.numel()} entries; expected B*S={B * S}")
    m = (
        torch.ones(B, S, device=scores_BSE.device)
        if token_mask_BS is None
        else token_mask_BS.reshape(B, S).to(device=scores_BSE.device, dtype=torch.float32)
    )
    n = m.sum(1).clamp(min=1.0)  # [B]
    onehot = torch.zeros(B, S, E, device=scores_BSE.device)
    onehot.scatter_add_(2, topk_ids_BSK, m.unsqueeze(-1).expand(B, S, K).contiguous())
    f = onehot.sum(1) * E / (K * n.unsqueeze(1))  # [B, E]
    P = (_normalised(scores_BSE) * m.unsqueeze(-1)).sum(1) / n.unsqueeze(1)
    has_tokens = (m.sum(1) > 0).float()
    per_seq = (f * P).sum(-1) * has_tokens
    return per_seq.sum() / has_tokens.sum().clamp(min=1.0)


def z_loss(logits_TE: torch.Tensor, token_mask_T: torch.Tensor | None = None) -> torch.Tensor:
    if not isinstance(logits_TE, torch.Tensor) or logits_TE.dim() != 2:
        raise ValueError(f"z_loss: logits must be [T, E], got {getattr(logits_TE, 'shape', logits_TE)}")
    _check_routing("z_loss", logits_TE, None, tuple(logits_TE.shape[:1]))
    T = logits_TE.shape[0]
    m = _mask_T(token_mask_T, T, logits_TE.device)
    lse = torch.logsumexp(logits_TE.float(), dim=-1)
    return (lse.square() * m).sum() / m.sum().clamp(min=1.0)


class _AttachLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, out, loss):
        ctx.loss_shape, ctx.loss_dtype, ctx.loss_device = loss.shape, loss.dtype, loss.device
        return out.view_as(out)

    @staticmethod
    def backward(ctx, grad_out):
        return grad_out, torch.ones(ctx.loss_shape, dtype=ctx.loss_dtype, device=ctx.loss_device)


def attach_aux_loss(out: torch.Tensor, loss: torch.Tensor) -> torch.Tensor:
    """Return ``out`` unchanged; backward through it also backpropagates ``loss`` (weight 1).

    So ``(main_loss(out)).backward()`` gives the gradients of ``main_loss + loss``."""
    if not isinstance(out, torch.Tensor) or not isinstance(loss, torch.Tensor):
        raise TypeError(
            f"attach_aux_loss takes two tensors, got {type(out).__name__} and {type(loss).__name__}"
        )
    if not loss.requires_grad or not torch.is_grad_enabled():
        return out
    return _AttachLoss.apply(out, loss)


def expert_bias_update(tokens_per_expert_E: torch.Tensor, rate: float) -> torch.Tensor:
    """DeepSeek-V3's sign rule: the bias change ``rate * sign(mean_load - load_e)``."""
    check_finite("expert_bias_update", "rate", rate)
    _check_load(tokens_per_expert_E, "expert_bias_update")
    load = tokens_per_expert_E.float()
    return rate * torch.sign(load.mean() - load)


def in_backward() -> bool:
    """True while autograd runs a backward pass, e.g. when activation checkpointing
    recomputes this layer's forward: statistics must not be counted twice then. (Under
    torch.compile the check is not traceable; compiled activation checkpointing recomputes
    inside the compiled backward graph, where this Python code does not run.)"""
    if torch.compiler.is_compiling():
        return False
    return torch._C._current_graph_task_id() != -1


def load_stats(tokens_per_expert_E: torch.Tensor) -> dict:
    """Tokens per expert, max/mean and min/mean load, coefficient of variation, dead experts."""
    _check_load(tokens_per_expert_E, "load_stats")
    load = tokens_per_expert_E.detach().float().cpu()
    mean = load.mean().item() if load.numel() else 0.0
    return {
        "tokens_per_expert": load.tolist(),
        "total": load.sum().item(),
        "max_over_mean": (load.max().item() / mean) if mean > 0 else 0.0,
        "min_over_mean": (load.min().item() / mean) if mean > 0 else 0.0,
        "cv": (load.std(unbiased=False).item() / mean) if mean > 0 else 0.0,
        "dead_experts": [i for i, v in enumerate(load.tolist()) if v == 0],
        "num_dead": int((load == 0).sum().item()),
    }


def _check_load(tokens_per_expert_E, what: str) -> None:
    if not isinstance(tokens_per_expert_E, torch.Tensor) or tokens_per_expert_E.dim() != 1:
        raise ValueError(
            f"{what}: tokens_per_expert must be a 1-D tensor [E], got "
            f"{getattr(tokens_per_expert_E, 'shape', type(tokens_per_expert_E).__name__)}"
        )
