"""The ``moekit`` command: a thin argparse front end over library functions.

    moekit demo                 train a tiny MoE LM three ways on CPU; table + JSON + PNG
    moekit bench [ARGS]         the experts benchmark (moekit.benchmark); CPU smoke test without a GPU
    moekit check MODEL          patch an HF model with moekit; logits/grads parity, routing agreement
    moekit check --tiny FAMILY  the same on a random tiny model built offline
    moekit presets              the presets with their sizes

Every argument is checked before any long work starts. Every error (an unknown preset, shape,
implementation or family, a bad number, a device that is not there, an output folder that
cannot be written, a missing optional dependency) prints one line on stderr naming the problem
and the fix, and exits with status 2; no traceback unless ``--debug`` is given (anywhere on the
command line). ``main(argv)`` returns the exit status, so the tests call it in-process.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import os
import sys
import time
from pathlib import Path

import torch

__all__ = ["TINY_FAMILIES", "CLIError", "check_writable_dir", "human", "main", "run_check"]

EXIT_USER_ERROR = 2
EXIT_CHECK_FAILED = 1


class CLIError(Exception):
    """A user error: printed as ``moekit: error: <message>`` with exit status 2."""


class OneLineParser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are a CLIError (one line, status 2) instead of the usage
    text and ``sys.exit``; its subparsers are of the same class."""

    def error(self, message: str):
        where = "" if self.prog == "moekit" else f"{self.prog}: "
        raise CLIError(f"{where}{message} (see `{self.prog} --help`)")


def check_number(option: str, value: float, *, minimum: float = 0.0, strict: bool = True) -> None:
    """``value`` is finite and ``> minimum`` (``>= minimum`` when not ``strict``)."""
    ok = math.isfinite(value) and (value > minimum if strict else value >= minimum)
    if not ok:
        rel = ">" if strict else ">="
        raise CLIError(f"{option} must be a finite number {rel} {minimum:g}, got {value!r}")


def check_writable_dir(path: str | os.PathLike, option: str = "--out") -> None:
    """``path`` is (or can be made) a folder this process can write to: made, then probed with a
    small file that is removed again."""
    p = Path(path)
    if p.exists() and not p.is_dir():
        raise CLIError(f"{option} {str(path)!r} is a file, not a folder")
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe = p / f".moekit-write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise CLIError(f"{option} {str(path)!r} is not writable: {e.strerror or e}") from None


def _check_json_path(path: str | None) -> None:
    if path is None:
        return
    if Path(path).is_dir():
        raise CLIError(f"--json {path!r} is a folder; give a file name")
    check_writable_dir(Path(path).parent or ".", "--json's folder")


def _check_seed(seed: int) -> None:
    if not 0 <= seed < 2**63:
        raise CLIError(f"--seed must be in [0, 2**63), got {seed}")


# ---------------------------------------------------------------------------- helpers
def human(n: float, unit: str = "") -> str:
    """``11.3B``, ``480.0M``, ``2.1K``, ``12``: numbers with a magnitude suffix."""
    for suffix, div in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.1f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def _check_preset(name: str) -> None:
    from .presets import PRESETS

    if name not in PRESETS:
        raise CLIError(
            f"unknown preset {name!r}; allowed: {', '.join(PRESETS)} (see `moekit presets`)"
        )


def _check_device(name: str) -> torch.device:
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError):
        raise CLIError(f"--device {name!r} is not a device name; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise CLIError(
                f"--device {name}: no CUDA GPU is visible to torch {torch.__version__} "
                f"(torch.cuda.is_available() is False); run with --device cpu, or install a CUDA "
                "build of torch on a machine with a GPU"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise CLIError(
                f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) visible "
                f"(cuda:0 .. cuda:{torch.cuda.device_count() - 1})"
            )
    elif dev.type == "mps":
        if not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
            raise CLIError(f"--device {name}: MPS is not available here; use --device cpu")
    elif dev.type != "cpu":
        raise CLIError(f"--device {name}: moekit's commands run on cpu, cuda or mps")
    return dev


def _need(module: str, extra: str, what: str) -> None:
    """Import ``module`` or raise a CLIError with the pip command that installs it."""
    try:
        __import__(module)
    except ImportError:
        raise CLIError(
            f"{what} needs {module.split('.')[0]}, which is not installed: "
            f"pip install 'moekit[{extra}]'"
        ) from None


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


# ---------------------------------------------------------------------------- bench
BENCH_HELP = "the experts benchmark (moekit.benchmark): table, JSON and PNG; CPU smoke test without a GPU"


def _cmd_bench(argv: list[str]) -> int:
    """Forward ``argv`` to ``moekit.benchmark.main`` (which owns the options and says when it
    runs the small CPU shapes for want of a GPU); ``--out`` defaults to moekit-out/bench."""
    try:
        from . import benchmark
    except ImportError as e:
        if "--help" in argv or "-h" in argv:
            print("usage: moekit bench [ARGS...]\n\n" + BENCH_HELP)
        raise CLIError(
            f"moekit bench: the benchmark module is not available ({e}); it ships with moekit "
            "from source (src/moekit/benchmark.py)"
        ) from None
    entry = getattr(benchmark, "main", None)
    if entry is None:
        raise CLIError("moekit bench: moekit.benchmark has no main(argv)")
    if "-h" not in argv and "--help" not in argv:
        dev = next((argv[i + 1] for i, x in enumerate(argv[:-1]) if x == "--device"), None)
        dev = dev or next((x.split("=", 1)[1] for x in argv if x.startswith("--device=")), None)
        if dev is not None:
            _check_device(dev)
    rc = entry(list(argv), default_out="moekit-out/bench", parser_class=OneLineParser)
    return 0 if rc is None else int(rc)


# ---------------------------------------------------------------------------- check
# the families of moekit.hf.tiny (not imported here: that needs transformers; a test checks
# that the two agree)
TINY_FAMILIES = ("mixtral", "qwen2_moe", "qwen3_moe", "olmoe", "deepseek_v3", "gpt_oss", "llama4")


def _tiny_model(family: str, seed: int):
    from .hf.tiny import tiny_model

    return tiny_model(family, seed)


def _first_int_2d(values):
    for v in values:
        if isinstance(v, torch.Tensor) and v.dim() == 2 and not v.is_floating_point():
            return v
    return None


class _RoutingRecorder:
    """Records, for each HF sparse block, the top-k expert ids of its last forward: the
    integer ids its experts module receives, else those its router returns, else the top-k
    of the first [T, E] float tensor its router returns (Llama 4: the scattered scores)."""

    def __init__(self, model, names: list[str], top_k: dict[str, int], num_experts: dict[str, int]):
        self.ids: dict[str, torch.Tensor] = {}
        self.source: dict[str, str] = {}
        self.handles = []
        for n in names:
            block = model.get_submodule(n)
            ex = getattr(block, "experts", None)
            if isinstance(ex, torch.nn.Module):
                self.handles.append(ex.register_forward_pre_hook(self._experts_hook(n), with_kwargs=True))
            for rname in ("gate", "router"):
                r = getattr(block, rname, None)
                if isinstance(r, torch.nn.Module):
                    self.handles.append(r.register_forward_hook(self._router_hook(n, top_k[n], num_experts[n])))
                    break

    def _experts_hook(self, n):
        def hook(mod, args, kwargs):
            ids = _first_int_2d(list(args[1:]) + list(kwargs.values()))
            if ids is not None:
                self.ids[n], self.source[n] = ids.detach().reshape(ids.shape[0], -1).clone(), "experts input"
        return hook

    def _router_hook(self, n, K, E):
        def hook(mod, args, out):
            outs = out if isinstance(out, tuple) else (out,)
            ids = _first_int_2d(outs)
            if ids is not None:
                self.ids.setdefault(n, ids.detach().clone())
                self.source.setdefault(n, "router output")
                return
            for v in outs:
                if isinstance(v, torch.Tensor) and v.is_floating_point() and v.shape[-1] == E:
                    self.ids.setdefault(n, v.detach().reshape(-1, E).topk(K, dim=-1).indices)
                    self.source.setdefault(n, "top-k of router output")
                    return
        return hook

    def close(self):
        for h in self.handles:
            h.remove()


def run_check(model: str | None = None, *, tiny: str | None = None, backend: str = "auto",
              device: str = "cpu", batch: int = 2, seq_len: int = 16, seed: int = 0,
              tol: float = 1e-4, log=print) -> dict:
    """Patch an HF model (id/path, or a random tiny one of ``tiny``'s family) with
    ``moekit.hf.patch`` and compare it with the original: logits, the gradient of every
    parameter (loss: a fixed random projection of the logits), and per patched layer the
    share of (token, expert) picks the two agree on. fp32; ``tol`` relative to max |ref|."""
    import transformers

    import moekit.hf as mh

    transformers.logging.set_verbosity_error()
    dev = torch.device(device)
    if tiny is not None:
        ref = _tiny_model(tiny, seed)
        what = f"random tiny {tiny} model (2 layers, hidden 32, built offline)"
    else:
        try:
            ref = transformers.AutoModelForCausalLM.from_pretrained(model, dtype=torch.float32)
        except (OSError, ValueError) as e:
            raise CLIError(f"cannot load {model!r} with transformers: {str(e).splitlines()[0]}") from None
        what = model
    ref = ref.float().to(dev).eval()
    patched = copy.deepcopy(ref)
    t0 = time.perf_counter()
    try:
        names = mh.patch(patched, backend=backend)
    except mh.PatchError as e:
        raise CLIError(f"moekit cannot patch {what}: {e}") from None
    if not names:
        raise CLIError(f"{what}: no sparse MoE block found to patch")
    log(f"patched {len(names)} MoE block(s) of {what} with moekit (backend={backend}) "
        f"in {time.perf_counter() - t0:.2f} s")
    moes = {n: patched.get_submodule(n) for n in names}
    rec = _RoutingRecorder(ref, names, {n: m.config.top_k for n, m in moes.items()},
                           {n: m.num_experts for n, m in moes.items()})
    text_cfg = ref.config.get_text_config() if hasattr(ref.config, "get_text_config") else ref.config
    V = text_cfg.vocab_size
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(min(3, V - 1), V, (batch, seq_len), generator=g).to(dev)
    try:
        out_ref = ref(ids)
        out = patched(ids)
    finally:
        rec.close()
    w = torch.randn(out_ref.logits.shape, generator=g).to(dev)
    (out_ref.logits.float() * w).sum().backward()
    (out.logits.float() * w).sum().backward()

    scale = out_ref.logits.abs().max().item()
    logits_err = (out.logits.float() - out_ref.logits.float()).abs().max().item()
    logits_rel = logits_err / max(scale, 1e-12)
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    g_got = mh.grads_by_hf_name(patched)
    missing = sorted(set(g_ref) ^ set(g_got))
    grad_rel, worst = 0.0, None
    for n in sorted(set(g_ref) & set(g_got)):
        r = (g_got[n].float() - g_ref[n].float()).abs().max().item() / max(g_ref[n].abs().max().item(), 1e-12)
        if r > grad_rel:
            grad_rel, worst = r, n
    layers = []
    for n, m in moes.items():
        got = m.last_router_output.topk_ids.detach().cpu()
        exp = rec.ids.get(n)
        row = {"layer": n, "tokens": int(got.shape[0]), "top_k": int(got.shape[1]),
               "source": rec.source.get(n, "not recorded"), "agreement": None}
        if exp is not None and exp.shape[0] == got.shape[0]:
            exp = exp.cpu().to(torch.int64)
            hit = (got.unsqueeze(2) == exp.unsqueeze(1)).any(2).float().mean().item()
            row["agreement"] = hit
        layers.append(row)
    ok = logits_rel <= tol and grad_rel <= tol and not missing
    return {
        "model": what, "patched": names, "backend": backend, "tokens": batch * seq_len,
        "logits_max_abs_diff": logits_err, "logits_rel_diff": logits_rel,
        "grads_compared": len(set(g_ref) & set(g_got)), "grads_unmatched": missing,
        "grads_max_rel_diff": grad_rel, "grads_worst": worst, "routing": layers,
        "tol": tol, "ok": ok,
    }


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="patch an HF model with moekit; report logits/grads parity and routing agreement",
        description=(
            "Load a transformers MoE model (an HF model id or a local path; or --tiny FAMILY: a "
            "random tiny model built offline), patch every sparse MoE block with moekit "
            "(moekit.hf.patch), run both on the same random tokens in fp32 and report: logits "
            "parity, the gradient parity of every parameter, and per patched layer the share "
            "of top-k picks that agree. Exit status 1 when the parity is outside --tol. "
            "Needs pip install 'moekit[hf]'."
        ),
    )
    p.add_argument("model", nargs="?", help="HF model id or local path")
    p.add_argument("--tiny", metavar="FAMILY", help=f"a random tiny model; one of {', '.join(TINY_FAMILIES)}")
    p.add_argument("--backend", default="auto", help="moekit experts backend (auto, loop, grouped_mm, triton)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or mps")
    p.add_argument("--batch-size", type=int, default=2)
    p.add_argument("--seq-len", type=int, default=16)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tol", type=float, default=1e-4, help="max diff relative to max |reference|")
    p.add_argument("--json", metavar="PATH", help="also write the report as JSON")
    p.set_defaults(func=_cmd_check)


def _cmd_check(a) -> int:
    if (a.model is None) == (a.tiny is None):
        raise CLIError("moekit check takes either MODEL (an HF model id or path) or --tiny FAMILY, not both or neither")
    if a.tiny is not None and a.tiny not in TINY_FAMILIES:
        raise CLIError(f"unknown tiny family {a.tiny!r}; allowed: {', '.join(TINY_FAMILIES)}")
    dev = _check_device(a.device)
    from .ops.backends import backend_names, resolve_backend

    if a.backend not in backend_names():
        raise CLIError(f"unknown --backend {a.backend!r}; allowed: {', '.join(backend_names())}")
    try:
        resolve_backend(a.backend, dev, torch.float32)  # `check` runs in float32
    except ValueError as e:
        raise CLIError(f"--backend {a.backend}: {e}") from None
    for name in ("batch_size", "seq_len"):
        if getattr(a, name) < 1:
            raise CLIError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(a, name)}")
    _check_seed(a.seed)
    check_number("--tol", a.tol)
    _check_json_path(a.json)
    _need("transformers", "hf", "moekit check")
    try:
        import moekit.hf  # noqa: F401
    except ImportError as e:
        raise CLIError(f"moekit check: {e}") from None
    r = run_check(a.model, tiny=a.tiny, backend=a.backend, device=str(dev), batch=a.batch_size,
                  seq_len=a.seq_len, seed=a.seed, tol=a.tol)
    mark = lambda good: "OK" if good else "FAIL"
    print(f"logits: max abs diff {r['logits_max_abs_diff']:.3g} = {r['logits_rel_diff']:.3g} x max|ref|  "
          f"{mark(r['logits_rel_diff'] <= r['tol'])}")
    print(f"grads:  {r['grads_compared']} tensors, max diff {r['grads_max_rel_diff']:.3g} x max|ref| "
          f"(worst: {r['grads_worst']})  {mark(r['grads_max_rel_diff'] <= r['tol'] and not r['grads_unmatched'])}")
    if r["grads_unmatched"]:
        print(f"        gradients present on one side only: {r['grads_unmatched'][:6]}")
    print(f"routing agreement ({r['tokens']} tokens; share of top-k picks that are the same):")
    for row in r["routing"]:
        agr = "n/a" if row["agreement"] is None else f"{100 * row['agreement']:.1f}%"
        print(f"  {row['layer']:<32} top-{row['top_k']}  {agr:>7}   (HF ids from the {row['source']})")
    if a.json:
        Path(a.json).parent.mkdir(parents=True, exist_ok=True)
        Path(a.json).write_text(json.dumps(r, indent=1))
        print(f"wrote {a.json}")
    print("parity OK" if r["ok"] else f"parity FAILED (tolerance {r['tol']:g} x max|ref|)")
    return 0 if r["ok"] else EXIT_CHECK_FAILED


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = OneLineParser(
        prog="moekit",
        description="moekit: Mixture-of-Experts layers for PyTorch. Start with `moekit demo`.",
    )
    p.add_argument("--version", action="version", version=f"moekit {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (accepted anywhere on the line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    sub.add_parser("bench", help=BENCH_HELP, add_help=False,
                   description=BENCH_HELP + " (`moekit bench --help` for its options)")
    _add_check(sub)
    _add_presets(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    try:
        if argv and argv[0] == "bench":  # its own argparse (moekit.benchmark.main) owns the options
            return _cmd_bench(argv[1:])
        parser = build_parser()
        a = parser.parse_args(argv)
        if a.command is None:
            parser.print_help()
            print("moekit: error: a COMMAND is needed (demo, bench, check or presets)", file=sys.stderr)
            return EXIT_USER_ERROR
        return a.func(a)
    except SystemExit as e:  # --help and --version end here (status 0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for every error, the traceback on --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, CLIError):
            print(f"moekit: error: {msg}", file=sys.stderr)
        else:
            print(f"moekit: error: {type(e).__name__}: {msg} (run with --debug for the traceback)",
                  file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
