"""A small synthetic corpus for ``moekit demo``, made on the fly from distinct domains.

Each training sequence comes from one domain, so every token has a domain label and the
demo can show which experts each domain's tokens are routed to. The tokenizer is byte level
(vocabulary of 128 ASCII codes); nothing is downloaded.

Domains (one generator each, all driven by one ``random.Random`` so a seed fixes the corpus):

* ``arithmetic``: ``12+7=19;40-3=37;6*8=48;``
* ``dna``: ``ACGTTGCAGGTACCA...`` (a random walk over a few repeated motifs)
* ``words``: ``river stone apple cloud ...`` (lowercase English words)
* ``code``: ``x=f(y);if(a<b){c+=1;}return d;``
"""

from __future__ import annotations

import random

import torch

__all__ = ["DOMAINS", "VOCAB_SIZE", "decode", "encode", "make_batch", "make_sequence"]

VOCAB_SIZE = 128

_WORDS = [
    "apple", "river", "stone", "cloud", "green", "table", "light", "house", "water",
    "paper", "music", "heart", "night", "smile", "dream", "plant", "tiger", "horse",
    "bread", "chair", "glass", "sound", "earth", "field", "ocean", "quiet", "happy",
    "brave", "sweet", "small", "north", "south", "storm", "grass", "honey", "lemon",
]
_NAMES = ["x", "y", "n", "i", "acc", "val", "buf", "key"]
_FUNCS = ["f", "g", "len", "max", "sum", "get"]
_MOTIFS = ["ACGT", "GGCC", "TATA", "CAGT", "AATT", "GCGC"]


def _arithmetic(rng: random.Random) -> str:
    a, b = rng.randint(0, 99), rng.randint(0, 99)
    op = rng.choice("+-*")
    if op == "*":
        a, b = a % 13, b % 13
    val = a + b if op == "+" else a - b if op == "-" else a * b
    return f"{a}{op}{b}={val};"


def _dna(rng: random.Random) -> str:
    if rng.random() < 0.5:
        return rng.choice(_MOTIFS)
    return "".join(rng.choice("ACGT") for _ in range(rng.randint(3, 8)))


def _words(rng: random.Random) -> str:
    return rng.choice(_WORDS) + " "


def _code(rng: random.Random) -> str:
    v, w = rng.choice(_NAMES), rng.choice(_NAMES)
    k = rng.randint(0, 9)
    return rng.choice([
        f"{v}={rng.choice(_FUNCS)}({w});",
        f"if({v}<{w}){{{v}+={k};}}",
        f"return {v};",
        f"for({v} in {w}){{{rng.choice(_FUNCS)}({v});}}",
    ])


DOMAINS = {"arithmetic": _arithmetic, "dna": _dna, "words": _words, "code": _code}


def encode(text: str) -> list[int]:
    return [min(ord(c), VOCAB_SIZE - 1) for c in text]


def decode(ids) -> str:
    return "".join(chr(int(i)) for i in ids)


def make_sequence(domain: str, length: int, rng: random.Random) -> str:
    """``length`` characters of ``domain``, starting at a random offset into a run of items."""
    gen = DOMAINS[domain]
    parts, n = [], 0
    while n < length + 16:
        s = gen(rng)
        parts.append(s)
        n += len(s)
    text = "".join(parts)
    start = rng.randint(0, 15)
    return text[start:start + length]


def make_batch(
    batch_size: int, seq_len: int, rng: random.Random, domains: list[str] | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(ids [B, seq_len + 1] int64, domain index [B] int64)``; domains cycle through
    ``DOMAINS`` in order (so every batch holds every domain when ``batch_size >= 4``)."""
    names = list(DOMAINS) if domains is None else domains
    all_names = list(DOMAINS)
    ids, dom = [], []
    for b in range(batch_size):
        d = names[b % len(names)]
        ids.append(encode(make_sequence(d, seq_len + 1, rng)))
        dom.append(all_names.index(d))
    return torch.tensor(ids, dtype=torch.int64), torch.tensor(dom, dtype=torch.int64)
