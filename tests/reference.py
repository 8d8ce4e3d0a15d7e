"""Plain, independent references for the moekit tests.

Everything here is written from the spec (issue 3 / DESIGN.md), per token and per expert with
python loops, and never calls moekit. The functions use only elementary torch ops so that
autograd gives the reference gradients too; run them in float64 for the ground truth, or in
bf16 for the "plain PyTorch path in the same dtype" of DESIGN.md's tolerance rule.
"""

from __future__ import annotations

import math

import torch

# ----------------------------------------------------------------------------- comparisons


def max_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    if actual.numel() == 0 and expected.numel() == 0:
        return 0.0
    return (actual.detach().double() - expected.detach().double()).abs().max().item()


def scale_of(t: torch.Tensor) -> float:
    if t.numel() == 0:
        return 1.0
    return max(1.0, t.detach().double().abs().max().item())


def assert_close(actual, expected, tol: float = 1e-5, what: str = "") -> None:
    """fp32 'tight': max abs error <= tol * max(1, max|expected|)."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err, s = max_err(actual, expected), scale_of(expected)
    assert err <= tol * s, f"{what}: max error {err:.3e} > {tol:.1e} * {s:.3e}"


def assert_tolerance_rule(actual, plain, truth, atol: float = 1e-3, what: str = "") -> None:
    """DESIGN.md: err(actual vs truth) <= 2 * err(plain same-dtype path vs truth) + atol*scale."""
    assert actual.shape == truth.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    e_a, e_p, s = max_err(actual, truth), max_err(plain, truth), scale_of(truth)
    assert e_a <= 2 * e_p + atol * s, (
        f"{what}: error {e_a:.3e} > 2 * plain error {e_p:.3e} + {atol:.0e} * {s:.3e}"
    )


# ----------------------------------------------------------------------------- activations


def silu(x):
    return x * (1.0 / (1.0 + torch.exp(-x)))


def sigmoid(x):
    return 1.0 / (1.0 + torch.exp(-x))


def sqrt_softplus(x):
    return torch.sqrt(torch.log(1.0 + torch.exp(x)))


def _elementwise_score(score_func):
    return {"sigmoid": sigmoid, "sqrtsoftplus": sqrt_softplus}[score_func]


def gelu(x):
    return 0.5 * x * (1.0 + torch.erf(x / math.sqrt(2.0)))


def gelu_tanh(x):
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * x * x * x)))


def relu2(x):
    r = torch.where(x > 0, x, torch.zeros_like(x))
    return r * r


UNARY = {"silu": silu, "gelu": gelu, "gelu_tanh": gelu_tanh, "relu2": relu2}


def gpt_oss_glu(gate, up, alpha: float = 1.702, limit: float = 7.0):
    gate = torch.where(gate > limit, torch.full_like(gate, limit), gate)
    up = torch.where(up > limit, torch.full_like(up, limit), up)
    up = torch.where(up < -limit, torch.full_like(up, -limit), up)
    return (up + 1.0) * gate * sigmoid(alpha * gate)


def activate(h, activation: str, gated: bool, F: int):
    """h: the up projection's output of one row: [2F] when gated (gate first), else [F]."""
    if gated:
        gate, up = h[:F], h[F:]
        if activation == "gpt_oss":
            return gpt_oss_glu(gate, up)
        return UNARY[activation](gate) * up
    return UNARY[activation](h)


# ----------------------------------------------------------------------------- experts


def expert_forward(x_D, w_up_HD, w_down_DF, b_up_H=None, b_down_D=None, *, activation, gated):
    """One expert on one token (nn.Linear convention: weight is (out, in))."""
    F = w_down_DF.shape[1]
    h = (w_up_HD * x_D.unsqueeze(0)).sum(-1)
    if b_up_H is not None:
        h = h + b_up_H
    a = activate(h, activation, gated, F)
    y = (w_down_DF * a.unsqueeze(0)).sum(-1)
    if b_down_D is not None:
        y = y + b_down_D
    return y


def moe_experts_ref(x_TD, w_up, w_down, topk_ids, topk_weights, *, activation="silu", gated=True,
                    b_up=None, b_down=None, weight_on_input=False, kept=None):
    """``y[t] = sum_k w[t,k] * expert_{ids[t,k]}(x[t])`` by a loop over tokens and picks.
    ``weight_on_input``: ``expert(w[t,k] * x[t])`` instead. ``kept`` ([T, K] bool): slots not
    kept contribute nothing (capacity drops). Ids from ``E = w_up.shape[0]`` on name
    zero-computation experts: the identity."""
    T, D = x_TD.shape
    K = topk_ids.shape[1] if topk_ids.dim() == 2 else 0
    outs = []
    for t in range(T):
        acc = torch.zeros(D, dtype=x_TD.dtype, device=x_TD.device)
        for k in range(K):
            if kept is not None and not bool(kept[t, k]):
                continue
            e = int(topk_ids[t, k])
            w = topk_weights[t, k].to(x_TD.dtype)
            xin = x_TD[t] * w if weight_on_input else x_TD[t]
            if e >= w_up.shape[0]:  # a zero-computation (identity) expert
                acc = acc + (xin if weight_on_input else w * xin)
                continue
            y = expert_forward(
                xin, w_up[e], w_down[e], None if b_up is None else b_up[e],
                None if b_down is None else b_down[e], activation=activation, gated=gated,
            )
            acc = acc + (y if weight_on_input else w * y)
        outs.append(acc)
    if not outs:
        return x_TD.new_zeros(0, D) + 0 * x_TD.sum()
    return torch.stack(outs)


def shared_ref(x_TD, w_gate_FD, w_up_FD, w_down_DF, w_expert_gate_1D=None, *, activation="silu"):
    """Dense (gated when ``w_gate_FD`` is given) MLP per token, times sigmoid(gate(x))."""
    outs = []
    for t in range(x_TD.shape[0]):
        x = x_TD[t]
        up = (w_up_FD * x).sum(-1)
        if w_gate_FD is not None:
            g = (w_gate_FD * x).sum(-1)
            a = gpt_oss_glu(g, up) if activation == "gpt_oss" else UNARY[activation](g) * up
        else:
            a = UNARY[activation](up)
        y = (w_down_DF * a).sum(-1)
        if w_expert_gate_1D is not None:
            y = sigmoid((w_expert_gate_1D[0] * x).sum()) * y
        outs.append(y)
    if not outs:
        return x_TD.new_zeros(0, x_TD.shape[1])
    return torch.stack(outs)


# ----------------------------------------------------------------------------- router


def linear_ref(x_TD, w_ED, b_E=None):
    rows = []
    for t in range(x_TD.shape[0]):
        r = (w_ED * x_TD[t]).sum(-1)
        if b_E is not None:
            r = r + b_E
        rows.append(r)
    if not rows:
        return x_TD.new_zeros(0, w_ED.shape[0])
    return torch.stack(rows)


def _softmax_vec(v):
    m = v.max()
    e = torch.exp(v - m)
    return e / e.sum()


def _argsort_desc(values: list[float]) -> list[int]:
    return sorted(range(len(values)), key=lambda i: -values[i])


def route_ref(logits_TE, *, top_k, score_func="softmax", route_norm=False, route_scale=1.0,
              topk_before_score=False, expert_bias=None, num_expert_groups=None,
              num_limited_groups=None, forced_ids=None, group_score="top2_sum"):
    """Reference routing, per token. Returns (ids: list[list[int]], weights [T, K] tensor,
    scores [T, E] tensor). ``forced_ids`` replaces the selection (force_load_balance, hash)."""
    T, E = logits_TE.shape
    ids_all, w_all, s_all = [], [], []
    for t in range(T):
        lg = logits_TE[t]
        scores = _softmax_vec(lg) if score_func == "softmax" else _elementwise_score(score_func)(lg)
        s_all.append(scores)
        if topk_before_score:
            vals = [float(v) for v in lg.detach()]
            ids = forced_ids[t] if forced_ids is not None else _argsort_desc(vals)[:top_k]
            picked = torch.stack([lg[i] for i in ids])
            w = _softmax_vec(picked) if score_func == "softmax" else _elementwise_score(score_func)(picked)
        else:
            choice = [float(v) for v in scores.detach()]
            if expert_bias is not None:
                choice = [c + float(b) for c, b in zip(choice, expert_bias)]
            if num_expert_groups is not None:
                per = E // num_expert_groups
                gscore = []
                for g in range(num_expert_groups):
                    members = sorted(choice[g * per:(g + 1) * per], reverse=True)
                    gscore.append(members[0] + members[1] if group_score == "top2_sum" else members[0])
                keep = set(_argsort_desc(gscore)[:num_limited_groups])
                choice = [c if (i // per) in keep else -math.inf for i, c in enumerate(choice)]
            ids = forced_ids[t] if forced_ids is not None else _argsort_desc(choice)[:top_k]
            w = torch.stack([scores[i] for i in ids])
        if route_norm:
            w = w / (w.sum() + 1e-20)
        w = w * route_scale
        ids_all.append(list(ids))
        w_all.append(w)
    if T == 0:
        return [], logits_TE.new_zeros(0, top_k), logits_TE.new_zeros(0, E)
    return ids_all, torch.stack(w_all), torch.stack(s_all)


# ----------------------------------------------------------------------------- balance


def switch_aux_ref(scores_TE, ids_TK, mask_T=None):
    """E * sum_e f_e * P_e over real tokens: f_e = share of the real tokens' routed slots that
    went to e, P_e = mean over real tokens of the token's scores normalised to sum 1."""
    T, E = scores_TE.shape
    K = ids_TK.shape[1]
    real = [t for t in range(T) if mask_T is None or bool(mask_T[t])]
    n = max(len(real), 1)
    total = 0.0 * scores_TE.sum()
    for e in range(E):
        cnt = sum(1 for t in real for k in range(K) if int(ids_TK[t, k]) == e)
        f = cnt / (n * K)
        P = sum((scores_TE[t, e] / scores_TE[t].sum() for t in real), 0.0 * scores_TE.sum()) / n
        total = total + f * P
    return E * total


def seq_aux_ref(scores_BSE, ids_BSK, mask_BS=None):
    """DeepSeek-V3 sequence-wise loss: per sequence sum_e f_e P_e with
    f_e = E/(K*S_real) * #picks of e, P_e = mean normalised score; mean over sequences that
    have real tokens."""
    B, S, E = scores_BSE.shape
    K = ids_BSK.shape[-1]
    per_seq = []
    for b in range(B):
        real = [s for s in range(S) if mask_BS is None or bool(mask_BS[b, s])]
        if not real:
            continue
        n = len(real)
        tot = 0.0 * scores_BSE.sum()
        for e in range(E):
            cnt = sum(1 for s in real for k in range(K) if int(ids_BSK[b, s, k]) == e)
            f = E * cnt / (K * n)
            P = sum((scores_BSE[b, s, e] / scores_BSE[b, s].sum() for s in real), 0.0 * tot) / n
            tot = tot + f * P
        per_seq.append(tot)
    if not per_seq:
        return 0.0 * scores_BSE.sum()
    return sum(per_seq) / len(per_seq)


def z_loss_ref(logits_TE, mask_T=None):
    T = logits_TE.shape[0]
    real = [t for t in range(T) if mask_T is None or bool(mask_T[t])]
    tot = 0.0 * logits_TE.sum()
    for t in real:
        m = logits_TE[t].max()
        lse = m + torch.log(torch.exp(logits_TE[t] - m).sum())
        tot = tot + lse * lse
    return tot / max(len(real), 1)


def counts_ref(ids_TK, E, mask_T=None):
    c = [0] * E
    for t in range(ids_TK.shape[0]):
        if mask_T is not None and not bool(mask_T[t]):
            continue
        for k in range(ids_TK.shape[1]):
            c[int(ids_TK[t, k])] += 1
    return c


# ----------------------------------------------------------------------------- whole layer


def ref_params(moe, dtype=torch.float64):
    return {n: p.detach().to(dtype, copy=True).requires_grad_(True) for n, p in moe.named_parameters()}


def moe_ref(moe, x_TD, P, forced_ids=None, kept=None):
    """The whole layer, plainly, from the parameter copies ``P``; reads only ``moe``'s config
    fields and buffers (never calls moekit code)."""
    rc = moe.router.config
    logits = linear_ref(x_TD.double(), P["router.gate.weight"].double(),
                        P["router.gate.bias"].double() if "router.gate.bias" in P else None)
    eb = moe.router.expert_bias
    ids, w, _ = route_ref(
        logits, top_k=rc.top_k, score_func=rc.score_func, route_norm=rc.route_norm,
        route_scale=rc.route_scale, topk_before_score=rc.topk_before_score,
        expert_bias=None if eb is None else eb.tolist(), num_expert_groups=rc.num_expert_groups,
        num_limited_groups=rc.num_limited_groups, forced_ids=forced_ids,
    )
    ids = torch.tensor(ids, dtype=torch.long).view(x_TD.shape[0], rc.top_k)
    ex = moe.experts
    up = "experts." + ex.up_name
    y = moe_experts_ref(
        x_TD, P[up], P["experts.down_proj"], ids, w, activation=ex.activation, gated=ex.gated,
        b_up=P.get(up + "_bias"), b_down=P.get("experts.down_proj_bias"),
        weight_on_input=ex.config.routing_weight_on == "input", kept=kept,
    )
    if moe.shared_experts is not None:
        s = moe.shared_experts
        y = y + shared_ref(
            x_TD, P.get("shared_experts.gate_proj.weight"), P["shared_experts.up_proj.weight"],
            P["shared_experts.down_proj.weight"], P.get("shared_experts.expert_gate.weight"),
            activation=s.config.activation,
        )
    return y, ids


# ----------------------------------------------------------------------------- layouts
def interleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """``[E, 2F, ...]`` with the gate rows first -> gate and up rows alternating (GPT-OSS)."""
    f = t.shape[1] // 2
    return torch.stack([t[:, :f], t[:, f:]], dim=2).reshape(t.shape)


def deinterleave_gate_up(t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`interleave_gate_up`."""
    v = t.reshape(t.shape[0], t.shape[1] // 2, 2, *t.shape[2:])
    return torch.cat([v[:, :, 0], v[:, :, 1]], dim=1)
