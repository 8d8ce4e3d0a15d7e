"""Token-choice top-k routing: TokenChoiceTopKRouter (with its ``Config``) and RouterOutput.

The router only decides which experts each token goes to and with what weight; it never
touches expert weights. The checks of ``TokenChoiceTopKRouter.Config`` are in
``router_checks.py`` (:func:`check_router_config`, :func:`check_router_num_experts`).
Legend: T tokens, D model dim, E experts, K top-k, G expert groups.

Routing orders
--------------
* score-then-topk (DeepSeek-V3, Qwen3, Qwen2, Mixtral, OLMoE): ``scores = score_func(logits)``
  over all experts; the experts are *selected* on ``scores + expert_bias`` (the aux-loss-free
  bias only changes which experts are picked); with group-limited routing each of the G groups
  is scored by the sum of its top-2 biased scores and only ``num_limited_groups`` groups stay
  eligible. The *weights* are the unbiased scores of the picked experts.
* topk-then-score (GPT-OSS, Llama 4): select the top-k of the logits (the router bias, if any,
  is part of the gate Linear; the aux-loss-free ``expert_bias``, if any, is added for the
  selection only); the weights are then ``softmax`` over the k picked logits
  (GPT-OSS) or their ``sigmoid`` (Llama 4).
  ``score_func="sqrtsoftplus"`` (DeepSeek-V4) scores each logit by ``sqrt(softplus(l))``, an
  elementwise score like the sigmoid.
* sparsemixer (PhiMoE): two picks, each the largest eligible logit with its weight the softmax
  over the experts whose logits are within ``2 * sparsemixer_eps`` (relative) of it; in
  training the picks are sampled, as transformers' PhiMoE does (:mod:`moekit.sparsemixer`).
  ``top_k=2`` and ``score_func="softmax"`` (the ``scores`` the aux losses read).
* hash (Hash Layers): a fixed table maps each token id to K experts; ``forward`` needs
  ``input_ids``. ``hash_weights="uniform"`` gives every pick weight ``1/K``; ``"scores"`` takes
  ``score_func(logits)`` at the picked experts (so the gate still learns).

Then, in every order: ``route_norm`` divides the picked weights by their sum (+1e-20) — with
``top_k=1`` and softmax/sigmoid weights this makes every weight 1 (allowed, and sometimes
what a model does) — and the weights are multiplied by ``route_scale``.

``router_dtype`` (default float32) is the dtype of the gate matmul and of all routing math,
whatever the input dtype (for a bf16 input and gate on a GPU the fp32 matmul runs on tensor
cores with exact products, ``moekit.ops.gate``). ``router_dtype=None`` runs the gate matmul in
the input dtype and the scoring in float32 (what Hugging Face models do; use it for bit-parity
with them).
``force_load_balance`` (debug) replaces the selection by a round-robin assignment, keeping
the weights computed as the routing order prescribes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from .config import Config, Module, check_positive
from .ops.gate import fp32_gate_applies, fp32_gate_logits
from .router_checks import check_router_config, check_router_num_experts
from .sparsemixer import sparsemixer_top2

__all__ = ["RouterOutput", "TokenChoiceTopKRouter"]


@dataclass
class RouterOutput:
    """What a router returns. Any module returning this can stand in for the router."""

    topk_ids: torch.Tensor  # int64 [T, K]
    topk_weights: torch.Tensor  # [T, K], router dtype (float32 by default)
    scores: torch.Tensor  # [T, E] score_func(logits), float32
    logits: torch.Tensor  # [T, E]

    @property
    def num_tokens(self) -> int:
        return self.topk_ids.shape[0]

    def detach(self) -> RouterOutput:
        """The same values outside the autograd graph (what a module may keep between calls)."""
        return RouterOutput(
            topk_ids=self.topk_ids.detach(), topk_weights=self.topk_weights.detach(),
            scores=self.scores.detach(), logits=self.logits.detach(),
        )


def _round_robin_ids(T: int, K: int, E: int, device: torch.device) -> torch.Tensor:
    """Each token gets K distinct experts and every expert the same load (within one)."""
    base = torch.arange(T, device=device).unsqueeze(1) * K + torch.arange(K, device=device)
    return base % E


class TokenChoiceTopKRouter(Module):
    @dataclass(kw_only=True)
    class Config(Config):
        top_k: int = 1
        score_func: str = "softmax"
        route_norm: bool = False
        route_scale: float = 1.0
        topk_before_score: bool = False
        use_router_bias: bool = False
        use_expert_bias: bool = False
        num_expert_groups: int | None = None
        num_limited_groups: int | None = None
        group_score: str = "top2_sum"
        # top_k above the experts of the kept groups: False rejects the config; True picks the
        # rest from the masked groups in torch.topk's order of their -inf ties (transformers'
        # DeepSeek-V3 routes such configs that way)
        topk_beyond_groups: bool = False
        router_dtype: torch.dtype | None = torch.float32
        force_load_balance: bool = False
        routing: str = "learned"
        hash_vocab_size: int | None = None
        hash_weights: str = "uniform"
        hash_seed: int = 0
        sparsemixer_eps: float = 0.01

        def __post_init__(self) -> None:
            check_router_config(self)

        def validate_for(self, num_experts: int) -> None:
            check_router_num_experts(self, num_experts)

    def __init__(self, config: Config, *, dim: int, num_experts: int):
        super().__init__()
        check_positive("TokenChoiceTopKRouter", "dim", dim)
        check_positive("TokenChoiceTopKRouter", "num_experts", num_experts)
        config.validate_for(num_experts)
        self.config = config
        self.dim, self.num_experts, self.top_k = dim, num_experts, config.top_k
        self.gate = nn.Linear(dim, num_experts, bias=config.use_router_bias)
        if config.use_expert_bias:
            self.register_buffer("expert_bias", torch.zeros(num_experts, dtype=torch.float32))
        else:
            self.expert_bias = None
        if config.routing == "hash":
            self.register_buffer("hash_table", self._make_hash_table(), persistent=True)
        else:
            self.hash_table = None

    def _make_hash_table(self) -> torch.Tensor:
        """[vocab, K] distinct experts per token id, balanced, fixed by ``hash_seed``."""
        cfg = self.config
        g = torch.Generator().manual_seed(cfg.hash_seed)
        V, K, E = cfg.hash_vocab_size, self.top_k, self.num_experts
        # K consecutive positions of a fixed random permutation of the experts, from a random
        # start per token id: the K picks are distinct and every expert equally likely
        first = torch.randint(0, E, (V, 1), generator=g)
        perm = torch.randperm(E, generator=g)
        pos = (first + torch.arange(K)) % E
        return perm[pos]

    def _apply(self, fn, recurse=True):
        # the aux-loss-free bias stays float32 whatever the module is cast to: its 1e-3
        # steps would vanish in bfloat16
        super()._apply(fn, recurse)
        if self.expert_bias is not None and self.expert_bias.dtype != torch.float32:
            self.expert_bias = self.expert_bias.float()
        return self

    def init_weights(self, init_std: float = 0.02) -> None:
        nn.init.trunc_normal_(self.gate.weight, mean=0.0, std=init_std)
        if self.gate.bias is not None:
            nn.init.zeros_(self.gate.bias)
        if self.expert_bias is not None:
            self.expert_bias.zero_()

    def _score(self, logits: torch.Tensor) -> torch.Tensor:
        if self.config.score_func == "softmax":
            return torch.softmax(logits, dim=-1)
        if self.config.score_func == "sqrtsoftplus":
            return F.softplus(logits).sqrt()
        return torch.sigmoid(logits)

    def compute_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        dt = self.config.router_dtype
        if dt is None:
            return self.gate(x_TD)
        if dt == torch.float32 and fp32_gate_applies(x_TD, self.gate.weight):
            return fp32_gate_logits(x_TD, self.gate.weight, self.gate.bias)
        w = self.gate.weight.to(dt)
        b = None if self.gate.bias is None else self.gate.bias.to(dt)
        return F.linear(x_TD.to(dt), w, b)

    def _group_mask(self, choice_TE: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        T, E = choice_TE.shape
        G = cfg.num_expert_groups
        grouped = choice_TE.view(T, G, E // G)
        if cfg.group_score == "top2_sum":
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)
        else:
            group_scores = grouped.amax(dim=-1)
        keep = group_scores.topk(cfg.num_limited_groups, dim=-1).indices  # [T, G']
        mask = torch.ones(T, G, dtype=torch.bool, device=choice_TE.device)
        mask.scatter_(1, keep, False)
        return choice_TE.masked_fill(mask.repeat_interleave(E // G, dim=1), float("-inf"))

    def forward(
        self,
        x_TD: torch.Tensor | None = None,
        *,
        logits: torch.Tensor | None = None,
        input_ids: torch.Tensor | None = None,
    ) -> RouterOutput:
        """Route ``x_TD`` ([T, D]), or precomputed ``logits`` ([T, E]) when given."""
        cfg = self.config
        if logits is None:
            if x_TD is None:
                raise ValueError("router needs x_TD or precomputed logits")
            if x_TD.dim() != 2 or x_TD.shape[-1] != self.dim:
                raise ValueError(f"router input must be [T, {self.dim}], got {tuple(x_TD.shape)}")
            if not x_TD.is_floating_point():
                raise TypeError(f"router input must be a floating tensor, got {x_TD.dtype}")
            logits = self.compute_logits(x_TD)
        elif logits.dim() != 2 or logits.shape[-1] != self.num_experts:
            raise ValueError(f"logits must be [T, {self.num_experts}], got {tuple(logits.shape)}")
        work_dt = cfg.router_dtype if cfg.router_dtype in (torch.float32, torch.float64) else torch.float32
        logits_w = logits.to(work_dt)
        T, K, E = logits.shape[0], self.top_k, self.num_experts
        scores = self._score(logits_w)

        if cfg.routing == "hash":
            if input_ids is None:
                raise ValueError("routing='hash' needs input_ids (the token ids), shape [T] or [B, S]")
            if not isinstance(input_ids, torch.Tensor) or input_ids.is_floating_point() or input_ids.is_complex():
                raise TypeError(
                    "routing='hash' needs integer input_ids (token ids), got "
                    f"{getattr(input_ids, 'dtype', type(input_ids).__name__)}"
                )
            ids = input_ids.reshape(-1)
            if ids.shape[0] != T:
                raise ValueError(f"input_ids has {ids.shape[0]} tokens, the input has {T}")
            if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= cfg.hash_vocab_size):
                raise ValueError(f"input_ids must lie in [0, {cfg.hash_vocab_size}) (hash_vocab_size)")
            topk_ids = self.hash_table[ids.to(torch.int64)]
            if cfg.hash_weights == "uniform":
                weights = torch.full((T, K), 1.0 / K, dtype=work_dt, device=logits.device)
            else:
                weights = scores.gather(1, topk_ids)
        elif cfg.routing == "sparsemixer":
            topk_ids, weights = sparsemixer_top2(logits_w, cfg.sparsemixer_eps, self.training)
        elif cfg.topk_before_score:
            if cfg.force_load_balance:
                topk_ids = _round_robin_ids(T, K, E, logits.device)
            elif self.expert_bias is not None:  # the bias changes the pick, not the weights
                topk_ids = (logits_w + self.expert_bias.to(work_dt)).topk(K, dim=-1).indices
            else:
                topk_ids = logits_w.topk(K, dim=-1).indices
            picked = logits_w.gather(1, topk_ids)
            weights = self._score(picked)  # softmax over the k picked; elementwise otherwise
        else:
            choice = scores
            if self.expert_bias is not None:
                choice = choice + self.expert_bias.to(work_dt)
            if cfg.num_expert_groups is not None:
                choice = self._group_mask(choice)
            if cfg.force_load_balance:
                topk_ids = _round_robin_ids(T, K, E, logits.device)
            else:
                topk_ids = choice.topk(K, dim=-1).indices
            weights = scores.gather(1, topk_ids)

        if cfg.route_norm:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        if cfg.route_scale != 1.0:
            weights = weights * cfg.route_scale
        return RouterOutput(topk_ids=topk_ids, topk_weights=weights, scores=scores, logits=logits)
