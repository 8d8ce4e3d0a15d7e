"""End-to-end model benchmark: a transformers MoE model of a family's real layer dimensions
(a few layers, random weights) timed for one training step and one prefill, with its experts
run by transformers' ``grouped_mm``, by ``experts_implementation="moekit"`` and by
``moekit.hf.patch`` (the whole sparse block replaced by :class:`moekit.MoE`).

Each row reports the median time (the modes alternated over a few rounds), tokens/s, the peak
memory above the model's own, and the relative error of the prefill logits against an fp32 run
of the same weights. The same model object (same weights, same inputs) serves every row of a
family, so the rows compare only the experts' path. Used by ``benchmarks/bench_model.py``;
``run(..., tiny=True)`` builds small models for tests on CPU.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import asdict, dataclass

import torch

__all__ = ["FAMILIES", "ModelRow", "build_model", "run", "format_table"]

# the families' real layer dimensions (the vocabulary is shrunk to keep the LM head out of
# the way; deepseek_v3 keeps 64 of its 256 routed experts, the share of one GPU at EP=4)
FAMILIES: dict[str, dict] = {
    "qwen3_moe": dict(
        hidden_size=2048, intermediate_size=6144, moe_intermediate_size=768, num_experts=128,
        num_experts_per_tok=8, num_attention_heads=32, num_key_value_heads=4, head_dim=128,
        norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
    ),
    "olmoe": dict(
        hidden_size=2048, intermediate_size=1024, num_experts=64, num_experts_per_tok=8,
        num_attention_heads=16, num_key_value_heads=16,
    ),
    "gpt_oss": dict(
        hidden_size=2880, intermediate_size=2880, num_local_experts=32, num_experts_per_tok=4,
        num_attention_heads=64, num_key_value_heads=8, head_dim=64, sliding_window=128,
    ),
    "deepseek_v3": dict(
        hidden_size=7168, intermediate_size=18432, moe_intermediate_size=2048,
        n_routed_experts=64, num_experts_per_tok=8, n_group=8, topk_group=4, n_shared_experts=1,
        first_k_dense_replace=0, num_attention_heads=128, num_key_value_heads=128,
        q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, routed_scaling_factor=2.5, norm_topk_prob=True,
    ),
}
# GPT-OSS's attention sinks need the eager attention in transformers
_ATTN = {"gpt_oss": "eager"}
MODES = ("grouped_mm", "moekit", "patch")


def _tiny(family: str) -> dict:
    """The family's config shrunk for a CPU test (same structure, small numbers)."""
    cfg = dict(FAMILIES[family])
    small = dict(hidden_size=64, intermediate_size=96, moe_intermediate_size=32,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 q_lora_rank=32, kv_lora_rank=16, qk_nope_head_dim=16, qk_rope_head_dim=8,
                 v_head_dim=16)
    for k, v in small.items():
        if k in cfg:
            cfg[k] = v
    for k in ("num_experts", "num_local_experts", "n_routed_experts"):
        if k in cfg:
            cfg[k] = 8
    cfg["num_experts_per_tok"] = 2
    if family == "olmoe":
        cfg["intermediate_size"] = 32
    if family == "gpt_oss":
        cfg["intermediate_size"] = 32
    if family == "deepseek_v3":
        cfg.update(n_group=2, topk_group=1, num_key_value_heads=4)
    return cfg


def build_model(family: str, *, layers: int, vocab: int, dtype: torch.dtype, device,
                tiny: bool = False, seed: int = 0):
    """A randomly initialised causal LM of ``family``'s layer dimensions (``tiny``: small)."""
    from transformers import AutoConfig, AutoModelForCausalLM

    if family not in FAMILIES:
        raise ValueError(f"family={family!r} is not benchmarked; allowed: {sorted(FAMILIES)}")
    fields = _tiny(family) if tiny else FAMILIES[family]
    config = AutoConfig.for_model(family, num_hidden_layers=layers, vocab_size=vocab, **fields)
    if family == "gpt_oss":
        config.layer_types = ["sliding_attention" if i % 2 == 0 else "full_attention"
                              for i in range(layers)]
    config._attn_implementation = _ATTN.get(family, "sdpa")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.set_experts_implementation("grouped_mm")
    return model


@dataclass
class ModelRow:
    family: str
    mode: str
    tokens: int
    train_ms: float
    train_tokens_per_s: float
    train_peak_gib: float
    prefill_ms: float
    prefill_tokens_per_s: float
    logits_rel_err: float


def _sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


def _times_ms(fn, device, warmup: int, iters: int) -> list[float]:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(iters):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append((time.perf_counter() - t0) * 1e3)
    return times


def _peak_gib(fn, device) -> float:
    if torch.device(device).type != "cuda":
        return float("nan")
    _sync(device)
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    _sync(device)
    return (torch.cuda.max_memory_allocated() - base) / 2**30


def _set_mode(model, mode: str):
    """Put ``model`` in ``mode``; returns the undo."""
    import moekit.hf as mh

    if mode == "patch":
        model.set_experts_implementation("grouped_mm")
        mh.patch(model)
        return lambda: mh.unpatch(model)
    model.set_experts_implementation(mode)
    return lambda: model.set_experts_implementation("grouped_mm")


def _rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.float() - ref).norm() / ref.norm().clamp_min(1e-30)).item()


def bench_family(family: str, *, layers: int = 2, batch: int = 4, seq: int = 2048,
                 vocab: int = 32768, dtype: torch.dtype = torch.bfloat16, device="cuda",
                 modes=MODES, warmup: int = 2, iters: int = 5, rounds: int = 3,
                 tiny: bool = False, seed: int = 0) -> list[ModelRow]:
    """One row per mode: the medians over ``rounds`` rounds, each of which puts the model in
    every mode in turn (``warmup`` untimed steps, then ``iters`` timed ones), so that a drift of
    the machine's clocks during the run reaches every mode alike."""
    import moekit.hf  # noqa: F401 - registers experts_implementation="moekit"

    if rounds < 1 or iters < 1 or warmup < 0:
        raise ValueError(f"rounds={rounds}, iters={iters} must be >= 1 and warmup={warmup} >= 0")
    model = build_model(family, layers=layers, vocab=vocab, dtype=dtype, device=device,
                        tiny=tiny, seed=seed)
    g = torch.Generator(device="cpu").manual_seed(seed + 1)
    ids = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    labels = torch.randint(0, vocab, (batch, seq), generator=g).to(device)
    # the fp32 reference: the same weights cast up (casting back to bf16 is exact)
    with torch.no_grad():
        model.to(torch.float32)
        model.set_experts_implementation("eager")
        ref = model(ids, use_cache=False).logits.float()
        model.set_experts_implementation("grouped_mm")
        model.to(dtype)

    def train_step():
        loss = model(ids, labels=labels, use_cache=False).loss
        loss.backward()
        for p in model.parameters():
            p.grad = None

    def prefill():
        with torch.no_grad():
            return model(ids, use_cache=True).logits

    T = batch * seq
    train, pre, peak, err = ({m: [] for m in modes} for _ in range(4))
    for r in range(rounds):
        for mode in modes:
            undo = _set_mode(model, mode)
            try:
                if r == 0:
                    with torch.no_grad():
                        err[mode] = _rel_err(model(ids, use_cache=False).logits, ref)
                    peak[mode] = _peak_gib(train_step, device)
                train[mode] += _times_ms(train_step, device, warmup, iters)
                pre[mode] += _times_ms(prefill, device, warmup, iters)
            finally:
                undo()
    rows = []
    for mode in modes:
        train_ms, prefill_ms = statistics.median(train[mode]), statistics.median(pre[mode])
        rows.append(ModelRow(family, mode, T, train_ms, T / train_ms * 1e3, peak[mode],
                             prefill_ms, T / prefill_ms * 1e3, err[mode]))
    model = train_step = prefill = None  # frees the model before the cache is emptied
    if torch.device(device).type == "cuda":
        torch.cuda.empty_cache()
    return rows


def run(families, **kw) -> list[ModelRow]:
    rows = []
    for fam in families:
        rows += bench_family(fam, **kw)
    return rows


def format_table(rows: list[ModelRow]) -> str:
    """Markdown: one row per (family, mode), with the training speed-up over grouped_mm."""
    base = {r.family: r for r in rows if r.mode == "grouped_mm"}
    out = ["| family | experts | train ms | train tok/s | vs grouped_mm | peak GiB | "
           "prefill ms | prefill vs grouped_mm | logits rel err vs fp32 |",
           "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        b = base.get(r.family)
        sp = f"{b.train_ms / r.train_ms:.2f}x" if b else "-"
        pp = f"{b.prefill_ms / r.prefill_ms:.2f}x" if b else "-"
        out.append(f"| {r.family} | {r.mode} | {r.train_ms:.1f} | {r.train_tokens_per_s:,.0f} | "
                   f"{sp} | {r.train_peak_gib:.2f} | {r.prefill_ms:.1f} | {pp} | "
                   f"{r.logits_rel_err:.2e} |")
    return "\n".join(out)


def rows_to_dicts(rows: list[ModelRow]) -> list[dict]:
    return [asdict(r) for r in rows]
