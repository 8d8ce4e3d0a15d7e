"""MoE: router -> routing plan -> grouped experts -> combine (+ shared experts).

This module holds the layer, :class:`MoE`, and its ``MoE.Config``: the composition, the load
counting, the aux-loss attachment and ``update_expert_bias``. Each stage is its own module
with its own config; the checks of the config and of the forward's inputs are in
``moe_checks.py`` (:func:`check_moe_config`, :func:`check_moe_input`).
Legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from . import balance
from .capacity import sequence_capacity_keep
from .config import Config, Module
from .experts import GroupedExperts, depth_scaled_std
from .moe_checks import check_moe_config, check_moe_input
from .router import RouterOutput, TokenChoiceTopKRouter
from .shared import SharedExperts

__all__ = ["MoE"]


class MoE(Module):
    """A Mixture-of-Experts layer. ``moe(x)`` maps [T, D] or [B, S, D] to the same shape.

    Keyword inputs of ``forward``: ``input_ids`` (hash routing), ``token_mask`` (1/True for real
    tokens, 0/False for padding: padding is excluded from the aux losses and the load counts,
    and still gets an output), ``router_logits`` (precomputed [T, E] logits instead of the gate).

    ``Config.zero_experts`` Z adds Z zero-computation (identity) experts (LongCat-Flash): the
    router chooses among ``num_experts + Z`` (its gate, scores, expert bias and the load counts
    have ``E + Z`` entries, the zero experts last); a slot routed to a zero expert adds
    ``weight * x`` and costs no expert compute.

    After a forward: ``last_router_output`` (the RouterOutput, detached; ``forward_with_routing``
    returns the one inside the autograd graph), ``aux_losses`` (the last values,
    detached, of each active loss, already multiplied by its coefficient),
    ``tokens_per_expert`` (int64 [E] buffer, accumulated across forwards until
    ``update_expert_bias()`` or ``reset_load()``; not counted again when activation
    checkpointing recomputes the forward).

    Optional config fields for layers that do more around the experts:
    ``sequence_capacity`` (each expert takes at most this many routed slots of each sequence,
    the rows of a [B, S, D] input or the whole of a [T, D] one, earliest positions first; the
    others get weight zero, hence zero output and zero gradient: Switch Transformers'
    ``expert_capacity``), ``output_bias`` (a learned [D] bias added to the layer's output,
    JetMoE's) and ``output_norm_eps`` (an RMSNorm with that epsilon and a learned [D] scale on
    the layer's output, after the shared experts and the bias: A.X-K1's post-MLP norm).
    """

    @dataclass(kw_only=True)
    class Config(Config):
        dim: int
        hidden_dim: int
        num_experts: int
        router: Config = field(default_factory=TokenChoiceTopKRouter.Config)
        experts: GroupedExperts.Config = field(default_factory=GroupedExperts.Config)
        shared_experts: SharedExperts.Config | None = None
        capacity_factor: float | None = None
        drop_policy: str = "position"
        load_balance_coeff: float = 0.0
        seq_aux_loss_coeff: float = 0.0
        z_loss_coeff: float = 0.0
        expert_bias_update_rate: float = 1e-3
        sequence_capacity: int | None = None
        output_bias: bool = False
        output_norm_eps: float | None = None
        zero_experts: int = 0

        def __post_init__(self) -> None:
            check_moe_config(self)

        @property
        def top_k(self) -> int:
            return self.router.top_k

        @property
        def router_experts(self) -> int:
            """The experts the router chooses among: the real ones, then the zero experts."""
            return self.num_experts + self.zero_experts

    def __init__(self, config: Config):
        super().__init__()
        self.config = config
        self.dim, self.num_experts = config.dim, config.num_experts
        self.router_experts = config.router_experts  # with the zero experts
        self.router = config.router.build(dim=config.dim, num_experts=self.router_experts)
        self.experts = config.experts.build(
            dim=config.dim, hidden_dim=config.hidden_dim, num_experts=config.num_experts,
            capacity_factor=config.capacity_factor, drop_policy=config.drop_policy,
            num_zero_experts=config.zero_experts,
        )
        self.shared_experts = (
            config.shared_experts.build(dim=config.dim) if config.shared_experts is not None else None
        )
        self.output_bias = (
            torch.nn.Parameter(torch.zeros(config.dim)) if config.output_bias else None
        )
        self.output_norm = (
            torch.nn.RMSNorm(config.dim, eps=config.output_norm_eps)
            if config.output_norm_eps is not None
            else None
        )
        # dispatch/combine across ranks, the sibling of the experts: set by
        # moekit.parallel.apply_ep (expert parallelism); None runs the experts on this
        # process's tokens
        self.dispatch: torch.nn.Module | None = None
        # int64: exact counts, untouched by casting the module to a low-precision dtype
        self.register_buffer(
            "tokens_per_expert", torch.zeros(self.router_experts, dtype=torch.int64), persistent=False
        )
        self.aux_losses: dict[str, torch.Tensor] = {}
        self.last_router_output: RouterOutput | None = None

    def init_weights(self, init_std: float = 0.02, layer_id: int | None = None) -> None:
        """As torchtitan: the first (gate) projections ~ N(0, 0.02); the router gate, the up
        rows of gated projections and the output projections ~ N(0, std) with
        ``std = init_std`` or, given ``layer_id``, the depth-scaled ``init_std / sqrt(2 (layer_id + 1))``."""
        out_std = init_std if layer_id is None else depth_scaled_std(init_std, layer_id)
        self.router.init_weights(out_std)
        self.experts.init_weights(init_std, out_std=out_std)
        if self.shared_experts is not None:
            self.shared_experts.init_weights(init_std, out_std=out_std)
        with torch.no_grad():
            if self.output_bias is not None:
                self.output_bias.zero_()
            if self.output_norm is not None:
                self.output_norm.weight.fill_(1.0)

    # ------------------------------------------------------------------ forward
    def forward(
        self,
        x: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        router_logits: torch.Tensor | None = None,
    ) -> torch.Tensor:
        return self.forward_with_routing(
            x, input_ids=input_ids, token_mask=token_mask, router_logits=router_logits
        )[0]

    def forward_with_routing(
        self,
        x: torch.Tensor,
        *,
        input_ids: torch.Tensor | None = None,
        token_mask: torch.Tensor | None = None,
        router_logits: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, RouterOutput | None]:
        """``forward``, also returning this call's RouterOutput as computed, inside the autograd
        graph (None for an empty input): for a caller whose loss uses the router's logits or
        weights. The module itself keeps only a detached copy (``last_router_output``)."""
        # under expert parallelism (``self.dispatch``) a rank with no tokens must still join the
        # collectives, so it runs the layer on its empty batch; and a rank whose input is bad
        # must not leave the others waiting in a collective: every rank raises together
        all_ranks = self.dispatch is not None
        problem = r = None
        try:
            check_moe_input(
                x, token_mask, router_logits, dim=self.dim, router_experts=self.router_experts,
                router=self.router, experts=self.experts,
            )
            if x.numel() == 0 and not all_ranks:
                self.aux_losses = {}
                self.last_router_output = None
                return x * 0, None  # empty, and still part of the graph
            r = self._route(x, input_ids, router_logits)
        except (ValueError, TypeError) as e:
            if not all_ranks or torch.compiler.is_compiling():
                raise
            problem = e
        if problem is not None:  # every rank raises together: its status travels with the
            self.dispatch.fail_together(problem, x)  # counts exchange the others are in
        shape = x.shape
        x_TD = x.reshape(-1, self.dim)
        T = x_TD.shape[0]
        if self.config.sequence_capacity is not None and T > 0:
            r = self._drop_over_sequence_capacity(r, shape)
        self.last_router_output = r.detach()  # no graph kept between calls (deepcopy, pickle)
        mask_T = None if token_mask is None else token_mask.reshape(-1)

        # routed slots per expert: for the load statistics (not counted again when activation
        # checkpointing recomputes the forward) and the load-balance loss, counted once
        count_stats = not balance.in_backward()
        load_E = None
        if count_stats or self._switch_loss_on():
            with torch.no_grad():
                load_E = balance.count_tokens_per_expert(r.topk_ids, self.router_experts, mask_T)
        if count_stats:
            self.tokens_per_expert += load_E.to(self.tokens_per_expert.device, torch.int64)

        shared_done = False
        if self.dispatch is None:
            y_TD = self.experts(x_TD, r.topk_ids, r.topk_weights)
        elif self.dispatch.overlaps_shared(self.shared_experts):
            # the shared experts compute while the expert-parallel exchanges travel
            y_TD = self.dispatch(x_TD, r.topk_ids, r.topk_weights, self.experts,
                                 self.shared_experts)
            shared_done = True
        else:
            y_TD = self.dispatch(x_TD, r.topk_ids, r.topk_weights, self.experts)
        if self.shared_experts is not None and not shared_done:
            y_TD = y_TD + self.shared_experts(x_TD)
        if self.output_bias is not None:
            y_TD = y_TD + self.output_bias
        if self.output_norm is not None:
            y_TD = self.output_norm(y_TD)
        if T > 0:
            y_TD = self._attach_losses(y_TD, r, mask_T, shape, load_E)
        else:
            self.aux_losses = {}
        return y_TD.reshape(shape), r

    def _drop_over_sequence_capacity(self, r: RouterOutput, shape) -> RouterOutput:
        """``r`` with the weights of the slots beyond ``sequence_capacity`` set to zero (a
        constant mask: no gradient reaches them, as if they had not been routed)."""
        keep = sequence_capacity_keep(
            r.topk_ids, shape[0] if len(shape) == 3 else 1, self.num_experts,
            self.config.sequence_capacity,
        )
        return RouterOutput(
            topk_ids=r.topk_ids, topk_weights=r.topk_weights * keep.to(r.topk_weights.dtype),
            scores=r.scores, logits=r.logits,
        )

    def _route(self, x, input_ids, router_logits) -> RouterOutput:
        kwargs = {}
        if router_logits is not None:
            kwargs["logits"] = router_logits.reshape(-1, router_logits.shape[-1])
        if input_ids is not None:
            kwargs["input_ids"] = input_ids
        r = self.router(x.reshape(-1, self.dim), **kwargs)
        if not isinstance(r, RouterOutput):
            raise TypeError(f"the router must return a RouterOutput, got {type(r).__name__}")
        return r

    def _switch_loss_on(self) -> bool:
        return self.training and self.config.load_balance_coeff > 0

    def _attach_losses(self, y_TD, r: RouterOutput, mask_T, shape, load_E) -> torch.Tensor:
        cfg = self.config
        losses: dict[str, torch.Tensor] = {}
        if self.training:
            if self._switch_loss_on():
                losses["load_balance"] = cfg.load_balance_coeff * balance.switch_aux_loss(
                    r.scores, r.topk_ids, mask_T, load_E
                )
            if cfg.seq_aux_loss_coeff > 0:
                B, S = (shape[0], shape[1]) if len(shape) == 3 else (1, shape[0])
                K = r.topk_ids.shape[1]
                losses["seq_aux"] = cfg.seq_aux_loss_coeff * balance.sequence_aux_loss(
                    r.scores.view(B, S, -1), r.topk_ids.view(B, S, K),
                    None if mask_T is None else mask_T.view(B, S),
                )
            if cfg.z_loss_coeff > 0:
                losses["z_loss"] = cfg.z_loss_coeff * balance.z_loss(r.logits, mask_T)
        self.aux_losses = {k: v.detach() for k, v in losses.items()}
        if losses:
            y_TD = balance.attach_aux_loss(y_TD, sum(losses.values()))
        return y_TD

    # ------------------------------------------------------------ balancing
    @torch.no_grad()
    def update_expert_bias(self, group=None) -> torch.Tensor:
        """Aux-loss-free balancing step (DeepSeek-V3): ``expert_bias += rate *
        sign(mean_load - load)`` from the counts accumulated since the last step (summed over
        ``group``, a data-parallel process group, when given); then reset the counts.
        Returns the change applied."""
        bias = getattr(self.router, "expert_bias", None)
        if bias is None:
            raise ValueError(
                "update_expert_bias() needs router.expert_bias: build the router with use_expert_bias=True"
            )
        if group is not None and not isinstance(group, torch.distributed.ProcessGroup):
            raise TypeError(f"group must be a torch.distributed ProcessGroup or None, got {type(group).__name__}")
        counts = self.tokens_per_expert.clone()
        if group is not None:
            torch.distributed.all_reduce(counts, group=group)
        delta = balance.expert_bias_update(counts, self.config.expert_bias_update_rate)
        bias.add_(delta.to(bias.device, bias.dtype))
        self.reset_load()
        return delta

    def load_stats(self) -> dict:
        """Load since the last reset: tokens per expert, max/mean, min/mean, cv, dead experts."""
        return balance.load_stats(self.tokens_per_expert)

    @torch.no_grad()
    def reset_load(self) -> None:
        self.tokens_per_expert.zero_()
