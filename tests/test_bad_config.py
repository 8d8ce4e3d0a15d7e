"""Bad configuration values: every one raises early, with the field named.

Table-driven: (id, callable, error type, phrase of the message). NaN and inf in every float
field, non-bools in bool fields, fields assigned after construction (checked again at build).
"""

from __future__ import annotations

import pytest
import torch

from moekit import GroupedExperts, MoE, SharedExperts, TokenChoiceTopKRouter
from moekit.demo import DemoConfig
from moekit.plan import make_plan
from moekit.presets import PRESETS, get_preset, preset_sizes

D, F, E = 8, 16, 4
NAN, INF = float("nan"), float("inf")
R = TokenChoiceTopKRouter.Config


def moe_cfg(**kw):
    return MoE.Config(dim=D, hidden_dim=F, num_experts=E, router=kw.pop("router", R(top_k=2)), **kw)


def assigned_then_built(field, value, where="moe"):
    """A field assigned after the config was made: build() validates again."""
    cfg = moe_cfg()
    setattr(cfg.router if where == "router" else cfg, field, value)
    return cfg.build()


MOE_FLOATS = ["load_balance_coeff", "seq_aux_loss_coeff", "z_loss_coeff", "expert_bias_update_rate",
              "capacity_factor"]

CASES = [
    # NaN / inf in every float field of MoE.Config and the router config
    *[(f"moe-{f}-{v}", (lambda f=f, v=v: moe_cfg(**{f: v})), ValueError, f"MoE.Config.{f}={v!r}")
      for f in MOE_FLOATS for v in (NAN, INF)],
    ("moe-coeff-neg-inf", lambda: moe_cfg(z_loss_coeff=-INF), ValueError, "finite number >= 0"),
    ("route_scale-nan", lambda: R(route_scale=NAN), ValueError, "route_scale=nan"),
    ("route_scale-inf", lambda: R(route_scale=INF), ValueError, "finite number"),
    ("route_scale-str", lambda: R(route_scale="2.5"), ValueError, "route_scale='2.5'"),
    ("experts-capacity-inf", lambda: GroupedExperts.Config().build(dim=D, hidden_dim=F, num_experts=E,
                                                                  capacity_factor=INF),
     ValueError, "capacity_factor=inf"),
    ("make_plan-capacity-inf", lambda: make_plan(torch.zeros(3, 1, dtype=torch.long), E, capacity_factor=INF),
     ValueError, "capacity_factor=inf"),
    ("make_plan-capacity-nan", lambda: make_plan(torch.zeros(3, 1, dtype=torch.long), E, capacity_factor=NAN),
     ValueError, "finite number > 0"),
    # non-bools in bool fields (a truthy string would silently switch the option on)
    ("route_norm-str", lambda: R(route_norm="no"), TypeError, "route_norm='no'"),
    ("use_expert_bias-int", lambda: R(use_expert_bias=1), TypeError, "use_expert_bias=1"),
    ("topk_before_score-none", lambda: R(topk_before_score=None), TypeError, "True or False"),
    ("force_load_balance-str", lambda: R(force_load_balance="false"), TypeError, "force_load_balance"),
    ("use_router_bias-str", lambda: R(use_router_bias="yes"), TypeError, "use_router_bias"),
    ("experts-gated-str", lambda: GroupedExperts.Config(gated="no"), TypeError, "gated='no'"),
    ("experts-use_bias-str", lambda: GroupedExperts.Config(use_bias="false"), TypeError, "use_bias='false'"),
    ("shared-use_gate-int", lambda: SharedExperts.Config(hidden_dim=4, use_gate=0), TypeError, "use_gate=0"),
    ("shared-gated-str", lambda: SharedExperts.Config(hidden_dim=4, gated="yes"), TypeError, "gated='yes'"),
    ("hash_seed-str", lambda: R(routing="hash", hash_vocab_size=10, hash_seed="a"), TypeError, "hash_seed='a'"),
    # fields assigned after construction are checked again at build
    ("assigned-z_loss-nan", lambda: assigned_then_built("z_loss_coeff", NAN), ValueError, "z_loss_coeff=nan"),
    ("assigned-capacity-inf", lambda: assigned_then_built("capacity_factor", INF), ValueError,
     "capacity_factor=inf"),
    ("assigned-route_scale-nan", lambda: assigned_then_built("route_scale", NAN, "router"), ValueError,
     "route_scale=nan"),
    ("assigned-top_k-zero", lambda: assigned_then_built("top_k", 0, "router"), ValueError, "top_k=0"),
    ("replace-nan", lambda: moe_cfg().replace(load_balance_coeff=NAN), ValueError, "load_balance_coeff=nan"),
    # integers and choices
    ("dim-float", lambda: MoE.Config(dim=8.0, hidden_dim=F, num_experts=E), ValueError, "positive integer"),
    ("num_experts-bool", lambda: MoE.Config(dim=D, hidden_dim=F, num_experts=True), ValueError, "num_experts=True"),
    ("top_k-above-E", lambda: moe_cfg(router=R(top_k=E + 1)), ValueError, f"top_k={E + 1} > num_experts={E}"),
    ("router_dtype-int", lambda: R(router_dtype=torch.int32), ValueError, "router_dtype"),
    ("backend-unknown", lambda: GroupedExperts.Config(backend="cuda"), ValueError, "allowed"),
    ("activation-unknown", lambda: GroupedExperts.Config(activation="tanh"), ValueError, "activation='tanh'"),
    ("preset-unknown", lambda: get_preset("gpt-5"), ValueError, "unknown preset 'gpt-5'"),
    ("preset-not-a-str", lambda: get_preset(3), ValueError, "unknown preset 3"),
    ("preset-tiny-str", lambda: get_preset("mixtral-8x7b", tiny="yes"), TypeError, "tiny='yes'"),
    ("demo-lr-nan", lambda: DemoConfig(lr=NAN), ValueError, "DemoConfig.lr=nan"),
    ("demo-bias-rate-inf", lambda: DemoConfig(bias_update_rate=INF), ValueError, "bias_update_rate=inf"),
    ("demo-aux-coeff-nan", lambda: DemoConfig(aux_loss_coeff=NAN), ValueError, "aux_loss_coeff=nan"),
    ("demo-steps-zero", lambda: DemoConfig(steps=0), ValueError, "DemoConfig.steps=0"),
    ("demo-unknown-run", lambda: DemoConfig(runs=("no balancing", "magic")), ValueError, "unknown run(s) ['magic']"),
    ("preset_sizes-not-a-config", lambda: preset_sizes("mixtral-8x7b"), TypeError, "takes a MoE.Config"),
]


@pytest.mark.parametrize("fn,err,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_config(fn, err, phrase):
    with pytest.raises(err) as e:
        fn()
    assert phrase in str(e.value), str(e.value)


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_float_fields_are_finite(name):
    """Every preset (and its tiny variant) passes the checks it is now held to, and builds."""
    for tiny in (False, True):
        cfg = get_preset(name, tiny=tiny)
        cfg.replace()  # validated again
    get_preset(name, tiny=True).build()


def test_route_scale_zero_is_allowed_and_zeroes_the_routed_output():
    moe = moe_cfg(router=R(top_k=2, route_scale=0.0)).build()
    y = moe(torch.randn(5, D))
    assert torch.equal(y, torch.zeros(5, D))
