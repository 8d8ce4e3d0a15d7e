"""``moekit.hf.patch`` on blocks that do more than route and run fused experts: per-expert
module lists (Switch Transformers, stacked at patch time, with its per-sequence expert
capacity), an output bias (JetMoE), a norm on the block output (A.X-K1) and a shared expert
with one fused gate/up projection (MiniMax-M3-VL). Each against the transformers eager model
on the same weights: output and every gradient."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
mh = pytest.importorskip("moekit.hf")

from moekit.hf import discover  # noqa: E402
from moekit.hf.tiny import randomize_routing  # noqa: E402

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.filterwarnings("ignore:moekit.hf.patch:UserWarning")
transformers.logging.set_verbosity_error()


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    n = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny models: one thread is faster, and shares the CI's 2 cores
    yield
    torch.set_num_threads(n)


def _model(family: str, **overrides):
    fam = discover.family_by_name(family)
    cfg = discover.tiny_config(fam)
    for k, v in overrides.items():
        setattr(cfg, k, v)
    torch.manual_seed(0)
    auto = transformers.AutoModelForCausalLM if fam.causal_lm else transformers.AutoModel
    model = auto.from_config(cfg, dtype=torch.float32)
    randomize_routing(model, 0)
    return model.float().eval()


def _close(got, ref, what, rel=1e-4, atol=1e-7):
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rel * max(ref.abs().max().item(), 1e-6) + atol, f"{what}: {err:.3g}"


def _out(model, ids):
    kw = {"decoder_input_ids": ids} if model.config.is_encoder_decoder else {}
    out = model(input_ids=ids, **kw)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    w = torch.randn(y.shape, generator=torch.Generator().manual_seed(5))
    (y * w).sum().backward()
    return y.detach()


def _patched_equals_eager(ref, ids, model=None):
    """Patch ``model`` (default: a copy of ``ref``); assert its output and every gradient
    equal the eager model's (by the original names); return it."""
    model = copy.deepcopy(ref) if model is None else model
    y_ref = _out(ref, ids)
    names = mh.patch(model)
    assert names and not names.skipped
    _close(_out(model, ids), y_ref, "output")
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    got = mh.grads_by_hf_name(model)
    assert set(got) == set(want), sorted(set(got) ^ set(want))[:4]
    # a gradient that cancels to ~0 in fp32 (DeepSeek-V4's hash-routed layer 0: its gate's
    # reference grad is ~1e-7 beside grads of ~10) is noise of the order of 1e-8 times the
    # model's largest gradient: the absolute floor scales with it
    atol = 1e-8 * max(1.0, max(g.abs().max().item() for g in want.values()))
    for n in want:
        _close(got[n], want[n], f"grad {n}", atol=max(1e-7, atol))
    return model


def _ids(S=7):
    return torch.randint(3, discover.VOCAB, (2, S), generator=torch.Generator().manual_seed(3))


def test_switch_per_expert_modules_with_capacity_drops():
    """Switch Transformers keeps one wi/wo module per expert and drops the tokens beyond
    ``expert_capacity`` per sequence: with a capacity of 2 in sequences of 9 tokens some are
    dropped, and the patched model still equals the eager one; its stacked weights are new
    Parameters (a warning says so) and unpatch writes the per-expert weights back."""
    ref = _model("switch_transformers", router_jitter_noise=0.0, dropout_rate=0.0,
                 expert_capacity=2)
    ids = _ids(9)
    with pytest.warns(UserWarning, match="build the optimizer after patch"):
        model = _patched_equals_eager(ref, ids)
    moe = model.encoder.block[0].layer[1].mlp
    assert moe.config.sequence_capacity == 2 and moe.experts.up_proj.shape == (4, 24, 32)
    mh.unpatch(model)
    for n, p in ref.named_parameters():
        assert torch.equal(model.get_parameter(n), p), n


def test_switch_training_noise_is_refused():
    ref = _model("switch_transformers", router_jitter_noise=0.01, dropout_rate=0.0)
    with pytest.raises(mh.PatchError, match=r"router_jitter_noise=0.01.*set it to 0.0"):
        mh.patch(ref)
    ref = _model("switch_transformers", router_jitter_noise=0.0, dropout_rate=0.1)
    with pytest.raises(mh.PatchError, match=r"dropout_rate=0.1 applies dropout inside"):
        mh.patch(ref)


def test_jetmoe_output_bias_same_parameters():
    """JetMoE's MoE block: input_linear / output_linear [E, 2F, D] / [E, D, F] are moekit's
    layout (the same Parameter objects, no warning) and a [D] bias on the output
    (``MoE.Config.output_bias``); its mixture-of-attention modules (whose forward only raises)
    are not MoE blocks and stay as they are."""
    ref = _model("jetmoe")
    block = ref.model.layers[0].mlp
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        model = copy.deepcopy(ref)
        w = model.model.layers[0].mlp.input_linear.weight
        _patched_equals_eager(ref, _ids(), model)
    assert [n for n, m in model.named_modules() if isinstance(m, mh.HFMoE)] == [
        f"model.layers.{i}.mlp" for i in range(2)
    ]
    moe = model.model.layers[0].mlp
    assert moe.config.output_bias and moe.experts.gate_up_proj is w
    assert type(model.model.layers[0].self_attention.experts).__name__ == "JetMoeMoA"
    assert block.bias.abs().sum() > 0  # randomised: a dropped bias shows


def test_axk1_norm_on_the_block_output():
    """A.X-K1 is DeepSeek-V3 with an RMSNorm on the block output (after the shared expert):
    ``MoE.Config.output_norm_eps``, its scale the block's own Parameter."""
    ref = _model("axk1")
    g = torch.Generator().manual_seed(9)
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if n.endswith("post_mlp_layernorm.weight"):
                p.copy_(1 + 0.5 * torch.randn(p.shape, generator=g))
    model = copy.deepcopy(ref)
    w = model.model.layers[0].mlp.post_mlp_layernorm.weight
    _patched_equals_eager(ref, _ids(), model)
    moe = model.model.layers[0].mlp
    assert moe.config.output_norm_eps == ref.config.rms_norm_eps
    assert moe.output_norm.weight is w


def test_minimax_m3_shared_expert_with_fused_gate_up():
    """MiniMax-M3-VL's shared expert is one gate_up_proj Linear and a down_proj with GPT-OSS's
    clamped GLU on [gate | up] halves: ``SharedExperts.Config(fused_gate_up=True)`` holding
    the block's own Parameter, the activation found on a probe."""
    ref = _model("minimax_m3_vl")
    model = copy.deepcopy(ref)
    lm = model.model.language_model if hasattr(model.model, "language_model") else model.model
    w = lm.layers[0].mlp.shared_experts.gate_up_proj.weight
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _patched_equals_eager(ref, _ids(), model)
    sh = lm.layers[0].mlp.shared_experts
    assert sh.config.fused_gate_up and sh.gate_up_proj.weight is w
    assert sh.config.activation.startswith("gpt_oss")


def test_moe_config_checks_of_the_new_fields():
    from moekit import MoE, SharedExperts

    with pytest.raises(ValueError, match="two capacity rules"):
        MoE.Config(dim=8, hidden_dim=4, num_experts=4, sequence_capacity=2, capacity_factor=1.0)
    with pytest.raises(ValueError, match="sequence_capacity=0"):
        MoE.Config(dim=8, hidden_dim=4, num_experts=4, sequence_capacity=0)
    with pytest.raises(TypeError, match="output_bias"):
        MoE.Config(dim=8, hidden_dim=4, num_experts=4, output_bias="yes")
    with pytest.raises(ValueError, match="output_norm_eps"):
        MoE.Config(dim=8, hidden_dim=4, num_experts=4, output_norm_eps=-1.0)
    with pytest.raises(ValueError, match="fused_gate_up=True needs a gated activation"):
        SharedExperts.Config(hidden_dim=4, activation="relu2", fused_gate_up=True)


def test_fused_shared_experts_equal_separate_ones():
    from moekit import SharedExperts

    torch.manual_seed(0)
    sep = SharedExperts.Config(hidden_dim=6, activation="gelu").build(dim=8)
    fused = SharedExperts.Config(hidden_dim=6, activation="gelu", fused_gate_up=True).build(dim=8)
    assert fused.gate_proj is None and fused.up_proj is None
    with torch.no_grad():
        fused.gate_up_proj.weight.copy_(torch.cat([sep.gate_proj.weight, sep.up_proj.weight]))
        fused.down_proj.weight.copy_(sep.down_proj.weight)
    x = torch.randn(5, 8)
    torch.testing.assert_close(fused(x), sep(x))


def test_sequence_capacity_drops_by_position_in_each_sequence():
    """Each expert keeps its first ``sequence_capacity`` slots of each sequence: a dropped
    token's output is the shared part only (here none: zero), a kept one is unchanged."""
    from moekit import MoE

    torch.manual_seed(0)
    cfg = MoE.Config(dim=8, hidden_dim=4, num_experts=2, output_bias=True)
    free = cfg.build()
    capped = cfg.replace(sequence_capacity=2).build()
    capped.load_state_dict(free.state_dict())
    with torch.no_grad():
        free.output_bias.fill_(0.5)
        capped.output_bias.fill_(0.5)
    x = torch.randn(3, 5, 8)
    y_free, y_cap = free(x), capped(x)
    ids = free.last_router_output.topk_ids.view(3, 5)
    for b in range(3):
        for s in range(5):
            kept = int((ids[b, : s + 1] == ids[b, s]).sum()) <= 2
            want = y_free[b, s] if kept else torch.full((8,), 0.5)
            torch.testing.assert_close(y_cap[b, s], want)


@pytest.mark.parametrize("family,flag", [("ernie4_5_moe", "use_bias"), ("deepseek_v4", "mlp_bias")])
def test_shared_experts_with_biases(family, flag):
    """ERNIE-4.5's ``use_bias`` and DeepSeek-V4's ``mlp_bias`` put biases on the shared MLP
    (not on the routed experts): ``SharedExperts.Config(use_bias=True)`` holds them, the same
    Parameter objects; output and every gradient (the biases' too) equal eager's."""
    ref = _model(family, **{flag: True})
    with torch.no_grad():
        for n, p in ref.named_parameters():
            if "shared_experts" in n and n.endswith(".bias"):
                p.normal_(0.0, 0.5)  # zero-initialised: make them matter
    biases = {n: p for n, p in ref.named_parameters() if "shared_experts" in n and n.endswith(".bias")}
    assert len(biases) >= 3
    model = copy.deepcopy(ref)
    same = {n: p for n, p in model.named_parameters() if n in biases}
    _patched_equals_eager(ref, _ids(), model)
    moe = next(m for m in model.modules() if isinstance(m, mh.HFMoE))
    assert moe.config.shared_experts.use_bias
    held = {id(p) for p in model.parameters()}
    assert all(id(p) in held for p in same.values())  # the block's own bias Parameters


def test_shared_experts_bias_config():
    """SharedExperts(use_bias=True) against a hand-written biased SwiGLU MLP; TP refuses it."""
    from moekit import SharedExperts

    se = SharedExperts.Config(hidden_dim=6, use_bias=True).build(dim=4)
    assert all(torch.count_nonzero(lin.bias) == 0 for lin in (se.gate_proj, se.up_proj, se.down_proj))
    with torch.no_grad():
        for lin in (se.gate_proj, se.up_proj, se.down_proj):
            lin.bias.normal_()
    x = torch.randn(5, 4)
    g, u = x @ se.gate_proj.weight.T + se.gate_proj.bias, x @ se.up_proj.weight.T + se.up_proj.bias
    want = (torch.nn.functional.silu(g) * u) @ se.down_proj.weight.T + se.down_proj.bias
    torch.testing.assert_close(se(x), want)
    with pytest.raises(TypeError, match="use_bias"):
        SharedExperts.Config(hidden_dim=6, use_bias=1)
    from moekit.parallel.tp import TPSharedExperts

    with pytest.raises(ValueError, match="use_bias=True run local or external"):
        TPSharedExperts(se, None)
