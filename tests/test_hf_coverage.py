"""moekit.hf.coverage: the families of the installed transformers through both routes.

CI runs a fixed subset, one family per path of the code (named families are covered by
test_hf_families.py); the whole table is ``python -m moekit.hf.coverage --write docs/hf.md``
(about 75 s of CPU time on transformers 5.24). Each family's expected outcome is asserted, so
a family that stops passing, or starts being refused, fails here.
"""

from __future__ import annotations

import warnings

import pytest

transformers = pytest.importorskip("transformers", minversion="5.0")
cov = pytest.importorskip("moekit.hf.coverage")

warnings.filterwarnings("ignore")

# family -> (experts_implementation="moekit", patch): what each path of the code gives
CI_FAMILIES = {
    "qwen3_moe": ("pass", "pass"),  # a named family
    "beam": ("pass", "pass"),  # its own gate function, equal to SiLU-GLU on a probe
    "lfm2_moe": ("pass", "pass"),  # F.silu act_fn; the router takes the selection bias
    "hy_v3": ("pass", "pass"),  # bias as a router argument, router-held scale
    "nemotron_h": ("pass", "pass"),  # non-gated relu2 experts and shared expert
    "kimi_linear": ("pass", "pass"),  # linear attention, grouped routing
    "diffusion_gemma": ("pass", "refused"),  # random noise in the forward; decoder-layer MoE
    "muse_spark": ("pass", "refused"),  # post-expert norm
    "phimoe": ("pass", "refused"),  # sparsemixer routing
    "dbrx": ("refused", "refused"),  # undecorated experts
}


def test_find_families():
    fams = {f.name: f for f in cov.find_families()}
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4", "dbrx"} <= set(fams)
    assert fams["mixtral"].decorated and not fams["llama4"].decorated
    assert fams["llama4"].model_type == "llama4_text" and fams["qwen3_moe"].causal_lm
    if transformers.__version__.startswith("5.24."):
        assert len(fams) >= 70


def test_ci_families():
    results = cov.run_all(list(CI_FAMILIES))
    got = {r.family.name: (r.moekit.status, r.patch.status) for r in results}
    bad = {
        f: (got[f], want, [r.moekit.detail, r.patch.detail])
        for f, want in CI_FAMILIES.items()
        for r in results
        if r.family.name == f and got[f] != want
    }
    assert not bad, bad
    by = {r.family.name: r for r in results}
    assert "post-expert norm" in by["muse_spark"].patch.detail
    assert "not decorated" in by["dbrx"].moekit.detail
    table = cov.markdown_table(results)
    assert table.count("\n| ") == len(CI_FAMILIES) + 1  # header + one row per family
    assert "`patch`: 6 pass, 4 refused, 0 failed" in table


def test_write_table(tmp_path):
    r = cov.FamilyResult(
        cov.Family("x", "x", True, True), cov.Outcome("pass"), cov.Outcome("refused", "a|b")
    )
    p = tmp_path / "hf.md"
    p.write_text(f"head\n{cov.BEGIN}\nold\n{cov.END}\ntail\n")
    cov.write_table(str(p), [r])
    text = p.read_text()
    assert text.startswith("head\n") and text.endswith("tail\n") and "old" not in text
    assert "| x | x | pass | refused: a\\|b |" in text
    p.write_text("no markers")
    with pytest.raises(ValueError, match="coverage-table"):
        cov.write_table(str(p), [r])


def test_unknown_family():
    with pytest.raises(ValueError, match="unknown MoE families"):
        cov.run_all(["not_a_family"])
