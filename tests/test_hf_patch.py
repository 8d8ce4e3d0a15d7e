"""``moekit.hf.patch`` never skips an MoE block silently, and a patched model behaves like the
original to what uses it (save_pretrained, the meta device, an optimizer built before)."""

from __future__ import annotations

import copy
import re
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers", minversion="5.0")
mh = pytest.importorskip("moekit.hf")

from test_hf_families import _build, _cfg, _ids, _tol_close  # noqa: E402

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.filterwarnings("ignore:moekit.hf.patch:UserWarning")


def _odd_router_in_layer(model, layer: int):
    """Give one layer a router that no moekit router config reproduces (it squares the
    routing weights), in a block class outside the family map."""
    mlp = model.model.layers[layer].mlp
    gate = mlp.gate
    orig = type(gate).forward

    class OddRouter(type(gate)):
        def forward(self, h):
            logits, w, ids = orig(self, h)
            return logits, w * w, ids

    gate.__class__ = OddRouter
    mlp.__class__ = type("OddSparseMoeBlock", (type(mlp),), {})


def test_strict_names_every_refused_block_and_swaps_nothing():
    ref = _build(_cfg("qwen3_moe"))
    model = copy.deepcopy(ref)
    _odd_router_in_layer(model, 1)
    want = model(_ids()).logits
    with pytest.raises(mh.PatchError, match=r"(?s)1 of 2 MoE blocks.*model\.layers\.1\.mlp") as e:
        mh.patch(model)
    assert "model.layers.0.mlp" not in str(e.value)
    assert not any(isinstance(m, mh.HFMoE) for m in model.modules())
    # the blocks that could be patched were left whole (their tensors not handed over)
    _tol_close(model(_ids()).logits, want, "logits after a refused patch")


def test_non_strict_replaces_the_others_and_reports_the_skipped():
    ref = _build(_cfg("qwen3_moe"))
    model = copy.deepcopy(ref)
    _odd_router_in_layer(model, 1)
    want = model(_ids()).logits
    res = mh.patch(model, strict=False)
    assert isinstance(res, list) and res == ["model.layers.0.mlp"]
    assert list(res.skipped) == ["model.layers.1.mlp"]
    assert "OddRouter" in res.skipped["model.layers.1.mlp"]
    assert isinstance(model.model.layers[0].mlp, mh.HFMoE)
    assert not isinstance(model.model.layers[1].mlp, mh.HFMoE)
    _tol_close(model(_ids()).logits, want, "partly patched logits")


class _ListExpertsBlock(nn.Module):
    """An MoE block with per-expert ModuleList experts (remote-code models keep these)."""

    def __init__(self, D=8, E=4):
        super().__init__()
        self.gate = nn.Linear(D, E, bias=False)
        self.experts = nn.ModuleList(nn.Linear(D, D) for _ in range(E))

    def forward(self, x):
        w = self.gate(x).softmax(-1)
        return sum(w[..., i : i + 1] * e(x) for i, e in enumerate(self.experts))


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.block = _ListExpertsBlock()


def test_list_experts_block_is_reported_not_skipped():
    net = _Net()
    with pytest.raises(mh.PatchError, match=r"(?s)block \(_ListExpertsBlock\).*ModuleList of 4"):
        mh.patch(net)
    res = mh.patch(net, strict=False)
    assert res == [] and "per-expert" in res.skipped["block"]


def test_no_moe_block_is_an_error():
    with pytest.raises(mh.PatchError, match="no sparse MoE block"):
        mh.patch(nn.Sequential(nn.Linear(4, 4)))
    assert mh.patch(nn.Sequential(nn.Linear(4, 4)), strict=False) == []


def test_patch_twice_is_a_no_op():
    model = _build(_cfg("mixtral"))
    first = mh.patch(model)
    assert len(first) == 2 and mh.patch(model) == []


@pytest.mark.parametrize("family", ["llama4", "gpt_oss", "qwen2_moe"])
def test_patched_block_returns_what_the_block_returns(family):
    """Shape, tuple or not, and the second element (router logits / top-k weights)."""
    model = _build(_cfg(family))
    name, block = mh.find_moe_blocks(model)[-1]
    orig = copy.deepcopy(block)
    mh.patch(model)
    moe = model.get_submodule(name)
    x = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = orig(x), moe(x)
    assert isinstance(got, tuple) == isinstance(want, tuple)
    want_t = want if isinstance(want, tuple) else (want,)
    got_t = got if isinstance(got, tuple) else (got,)
    assert len(got_t) == len(want_t)
    for a, b in zip(got_t, want_t):
        assert a.shape == b.shape
        _tol_close(a, b, f"{family} block output")


def test_deepseek_v3_topk_beyond_the_kept_groups():
    """transformers' DeepSeek-V3 test configuration: top-8 of 8 experts with 1 of 2 groups
    kept; transformers still routes it (the masked experts fill the top-k)."""
    cfg = _cfg("deepseek_v3", n_routed_experts=8, n_group=2, topk_group=1, num_experts_per_tok=8)
    ref = _build(cfg)
    ref.set_experts_implementation("eager")
    want = ref(_ids()).logits
    model = copy.deepcopy(ref)
    assert mh.patch(model) == ["model.layers.1.mlp"]
    assert model.model.layers[1].mlp.router.config.topk_beyond_groups
    _tol_close(model(_ids()).logits, want, "deepseek_v3 top-8 logits")


def test_router_rejects_topk_beyond_groups_unless_asked():
    from moekit import TokenChoiceTopKRouter

    kw = dict(top_k=8, score_func="sigmoid", num_expert_groups=2, num_limited_groups=1)
    with pytest.raises(ValueError, match="topk_beyond_groups=True"):
        TokenChoiceTopKRouter.Config(**kw).build(dim=8, num_experts=8)
    r = TokenChoiceTopKRouter.Config(**kw, topk_beyond_groups=True).build(dim=8, num_experts=8)
    out = r(torch.randn(5, 8))
    assert out.topk_ids.sort(1).values.eq(torch.arange(8)).all()  # every expert once


@pytest.mark.parametrize("family", ["gpt_oss", "llama4", "deepseek_v3"])
def test_save_pretrained_of_a_patched_model_is_a_transformers_checkpoint(family, tmp_path):
    """save_pretrained writes the original layout: plain transformers reloads the same
    logits (after moekit changed the weights), and the patched model stays patched."""
    model = _build(_cfg(family))
    mh.patch(model)
    moe = next(m for m in model.modules() if isinstance(m, mh.HFMoE))
    with torch.no_grad():
        moe.experts.down_proj.mul_(1.5)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.add_(0.05)
    want = model(_ids()).logits
    model.save_pretrained(tmp_path)
    assert isinstance(moe, mh.HFMoE) and moe in list(model.modules())
    loaded = type(model).from_pretrained(tmp_path).eval()
    assert not any(isinstance(m, mh.HFMoE) for m in loaded.modules())
    _tol_close(loaded(_ids()).logits, want, f"{family} reloaded logits")
    assert set(mh.hf_state_dict(model)) == set(loaded.state_dict())
    mh.unpatch(model)
    assert "save_pretrained" not in vars(model)  # back to the class's own


def test_patch_on_the_meta_device():
    """Named families patch on the meta device (weights come later, converted with
    from_hf_state_dict); families outside the map say why they cannot."""
    ref = _build(_cfg("qwen3_moe"))
    with torch.device("meta"):
        meta = transformers.AutoModelForCausalLM.from_config(_cfg("qwen3_moe"))
    assert mh.patch(meta) == ["model.layers.0.mlp", "model.layers.1.mlp"]
    msd = mh.from_hf_state_dict(ref.state_dict(), ref.config)
    assert set(meta.state_dict()) == set(msd)
    meta.load_state_dict(msd, assign=True)
    for n, b in ref.named_buffers():  # what loading does for the non-persistent buffers
        mod, _, leaf = n.rpartition(".")
        setattr(meta.get_submodule(mod), leaf, b)
    meta.eval()
    _tol_close(meta(_ids()).logits, ref(_ids()).logits, "meta-patched then loaded logits")

    from moekit.hf.tiny import tiny_config

    with torch.device("meta"):
        generic = transformers.AutoModelForCausalLM.from_config(tiny_config("minimax"))
    with pytest.raises(mh.PatchError, match="meta device.*after loading the weights"):
        mh.patch(generic)


@pytest.mark.parametrize("family", ["gpt_oss", "llama4"])
def test_an_optimizer_built_before_patch_keeps_training_the_model(family):
    """GPT-OSS's and Llama 4's experts change layout when patched, yet keep their Parameter
    objects (no warning): Adam built before patch, stepping the patched model, ends where Adam
    on the unpatched model ends; unpatch gives the same objects back in the original layout."""
    ref = _build(_cfg(family))
    model = copy.deepcopy(ref)
    ids = _ids()
    opt_ref = torch.optim.Adam(ref.parameters(), lr=1e-2)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    before = {n: p for n, p in model.named_parameters()}
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        mh.patch(model)
    for m, o in ((ref, opt_ref), (model, opt)):
        m.train()
        for _ in range(3):
            o.zero_grad()
            m(ids, labels=ids).loss.backward()
            o.step()
    mh.unpatch(model)
    after = dict(model.named_parameters())
    assert set(after) == set(before)
    for n, p in ref.named_parameters():
        assert after[n] is before[n], f"{n}: not the same Parameter object after unpatch"
        _tol_close(after[n], p, f"{family} {n} after 3 Adam steps")


def test_stacked_parts_warn_and_an_optimizer_after_patch_trains():
    """DBRX's per-expert rows are stacked into new Parameters: patch says so."""
    from moekit.hf.discover import VOCAB, build_model, family_by_name

    model = build_model(family_by_name("dbrx"))
    with pytest.warns(UserWarning, match="parts stacked into one tensor.*build the optimizer after patch"):
        mh.patch(model)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ids = torch.randint(0, VOCAB, (2, 12), generator=torch.Generator().manual_seed(0))
    losses = []
    model.train()
    for _ in range(4):
        out = model(ids, labels=ids)
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    assert losses[-1] < losses[0]


def test_parametric_activations():
    from moekit.activations import canonical_activation, get_activation

    g, u = torch.randn(6, 5) * 4, torch.randn(6, 5) * 4
    a = get_activation("gpt_oss(alpha=1.2, limit=3)")
    gc, uc = g.clamp(max=3.0), u.clamp(-3.0, 3.0)
    assert torch.allclose(a.gated(g, u), (uc + 1) * gc * torch.sigmoid(1.2 * gc))
    s = get_activation("silu(limit=2)")
    want = torch.nn.functional.silu(g.clamp(max=2.0)) * u.clamp(-2, 2)
    assert torch.allclose(s.gated(g, u), want)
    c = get_activation("silu_softcap(gate=3, up=5)")
    want = 3 * torch.tanh(g / 3) * torch.sigmoid(g) * 5 * torch.tanh(u / 5)
    assert torch.allclose(c.gated(g, u), want)
    assert canonical_activation("silu_softcap()") == "silu"  # no caps
    assert canonical_activation("gpt_oss(alpha=1.702,limit=7)") == "gpt_oss"  # the defaults
    for bad, phrase in [
        ("gpt_oss(beta=1)", "takes ['alpha', 'limit']"),
        ("relu2(limit=1)", "only ['gpt_oss', 'silu', 'silu_softcap'] take them"),
        ("silu(limit=-1)", "limit or cap > 0"),
        ("gpt_oss(limit=nan)", "must be finite"),
    ]:
        with pytest.raises(ValueError, match=re.escape(phrase)):
            canonical_activation(bad)


def test_gpt_oss_with_another_limit_keeps_the_triton_backend():
    """GPT-OSS with another swiglu_limit: the activation carries the constants and the block
    keeps the backend asked for (the triton kernels take them as arguments)."""
    model = _build(_cfg("gpt_oss", swiglu_limit=5.0))
    mh.patch(model, backend="triton", verify=False)
    ex = model.model.layers[0].mlp.experts
    assert ex.activation == "gpt_oss(alpha=1.702,limit=5.0)"
    assert ex.config.backend == "triton"


def test_patched_model_pickles_and_deepcopies(tmp_path):
    import pickle

    model = _build(_cfg("qwen3_moe"))
    mh.patch(model)
    with torch.no_grad():  # (a grad-enabled forward leaves graph state in moekit.MoE)
        want = model(_ids()).logits
    for other in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model)):
        assert other.save_pretrained.model is other  # saves itself, not the original
        _tol_close(other(_ids()).logits, want, "copied patched model")
    other.save_pretrained(tmp_path)
    _tol_close(type(model).from_pretrained(tmp_path)(_ids()).logits, want, "reloaded copy")


def test_dbrx_row_experts(tmp_path):
    """DBRX keeps each expert projection as one [E * F, D] matrix (w1 gate, v1 up, w2 down):
    patch stacks w1/v1 into gate_up (a copy) and views w2; logits and every gradient equal,
    unpatch / save_pretrained / the state-dict conversion write the rows back exactly."""
    from moekit.hf import discover

    ref = discover.build_model(discover.family_by_name("dbrx"))
    ids = _ids()
    want = ref(ids)
    (want.logits * want.logits).sum().backward()
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    assert mh.patch(model) == [f"transformer.blocks.{i}.ffn" for i in range(2)]
    out = model(ids)
    _tol_close(out.logits, want.logits, "dbrx logits")
    (out.logits * out.logits).sum().backward()
    got = mh.grads_by_hf_name(model)
    for n, p in ref.named_parameters():
        _tol_close(got[n], p.grad, f"dbrx grad {n}")
    sd = ref.state_dict()
    back = mh.to_hf_state_dict(mh.from_hf_state_dict(sd, ref.config), ref.config)
    assert set(back) == set(sd) and all(torch.equal(back[k], sd[k]) for k in sd)
    model.save_pretrained(tmp_path)
    _tol_close(type(ref).from_pretrained(tmp_path)(ids).logits, want.logits, "dbrx reloaded")
    mh.unpatch(model)
    mlp = model.transformer.blocks[0].ffn.experts.mlp
    ref_mlp = ref.transformer.blocks[0].ffn.experts.mlp
    for name in ("w1", "v1", "w2"):
        assert torch.equal(getattr(mlp, name), getattr(ref_mlp, name)), name
