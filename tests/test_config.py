"""Config/build pattern and every validation error of issue 3 (ValueError naming the field)."""

from __future__ import annotations

import dataclasses

import pytest
import torch

import moekit
from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.ops import moe_experts
from moekit.plan import make_plan

R = TokenChoiceTopKRouter.Config


def moe_cfg(**kw):
    base = dict(dim=16, hidden_dim=8, num_experts=8, router=R(top_k=2))
    base.update(kw)
    return MoE.Config(**base)


# ------------------------------------------------------------------ Config / build


def test_configs_are_kw_only_dataclasses():
    for cls in (R, GroupedExperts.Config, SharedExperts.Config, MoE.Config):
        assert dataclasses.is_dataclass(cls)
        assert issubclass(cls, moekit.Config)
    with pytest.raises(TypeError):
        R(2)  # kw_only


def test_router_build_sets_parent_fields():
    r = R(top_k=3, use_router_bias=True, use_expert_bias=True).build(dim=12, num_experts=6)
    assert isinstance(r, TokenChoiceTopKRouter)
    assert (r.dim, r.num_experts, r.top_k) == (12, 6, 3)
    assert tuple(r.gate.weight.shape) == (6, 12)
    assert tuple(r.gate.bias.shape) == (6,)
    assert tuple(r.expert_bias.shape) == (6,) and r.expert_bias.dtype == torch.float32
    assert "expert_bias" in dict(r.named_buffers())
    r2 = R(top_k=1).build(dim=12, num_experts=6)
    assert r2.gate.bias is None and r2.expert_bias is None


@pytest.mark.parametrize(
    "activation,gated,up_name,up_rows",
    [("silu", None, "gate_up_proj", 2 * 5), ("relu2", None, "up_proj", 5),
     ("gelu", False, "up_proj", 5), ("gpt_oss", None, "gate_up_proj", 10)],
)
@pytest.mark.parametrize("use_bias", [False, True])
def test_experts_build_shapes(activation, gated, up_name, up_rows, use_bias):
    ex = GroupedExperts.Config(activation=activation, gated=gated, use_bias=use_bias).build(
        dim=7, hidden_dim=5, num_experts=3
    )
    params = dict(ex.named_parameters())
    assert tuple(params[up_name].shape) == (3, up_rows, 7)
    assert tuple(params["down_proj"].shape) == (3, 7, 5)
    if use_bias:
        assert tuple(params[up_name + "_bias"].shape) == (3, up_rows)
        assert tuple(params["down_proj_bias"].shape) == (3, 7)
    else:
        assert set(params) == {up_name, "down_proj"}
    assert (ex.dim, ex.hidden_dim, ex.num_experts) == (7, 5, 3)


def test_shared_build_shapes():
    s = SharedExperts.Config(hidden_dim=9, use_gate=True).build(dim=4)
    assert tuple(s.gate_proj.weight.shape) == (9, 4)
    assert tuple(s.up_proj.weight.shape) == (9, 4)
    assert tuple(s.down_proj.weight.shape) == (4, 9)
    assert tuple(s.expert_gate.weight.shape) == (1, 4)
    s2 = SharedExperts.Config(hidden_dim=9, activation="relu2").build(dim=4)
    assert s2.gate_proj is None and s2.expert_gate is None


def test_moe_build_propagates_nested_configs():
    cfg = moe_cfg(
        router=R(top_k=3, score_func="sigmoid"),
        experts=GroupedExperts.Config(activation="gelu", use_bias=True),
        shared_experts=SharedExperts.Config(hidden_dim=12),
        capacity_factor=1.5, drop_policy="weight",
    )
    moe = cfg.build()
    assert isinstance(moe, MoE) and isinstance(moe, torch.nn.Module)
    assert moe.router.config is cfg.router and moe.experts.config is cfg.experts
    assert cfg.top_k == 3 and moe.router.top_k == 3
    assert (moe.router.dim, moe.router.num_experts) == (16, 8)
    assert (moe.experts.dim, moe.experts.hidden_dim, moe.experts.num_experts) == (16, 8, 8)
    assert (moe.experts.capacity_factor, moe.experts.drop_policy) == (1.5, "weight")
    assert moe.shared_experts.dim == 16 and moe.shared_experts.hidden_dim == 12
    assert tuple(moe.experts.gate_up_proj.shape) == (8, 16, 16)
    assert tuple(moe.tokens_per_expert.shape) == (8,)
    # public names used outside the repository
    assert moe.experts.gate_up_proj is not None and moe.experts.down_proj is not None
    assert isinstance(moe.router.gate, torch.nn.Linear)


def test_default_moe_config_builds_and_runs():
    moe = MoE.Config(dim=8, hidden_dim=4, num_experts=2).build()
    y = moe(torch.randn(3, 8))
    assert y.shape == (3, 8)


def test_activation_aliases_are_canonical():
    assert GroupedExperts.Config(activation="swiglu").activation == "silu"
    assert GroupedExperts.Config(activation="geglu").activation == "gelu"
    assert GroupedExperts.Config(activation="squared_relu").activation == "relu2"
    assert SharedExperts.Config(hidden_dim=2, activation="swiglu").activation == "silu"
    assert GroupedExperts.Config(activation="relu2").is_gated is False
    assert GroupedExperts.Config(activation="silu").is_gated is True
    assert GroupedExperts.Config(activation="silu", gated=False).is_gated is False


def test_replace_revalidates_and_to_dict():
    c = R(top_k=2)
    assert c.replace(top_k=4).top_k == 4 and c.top_k == 2
    with pytest.raises(ValueError, match="top_k"):
        c.replace(top_k=0)
    d = moe_cfg().to_dict()
    assert d["router"]["top_k"] == 2 and d["dim"] == 16


def test_unattached_config_build_raises():
    @dataclasses.dataclass(kw_only=True)
    class Lonely(moekit.Config):
        x: int = 1

    with pytest.raises(TypeError):
        Lonely().build()


def test_route_norm_with_top_k_1_is_allowed_and_gives_weight_1():
    r = R(top_k=1, route_norm=True).build(dim=4, num_experts=3)
    out = r(torch.randn(5, 4))
    torch.testing.assert_close(out.topk_weights, torch.ones(5, 1))


# ------------------------------------------------------------------ validation errors


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(top_k=0), "top_k"),
        (dict(top_k=-1), "top_k"),
        (dict(top_k=True), "top_k"),
        (dict(score_func="relu"), "score_func"),
        (dict(routing="random"), "routing"),
        (dict(hash_weights="foo"), "hash_weights"),
        (dict(group_score="mean"), "group_score"),
        (dict(route_scale=-1.0), "route_scale"),
        (dict(router_dtype=torch.int32), "router_dtype"),
        (dict(num_expert_groups=4), "num_limited_groups"),
        (dict(num_limited_groups=2), "num_expert_groups"),
        (dict(num_expert_groups=2, num_limited_groups=3), "num_limited_groups"),
        (dict(num_expert_groups=0, num_limited_groups=0), "num_expert_groups"),
        (dict(num_expert_groups=2, num_limited_groups=1, topk_before_score=True), "topk_before_score"),
        (dict(routing="hash"), "hash_vocab_size"),
        (dict(routing="hash", hash_vocab_size=0), "hash_vocab_size"),
        (dict(routing="hash", hash_vocab_size=10, topk_before_score=True), "topk_before_score"),
        (dict(routing="hash", hash_vocab_size=10, num_expert_groups=2, num_limited_groups=1), "groups"),
    ],
)
def test_router_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        R(**kwargs)


@pytest.mark.parametrize(
    "kwargs,E,match",
    [
        (dict(top_k=5), 4, "top_k"),
        (dict(top_k=2, num_expert_groups=3, num_limited_groups=1), 8, "divisible"),
        (dict(top_k=2, num_expert_groups=4, num_limited_groups=1), 4, "top2_sum"),
        (dict(top_k=5, num_expert_groups=4, num_limited_groups=1), 8, "top_k"),
    ],
)
def test_router_build_errors(kwargs, E, match):
    cfg = R(**kwargs)
    with pytest.raises(ValueError, match=match):
        cfg.build(dim=4, num_experts=E)
    with pytest.raises(ValueError, match=match):  # also when the MoE config is created
        MoE.Config(dim=4, hidden_dim=4, num_experts=E, router=cfg)


def test_top_k_equal_num_experts_allowed():
    R(top_k=4).build(dim=4, num_experts=4)


def test_router_build_dim_errors():
    with pytest.raises(ValueError, match="dim"):
        R().build(dim=0, num_experts=4)
    with pytest.raises(ValueError, match="num_experts"):
        R().build(dim=4, num_experts=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(activation="tanh"), "activation"),
        (dict(activation="gpt_oss", gated=False), "gated"),
    ],
)
def test_experts_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GroupedExperts.Config(**kwargs)


def test_experts_config_unknown_backend():
    with pytest.raises(ValueError, match="backend"):
        GroupedExperts.Config(backend="cuda_magic")


def test_experts_config_unknown_routing_weight_on():
    with pytest.raises(ValueError, match="routing_weight_on"):
        GroupedExperts.Config(routing_weight_on="middle")


def test_unknown_backend_fails_at_forward_at_least():
    with pytest.raises(ValueError, match="backend"):
        moe_experts(torch.randn(2, 4), torch.randn(2, 6, 4), torch.randn(2, 4, 3),
                    torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), backend="cuda_magic")


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(dim=0), "dim"), (dict(hidden_dim=0), "hidden_dim"), (dict(num_experts=-1), "num_experts")],
)
def test_experts_build_errors(kwargs, match):
    base = dict(dim=4, hidden_dim=4, num_experts=2)
    base.update(kwargs)
    with pytest.raises(ValueError, match=match):
        GroupedExperts.Config().build(**base)


def test_experts_build_capacity_and_policy_errors():
    with pytest.raises(ValueError, match="capacity_factor"):
        GroupedExperts.Config().build(dim=4, hidden_dim=4, num_experts=2, capacity_factor=0.0)
    with pytest.raises(ValueError, match="drop_policy"):
        GroupedExperts.Config().build(dim=4, hidden_dim=4, num_experts=2, drop_policy="random")


@pytest.mark.parametrize(
    "kwargs,match",
    [(dict(hidden_dim=0), "hidden_dim"), (dict(hidden_dim=4, activation="nope"), "activation"),
     (dict(hidden_dim=4, activation="gpt_oss", gated=False), "gated")],
)
def test_shared_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SharedExperts.Config(**kwargs)
    with pytest.raises(ValueError, match="dim"):
        SharedExperts.Config(hidden_dim=4).build(dim=0)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(dim=0), "dim"),
        (dict(hidden_dim=-3), "hidden_dim"),
        (dict(num_experts=0), "num_experts"),
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(capacity_factor=-1.0), "capacity_factor"),
        (dict(drop_policy="lifo"), "drop_policy"),
        (dict(load_balance_coeff=-1e-3), "load_balance_coeff"),
        (dict(seq_aux_loss_coeff=-1.0), "seq_aux_loss_coeff"),
        (dict(z_loss_coeff=-1.0), "z_loss_coeff"),
        (dict(expert_bias_update_rate=0.0), "expert_bias_update_rate"),
        (dict(router=R(top_k=9)), "top_k"),
    ],
)
def test_moe_config_errors(kwargs, match):
    with pytest.raises(ValueError, match=match):
        moe_cfg(**kwargs)


def test_moe_config_type_errors():
    with pytest.raises(TypeError, match="router"):
        moe_cfg(router=object())
    with pytest.raises(TypeError, match="experts"):
        moe_cfg(experts=R())
    with pytest.raises(TypeError, match="shared_experts"):
        moe_cfg(shared_experts=GroupedExperts.Config())


def test_forward_input_errors():
    moe = moe_cfg().build()
    with pytest.raises(ValueError, match="16"):
        moe(torch.randn(3, 15))
    with pytest.raises(ValueError):
        moe(torch.randn(16))
    with pytest.raises(ValueError, match="token_mask"):
        moe(torch.randn(3, 16), token_mask=torch.ones(4))
    r = R(top_k=2).build(dim=4, num_experts=3)
    with pytest.raises(ValueError, match="logits"):
        r(logits=torch.randn(2, 4))
    with pytest.raises(ValueError):
        r()
    with pytest.raises(ValueError):
        r(torch.randn(2, 5))


def test_hash_forward_errors():
    r = R(top_k=2, routing="hash", hash_vocab_size=10).build(dim=4, num_experts=4)
    with pytest.raises(ValueError, match="input_ids"):
        r(torch.randn(3, 4))
    with pytest.raises(ValueError, match="hash_vocab_size"):
        r(torch.randn(3, 4), input_ids=torch.tensor([0, 1, 10]))
    with pytest.raises(ValueError, match="tokens"):
        r(torch.randn(3, 4), input_ids=torch.tensor([0, 1]))


def test_update_expert_bias_needs_expert_bias():
    moe = moe_cfg().build()
    with pytest.raises(ValueError, match="use_expert_bias"):
        moe.update_expert_bias()


def test_plan_errors():
    ids = torch.tensor([[0, 1], [2, 3]])
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        make_plan(torch.tensor([[0, 4]]), 4)
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        make_plan(torch.tensor([[-1, 0]]), 4)
    with pytest.raises(ValueError, match="pad_to_multiple"):
        make_plan(ids, 4, pad_to_multiple=0)
    with pytest.raises(ValueError, match="drop_policy"):
        make_plan(ids, 4, drop_policy="fifo")
    with pytest.raises(ValueError, match="topk_weights"):
        make_plan(ids, 4, capacity_factor=1.0, drop_policy="weight")
    with pytest.raises(ValueError, match="capacity_factor"):
        make_plan(ids, 4, capacity_factor=-1.0)
    with pytest.raises(ValueError, match="num_experts"):
        make_plan(ids, 0)
    with pytest.raises(ValueError, match=r"\[T, K\]"):
        make_plan(torch.tensor([0, 1]), 4)
    with pytest.raises(TypeError, match="int"):
        make_plan(ids.float(), 4)


def test_moe_experts_argument_errors():
    x = torch.randn(3, 4)
    wu, wd = torch.randn(2, 6, 4), torch.randn(2, 4, 3)
    ids, w = torch.zeros(3, 1, dtype=torch.long), torch.ones(3, 1)
    with pytest.raises(TypeError, match="dtype"):
        moe_experts(x, wu.double(), wd.double(), ids, w)
    with pytest.raises(ValueError, match="shape"):
        moe_experts(x, torch.randn(2, 6, 5), wd, ids, w)
    with pytest.raises(ValueError, match="rows"):
        moe_experts(x, torch.randn(2, 5, 4), wd, ids, w)
    with pytest.raises(ValueError, match="gated"):
        moe_experts(x, torch.randn(2, 3, 4), wd, ids, w, activation="gpt_oss")
    with pytest.raises(ValueError, match="topk"):
        moe_experts(x, wu, wd, ids, torch.ones(3, 2))
    with pytest.raises(ValueError, match="bias"):
        moe_experts(x, wu, wd, ids, w, down_proj_bias=torch.zeros(2, 5))
    with pytest.raises(ValueError, match="activation"):
        moe_experts(x, wu, wd, ids, w, activation="tanh")


def test_get_preset_unknown():
    with pytest.raises(ValueError, match="preset"):
        moekit.presets.get_preset("gpt-5")
