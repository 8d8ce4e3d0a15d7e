"""The ``moekit demo`` and ``moekit presets`` subcommands: their parsers (``_add_demo``,
``_add_presets``), the argument checks and the printed tables (``preset_rows`` is the data of
the presets table). Registered by ``moekit.cli.build_parser``.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from .cli_common import (
    CLIError,
    _check_device,
    _check_json_path,
    _check_preset,
    _check_seed,
    _need,
    check_number,
    check_writable_dir,
    human,
)


# ---------------------------------------------------------------------------- demo
def _add_demo(sub) -> None:
    from .demo import DemoConfig

    d = DemoConfig()
    p = sub.add_parser(
        "demo",
        help="train a tiny MoE language model three ways on CPU and draw the expert load",
        description=(
            "Train a tiny MoE language model (byte level; embedding, pre-norm transformer "
            "blocks with causal attention and a moekit MoE from a preset's tiny variant) on a "
            "synthetic corpus of 4 domains (arithmetic, DNA-like strings, words, code), three "
            "times with the same seed, data and initial weights: no balancing, the aux loss, "
            "the aux-loss-free expert bias. Prints a table, writes OUT/demo.json and "
            "OUT/demo.png (loss curves, per-expert load over steps, per-domain routing). "
            "About a minute on a laptop CPU with the defaults."
        ),
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--preset", default=d.preset, help="the MoE preset whose tiny variant is used (see `moekit presets`)")
    p.add_argument("--steps", type=int, default=d.steps, help="training steps per run")
    p.add_argument("--batch-size", type=int, default=d.batch_size, help="sequences per step")
    p.add_argument("--seq-len", type=int, default=d.seq_len, help="tokens (bytes) per sequence")
    p.add_argument("--layers", type=int, default=d.n_layers, help="transformer blocks")
    p.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate (warm-up, cosine decay)")
    p.add_argument("--seed", type=int, default=d.seed, help="seed of the weights and the corpus (the same for all runs)")
    p.add_argument("--device", default=d.device, help="cpu, cuda, cuda:N or mps")
    p.add_argument("--out", default=d.out, help="output folder for demo.json and demo.png")
    p.add_argument("--aux-loss-coeff", type=float, default=d.aux_loss_coeff,
                   help="load_balance_coeff of the aux-loss run")
    p.add_argument("--bias-update-rate", type=float, default=d.bias_update_rate,
                   help="expert_bias_update_rate of the aux-loss-free run (bias step per update)")
    p.add_argument("--router-init-std", type=float, default=d.router_init_std,
                   help="std of the router gate's initial weights")
    p.add_argument("--eval-seqs", type=int, default=d.eval_seqs,
                   help="held-out sequences routed at the end (load, dead experts, domains)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG (no matplotlib needed)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars (no tqdm needed)")
    p.set_defaults(func=_cmd_demo)


def _cmd_demo(a) -> int:
    from .demo import DemoConfig, format_table, run_demo
    from .presets import get_preset

    _check_preset(a.preset)
    dev = _check_device(a.device)
    for name in ("steps", "batch_size", "seq_len", "layers", "eval_seqs"):
        if getattr(a, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    if a.batch_size < 4 or a.eval_seqs < 4:
        raise CLIError("--batch-size and --eval-seqs must be >= 4 (one sequence per domain at least)")
    _check_seed(a.seed)
    check_number("--lr", a.lr)
    check_number("--aux-loss-coeff", a.aux_loss_coeff, strict=False)
    check_number("--bias-update-rate", a.bias_update_rate)
    check_number("--router-init-std", a.router_init_std)
    if not a.no_plot:
        _need("matplotlib", "demo", "moekit demo (the PNG; or pass --no-plot)")
    if not a.no_progress:
        _need("tqdm", "demo", "moekit demo (the progress bar; or pass --no-progress)")
    check_writable_dir(a.out)
    cfg = DemoConfig(
        preset=a.preset, steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len,
        n_layers=a.layers, lr=a.lr, seed=a.seed, device=str(dev), out=a.out,
        aux_loss_coeff=a.aux_loss_coeff, bias_update_rate=a.bias_update_rate,
        router_init_std=a.router_init_std, eval_seqs=a.eval_seqs,
        progress=not a.no_progress, plot=not a.no_plot,
    )
    base = get_preset(a.preset, tiny=True)
    print(
        f"moekit demo: a byte-level LM with {cfg.n_layers} blocks whose MLP is the {a.preset} tiny MoE "
        f"({base.num_experts} experts, top-{base.top_k}, dim {base.dim}); {cfg.steps} steps of "
        f"{cfg.batch_size}x{cfg.seq_len} tokens, three runs, on {dev}",
        flush=True,
    )
    if getattr(base.router, "topk_before_score", False):
        print(
            f"note: {a.preset} selects its top-k before scoring, where the aux-loss-free expert "
            "bias does not change the selection; that run is effectively unbalanced here",
            flush=True,
        )
    s = run_demo(cfg)
    E, K = base.num_experts, base.top_k
    print()
    print(format_table(s))
    print(
        f"\nmax/mean load: the busiest expert's routed tokens over the mean, on {cfg.eval_seqs * cfg.seq_len} "
        f"held-out tokens, worst layer (1.00 = balanced, {E / K:.2f} = every token on the same "
        f"{K}); dead = experts that got no held-out token, all layers"
    )
    files = [str(Path(cfg.out) / "demo.json")] + ([s["png"]] if "png" in s else [])
    print(f"wrote {', '.join(files)} in {s['seconds']:.1f} s")
    return 0


# ---------------------------------------------------------------------------- presets
def _add_presets(sub) -> None:
    p = sub.add_parser(
        "presets",
        help="list the presets with their sizes",
        description="List the MoE presets with the size of one MoE layer: parameters, "
        "parameters one token uses, forward matmul FLOPs per token.",
    )
    p.add_argument("--tiny", action="store_true", help="the tiny variants (what the demo and tests use)")
    p.add_argument("--json", metavar="PATH", help="also write the table as JSON")
    p.set_defaults(func=_cmd_presets)


def preset_rows(tiny: bool = False) -> list[dict]:
    from .presets import PRESETS, get_preset, preset_sizes

    rows = []
    for name in PRESETS:
        cfg = get_preset(name, tiny=tiny)
        s = preset_sizes(cfg)
        rows.append({
            "preset": name, "dim": cfg.dim, "hidden_dim": cfg.hidden_dim,
            "experts": cfg.num_experts, "top_k": cfg.top_k,
            "shared": cfg.shared_experts is not None,
            "score_func": getattr(cfg.router, "score_func", "?"),
            "params": s.params, "active_params": s.active_params,
            "flops_per_token": s.flops_per_token,
        })
    return rows


def _cmd_presets(a) -> int:
    _check_json_path(a.json)
    rows = preset_rows(a.tiny)
    what = "tiny variants" if a.tiny else "published sizes"
    print(f"moekit presets ({what}); sizes are of ONE MoE layer (router + experts + shared experts)\n")
    head = (f"{'preset':<17} {'dim':>5} {'hidden':>6} {'experts':>7} {'top-k':>5} {'shared':>6} "
            f"{'scores':>7} {'params':>8} {'active':>8} {'FLOPs/token':>11}")
    print(head)
    print("-" * len(head))
    for r in rows:
        print(
            f"{r['preset']:<17} {r['dim']:>5} {r['hidden_dim']:>6} {r['experts']:>7} {r['top_k']:>5} "
            f"{'yes' if r['shared'] else 'no':>6} {r['score_func']:>7} {human(r['params']):>8} "
            f"{human(r['active_params']):>8} {human(r['flops_per_token']):>11}"
        )
    print("\nFLOPs/token: forward matmul FLOPs of the layer per token (2 x active params).")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(rows, indent=1))
        print(f"wrote {a.json}")
    return 0
