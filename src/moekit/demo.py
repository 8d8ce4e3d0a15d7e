"""``moekit demo``: train a tiny MoE language model three ways and picture the expert load.

A byte-level causal language model (embedding -> ``n_layers`` pre-norm transformer blocks
whose MLP is a moekit :class:`~moekit.MoE` built from a preset's tiny variant -> norm ->
head) is trained on a synthetic corpus of distinct domains (:mod:`moekit.demo_data`), three
times with the same seed, the same data and the same initial weights:

* ``no balancing``: no aux loss, no z-loss, no expert bias;
* ``aux loss``: the Switch/GShard load-balancing loss (``MoE.Config.load_balance_coeff``);
* ``aux-loss-free bias``: DeepSeek-V3's expert bias (``router.use_expert_bias=True``), updated
  after every optimizer step with ``moe.update_expert_bias()``.

The router gate starts from ``N(0, router_init_std)``, by default the library's own 0.02: no
skew is injected, the unbalanced run's imbalance is what training produces by itself. All
three runs start from the same weights and see the same batches, so the comparison is fair.
The aux-loss coefficient (1e-2) is the one Mixtral/OLMoE use; the bias update rate (1e-3) is
the library's default (1e-2 overshoots with softmax scores: the load swings from step to step).

Every number reported is measured: the per-step load comes from ``moe.tokens_per_expert``;
the final load statistics, the dead experts and the per-domain assignment come from routing a
held-out evaluation set (``eval_seqs`` sequences, the same for every run) through the final
model in eval mode.

This module holds the demo's configuration (:class:`DemoConfig`, ``RUNS``), the training of
one run (:func:`train_one`), the three runs with their JSON summary (:func:`run_demo`) and the
printed table (:func:`format_table`). The model is in ``demo_model.py`` (:class:`TinyMoELM`),
the picture in ``demo_plot.py`` (:func:`plot_demo`), the corpus in ``demo_data.py``.
"""

from __future__ import annotations

import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from . import balance
from .config import check_nonneg, check_positive
from .demo_data import DOMAINS, make_batch
from .demo_model import TinyMoELM
from .demo_plot import plot_demo
from .moe import MoE
from .presets import get_preset

__all__ = ["RUNS", "DemoConfig", "TinyMoELM", "format_table", "plot_demo", "run_demo", "train_one"]

RUNS = ("no balancing", "aux loss", "aux-loss-free bias")


@dataclass
class DemoConfig:
    preset: str = "qwen3-30b-a3b"
    steps: int = 600
    batch_size: int = 16
    seq_len: int = 64
    n_layers: int = 2
    n_heads: int = 4
    lr: float = 3e-3
    seed: int = 0
    device: str = "cpu"
    router_init_std: float = 0.02
    aux_loss_coeff: float = 1e-2
    bias_update_rate: float = 1e-3
    eval_seqs: int = 64
    out: str = "moekit-out"
    runs: tuple[str, ...] = RUNS
    progress: bool = True
    plot: bool = True

    def __post_init__(self) -> None:
        o = "DemoConfig"
        for name in ("steps", "batch_size", "seq_len", "n_layers", "n_heads", "eval_seqs"):
            check_positive(o, name, getattr(self, name))
        for name in ("lr", "router_init_std", "bias_update_rate"):
            check_positive(o, name, getattr(self, name), integer=False)
        check_nonneg(o, "aux_loss_coeff", self.aux_loss_coeff)
        unknown = [r for r in self.runs if r not in RUNS]
        if unknown:
            raise ValueError(f"{o}.runs: unknown run(s) {unknown}; allowed: {RUNS}")


# ---------------------------------------------------------------------------- runs
def run_moe_config(base: MoE.Config, run: str, cfg: DemoConfig) -> MoE.Config:
    """The preset's tiny MoE config with its balancing switched to ``run``'s (all else kept)."""
    if run not in RUNS:
        raise ValueError(f"unknown run {run!r}; allowed: {list(RUNS)}")
    router = base.router.replace(use_expert_bias=run == "aux-loss-free bias")
    return base.replace(
        router=router,
        load_balance_coeff=cfg.aux_loss_coeff if run == "aux loss" else 0.0,
        seq_aux_loss_coeff=0.0,
        z_loss_coeff=0.0,
        expert_bias_update_rate=cfg.bias_update_rate,
    )


def _eval_set(cfg: DemoConfig) -> tuple[torch.Tensor, torch.Tensor]:
    # a random stream of its own, independent of the training batches (the same for every run)
    return make_batch(cfg.eval_seqs, cfg.seq_len, random.Random(f"eval-{cfg.seed}"))


def _lr_at(step: int, cfg: DemoConfig) -> float:
    warm = max(1, cfg.steps // 20)
    if step < warm:
        return cfg.lr * (step + 1) / warm
    t = (step - warm) / max(1, cfg.steps - warm)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))


def train_one(run: str, cfg: DemoConfig, base: MoE.Config, init_state: dict | None = None,
              pbar=None) -> dict:
    """Train one run; return its curves, final numbers and per-domain routing."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    model = TinyMoELM(run_moe_config(base, run, cfg), n_layers=cfg.n_layers,
                      n_heads=cfg.n_heads, seq_len=cfg.seq_len)
    model.init_weights(cfg.router_init_std)
    if init_state is not None:  # same initial weights in every run (expert_bias buffers aside)
        model.load_state_dict(init_state, strict=False)
    model.to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=0.01, betas=(0.9, 0.95))
    rng = random.Random(f"train-{cfg.seed}")  # the same batches in every run
    use_bias = run == "aux-loss-free bias"
    losses, aux, loads = [], [], []
    for moe in model.moes:
        moe.reset_load()
    model.train()
    for step in range(cfg.steps):
        for g in opt.param_groups:
            g["lr"] = _lr_at(step, cfg)
        ids, _ = make_batch(cfg.batch_size, cfg.seq_len, rng)
        ids = ids.to(device)
        logits = model(ids[:, :-1])
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()  # the aux losses ride along (attached to each MoE's output)
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step_load = torch.stack([m.tokens_per_expert.detach().float().cpu() for m in model.moes])
        for moe in model.moes:
            if use_bias:
                moe.update_expert_bias()  # uses the counts of this step, then resets them
            else:
                moe.reset_load()
        losses.append(loss.item())
        aux.append(sum(float(v) for m in model.moes for v in m.aux_losses.values()))
        loads.append(step_load)
        if pbar is not None:
            mm = (step_load.max(1).values / step_load.mean(1)).max().item()
            pbar.set_postfix_str(f"loss {losses[-1]:.3f}  max/mean {mm:.2f}", refresh=False)
            pbar.update(1)

    # ----- evaluation on the held-out set: final load, dead experts, per-domain routing
    model.eval()
    ids, dom_B = _eval_set(cfg)
    ids = ids.to(device)
    L, E = cfg.n_layers, base.num_experts
    n_dom = len(DOMAINS)
    with torch.no_grad():
        logits = model(ids[:, :-1])
        eval_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)).item()
        per_domain = torch.zeros(L, n_dom, E)
        eval_load = torch.zeros(L, E)
        dom_T = dom_B.repeat_interleave(cfg.seq_len)
        for li, moe in enumerate(model.moes):
            topk = moe.last_router_output.topk_ids.cpu()  # [T, K]
            eval_load[li] = balance.count_tokens_per_expert(topk, E).float()
            for d in range(n_dom):
                per_domain[li, d] = balance.count_tokens_per_expert(topk[dom_T == d], E).float()
            moe.reset_load()
    stats = [balance.load_stats(eval_load[li]) for li in range(L)]
    tail = max(1, cfg.steps // 10)
    load_steps = torch.stack(loads)  # [steps, L, E]
    train_tail = load_steps[-tail:].sum(0)
    train_mm = [balance.load_stats(train_tail[li])["max_over_mean"] for li in range(L)]
    per_domain_frac = per_domain / per_domain.sum(-1, keepdim=True).clamp(min=1)
    return {
        "run": run,
        "final_loss": sum(losses[-tail:]) / tail,
        "eval_loss": eval_loss,
        "max_over_mean": max(s["max_over_mean"] for s in stats),
        "max_over_mean_per_layer": [s["max_over_mean"] for s in stats],
        "cv_per_layer": [s["cv"] for s in stats],
        "dead_experts": sum(s["num_dead"] for s in stats),
        "dead_experts_per_layer": [s["dead_experts"] for s in stats],
        "train_tail_max_over_mean": max(train_mm),
        "eval_tokens_per_expert": eval_load.tolist(),
        "domain_expert_fraction": per_domain_frac.tolist(),
        "loss_curve": losses,
        "aux_loss_curve": aux,
        "load_per_step": load_steps.tolist(),
    }


def run_demo(cfg: DemoConfig) -> dict:
    """Run the three trainings, write ``demo.json`` (and ``demo.png``) under ``cfg.out``."""
    base = get_preset(cfg.preset, tiny=True)
    t0 = time.perf_counter()
    torch.manual_seed(cfg.seed)
    ref = TinyMoELM(run_moe_config(base, "no balancing", cfg), n_layers=cfg.n_layers,
                    n_heads=cfg.n_heads, seq_len=cfg.seq_len)
    ref.init_weights(cfg.router_init_std)
    init_state = {k: v.clone() for k, v in ref.state_dict().items()}
    results = []
    pbar_cls = None
    if cfg.progress:
        from tqdm.auto import tqdm as pbar_cls
    for run in cfg.runs:
        pbar = pbar_cls(total=cfg.steps, desc=f"{run:>18}", unit="step", leave=True) if pbar_cls else None
        try:
            r = train_one(run, cfg, base, init_state, pbar)
        finally:
            if pbar is not None:
                pbar.close()
        results.append(r)
    seconds = time.perf_counter() - t0
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    summary = {
        "config": {**asdict(cfg), "runs": list(cfg.runs)},
        "moe": {"num_experts": base.num_experts, "top_k": base.top_k, "dim": base.dim,
                "hidden_dim": base.hidden_dim, "shared_experts": base.shared_experts is not None},
        "domains": list(DOMAINS),
        "seconds": seconds,
        "table": [
            {k: r[k] for k in ("run", "final_loss", "eval_loss", "max_over_mean", "dead_experts",
                               "train_tail_max_over_mean")}
            for r in results
        ],
        "runs": results,
    }
    (out / "demo.json").write_text(json.dumps(summary))
    if cfg.plot:
        summary["png"] = str(plot_demo(summary, out / "demo.png"))
    return summary


def format_table(summary: dict) -> str:
    E = summary["moe"]["num_experts"]
    L = summary["config"]["n_layers"]
    head = f"{'run':<20} {'final loss':>10} {'eval loss':>10} {'max/mean load':>14} {'dead experts':>13}"
    lines = [head, "-" * len(head)]
    for r in summary["table"]:
        lines.append(
            f"{r['run']:<20} {r['final_loss']:>10.3f} {r['eval_loss']:>10.3f} "
            f"{r['max_over_mean']:>14.2f} {str(r['dead_experts']) + '/' + str(L * E):>13}"
        )
    return "\n".join(lines)
