"""Module state between calls: only detached or plain values, so that the ordinary PyTorch
workflows (deepcopy, pickle, state_dict, torch.save) work after any forward, and load
statistics stay available. One torch.compile(fullgraph=True) case on CPU in float32.
"""

from __future__ import annotations

import copy
import io
import pickle

import pytest
import torch

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.presets import get_preset

D, F, E, K = 8, 16, 4, 2
R = TokenChoiceTopKRouter.Config


def cfg(name):
    base = {"dim": D, "hidden_dim": F, "num_experts": E}
    return {
        "default": lambda: MoE.Config(**base, router=R(top_k=K)),
        "aux-and-z-loss": lambda: MoE.Config(**base, router=R(top_k=K), load_balance_coeff=0.1, z_loss_coeff=0.1),
        "seq-aux-loss": lambda: MoE.Config(**base, router=R(top_k=K), seq_aux_loss_coeff=0.1),
        "expert-bias": lambda: MoE.Config(**base, router=R(top_k=K, use_expert_bias=True)),
        "shared-gated": lambda: MoE.Config(**base, router=R(top_k=K),
                                           shared_experts=SharedExperts.Config(hidden_dim=4, use_gate=True)),
        "capacity-drops": lambda: MoE.Config(**base, router=R(top_k=K), capacity_factor=0.5),
        "experts-bias-weight-on-input": lambda: MoE.Config(
            **base, router=R(top_k=K), experts=GroupedExperts.Config(use_bias=True, routing_weight_on="input")),
        "deepseek-v3-tiny": lambda: get_preset("deepseek-v3", tiny=True),
        "gpt-oss-tiny": lambda: get_preset("gpt-oss-20b", tiny=True),
    }[name]()


CONFIGS = ["default", "aux-and-z-loss", "seq-aux-loss", "expert-bias", "shared-gated", "capacity-drops",
           "experts-bias-weight-on-input", "deepseek-v3-tiny", "gpt-oss-tiny"]


def trained(name):
    """A layer after a training forward whose backward has not run yet (the worst moment)."""
    torch.manual_seed(0)
    moe = cfg(name).build().train()
    x = torch.randn(2, 3, moe.dim, requires_grad=True)
    y = moe(x)
    return moe, y


def graph_tensors(module: torch.nn.Module) -> list[str]:
    """Names of tensors kept on the modules (outside parameters and buffers) that belong to an
    autograd graph."""
    found = []

    def visit(name, v, depth=0):
        if depth > 3:
            return
        if isinstance(v, torch.Tensor):
            if v.grad_fn is not None or (v.requires_grad and not isinstance(v, torch.nn.Parameter)):
                found.append(name)
        elif isinstance(v, dict):
            for k, w in v.items():
                visit(f"{name}[{k!r}]", w, depth + 1)
        elif isinstance(v, (list, tuple)):
            for i, w in enumerate(v):
                visit(f"{name}[{i}]", w, depth + 1)
        elif hasattr(v, "__dataclass_fields__"):
            for k in v.__dataclass_fields__:
                visit(f"{name}.{k}", getattr(v, k), depth + 1)

    for mname, m in module.named_modules():
        for k, v in vars(m).items():
            if k not in ("_parameters", "_buffers", "_modules"):
                visit(f"{mname}.{k}", v)
    return found


@pytest.mark.parametrize("name", CONFIGS)
def test_deepcopy_after_training_forward(name):
    moe, y = trained(name)
    assert graph_tensors(moe) == []
    twin = copy.deepcopy(moe)
    x2 = torch.randn(4, moe.dim)
    torch.testing.assert_close(twin(x2), moe(x2), rtol=0, atol=0)
    assert torch.equal(twin.tokens_per_expert, moe.tokens_per_expert)
    y.sum().backward()  # the original graph is untouched by the copy


@pytest.mark.parametrize("name", ["default", "aux-and-z-loss", "expert-bias", "deepseek-v3-tiny"])
def test_pickle_and_torch_save_after_training_forward(name):
    moe, _ = trained(name)
    x2 = torch.randn(4, moe.dim)
    want = moe(x2)
    for twin in (pickle.loads(pickle.dumps(moe)), _saved_and_loaded(moe)):
        torch.testing.assert_close(twin(x2), want, rtol=0, atol=0)


def _saved_and_loaded(moe):
    buf = io.BytesIO()
    torch.save(moe, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=False)


@pytest.mark.parametrize("name", ["default", "expert-bias", "shared-gated"])
def test_state_dict_after_training_forward(name):
    moe, _ = trained(name)
    fresh = cfg(name).build()
    fresh.load_state_dict(moe.state_dict())
    x2 = torch.randn(4, moe.dim)
    torch.testing.assert_close(fresh(x2), moe(x2), rtol=0, atol=0)


def test_load_stats_after_deepcopy_count_the_routed_slots():
    moe, _ = trained("default")
    ids = moe.last_router_output.topk_ids
    want = torch.bincount(ids.reshape(-1), minlength=E).tolist()
    stats = copy.deepcopy(moe).load_stats()
    assert stats["tokens_per_expert"] == [float(v) for v in want]
    assert stats["total"] == ids.numel()


def test_last_router_output_is_detached_and_current():
    moe, _ = trained("default")
    r = moe.last_router_output
    for t in (r.topk_ids, r.topk_weights, r.scores, r.logits):
        assert t.grad_fn is None and not t.requires_grad
    x2 = torch.randn(3, D)
    moe(x2)
    fresh = moe.router(x2)
    assert torch.equal(moe.last_router_output.topk_ids, fresh.topk_ids)
    torch.testing.assert_close(moe.last_router_output.logits, fresh.logits.detach())


def test_forward_with_routing_gives_the_live_router_output():
    """A loss on the router's logits (transformers' output_router_logits) still trains the gate."""
    torch.manual_seed(0)
    moe = cfg("default").build()
    x = torch.randn(5, D)
    y, r = moe.forward_with_routing(x)
    torch.testing.assert_close(y, moe(x), rtol=0, atol=0)
    assert r.logits.grad_fn is not None
    r.logits.square().sum().backward()
    want = torch.autograd.grad(moe.router.compute_logits(x).square().sum(), moe.router.gate.weight)[0]
    torch.testing.assert_close(moe.router.gate.weight.grad, want)


def test_empty_batch_clears_the_last_routing():
    moe, _ = trained("aux-and-z-loss")
    assert moe.last_router_output is not None and moe.aux_losses
    y, r = moe.forward_with_routing(torch.randn(0, D))
    assert r is None and moe.last_router_output is None and moe.aux_losses == {}
    assert y.shape == (0, D)


def test_inference_mode_then_copy_and_update_bias():
    moe = cfg("expert-bias").build()
    with torch.inference_mode():
        moe(torch.randn(6, D))
    twin = copy.deepcopy(moe)
    delta = twin.update_expert_bias()
    counts = moe.tokens_per_expert.float()
    assert torch.equal(delta, 1e-3 * torch.sign(counts.mean() - counts))
    assert twin.tokens_per_expert.sum() == 0 and moe.tokens_per_expert.sum() == 6 * K


@pytest.mark.filterwarnings("ignore:`torch.jit.script_method` is deprecated:DeprecationWarning")
def test_compile_fullgraph_cpu_float32_equals_eager():
    torch.manual_seed(0)
    moe = MoE.Config(dim=D, hidden_dim=F, num_experts=E, router=R(top_k=K)).build()
    x = torch.randn(6, D)
    want = moe(x)
    compiled = torch.compile(moe, fullgraph=True)
    got = compiled(x)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    copy.deepcopy(moe)  # the state the compiled forward left is plain too


def test_patched_hf_model_aux_loss_still_trains_the_router():
    """The layer keeps a detached routing, but transformers' aux loss (output_router_logits)
    gets the live router logits: its gradients equal the original model's."""
    pytest.importorskip("transformers")
    import moekit.hf as mh
    from moekit.hf.tiny import tiny_model

    ref = tiny_model("mixtral", 0).float()
    model = copy.deepcopy(ref)
    mh.patch(model)
    ids = torch.randint(3, ref.config.vocab_size, (2, 8), generator=torch.Generator().manual_seed(0))
    for m in (ref, model):
        m(ids, output_router_logits=True).aux_loss.backward()
    want = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None and "gate.weight" in n}
    got = mh.grads_by_hf_name(model)
    assert want
    for n, g in want.items():
        torch.testing.assert_close(got[n], g, rtol=1e-5, atol=1e-6)
    copy.deepcopy(model)  # and the patched model copies after a training forward
