"""moekit.hf.coverage: every MoE family of the installed transformers through both routes.

One process runs all of them (about 10 s of CPU time for the 72 families of transformers
5.24: tiny models); ``python -m moekit.hf.coverage --write docs/hf.md`` writes the same table
into the docs. No family may fail either route; every decorated family passes
``experts_implementation="moekit"``; families of one per path of the code have their expected
outcome asserted, and the summary line of docs/hf.md must be the installed version's.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest

transformers = pytest.importorskip("transformers", minversion="5.0")
cov = pytest.importorskip("moekit.hf.coverage")

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.filterwarnings("ignore:moekit.hf.patch:UserWarning")

# family -> (experts_implementation="moekit", patch): one family per path of the code
CI_FAMILIES = {
    "qwen3_moe": ("pass", "pass"),  # a named family
    "beam": ("pass", "pass"),  # its own gate function, equal to SiLU-GLU on a probe
    "lfm2_moe": ("pass", "pass"),  # F.silu act_fn; the router takes the selection bias
    "hy_v3": ("pass", "pass"),  # bias as a router argument, router-held scale
    "nemotron_h": ("pass", "pass"),  # non-gated relu2 experts and shared expert
    "kimi_linear": ("pass", "pass"),  # linear attention, grouped routing
    "inkling2": ("pass", "pass"),  # softcapped SwiGLU; a router with its dtype fixed to fp32
    "diffusion_gemma": ("pass", "refused"),  # random noise in the forward; decoder-layer MoE
    "muse_spark": ("pass", "refused"),  # post-expert norm
    "phimoe": ("pass", "pass"),  # sparsemixer routing (a named family)
    "longcat_flash": ("refused", "pass"),  # zero-computation experts (a named family)
    "deepseek_v4": ("pass", "pass"),  # hash layers routed by input_ids; sqrt(softplus) scores
    "dbrx": ("refused", "pass"),  # undecorated experts; per-expert rows [E * F, D]
    "step3p7": ("refused", "pass"),  # undecorated experts in the standard fused layout
    "jetmoe": ("refused", "pass"),  # undecorated stacked experts, an output bias, MoA left alone
    "switch_transformers": ("refused", "pass"),  # per-expert modules stacked at patch time
    "axk1": ("pass", "pass"),  # an RMSNorm on the block output
}


def test_find_families():
    fams = {f.name: f for f in cov.find_families()}
    assert {"mixtral", "qwen3_moe", "deepseek_v3", "gpt_oss", "llama4", "dbrx"} <= set(fams)
    assert fams["mixtral"].decorated and not fams["llama4"].decorated
    assert fams["llama4"].model_type == "llama4_text" and fams["qwen3_moe"].causal_lm
    if transformers.__version__.startswith("5.24."):
        assert len(fams) >= 70


@pytest.fixture(scope="module")
def results():
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and shares the CI's 2 cores
    try:
        return cov.run_all()
    finally:
        torch.set_num_threads(n)


def test_no_family_fails(results):
    failed = {
        r.family.name: (r.moekit.cell(), r.patch.cell())
        for r in results
        if "failed" in (r.moekit.status, r.patch.status)
    }
    assert not failed, failed
    for r in results:
        assert r.moekit.status == ("pass" if r.family.decorated else "refused"), r.family.name
        if r.patch.status == "refused":
            assert r.patch.detail, r.family.name  # every refusal says why


def test_expected_outcomes(results):
    got = {r.family.name: (r.moekit.status, r.patch.status) for r in results}
    bad = {f: (got.get(f), want) for f, want in CI_FAMILIES.items() if got.get(f) != want}
    assert not bad, bad
    by = {r.family.name: r for r in results}
    assert "post-expert norm" in by["muse_spark"].patch.detail
    assert "not decorated" in by["dbrx"].moekit.detail
    if transformers.__version__ == "5.24.0":
        s = cov.summary(results)
        assert (s["families"], s["decorated"]) == (72, 66)
        assert s["patch"]["pass"] >= 60


def test_router_refusals_name_the_reason(results):
    """Routers moekit's cannot stand in for are refused with what they compute instead."""
    by = {r.family.name: r.patch for r in results}
    assert by["inkling"].status == "refused" and "more score other experts" in by["inkling"].detail
    assert by["zaya"].status == "refused" and "network of 4 Linear layers" in by["zaya"].detail


def test_docs_table_is_current(results):
    """docs/hf.md's summary line is what this transformers version gives (when the table was
    written for it): regenerate with python -m moekit.hf.coverage --write docs/hf.md."""
    doc = Path(__file__).resolve().parents[1] / "docs" / "hf.md"
    text = doc.read_text()
    line = next(x for x in text.split(cov.BEGIN, 1)[1].splitlines() if x.strip())
    if not line.startswith(f"transformers {transformers.__version__}:"):
        pytest.skip(f"docs/hf.md's table is for another transformers: {line[:30]}")
    assert line == cov.markdown_table(results).splitlines()[0]
    table = cov.markdown_table(results)
    assert table.count("\n| ") == len(results) + 1  # header + one row per family


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
