"""Bad input to the transformers integration (moekit.hf): each case gives a clear error
(type and a phrase of the message) or the correct result."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")
mh = pytest.importorskip("moekit.hf")

from test_hf_families import _build, _cfg, _ids, _tol_close  # noqa: E402

from moekit.hf import coverage, tiny  # noqa: E402

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.filterwarnings("ignore:moekit.hf.patch:UserWarning")


@pytest.fixture(scope="module")
def mixtral():
    return _build(_cfg("mixtral"))


def _experts(model):
    return model.model.layers[0].mlp.experts


def _call_experts(model, x, ids, w):
    return mh.moekit_experts_forward(_experts(model), x, ids, w)


def _ids_k(v=0, T=3, dtype=torch.long):
    return torch.full((T, 2), v, dtype=dtype)


ERRORS = [
    # (id, call(model), error type, phrase)
    ("patch a non-module", lambda m: mh.patch("model"), TypeError, "torch.nn.Module"),
    ("backend not a str", lambda m: mh.patch(copy.deepcopy(m), backend=3), TypeError, "backend"),
    ("unknown backend", lambda m: mh.patch(copy.deepcopy(m), backend="nope"), mh.PatchError,
     "backend='nope'"),
    ("negative verify_tol", lambda m: mh.patch(copy.deepcopy(m), verify_tol=-1.0), ValueError,
     "verify_tol"),
    ("strict not a bool", lambda m: mh.patch(copy.deepcopy(m), strict="yes"), TypeError,
     "strict"),
    ("no MoE block", lambda m: mh.patch(nn.Sequential(nn.Linear(4, 4))), mh.PatchError,
     "no sparse MoE block"),
    ("router jitter", lambda m: mh.patch(_build(_cfg("mixtral", router_jitter_noise=0.1))),
     mh.PatchError, "router_jitter_noise"),
    ("config of a dense model", lambda m: mh.config_from_hf(transformers.LlamaConfig()),
     mh.PatchError, "no number of experts"),
    ("unpatch a foreign HFMoE",
     lambda m: mh.unpatch(nn.Sequential(mh.HFMoE(mh.config_from_hf(m.config)))), ValueError,
     "not made by moekit.hf.patch"),
    ("experts: wrong hidden size",
     lambda m: _call_experts(m, torch.randn(3, 31), _ids_k(), torch.rand(3, 2)), ValueError,
     "shape mismatch"),
    ("experts: id out of range",
     lambda m: _call_experts(m, torch.randn(3, 32), _ids_k(9), torch.rand(3, 2)), ValueError,
     "must lie in [0, 4)"),
    ("experts: negative id",
     lambda m: _call_experts(m, torch.randn(3, 32), _ids_k(-1), torch.rand(3, 2)), ValueError,
     "must lie in [0, 4)"),
    ("experts: weights shape",
     lambda m: _call_experts(m, torch.randn(3, 32), _ids_k(), torch.rand(3, 3)), ValueError,
     "must both be [T=3, K]"),
    ("experts: float ids",
     lambda m: _call_experts(m, torch.randn(3, 32), _ids_k(dtype=torch.float32), torch.rand(3, 2)),
     TypeError, "integer tensor"),
    ("to_hf layout", lambda m: mh.to_hf_state_dict({}, m.config, layout="nope"), ValueError,
     "layout"),
    ("unknown tiny family", lambda m: tiny.tiny_config("nope"), ValueError, "unknown tiny family"),
    ("unknown coverage family", lambda m: coverage.run_all(["nope"]), ValueError,
     "unknown MoE families"),
]


@pytest.mark.parametrize("case", ERRORS, ids=[c[0] for c in ERRORS])
def test_bad_hf_input(case, mixtral):
    _, call, exc, phrase = case
    with pytest.raises(exc) as e:
        call(mixtral)
    assert phrase in str(e.value)


def test_unpatch_of_an_unpatched_model_is_empty(mixtral):
    m = copy.deepcopy(mixtral)
    assert mh.unpatch(m) == []
    assert set(mh.hf_state_dict(m)) == set(m.state_dict())


def test_failed_patch_leaves_the_model_as_it_was(mixtral):
    m = copy.deepcopy(mixtral)
    want = m(_ids()).logits
    with pytest.raises(mh.PatchError):
        mh.patch(m, backend="nope")
    assert not any(isinstance(x, mh.HFMoE) for x in m.modules())
    _tol_close(m(_ids()).logits, want, "logits after a refused patch")
