"""The picture of ``moekit demo`` (``demo.png``): :func:`plot_demo` draws, from the summary
that ``run_demo`` (``demo.py``) returns, the loss curves, the max/mean expert load per step,
each run's load per expert over the steps and its per-domain routing on the held-out set.
matplotlib is imported when it is called (the ``demo`` extra).
"""

from __future__ import annotations

from pathlib import Path

__all__ = ["plot_demo"]


def plot_demo(summary: dict, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    runs = summary["runs"]
    E, K = summary["moe"]["num_experts"], summary["moe"]["top_k"]
    L = summary["config"]["n_layers"]
    domains = summary["domains"]
    colors = ["tab:red", "tab:blue", "tab:green"]
    n = len(runs)
    fig = plt.figure(figsize=(15, 3.4 + 3.1 * n), dpi=100)
    gs = fig.add_gridspec(1 + n, 2, width_ratios=[2.2, 1], height_ratios=[1.1] + [1] * n,
                          hspace=0.6, wspace=0.2, top=0.93)
    cfgd = summary["config"]
    fig.suptitle(
        f"moekit demo: tiny MoE LM ({cfgd['preset']} tiny: {E} experts, top-{K}, {L} layers) on "
        f"{len(domains)} synthetic domains, {cfgd['steps']} steps",
        fontsize=13,
    )

    def smooth(y, w):
        y = np.asarray(y, dtype=float)
        if len(y) < w or w <= 1:
            return y
        c = np.cumsum(np.insert(y, 0, 0.0))
        s = (c[w:] - c[:-w]) / w
        return np.concatenate([y[: w - 1], s])

    w = max(1, cfgd["steps"] // 30)
    ax = fig.add_subplot(gs[0, 0])
    for r, c in zip(runs, colors):
        ax.plot(smooth(r["loss_curve"], w), color=c, label=f"{r['run']} ({r['final_loss']:.3f})")
    ax.set_title("training loss (cross-entropy, nats/byte; smoothed)")
    ax.set_xlabel("step")
    lo = min(min(smooth(r["loss_curve"], w)) for r in runs)
    ax.set_ylim(lo - 0.05, max(lo + 0.5, min(3.0, max(r["loss_curve"][0] for r in runs))))
    ax.legend(loc="upper right", fontsize=9, title="run (final loss)", title_fontsize=9)
    ax.grid(alpha=0.3)

    ax = fig.add_subplot(gs[0, 1])
    for r, c in zip(runs, colors):
        ls = np.asarray(r["load_per_step"])  # [steps, L, E]
        mm = (ls.max(-1) / ls.mean(-1)).max(-1)
        ax.plot(smooth(mm, w), color=c, label=r["run"])
    ax.axhline(1.0, color="gray", lw=0.8, ls="--")
    ax.set_title("max/mean expert load per step (worst layer)")
    ax.set_xlabel("step")
    ax.set_ylim(bottom=0.9)
    ax.legend(fontsize=9)
    ax.grid(alpha=0.3)

    # a common colour scale for every heatmap: load / mean load, 0 .. E/K (all slots on one)
    vmax = min(E / K, max(
        float((np.asarray(r["load_per_step"]) / np.asarray(r["load_per_step"]).mean(-1, keepdims=True)).max())
        for r in runs
    ))
    for i, r in enumerate(runs):
        ls = np.asarray(r["load_per_step"])  # [steps, L, E]
        rel = ls / ls.mean(-1, keepdims=True)
        img = rel.transpose(1, 2, 0).reshape(L * E, -1)  # rows: layer-major experts
        ax = fig.add_subplot(gs[1 + i, 0])
        im = ax.imshow(img, aspect="auto", interpolation="nearest", cmap="magma", vmin=0, vmax=vmax)
        for li in range(1, L):
            ax.axhline(li * E - 0.5, color="white", lw=1.5)
        ax.set_yticks([li * E + E // 2 - 0.5 for li in range(L)],
                      [f"layer {li}\nexperts\n0-{E - 1}" for li in range(L)], fontsize=8)
        ax.set_xlabel("step")
        ax.set_title(
            f"{r['run']}: load per expert over steps (load / mean);  final max/mean "
            f"{r['max_over_mean']:.2f}, dead {r['dead_experts']}/{L * E}",
            fontsize=10, color=colors[i],
        )
        fig.colorbar(im, ax=ax, pad=0.01, fraction=0.03)

        frac = np.asarray(r["domain_expert_fraction"])  # [L, domains, E]
        ax = fig.add_subplot(gs[1 + i, 1])
        panel = np.concatenate([frac[li] for li in range(L)], axis=1)  # [domains, L*E]
        im2 = ax.imshow(panel, aspect="auto", interpolation="nearest", cmap="viridis", vmin=0,
                        vmax=max(0.5, float(panel.max())))
        for li in range(1, L):
            ax.axvline(li * E - 0.5, color="white", lw=1.5)
        ax.set_yticks(range(len(domains)), domains, fontsize=9)
        ax.set_xticks(range(L * E), [str(e) for _ in range(L) for e in range(E)], fontsize=6)
        ax.set_xlabel("  |  ".join(f"layer {li} experts" for li in range(L)), fontsize=9)
        ax.set_title("held-out tokens: share of each domain's picks per expert", fontsize=10)
        fig.colorbar(im2, ax=ax, pad=0.01, fraction=0.05)
    fig.savefig(path, bbox_inches="tight")
    plt.close(fig)
    return Path(path)
