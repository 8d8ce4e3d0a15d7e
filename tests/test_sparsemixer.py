"""routing="sparsemixer" (PhiMoE) against transformers' own ``sparsemixer`` on the same logits:
picks, weights and the logits' gradient, in evaluation and (from the same RNG state) in
training, where its custom backward drops the 1/3 multiplier from the gradient."""

from __future__ import annotations

import pytest
import torch

from moekit import TokenChoiceTopKRouter

phimoe = pytest.importorskip("transformers.models.phimoe.modeling_phimoe")


def _router(E=6, D=16, eps=0.05, seed=0, **kw):
    torch.manual_seed(seed)
    cfg = TokenChoiceTopKRouter.Config(top_k=2, routing="sparsemixer", sparsemixer_eps=eps, **kw)
    return cfg.build(dim=D, num_experts=E)


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0.05, 0.5])
def test_sparsemixer_matches_transformers(training, eps):
    r = _router(eps=eps).train(training)
    x = torch.randn(64, 16, generator=torch.Generator().manual_seed(1))
    w_out = torch.randn(64, 2, generator=torch.Generator().manual_seed(2))

    logits_ref = r.gate(x).detach().requires_grad_()
    torch.manual_seed(7)
    w_ref, ids_ref = phimoe.sparsemixer(logits_ref, jitter_eps=eps, training=training)
    (w_ref * w_out).sum().backward()

    logits = r.gate(x).detach().requires_grad_()
    torch.manual_seed(7)
    out = r(logits=logits)
    (out.topk_weights * w_out).sum().backward()

    assert torch.equal(out.topk_ids, ids_ref)
    torch.testing.assert_close(out.topk_weights, w_ref, rtol=0, atol=1e-7)
    torch.testing.assert_close(logits.grad, logits_ref.grad, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(out.scores, torch.softmax(logits.detach(), -1))
    if training:  # some weights carry the 1/3 multiplier: the gradient differs from w's own
        plain = torch.softmax(logits.detach(), -1).gather(1, out.topk_ids)
        assert (out.topk_weights < 0.5 * plain).any() or eps == 0.0


def test_sparsemixer_eval_picks_top2_logits():
    r = _router(eps=10.0).eval()  # eps this large masks nothing: plain top-2 softmax weights
    logits = torch.randn(32, 6)
    out = r(logits=logits)
    assert torch.equal(out.topk_ids[:, 0], logits.argmax(-1))
    p = torch.softmax(logits, -1)
    torch.testing.assert_close(out.topk_weights[:, 0], p.gather(1, out.topk_ids[:, :1]).squeeze(1))


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(top_k=3), "top_k=3 must be 2"),
        (dict(score_func="sigmoid"), "score_func='sigmoid' must be 'softmax'"),
        (dict(use_expert_bias=True), "use_expert_bias"),
        (dict(num_expert_groups=2, num_limited_groups=1), "num_expert_groups"),
        (dict(sparsemixer_eps=-0.1), "sparsemixer_eps"),
    ],
)
def test_sparsemixer_config_errors(kw, match):
    base = dict(top_k=2, routing="sparsemixer")
    with pytest.raises(ValueError, match=match):
        TokenChoiceTopKRouter.Config(**{**base, **kw})
