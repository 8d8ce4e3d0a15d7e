"""Every MoE family of the installed transformers through both routes, against eager.

``python -m moekit.hf.coverage [--write docs/hf.md] [--families a,b]`` (or :func:`run_all`):

1. :func:`find_families` lists the model folders of the installed transformers whose modeling
   file decorates experts with ``@use_experts_implementation`` or builds a sparse MoE block
   (an ``experts`` child next to a ``gate``/``router``).
2. :func:`tiny_config` takes the family's config class with its defaults and shrinks it
   generically (2 layers, hidden 32, 4 experts, top-2, vocabulary 97, ...; the first layer
   forced sparse), then applies :data:`OVERRIDES`, a short table of per-family fixes.
3. :func:`check_family` builds a random fp32 model (routing and zero-initialised biases
   randomised) and runs, against the eager model, ``experts_implementation="moekit"`` and
   ``moekit.hf.patch``: the output (logits, or hidden states for a base model) and the
   gradient of every parameter within 1e-4 of max |reference|.
4. :func:`markdown_table` renders one row per family, each route ``pass``, ``refused``
   (with the reason: a ``PatchError``, or experts transformers does not decorate) or
   ``failed`` (with what differed or crashed); :func:`write_table` puts it into docs/hf.md
   between the ``coverage-table`` markers.
"""

from __future__ import annotations

import copy
import os
import re
import time
import warnings
from dataclasses import dataclass, field

import torch

__all__ = [
    "Family", "Outcome", "FamilyResult", "find_families", "tiny_config", "check_family",
    "run_all", "markdown_table", "write_table", "OVERRIDES",
]

TOL = 1e-4  # max abs diff relative to max |reference|, per tensor
VOCAB = 97
_LAYERS = 2

# per-family fixes on top of the generic shrink (config attribute -> value)
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
    "dbrx": {"attn_config": {"rope_theta": 10000.0, "clip_qkv": 8.0}},
    "step3p7": {"text_config": {"sliding_window": 4}},
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


@dataclass(frozen=True)
class Outcome:
    status: str  # "pass" | "refused" | "failed"
    detail: str = ""

    def cell(self) -> str:
        return self.status if not self.detail else f"{self.status}: {self.detail}"


@dataclass
class FamilyResult:
    family: Family
    moekit: Outcome
    patch: Outcome
    seconds: float = 0.0
    patched: list = field(default_factory=list)


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
_DENSE_FIRST = ("first_k_dense_replace", "first_k_dense", "num_dense_layers")


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

    fam = family if isinstance(family, Family) else _family_by_name(family)
    default = AutoConfig.for_model(fam.model_type)
    kw = _shrunk_kwargs(default)
    for k, v in OVERRIDES.get(fam.name, {}).items():
        if isinstance(v, dict) and isinstance(kw.get(k), dict):
            kw[k] = {**kw[k], **v}
        else:
            kw[k] = v
    return type(default)(**kw)


def _family_by_name(name: str) -> Family:
    fams = {f.name: f for f in find_families()}
    if name not in fams:
        raise ValueError(f"unknown MoE family {name!r}; found: {sorted(fams)}")
    return fams[name]


def build_model(family: Family, seed: int = 0) -> torch.nn.Module:
    """A random fp32 model of the family's tiny config, eager experts, in eval mode."""
    import transformers

    from .tiny import randomize_routing

    cfg = tiny_config(family)
    torch.manual_seed(seed)
    auto = transformers.AutoModelForCausalLM if family.causal_lm else transformers.AutoModel
    model = auto.from_config(cfg, dtype=torch.float32)
    randomize_routing(model, seed)
    if family.decorated:
        model.set_experts_implementation("eager")
    return model.float().eval()


# ------------------------------------------------------------------------------ comparison
def _main_output(out) -> torch.Tensor:
    t = getattr(out, "logits", None)
    if t is None:
        t = getattr(out, "last_hidden_state", None)
    if t is None:
        t = out[0]
    return t


def _inputs(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids):
    torch.manual_seed(1234)  # families that sample in the forward (diffusion noise) see the same
    kw = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    return _main_output(model(input_ids=ids, **kw))


def _run(model, ids, w):
    y = _forward(model, ids).float()
    (y * w[..., : y.shape[-1]]).sum().backward()
    return y.detach()


def _rel_err(got, ref) -> float:
    return (got.float() - ref.float()).abs().max().item() / max(ref.abs().max().item(), 1e-6)


def _compare(y, y_ref, grads, grads_ref) -> str | None:
    e = _rel_err(y, y_ref)
    if e > TOL:
        return f"output differs ({e:.2g} x max|ref|)"
    if set(grads) != set(grads_ref):
        diff = sorted(set(grads) ^ set(grads_ref))
        return f"gradients on one side only: {diff[:3]}"
    worst = max(((_rel_err(grads[n], grads_ref[n]), n) for n in grads_ref), default=(0.0, ""))
    if worst[0] > TOL:
        return f"gradient of {worst[1]} differs ({worst[0]:.2g} x max|ref|)"
    return None


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


def _check_moekit_route(family, ref, ids, w, y_ref, g_ref) -> Outcome:
    from transformers.integrations.moe import ExpertsInterface

    from .experts_impl import EXPERTS_IMPLEMENTATION, moekit_experts_forward

    if not family.decorated:
        return Outcome("refused", "experts not decorated by transformers")
    calls = []

    def counting(self, *a, **k):
        calls.append(1)
        return moekit_experts_forward(self, *a, **k)

    mapping = ExpertsInterface._global_mapping
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    try:
        mapping[EXPERTS_IMPLEMENTATION] = counting
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        y = _run(model, ids, w)
    except Exception as e:  # a crash is a result of the table
        return Outcome("failed", _short(e))
    finally:
        mapping[EXPERTS_IMPLEMENTATION] = moekit_experts_forward
    if not calls:
        return Outcome("failed", "moekit's experts function was never called")
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    why = _compare(y, y_ref, g, g_ref)
    return Outcome("failed", why) if why else Outcome("pass")


def _check_patch_route(ref, ids, w, y_ref, g_ref) -> tuple[Outcome, list]:
    from . import patching
    from .layout import PatchError

    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    try:
        with warnings.catch_warnings():  # "build the optimizer after patch": not for here
            warnings.simplefilter("ignore")
            names = patching.patch(model, strict=False)
    except PatchError as e:
        return Outcome("refused", " ".join(str(e).split())), []
    except Exception as e:
        return Outcome("failed", "patch crashed: " + _short(e)), []
    if names.skipped:
        n = len(names) + len(names.skipped)
        first = " ".join(next(iter(names.skipped.values())).split())
        return Outcome("refused", f"{len(names.skipped)} of {n} blocks, e.g. {first}"), []
    if not names:
        return Outcome("failed", "patch found no MoE block"), []
    try:
        y = _run(model, ids, w)
    except Exception as e:
        return Outcome("failed", "patched forward crashed: " + _short(e)), list(names)
    why = _compare(y, y_ref, patching.grads_by_hf_name(model), g_ref)
    return (Outcome("failed", why) if why else Outcome("pass")), list(names)


def check_family(family: Family | str, seed: int = 0) -> FamilyResult:
    """Both routes of one family against its eager model (see the module docstring)."""
    fam = family if isinstance(family, Family) else _family_by_name(family)
    t0 = time.perf_counter()
    try:
        ref = build_model(fam, seed)
        ids = _inputs()
        y0 = _forward(ref, ids)
        w = torch.randn(y0.shape, generator=torch.Generator().manual_seed(5))
        ref.zero_grad(set_to_none=True)
        y_ref = _run(ref, ids, w)
    except Exception as e:
        bad = Outcome("failed", "the tiny eager model does not run: " + _short(e))
        return FamilyResult(fam, bad, bad, time.perf_counter() - t0)
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    m = _check_moekit_route(fam, ref, ids, w, y_ref, g_ref)
    p, names = _check_patch_route(ref, ids, w, y_ref, g_ref)
    return FamilyResult(fam, m, p, time.perf_counter() - t0, names)


def run_all(families=None, *, log=None) -> list[FamilyResult]:
    """:func:`check_family` for every family of :func:`find_families` (or ``families``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    fams = find_families()
    if families is not None:
        want = set(families)
        unknown = want - {f.name for f in fams}
        if unknown:
            found = [f.name for f in fams]
            raise ValueError(f"unknown MoE families {sorted(unknown)}; found: {found}")
        fams = [f for f in fams if f.name in want]
    out = []
    for f in fams:
        r = check_family(f)
        if log is not None:
            log(f"{f.name:24s} moekit: {r.moekit.cell()[:70]:70s} patch: {r.patch.cell()[:90]} "
                f"({r.seconds:.1f}s)")
        out.append(r)
    return out


# ------------------------------------------------------------------------------ table
def summary(results: list[FamilyResult]) -> dict:
    def count(route):
        c = {"pass": 0, "refused": 0, "failed": 0}
        for r in results:
            c[getattr(r, route).status] += 1
        return c

    return {
        "families": len(results),
        "decorated": sum(r.family.decorated for r in results),
        "moekit": count("moekit"),
        "patch": count("patch"),
    }


def markdown_table(results: list[FamilyResult]) -> str:
    import transformers

    s = summary(results)
    m, p = s["moekit"], s["patch"]
    lines = [
        f"transformers {transformers.__version__}: {s['families']} MoE families "
        f"({s['decorated']} with decorated experts). "
        f"`experts_implementation=\"moekit\"`: {m['pass']} pass, {m['refused']} refused, "
        f"{m['failed']} failed. `patch`: {p['pass']} pass, {p['refused']} refused, "
        f"{p['failed']} failed.",
        "",
        "| family | model type | `experts_implementation=\"moekit\"` | `patch` |",
        "|---|---|---|---|",
    ]
    for r in results:
        cells = [c.cell().replace("|", "\\|") for c in (r.moekit, r.patch)]
        lines.append(f"| {r.family.name} | {r.family.model_type} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- coverage-table:begin -->", "<!-- coverage-table:end -->"


def write_table(path: str, results: list[FamilyResult]) -> None:
    """Replace the text between the coverage-table markers of ``path`` by the table."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{markdown_table(results)}{END}{tail}")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m moekit.hf.coverage",
        description="Check every MoE family of the installed transformers through both routes.",
    )
    ap.add_argument("--families", help="comma-separated family names (default: all)")
    ap.add_argument("--write", metavar="MD", help="write the table into MD (e.g. docs/hf.md)")
    a = ap.parse_args(argv)
    fams = a.families.split(",") if a.families else None
    results = run_all(fams, log=print)
    print()
    print(markdown_table(results))
    if a.write:
        write_table(a.write, results)
        print(f"wrote the table into {a.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
