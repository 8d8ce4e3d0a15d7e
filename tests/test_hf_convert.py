"""Checkpoint conversion: transformers state dicts <-> a patched model's, exact both ways.

Layouts are decided by key names and the family, never by shape: the D == F cases (where a
transposed square ``down_proj`` has the right shape and the wrong values) are checked by
loading the converted weights into a differently initialised patched model and comparing its
logits with the original model's.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
mh = pytest.importorskip("moekit.hf")

from test_hf_families import _build, _cfg, _ids, _tol_close  # noqa: E402

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.filterwarnings("ignore:moekit.hf.patch:UserWarning")

CASES = [
    ("mixtral", {}),
    ("mixtral", {"intermediate_size": 32}),  # D == F
    ("qwen2_moe", {}),
    ("deepseek_v3", {}),
    ("gpt_oss", {}),
    ("gpt_oss", {"intermediate_size": 32}),  # D == F: square transposed down_proj
    ("llama4", {"intermediate_size": 32}),  # D == F, transposed
    ("olmoe", {}),
]


def _assert_same_sd(a: dict, b: dict):
    assert list(a) == list(b) or set(a) == set(b), sorted(set(a) ^ set(b))[:8]
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert a[k].shape == b[k].shape, k
        assert torch.equal(a[k], b[k]), k


def _ids_case(case):
    return f"{case[0]}{'-D==F' if case[1] else ''}"


@pytest.mark.parametrize("case", CASES, ids=_ids_case)
def test_fused_round_trip_and_values(case):
    family, over = case
    cfg = _cfg(family, **over)
    ref = _build(cfg)
    sd = ref.state_dict()
    msd = mh.from_hf_state_dict(sd, cfg)
    assert any(k.endswith(".router.gate.weight") for k in msd)
    # exact round trip
    _assert_same_sd(mh.to_hf_state_dict(msd, cfg), sd)
    # the converted values are right: load into a patched model with other weights
    torch.manual_seed(123)
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.3)
    mh.patch(other, verify=False)
    assert set(other.state_dict()) == set(msd)
    other.load_state_dict(msd, strict=True)
    ids = _ids()
    _tol_close(other(ids).logits, ref(ids).logits, f"{family} {over} logits after conversion")


@pytest.mark.parametrize(
    "family,names",
    [("mixtral", ("w1", "w3", "w2")), ("qwen3_moe", ("gate_proj", "up_proj", "down_proj"))],
)
@pytest.mark.parametrize("dim_eq", [False, True], ids=["D!=F", "D==F"])
def test_per_expert_layout(family, names, dim_eq):
    over = {"intermediate_size": 32} if family == "mixtral" and dim_eq else {}
    if family == "qwen3_moe" and dim_eq:
        over = {"moe_intermediate_size": 32}
    cfg = _cfg(family, **over)
    ref = _build(cfg)
    sd = ref.state_dict()
    # write a per-expert checkpoint by hand from the model's fused weights (independent of moekit)
    per = {}
    for k, v in sd.items():
        if k.endswith("experts.gate_up_proj"):
            p = k[: -len(".gate_up_proj")]
            Fh = v.shape[1] // 2
            for i in range(v.shape[0]):
                per[f"{p}.{i}.{names[0]}.weight"] = v[i, :Fh].clone()
                per[f"{p}.{i}.{names[1]}.weight"] = v[i, Fh:].clone()
                per[f"{p}.{i}.{names[2]}.weight"] = sd[f"{p}.down_proj"][i].clone()
        elif not k.endswith("experts.down_proj"):
            per[k] = v
    msd = mh.from_hf_state_dict(per, cfg)
    assert not any(".experts.0." in k for k in msd)
    _assert_same_sd(mh.from_hf_state_dict(sd, cfg), msd)  # same as from the fused layout
    back = mh.to_hf_state_dict(msd, cfg, layout="per_expert", expert_names=names)
    _assert_same_sd(back, per)
    patched = copy.deepcopy(ref)
    mh.patch(patched)
    patched.load_state_dict(msd, strict=True)
    _tol_close(patched(_ids()).logits, ref(_ids()).logits, f"{family} per-expert logits")


def test_ernie_round_trip_exact():
    """A selection bias stored [1, E] (ERNIE-4.5-MoE's moe_statics): exact both ways, loads."""
    from test_hf_families import _generic_config

    cfg = _generic_config("ernie4_5_moe")
    ref = _build(cfg)
    sd = ref.state_dict()
    msd = mh.from_hf_state_dict(sd, cfg)
    _assert_same_sd(mh.to_hf_state_dict(msd, cfg), sd)
    other = copy.deepcopy(ref)
    with torch.no_grad():
        for p in other.parameters():
            p.normal_(0, 0.3)
    mh.patch(other, verify=False)
    other.load_state_dict(msd, strict=True)
    _tol_close(other(_ids()).logits, ref(_ids()).logits, "ernie logits after conversion")


@pytest.mark.parametrize("family", ["deepseek_v3", "gpt_oss"])
def test_bf16_round_trip_exact(family):
    cfg = _cfg(family)
    ref = _build(cfg).to(torch.bfloat16)
    sd = ref.state_dict()
    msd = mh.from_hf_state_dict(sd, cfg)
    _assert_same_sd(mh.to_hf_state_dict(msd, cfg), sd)


def test_patched_state_dict_to_hf_loads_in_plain_transformers():
    """state dict of a patched model -> to_hf_state_dict -> plain transformers model."""
    cfg = _cfg("gpt_oss", intermediate_size=32)
    ref = _build(cfg)
    patched = copy.deepcopy(ref)
    mh.patch(patched)
    hf_sd = mh.to_hf_state_dict(patched.state_dict(), cfg)
    fresh = _build(cfg)
    with torch.no_grad():
        for p in fresh.parameters():
            p.zero_()
    fresh.load_state_dict(hf_sd, strict=True)
    _tol_close(fresh(_ids()).logits, ref(_ids()).logits, "gpt_oss reloaded logits")


def test_bad_layout_argument():
    cfg = _cfg("mixtral")
    with pytest.raises(ValueError, match="layout"):
        mh.to_hf_state_dict({}, cfg, layout="nope")
