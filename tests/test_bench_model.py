"""The end-to-end model benchmark at tiny sizes on CPU: every family and mode gives a row, and
each mode's logits equal the fp32 eager reference (fp32 here, so to rounding)."""

import pytest

pytest.importorskip("transformers")

import torch

from moekit.bench_model import FAMILIES, MODES, bench_family, build_model, format_table


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_rows_and_logits(family):
    # two rounds: every mode set up and undone twice (patch / unpatch included)
    rows = bench_family(family, layers=1, batch=2, seq=6, vocab=64, dtype=torch.float32,
                        device="cpu", warmup=0, iters=1, rounds=2, tiny=True)
    assert [r.mode for r in rows] == list(MODES)
    for r in rows:
        assert r.logits_rel_err < 1e-5, (r.mode, r.logits_rel_err)
        assert r.train_ms > 0 and r.prefill_ms > 0 and r.tokens == 12
    table = format_table(rows)
    assert table.count(f"| {family} |") == len(MODES) and "1.00x" in table


def test_bad_timing_counts():
    with pytest.raises(ValueError, match="rounds=0, iters=1 must be >= 1"):
        bench_family("olmoe", layers=1, batch=1, seq=2, vocab=8, dtype=torch.float32,
                     device="cpu", iters=1, rounds=0, tiny=True)


def test_unknown_family():
    with pytest.raises(ValueError, match="is not benchmarked; allowed"):
        build_model("llama", layers=1, vocab=8, dtype=torch.float32, device="cpu", tiny=True)


def test_real_dimensions_build_meta():
    """The real-size configs build (on the meta device: no memory) with the named dimensions."""
    m = build_model("qwen3_moe", layers=1, vocab=64, dtype=torch.bfloat16, device="meta")
    exp = m.model.layers[0].mlp.experts
    assert tuple(exp.gate_up_proj.shape) == (128, 2 * 768, 2048)
    assert set(FAMILIES) == {"qwen3_moe", "olmoe", "gpt_oss", "deepseek_v3"}
