"""Every MoE family of the installed transformers, and a tiny random model of each.

:func:`find_families` lists the model folders whose modeling file decorates experts with
``@use_experts_implementation`` or builds a sparse MoE block (an ``experts`` child next to a
``gate``/``router``). :func:`tiny_config` takes the family's config class with its defaults
and shrinks it generically (2 layers, hidden 32, 4 experts, top-2, vocabulary 97, ...; MoE
on every layer), then applies :data:`OVERRIDES`, a short table of per-family fixes;
:func:`build_model` makes a random fp32 model of it (moekit.hf.coverage compares the routes).
"""

from __future__ import annotations

import copy
import os
import re
from dataclasses import dataclass

import torch

__all__ = ["Family", "find_families", "tiny_config", "build_model", "family_by_name", "OVERRIDES"]

VOCAB = 97
_LAYERS = 2

OVERRIDES: dict[str, dict] = {
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "dots1": {"n_shared_experts": 1},
    "lfm2_moe": {"layer_types": ["conv", "full_attention"]},
    "jamba": {"attn_layer_period": 2, "attn_layer_offset": 1, "expert_layer_period": 1,
              "expert_layer_offset": 0},
    "granitemoehybrid": {"layer_types": ["mamba", "attention"]},
    "glm4v_moe": {"head_dim": 16, "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "partial_rotary_factor": 0.5,
        "mrope_section": [2, 1, 1]}},
    "ernie4_5_vl_moe": {"text_config": {"moe_intermediate_size": [16, 8], "rope_parameters": {
        "rope_type": "default", "rope_theta": 10000.0, "mrope_section": [1, 1, 2]}}},
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0},
             "ffn_config": {"moe_top_k": 2}},
    "step3p7": {"text_config": {"sliding_window": 4}},
    # training-only noise (router jitter, dropout inside the experts) that patch refuses
    "switch_transformers": {"router_jitter_noise": 0.0, "dropout_rate": 0.0},
    "qwen4_exp": {"indexer_budget": 8, "indexer_compress_ratio": 4, "indexer_n_heads": 2,
                  "indexer_kv_heads": 1, "indexer_head_dim": 8},
}


@dataclass(frozen=True)
class Family:
    """One MoE family: its transformers model folder, the model type built, whether its
    experts are ``@use_experts_implementation``-decorated."""

    name: str
    model_type: str
    decorated: bool
    causal_lm: bool


# ------------------------------------------------------------------------------ discovery
def find_families() -> list[Family]:
    """Every MoE family of the installed transformers (by reading its modeling sources)."""
    import transformers
    from transformers.models.auto import modeling_auto as ma
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES

    root = os.path.join(os.path.dirname(transformers.__file__), "models")
    out = []
    for d in sorted(os.listdir(root)):
        path = os.path.join(root, d, f"modeling_{d}.py")
        if not os.path.exists(path):
            continue
        with open(path, encoding="utf-8") as f:
            src = f.read()
        decorated = "@use_experts_implementation" in src
        block = bool(re.search(r"self\.experts\s*=", src)) and bool(
            re.search(r"self\.(gate|router)\s*=", src)
        )
        if not (decorated or block):
            continue
        types = [mt for mt in CONFIG_MAPPING_NAMES if mt == d or mt.startswith(d + "_")]
        clm = ma.MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
        base = ma.MODEL_MAPPING_NAMES
        # the text model where there is one, a causal LM before a base model
        order = [f"{d}_text", d] + [t for t in types if t.endswith("_text")]
        mt = next((t for t in order if t in clm), None) or next(
            (t for t in order if t in base), None
        )
        if mt is None:
            continue
        out.append(Family(d, mt, decorated, mt in clm))
    return out


# ------------------------------------------------------------------------------ tiny config
_SIZES = {
    "hidden_size": 32,
    "intermediate_size": 24,
    "moe_intermediate_size": 16,
    "expert_intermediate_size": 16,
    "shared_expert_intermediate_size": 16,
    "ffn_hidden_size": 24,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 8,
    "max_position_embeddings": 64,
    "kv_lora_rank": 8,
    "q_lora_rank": 8,
    "qk_rope_head_dim": 4,
    "qk_nope_head_dim": 4,
    "v_head_dim": 8,
    "vocab_size": VOCAB,
    "index_head_dim": 8,
    "index_n_heads": 2,
    "linear_key_head_dim": 8,
    "linear_value_head_dim": 8,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
    "linear_head_dim": 8,
    "linear_num_heads": 4,
    "vocab_size_per_layer_input": VOCAB,
    "expert_ffn_hidden_size": 16,
    "d_model": 32,
    "n_heads": 4,
    "kv_n_heads": 2,
    "mamba_n_heads": 4,
    "mamba_d_state": 8,
    "mamba_d_head": 16,
    "zero_expert_num": 2,
    "d_ff": 24,
    "d_kv": 8,
    "num_heads": 4,
    "hidden_size_per_layer_input": 8,
}
_NONE_OK = ("moe_intermediate_size", "head_dim")  # None in some defaults (MoE off): set it
_EXPERTS = ("num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts")
_TOPK = ("num_experts_per_tok", "num_experts_per_token", "moe_topk", "top_k", "moe_k",
         "top_k_experts")
_DENSE_FIRST = (
    "first_k_dense_replace", "first_k_dense", "num_dense_layers", "moe_layer_start_index",
)


def _shrink_layers(d: dict, old: int) -> int:
    """Cut the per-layer lists of a config to the new layer count (every kind of layer kept
    once, MoE on every layer); return that count."""
    lists = {k: v for k, v in d.items() if isinstance(v, list) and len(v) == old and old > 1}
    n = _LAYERS
    for k, v in lists.items():
        if all(isinstance(x, str) for x in v):
            if "sparse" in v:
                continue
            n = max(n, min(4, len(dict.fromkeys(v))))
    for k, v in lists.items():
        if all(isinstance(x, str) for x in v):
            if "sparse" in v:
                d[k] = ["sparse"] * n
            else:
                distinct = list(dict.fromkeys(v))
                d[k] = (distinct + [v[0]] * n)[:n]
        elif v == list(range(old)):
            d[k] = list(range(n))
        else:
            d[k] = v[:n]
    return n


def _shrunk_kwargs(cfg) -> dict:
    """The constructor arguments that shrink a default config ``cfg`` (sub-configs as
    dicts of theirs), so that fields derived in the config's constructor follow."""
    d = dict(vars(cfg))
    old_layers = d.get("num_hidden_layers")
    for k in ("num_layers", "n_layers"):  # a layer count the hidden one is derived from
        if _is_int(d.get(k)) and d[k] > 1:
            d[k] = 1 if old_layers == 2 * d[k] else _LAYERS
            old_layers = None
    for k, v in _SIZES.items():
        if k in d and (d[k] is None and k in _NONE_OK or _is_int(d[k])):
            d[k] = v
    if _is_int(vars(cfg).get("qk_rope_head_dim")) and vars(cfg)["qk_rope_head_dim"] == 0:
        d["qk_rope_head_dim"] = 0  # no rope (DSA layers): keep it so
    if _is_int(d.get("qk_rope_head_dim")):  # MLA: rope on qk_rope_head_dim features
        prf = d.get("partial_rotary_factor")
        rope = d["qk_rope_head_dim"]
        d["head_dim"] = int(rope / prf) if isinstance(prf, float) and 0 < prf < 1 else rope
        if "qk_head_dim" in d:
            d["qk_head_dim"] = d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
        if "kv_lora_rank" in d and _is_int(d.get("num_key_value_heads")):
            d["num_key_value_heads"] = d["num_attention_heads"]
    if _is_int(old_layers):
        d["num_hidden_layers"] = _shrink_layers(d, old_layers)
    for k in _EXPERTS:
        if k in d and (d[k] is None or _is_int(d[k]) and d[k] > 1):
            d[k] = 4
    for k in _TOPK:
        if k in d and (d[k] is None or _is_int(d[k]) and d[k] > 1):
            d[k] = 2
    for k in ("n_group", "num_expert_group", "num_group", "moe_n_group"):
        if _is_int(d.get(k)) and d[k] > 1:
            d[k] = 2
            if _is_int(d.get("topk_group")):
                d["topk_group"] = 1
    for k in _DENSE_FIRST:
        if _is_int(d.get(k)) and d[k] > 0:
            d[k] = 0
    for k in ("num_decoder_layers",):
        if _is_int(d.get(k)) and d[k] > _LAYERS:
            d[k] = _LAYERS
    for k in ("decoder_sparse_step", "encoder_sparse_step", "moe_layer_freq", "expert_interval"):
        if _is_int(d.get(k)) and d[k] > 1:
            d[k] = 1
    for k in ("enable_moe_block", "use_moe"):
        if d.get(k) is False:
            d[k] = True
    if "mlp_layer_types" in d and d["mlp_layer_types"] is None:
        d["mlp_layer_types"] = ["sparse"] * d.get("num_hidden_layers", _LAYERS)
    if isinstance(d.get("mlp_only_layers"), list):
        d["mlp_only_layers"] = []
    for k in ("pad_token_id", "bos_token_id", "eos_token_id"):
        v = d.get(k)
        if _is_int(v) and v >= VOCAB:
            d[k] = {"pad_token_id": 0, "eos_token_id": 1, "bos_token_id": 2}[k]
        elif isinstance(v, list):
            d[k] = [t if t < VOCAB else 1 for t in v]
    _shrink_rope(d)
    d["initializer_range"] = 0.2
    out = {k: v for k, v in d.items() if v is not vars(cfg).get(k) and not k.startswith("_")}
    for k, v in vars(cfg).items():
        if v is not cfg and type(v).__name__.endswith("Config") and hasattr(v, "to_dict"):
            out[k] = _shrunk_kwargs(v)
    return out


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _shrink_rope(d: dict) -> None:
    """Multimodal rope sections must add up to the (smaller) rotary half-dimension."""
    hd = d.get("qk_rope_head_dim") or d.get("head_dim") or 8
    rps = copy.deepcopy(d.get("rope_parameters"))
    d["rope_parameters"] = rps
    for rp in [rps] + (list(rps.values()) if isinstance(rps, dict) else []):
        if isinstance(rp, dict) and isinstance(rp.get("mrope_section"), list):
            half = int(hd * rp.get("partial_rotary_factor", 1.0)) // 2
            sec = rp["mrope_section"]
            new = [max(1, half * x // sum(sec)) for x in sec]
            new[0] += half - sum(new)
            rp["mrope_section"] = new


def tiny_config(family: Family | str):
    """The family's config class with its defaults, shrunk, with :data:`OVERRIDES`."""
    from transformers import AutoConfig

    fam = family if isinstance(family, Family) else family_by_name(family)
    default = AutoConfig.for_model(fam.model_type)
    kw = _shrunk_kwargs(default)
    for k, v in OVERRIDES.get(fam.name, {}).items():
        if isinstance(v, dict) and isinstance(kw.get(k), dict):
            kw[k] = {**kw[k], **v}
        else:
            kw[k] = v
    return type(default)(**kw)


def family_by_name(name: str) -> Family:
    fams = {f.name: f for f in find_families()}
    if name not in fams:
        raise ValueError(f"unknown MoE family {name!r}; found: {sorted(fams)}")
    return fams[name]


def _randomize_hash_tables(model: torch.nn.Module, seed: int) -> None:
    """Token-id -> experts tables of hash routing (DeepSeek-V4's ``tid2eid``) start as zeros:
    every token on expert 0 twice, which makes the routing weights constant (and their
    gradient zero). Give each token distinct random experts instead."""
    g = torch.Generator().manual_seed(seed + 2)
    for name, b in model.named_buffers():
        if name.endswith("tid2eid") and b.dim() == 2 and not b.is_floating_point():
            n_exp = int(getattr(model.config.get_text_config(), "n_routed_experts", 0) or 0)
            n_exp = n_exp or int(b.max()) + b.shape[1]
            rows = [torch.randperm(n_exp, generator=g)[: b.shape[1]] for _ in range(b.shape[0])]
            b.copy_(torch.stack(rows).to(b.dtype))


def build_model(family: Family, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of the family's tiny config, eager experts, in eval mode."""
    import transformers

    from .tiny import randomize_routing

    cfg = tiny_config(family)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if family.causal_lm else transformers.AutoModel
    model = auto.from_config(cfg, dtype=torch.float32)
    randomize_routing(model, seed)
    _randomize_hash_tables(model, seed)
    if family.decorated:
        model.set_experts_implementation("eager")
    return model.float().eval()
