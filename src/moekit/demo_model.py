"""The model of ``moekit demo``: a byte-level causal language model whose MLP is a moekit MoE.

:class:`TinyMoELM`: embedding + learned positions -> ``n_layers`` pre-norm transformer blocks
(:class:`Block`: causal self-attention, then a :class:`~moekit.MoE` built from a preset's tiny
variant) -> RMSNorm -> head over the byte vocabulary of :mod:`moekit.demo_data`. Trained by
``train_one`` in ``demo.py``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .demo_data import VOCAB_SIZE
from .moe import MoE

__all__ = ["Block", "TinyMoELM"]


class Block(nn.Module):
    """Pre-norm transformer block: x + attn(norm(x)); x + moe(norm(x))."""

    def __init__(self, dim: int, n_heads: int, moe_cfg: MoE.Config):
        super().__init__()
        if dim % n_heads:
            raise ValueError(f"dim={dim} is not divisible by n_heads={n_heads}")
        self.n_heads = n_heads
        self.norm1 = nn.RMSNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)
        self.norm2 = nn.RMSNorm(dim)
        self.moe = moe_cfg.build()

    def forward(self, x_BSD: torch.Tensor) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = self.qkv(self.norm1(x_BSD)).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2)
        a = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True
        )
        x_BSD = x_BSD + self.proj(a.transpose(1, 2).reshape(B, S, D))
        return x_BSD + self.moe(self.norm2(x_BSD))


class TinyMoELM(nn.Module):
    def __init__(self, moe_cfg: MoE.Config, *, n_layers: int, n_heads: int, seq_len: int,
                 vocab_size: int = VOCAB_SIZE):
        super().__init__()
        dim = moe_cfg.dim
        self.embed = nn.Embedding(vocab_size, dim)
        self.pos = nn.Parameter(torch.zeros(seq_len, dim))
        self.blocks = nn.ModuleList(Block(dim, n_heads, moe_cfg) for _ in range(n_layers))
        self.norm = nn.RMSNorm(dim)
        self.head = nn.Linear(dim, vocab_size, bias=False)

    @property
    def moes(self) -> list[MoE]:
        return [b.moe for b in self.blocks]

    def init_weights(self, router_init_std: float) -> None:
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
        nn.init.normal_(self.embed.weight, std=0.5)
        nn.init.normal_(self.pos, std=0.02)
        for i, moe in enumerate(self.moes):
            moe.init_weights(0.02, layer_id=i)
            nn.init.normal_(moe.router.gate.weight, std=router_init_std)

    def forward(self, ids_BS: torch.Tensor) -> torch.Tensor:
        x = self.embed(ids_BS) + self.pos[: ids_BS.shape[1]]
        for b in self.blocks:
            x = b(x)
        return self.head(self.norm(x))
