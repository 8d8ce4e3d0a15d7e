"""The ``moekit check`` subcommand: ``run_check`` patches a transformers MoE model (an HF id
or path, or a random tiny one of ``TINY_FAMILIES``) with ``moekit.hf.patch`` and compares it
with the original (logits, every gradient, and per layer the routing agreement, recorded by
``_RoutingRecorder``); ``_add_check`` and ``_cmd_check`` are its parser and command.
Registered by ``moekit.cli.build_parser``.
"""

from __future__ import annotations

import copy
import json
import time
from pathlib import Path

import torch

from .cli_common import (
    EXIT_CHECK_FAILED,
    CLIError,
    _check_device,
    _check_json_path,
    _check_seed,
    _need,
    check_number,
)

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
