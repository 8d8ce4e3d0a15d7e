"""moekit.hf against the transformers originals, one tiny random model per family (offline).

For each named family: logits and the gradient of every parameter equal the original's
(fp32: max abs diff <= 1e-4 x max|ref|), through ``experts_implementation="moekit"`` and
through ``patch``; router logits (``output_router_logits``) and the aux loss are the same;
``patch -> unpatch -> save_pretrained -> from_pretrained`` gives the same logits; a generic
family patches by structure; an inexpressible one raises a clear error.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

transformers = pytest.importorskip("transformers", minversion="5.0")
mh = pytest.importorskip("moekit.hf")

from transformers.integrations.moe import ExpertsInterface  # noqa: E402

import moekit  # noqa: E402
from moekit.hf.tiny import COMMON_FIELDS as COMMON  # noqa: E402
from moekit.hf.tiny import build_tiny, tiny_config  # noqa: E402

warnings.filterwarnings("ignore")
pytestmark = pytest.mark.filterwarnings("ignore:moekit.hf.patch:UserWarning")
transformers.logging.set_verbosity_error()

V = 97  # the tiny models' vocabulary (moekit.hf.tiny)
_cfg = tiny_config


FAMILIES = [
    "mixtral",
    "qwen2_moe",
    "qwen3_moe",
    "qwen3_moe_norm",
    "deepseek_v3",
    "gpt_oss",
    "llama4",
    "olmoe",
]


def _build(config) -> torch.nn.Module:
    return build_tiny(config, seed=0).float().eval()


def _ids(B=2, S=7, seed=3):
    return torch.randint(3, V, (B, S), generator=torch.Generator().manual_seed(seed))


def _tol_close(got, ref, what, rel=1e-4):
    scale = ref.abs().max().item()
    err = (got.float() - ref.float()).abs().max().item()
    assert err <= rel * max(scale, 1e-6) + 1e-7, (
        f"{what}: max abs diff {err:.3g} > {rel} x {scale:.3g}"
    )


def _loss(out):
    w = torch.randn(out.logits.shape, generator=torch.Generator().manual_seed(5))
    return (out.logits * w).sum()


def _check_grads(model, ref_model):
    ref = {n: p.grad for n, p in ref_model.named_parameters() if p.grad is not None}
    got = mh.grads_by_hf_name(model)
    assert set(got) == set(ref), f"grad names differ: {sorted(set(got) ^ set(ref))[:6]}"
    for n in ref:
        _tol_close(got[n], ref[n], f"grad {n}")


@pytest.fixture(scope="module", params=FAMILIES)
def family_model(request):
    model = _build(_cfg(request.param))
    model.set_experts_implementation("eager")
    out = model(_ids(), output_router_logits=True)
    _loss(out).backward()
    return request.param, model, out


def _has_decorated_experts(model) -> bool:
    return any(hasattr(m, "has_gate") and hasattr(m, "is_transposed") for m in model.modules())


def test_register_on_import():
    assert ExpertsInterface._global_mapping["moekit"] is mh.moekit_experts_forward


def test_experts_implementation_matches(family_model, monkeypatch):
    family, ref_model, ref_out = family_model
    model = copy.deepcopy(ref_model)
    model.zero_grad(set_to_none=True)
    calls = []

    def counting(self, *a, **k):
        calls.append(type(self).__name__)
        return mh.moekit_experts_forward(self, *a, **k)

    monkeypatch.setitem(ExpertsInterface._global_mapping, "moekit", counting)
    model.set_experts_implementation("moekit")
    out = model(_ids(), output_router_logits=True)
    _tol_close(out.logits, ref_out.logits, f"{family} logits")
    _loss(out).backward()
    _check_grads(model, ref_model)
    if _has_decorated_experts(ref_model):
        assert calls, "the moekit experts implementation was never called"
    else:  # Llama 4's experts are not @use_experts_implementation in transformers 5.x
        assert family == "llama4" and not calls


def test_patch_matches(family_model):
    family, ref_model, ref_out = family_model
    model = copy.deepcopy(ref_model)
    model.zero_grad(set_to_none=True)
    names = mh.patch(model)
    n_moe = sum(1 for m in ref_model.modules() if mh.patching.spec_for_block(m) is not None)
    assert len(names) == n_moe > 0
    for n in names:
        assert isinstance(model.get_submodule(n), moekit.MoE)
    if family == "deepseek_v3":  # dense first layer stays dense
        assert names == ["model.layers.1.mlp"]
    out = model(_ids(), output_router_logits=True)
    _tol_close(out.logits, ref_out.logits, f"{family} logits")
    # router logits for transformers' load-balancing loss (where the family returns them)
    if getattr(ref_out, "router_logits", None) is not None:
        assert len(out.router_logits) == len(ref_out.router_logits)
        for a, b in zip(out.router_logits, ref_out.router_logits):
            _tol_close(a, b, f"{family} router logits")
    elif int(transformers.__version__.split(".")[1]) >= 23:
        pytest.fail(f"{family}: the original returned no router logits")
    if getattr(ref_out, "aux_loss", None) is not None:
        _tol_close(out.aux_loss, ref_out.aux_loss, f"{family} aux loss")
    _loss(out).backward()
    _check_grads(model, ref_model)


def test_patch_shares_storage(family_model):
    family, ref_model, _ = family_model
    model = copy.deepcopy(ref_model)
    before = {n: p.data_ptr() for n, p in model.named_parameters()}
    mh.patch(model)
    moe = next(m for m in model.modules() if isinstance(m, mh.HFMoE))
    ptrs = {p.data_ptr() for p in moe.parameters()}
    assert moe.router.gate.weight.data_ptr() in before.values()
    if family != "gpt_oss":  # GPT-OSS's interleaved gate/up is converted, the rest shared
        assert ptrs <= set(before.values())


def test_patch_unpatch_save_load(family_model, tmp_path):
    family, ref_model, _ = family_model
    model = copy.deepcopy(ref_model)
    mh.patch(model)
    # change the weights through the patched modules: unpatch must carry the current ones
    moe = next(m for m in model.modules() if isinstance(m, mh.HFMoE))
    with torch.no_grad():
        moe.experts.down_proj.mul_(1.5)
        moe.router.gate.weight.add_(0.1)
        if moe.router.expert_bias is not None:
            moe.router.expert_bias.add_(0.05)
    ids = _ids(seed=9)
    want = model(ids).logits
    assert mh.unpatch(model)
    assert not any(isinstance(m, mh.HFMoE) for m in model.modules())
    _tol_close(model(ids).logits, want, f"{family} unpatched logits")
    model.save_pretrained(tmp_path)
    cls = type(model)
    loaded = cls.from_pretrained(tmp_path).eval()
    _tol_close(loaded(ids).logits, want, f"{family} reloaded logits")
    # and loading straight into the moekit experts implementation
    fast = cls.from_pretrained(tmp_path, experts_implementation="moekit").eval()
    assert fast.config._experts_implementation == "moekit"
    _tol_close(
        fast(ids).logits, want, f"{family} reloaded (experts_implementation='moekit') logits"
    )


def test_patched_moekit_features():
    model = _build(_cfg("deepseek_v3"))
    mh.patch(model)
    moe = model.model.layers[1].mlp
    assert isinstance(moe, moekit.MoE)
    model(_ids())
    stats = moe.load_stats()
    assert float(moe.tokens_per_expert.sum()) == 2 * 7 * 2
    before = moe.router.expert_bias.clone()
    moe.update_expert_bias()
    assert not torch.equal(before, moe.router.expert_bias)
    assert stats is not None


def test_config_from_hf():
    c = mh.config_from_hf(_cfg("deepseek_v3"))
    r = c.router
    assert (r.score_func, r.route_norm, r.route_scale, r.use_expert_bias) == (
        "sigmoid",
        True,
        2.5,
        True,
    )
    assert (r.num_expert_groups, r.num_limited_groups, r.top_k) == (4, 2, 2)
    assert c.shared_experts.hidden_dim == 16 and c.num_experts == 8 and c.hidden_dim == 16
    g = mh.config_from_hf(_cfg("gpt_oss"))
    assert g.router.topk_before_score and g.router.use_router_bias
    assert g.experts.activation == "gpt_oss" and g.experts.use_bias
    l4 = mh.config_from_hf(_cfg("llama4"))
    assert l4.router.score_func == "sigmoid" and l4.router.topk_before_score
    assert l4.experts.routing_weight_on == "input" and l4.shared_experts is not None
    q2 = mh.config_from_hf(_cfg("qwen2_moe"))
    assert q2.shared_experts.use_gate and q2.shared_experts.hidden_dim == 20
    assert mh.config_from_hf(_cfg("qwen3_moe_norm")).router.route_norm
    assert not mh.config_from_hf(_cfg("qwen3_moe")).router.route_norm


def test_inexpressible_raises():
    with pytest.raises(mh.PatchError, match="router_jitter_noise"):
        mh.config_from_hf(_cfg("mixtral", router_jitter_noise=0.1))
    assert mh.config_from_hf(_cfg("gpt_oss", swiglu_limit=5.0)).experts.activation == (
        "gpt_oss(alpha=1.702,limit=5.0)"
    )
    model = _build(_cfg("mixtral", router_jitter_noise=0.1))
    with pytest.raises(mh.PatchError, match=r"model\.layers\.0\.mlp.*router_jitter_noise"):
        mh.patch(model)
    assert not any(isinstance(m, mh.HFMoE) for m in model.modules())  # nothing swapped


GENERIC_KW = dict(
    COMMON,
    intermediate_size=24,
    moe_intermediate_size=16,
    num_experts=4,
    num_local_experts=4,
    n_routed_experts=8,
    num_experts_per_tok=2,
)


GENERIC_EXTRA = {
    "minimax": {},
    "minimax_m2": {},  # expert bias kept on the block (declarative map)
    "granitemoe": {},
    "glm4_moe": {},
    "exaone_moe": {},
    "hunyuan_v1_moe": {},  # gate Linear inside the router (gate.wg)
    "afmoe": {"route_scale": 1.7},
    "ernie4_5_moe": {
        "moe_num_shared_experts": 1
    },  # map: selection bias [1, E] in gate.moe_statics  # declarative map: gate in router.gate, bias on the block
    "dots1": {"n_shared_experts": 1, "first_k_dense_replace": 0},
    "qwen3_next": {"layer_types": ["linear_attention", "full_attention"]},
    "deepseek_v2": {  # declarative map: group-limited greedy on the group max
        "head_dim": None,
        "kv_lora_rank": 8,
        "q_lora_rank": 8,
        "qk_rope_head_dim": 4,
        "qk_nope_head_dim": 4,
        "v_head_dim": 8,
        "first_k_dense_replace": 0,
        "n_group": 4,
        "topk_group": 2,
        "topk_method": "group_limited_greedy",
        "routed_scaling_factor": 1.5,
    },
}


def _generic_config(model_type):
    kw = {
        k: v
        for k, v in {**GENERIC_KW, **GENERIC_EXTRA.get(model_type, {})}.items()
        if v is not None
    }
    try:
        return transformers.AutoConfig.for_model(model_type, **kw)
    except (ValueError, KeyError):
        pytest.skip(f"transformers {transformers.__version__} has no {model_type}")


@pytest.mark.parametrize("model_type", list(GENERIC_EXTRA))
def test_generic_families(model_type):
    """Families beyond the named seven: found by structure (small declarative maps where names
    differ), routing confirmed on a random router copy, exact."""
    ref = _build(_generic_config(model_type))
    ref.set_experts_implementation("eager")
    model = copy.deepcopy(ref)
    ids = _ids()
    want = ref(ids, output_router_logits=True)
    names = mh.patch(model)
    assert names and all(isinstance(model.get_submodule(n), mh.HFMoE) for n in names)
    got = model(ids, output_router_logits=True)
    _tol_close(got.logits, want.logits, f"{model_type} logits")
    if getattr(want, "router_logits", None) is not None:
        assert len(got.router_logits) == len(want.router_logits)
        for a, b in zip(got.router_logits, want.router_logits):
            _tol_close(a, b, f"{model_type} router logits")
    # the experts implementation too
    fast = copy.deepcopy(ref)
    fast.set_experts_implementation("moekit")
    _tol_close(fast(ids).logits, want.logits, f"{model_type} experts_implementation logits")
    assert mh.unpatch(model)
    _tol_close(model(ids).logits, want.logits, f"{model_type} unpatched logits")


def test_phimoe_sparsemixer_patch_matches_in_training():
    """PhiMoE's sparsemixer routing, in training mode: the patched block samples the same
    experts from the same RNG state and gets transformers' custom gradient."""
    ref = _build(_generic_config("phimoe")).train()
    for m in ref.modules():  # no dropout: only the routing samples
        if isinstance(m, torch.nn.Dropout):
            m.p = 0.0
    model = copy.deepcopy(ref)
    names = mh.patch(model)
    assert len(names) == 2 and model.model.layers[0].mlp.router.config.routing == "sparsemixer"
    assert model.training
    outs = []
    for m in (ref, model):
        torch.manual_seed(11)
        out = m(_ids(B=3, S=9))
        _loss(out).backward()
        outs.append(out.logits)
    _tol_close(outs[1], outs[0], "phimoe training logits")
    _check_grads(model, ref)
    with pytest.raises(mh.PatchError, match="input_jitter_noise=0.1"):
        mh.config_from_hf(_generic_config("phimoe").__class__(**{
            **_generic_config("phimoe").to_dict(), "input_jitter_noise": 0.1}))


@pytest.mark.parametrize("family", ["mixtral", "gpt_oss"])
def test_patch_bf16_tolerance_rule(family):
    """bf16: moekit's error vs the fp32 original is at most 2x transformers' own bf16 error."""
    ref32 = _build(_cfg(family))
    ids = _ids()
    want = ref32(ids).logits
    hf16 = copy.deepcopy(ref32).to(torch.bfloat16)
    hf16.set_experts_implementation("eager")
    mk16 = copy.deepcopy(hf16)
    mh.patch(mk16)
    err_hf = (hf16(ids).logits.float() - want).abs().max().item()
    err_mk = (mk16(ids).logits.float() - want).abs().max().item()
    assert err_mk <= 2 * err_hf + 1e-2 * want.abs().max().item(), (err_mk, err_hf)


def test_generic_inexpressible_router_names_block():
    """A router that no TokenChoiceTopKRouter config reproduces: a clear error, no swap."""
    model = _build(_cfg("qwen3_moe"))
    gate = model.model.layers[0].mlp.gate
    orig_forward = type(gate).forward

    class OddRouter(type(gate)):  # a family whose routing squares the probabilities
        def forward(self, h):
            logits, w, ids = orig_forward(self, h)
            return logits, w * w, ids

    for layer in model.model.layers:
        layer.mlp.gate.__class__ = OddRouter
        layer.mlp.__class__ = type("OddSparseMoeBlock", (type(layer.mlp),), {})
    with pytest.raises(
        mh.PatchError, match=r"model\.layers\.0\.mlp \(OddSparseMoeBlock\).*OddRouter"
    ):
        mh.patch(model)


GPU_FAMILIES = ["mixtral", "qwen2_moe", "deepseek_v3", "gpt_oss", "llama4"]
needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_gpu_fp32_model(family):
    """On a GPU in fp32: both paths give the original's logits and gradients."""
    ref = _build(_cfg(family)).cuda()
    ref.set_experts_implementation("eager")
    ids = _ids(B=4, S=16).cuda()
    want = ref(ids)
    _loss_cuda(want).backward()
    fast = copy.deepcopy(ref)
    fast.zero_grad(set_to_none=True)
    fast.set_experts_implementation("moekit")
    patched = copy.deepcopy(ref)
    patched.zero_grad(set_to_none=True)
    mh.patch(patched)
    for name, m in (("experts_implementation", fast), ("patch", patched)):
        out = m(ids)
        _tol_close(out.logits, want.logits, f"{family} {name} logits (cuda fp32)")
        _loss_cuda(out).backward()
        _check_grads(m, ref)


def _loss_cuda(out):
    g = torch.Generator().manual_seed(5)
    return (out.logits * torch.randn(out.logits.shape, generator=g).to(out.logits.device)).sum()


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("family", GPU_FAMILIES)
def test_gpu_bf16_block(family):
    """On a GPU in bf16, one MoE block (no routing flips from earlier layers): each path's
    error vs the fp32 block is at most 2x transformers' own bf16 error (+ a small atol)."""
    model = _build(_cfg(family)).cuda()
    name, block = [(n, m) for n, m in model.named_modules() if mh.patching.spec_for_block(m)][-1]
    x = torch.randn(
        2, 32, model.config.hidden_size, generator=torch.Generator().manual_seed(7)
    ).cuda()

    def run(blk, inp):
        y = blk(inp)
        return (y[0] if isinstance(y, tuple) else y).float().reshape(inp.shape)

    def variant(impl):
        blk = copy.deepcopy(block).to(torch.bfloat16)
        if hasattr(blk.experts, "has_gate"):
            blk.experts.config._experts_implementation_internal = impl
        return blk

    with torch.no_grad():
        want = run(block, x)
        err_hf = (run(variant("eager"), x.bfloat16()) - want).abs().max().item()
        box = torch.nn.Module()
        box.config, box.block = model.config, variant("eager")
        mh.patch(box)
        errs = {
            "experts_implementation": (run(variant("moekit"), x.bfloat16()) - want)
            .abs()
            .max()
            .item(),
            "patch": (run(box.block, x.bfloat16()) - want).abs().max().item(),
        }
    atol = 2e-3 * want.abs().max().item()
    for k, err in errs.items():
        assert err <= 2 * err_hf + atol, (family, k, err, err_hf)


# ------------------------------------------------------------------ expert parallelism
def _ep_worker(rank, world, port):
    import os
    from datetime import timedelta

    import torch.distributed as dist

    from moekit.parallel import apply_ep

    os.environ.setdefault("OMP_NUM_THREADS", "1")
    torch.set_num_threads(1)
    transformers.logging.set_verbosity_error()
    dist.init_process_group(
        "gloo",
        init_method=f"tcp://127.0.0.1:{port}",
        rank=rank,
        world_size=world,
        timeout=timedelta(seconds=60),
    )
    try:
        ref = _build(_cfg("qwen2_moe"))
        ref.set_experts_implementation("eager")
        ids = _ids(seed=20 + rank)  # each rank its own tokens
        want = ref(ids).logits
        model = copy.deepcopy(ref)
        for n in mh.patch(model):
            apply_ep(model.get_submodule(n))
        got = model(ids).logits
        _tol_close(got, want, f"rank {rank} expert-parallel logits")
        with pytest.raises(ValueError, match="apply_ep"):
            mh.unpatch(model)
        dist.barrier()
    finally:
        dist.destroy_process_group()


def test_patched_model_expert_parallel():
    """apply_ep on the patched blocks (2 CPU processes, gloo): same logits as one process."""
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_ep_worker, args=(2, port), nprocs=2, join=True)


@pytest.mark.parametrize("over", [{"swiglu_limit": 0.5}, {"swiglu_alpha": 1.2, "swiglu_limit": 3.0}])
def test_gpt_oss_other_glu_constants(over):
    """Another swiglu_alpha / swiglu_limit: the experts implementation uses the family's own
    gate function; patch the parametrised ``gpt_oss(alpha=..,limit=..)`` activation. Both
    exact, gradients too."""
    ref = _build(_cfg("gpt_oss", **over))
    ref.set_experts_implementation("eager")
    ids = _ids()
    want = ref(ids)
    _loss(want).backward()
    fast = copy.deepcopy(ref)
    fast.zero_grad(set_to_none=True)
    fast.set_experts_implementation("moekit")
    patched = copy.deepcopy(ref)
    patched.zero_grad(set_to_none=True)
    mh.patch(patched)
    act = patched.model.layers[0].mlp.experts.activation
    assert act.startswith("gpt_oss(") and f"limit={float(over['swiglu_limit'])}" in act
    for name, m in (("experts_implementation", fast), ("patch", patched)):
        out = m(ids)
        _tol_close(out.logits, want.logits, f"gpt_oss {over} {name} logits")
        _loss(out).backward()
        _check_grads(m, ref)


def test_gpt_oss_experts_implementation_takes_the_fused_path(monkeypatch):
    """GPT-OSS at the released alpha/limit runs through moe_experts (interleaved gate/up read in
    place, no staged path) with the original's logits and gradients."""
    from moekit.hf import experts_impl
    from moekit.ops import api

    calls = []
    real = api.moe_experts

    def spy(*a, **k):
        calls.append(k.get("gate_up_interleaved"))
        return real(*a, **k)

    monkeypatch.setattr(api, "moe_experts", spy)
    ref = _build(_cfg("gpt_oss"))
    ref.set_experts_implementation("eager")
    ids = _ids()
    want = ref(ids)
    (want.logits.square().mean()).backward()
    fast = copy.deepcopy(ref)
    fast.zero_grad(set_to_none=True)
    fast.set_experts_implementation("moekit")
    got = fast(ids)
    assert calls and all(c is True for c in calls), calls
    _tol_close(got.logits, want.logits, "gpt_oss experts_implementation logits")
    (got.logits.square().mean()).backward()
    _check_grads(fast, ref)
    assert experts_impl._gpt_oss_activation(
        next(m for m in fast.modules() if type(m).__name__ == "GptOssExperts")) == "gpt_oss"


def test_longcat_flash_zero_experts_patch():
    """LongCat-Flash's zero-computation experts: patched exactly (logits, every grad, the
    never-read zero-expert rows of gate_up_proj included), tokens do reach the zero experts,
    and unpatch / hf_state_dict give back the original tensors bit for bit."""
    from moekit.hf.discover import build_model, family_by_name

    ref = build_model(family_by_name("longcat_flash"))
    sd0 = {k: v.clone() for k, v in ref.state_dict().items()}
    model = copy.deepcopy(ref)
    assert len(mh.patch(model)) == 2
    moe = model.model.layers[0].mlp
    E, Z = ref.config.n_routed_experts, ref.config.zero_expert_num
    assert moe.config.zero_experts == Z and moe.experts.w_up.shape[0] == E
    ids = _ids()
    outs = [m(ids) for m in (ref, model)]
    for out in outs:
        _loss(out).backward()
    _tol_close(outs[1].logits, outs[0].logits, "longcat logits")
    assert int(moe.tokens_per_expert[E:].sum()) > 0  # some tokens took a zero expert
    _check_grads(model, ref)
    sd = mh.hf_state_dict(model)
    assert set(sd) == set(sd0) and all(torch.equal(sd[k], sd0[k]) for k in sd0)
    mh.unpatch(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], sd0[k]) for k in sd0)


def test_deepseek_v4_hash_and_sqrtsoftplus_layers_patch():
    """DeepSeek-V4: hash layers route by the token-id table tid2eid (the block receives
    input_ids), the others by sqrt(softplus) scores with the selection bias; experts and the
    shared expert use the clamped SwiGLU. Logits and every grad as transformers'."""
    from moekit.hf.discover import build_model, family_by_name

    ref = build_model(family_by_name("deepseek_v4"))
    sd0 = {k: v.clone() for k, v in ref.state_dict().items()}
    model = copy.deepcopy(ref)
    assert len(mh.patch(model)) == 2
    hash_moe, learned = model.model.layers[0].mlp, model.model.layers[1].mlp
    assert hash_moe.router.config.routing == "hash" and hash_moe.router.config.hash_weights == "scores"
    assert torch.equal(hash_moe.router.hash_table, sd0["model.layers.0.mlp.gate.tid2eid"])
    assert learned.router.config.score_func == "sqrtsoftplus" and learned.router.expert_bias is not None
    assert hash_moe.shared_experts.config.activation == "silu(limit=10.0)"
    ids = _ids()
    outs = [m(ids) for m in (ref, model)]
    for out in outs:
        _loss(out).backward()
    _tol_close(outs[1].logits, outs[0].logits, "deepseek_v4 logits")
    _check_grads(model, ref)
    with pytest.raises(ValueError, match="routing='hash' needs input_ids"):
        hash_moe(torch.randn(1, 3, 32))
    mh.unpatch(model)
    after = model.state_dict()
    assert all(torch.equal(after[k], sd0[k]) for k in sd0)
