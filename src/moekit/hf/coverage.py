"""Every MoE family of the installed transformers through both routes, against eager.

``python -m moekit.hf.coverage [--write docs/hf.md] [--families a,b]`` (or :func:`run_all`):

1. :func:`find_families` (moekit.hf.discover) lists the families of the installed
   transformers: experts decorated with ``@use_experts_implementation``, or a sparse MoE
   block (an ``experts`` child next to a ``gate``/``router``).
2. :func:`tiny_config` takes the family's config class with its defaults and shrinks it
   generically (2 layers, hidden 32, 4 experts, top-2, vocabulary 97, ...; MoE on every
   layer), then applies :data:`OVERRIDES`, a short table of per-family fixes.
3. :func:`check_family` builds a random fp32 model (routing and zero-initialised biases
   randomised) and runs, against the eager model, ``experts_implementation="moekit"`` and
   ``moekit.hf.patch``: the output (logits, or hidden states for a base model) and the
   gradient of every parameter within 1e-4 of max |reference|.
4. :func:`markdown_table` renders one row per family, each route ``pass``, ``refused``
   (with the reason: a ``PatchError``, or experts transformers does not decorate) or
   ``failed`` (with what differed or crashed); :func:`write_table` puts it into docs/hf.md
   between the ``coverage-table`` markers.
"""

from __future__ import annotations

import copy
import time
import warnings
from dataclasses import dataclass, field

import torch

from .discover import (
    OVERRIDES,
    VOCAB,
    Family,
    build_model,
    family_by_name,
    find_families,
    tiny_config,
)

__all__ = [
    "Family", "Outcome", "FamilyResult", "find_families", "tiny_config", "check_family",
    "run_all", "markdown_table", "write_table", "OVERRIDES",
]

TOL = 1e-4  # max abs diff relative to max |reference|, per tensor


@dataclass(frozen=True)
class Outcome:
    status: str  # "pass" | "refused" | "failed"
    detail: str = ""

    def cell(self) -> str:
        return self.status if not self.detail else f"{self.status}: {self.detail}"


@dataclass
class FamilyResult:
    family: Family
    moekit: Outcome
    patch: Outcome
    seconds: float = 0.0
    patched: list = field(default_factory=list)


# ------------------------------------------------------------------------------ comparison
def _main_output(out) -> torch.Tensor:
    t = getattr(out, "logits", None)
    if t is None:
        t = getattr(out, "last_hidden_state", None)
    if t is None:
        t = out[0]
    return t


def _inputs(seed: int = 3) -> torch.Tensor:
    return torch.randint(3, VOCAB, (2, 7), generator=torch.Generator().manual_seed(seed))


def _forward(model, ids):
    torch.manual_seed(1234)  # families that sample in the forward (diffusion noise) see the same
    kw = {"decoder_input_ids": ids} if getattr(model.config, "is_encoder_decoder", False) else {}
    return _main_output(model(input_ids=ids, **kw))


def _run(model, ids, w):
    y = _forward(model, ids).float()
    (y * w[..., : y.shape[-1]]).sum().backward()
    return y.detach()


def _rel_err(got, ref) -> float:
    return (got.float() - ref.float()).abs().max().item() / max(ref.abs().max().item(), 1e-6)


def _compare(y, y_ref, grads, grads_ref) -> str | None:
    e = _rel_err(y, y_ref)
    if e > TOL:
        return f"output differs ({e:.2g} x max|ref|)"
    if set(grads) != set(grads_ref):
        diff = sorted(set(grads) ^ set(grads_ref))
        return f"gradients on one side only: {diff[:3]}"
    # a gradient that is zero in exact arithmetic (e.g. a router's under top-1 with
    # renormalised weights, all 1) is rounding noise on both sides: compared in absolute
    # terms against the largest gradient of the model instead
    top = max((g.abs().max().item() for g in grads_ref.values()), default=0.0)

    def err(n):
        ref = grads_ref[n]
        scale = max(ref.abs().max().item(), 1e-6 * top, 1e-12)
        return (grads[n].float() - ref.float()).abs().max().item() / scale

    worst = max(((err(n), n) for n in grads_ref), default=(0.0, ""))
    if worst[0] > TOL:
        return f"gradient of {worst[1]} differs ({worst[0]:.2g} x max|ref|)"
    return None


def _short(e: BaseException, n: int = 160) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:n]}{'...' if len(msg) > n else ''}"


def _check_moekit_route(family, ref, ids, w, y_ref, g_ref) -> Outcome:
    from transformers.integrations.moe import ExpertsInterface

    from .experts_impl import EXPERTS_IMPLEMENTATION, moekit_experts_forward

    if not family.decorated:
        return Outcome("refused", "experts not decorated by transformers")
    calls = []

    def counting(self, *a, **k):
        calls.append(1)
        return moekit_experts_forward(self, *a, **k)

    mapping = ExpertsInterface._global_mapping
    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    try:
        mapping[EXPERTS_IMPLEMENTATION] = counting
        model.set_experts_implementation(EXPERTS_IMPLEMENTATION)
        y = _run(model, ids, w)
    except Exception as e:  # a crash is a result of the table
        return Outcome("failed", _short(e))
    finally:
        mapping[EXPERTS_IMPLEMENTATION] = moekit_experts_forward
    if not calls:
        return Outcome("failed", "moekit's experts function was never called")
    g = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    why = _compare(y, y_ref, g, g_ref)
    return Outcome("failed", why) if why else Outcome("pass")


def _check_patch_route(ref, ids, w, y_ref, g_ref) -> tuple[Outcome, list]:
    from . import patching
    from .layout import PatchError

    model = copy.deepcopy(ref)
    model.zero_grad(set_to_none=True)
    try:
        with warnings.catch_warnings():  # "build the optimizer after patch": not for here
            warnings.simplefilter("ignore")
            names = patching.patch(model, strict=False)
    except PatchError as e:
        return Outcome("refused", " ".join(str(e).split())), []
    except Exception as e:
        return Outcome("failed", "patch crashed: " + _short(e)), []
    if names.skipped:
        n = len(names) + len(names.skipped)
        first = " ".join(next(iter(names.skipped.values())).split())
        return Outcome("refused", f"{len(names.skipped)} of {n} blocks, e.g. {first}"), []
    if not names:
        return Outcome("failed", "patch found no MoE block"), []
    try:
        y = _run(model, ids, w)
    except Exception as e:
        return Outcome("failed", "patched forward crashed: " + _short(e)), list(names)
    why = _compare(y, y_ref, patching.grads_by_hf_name(model), g_ref)
    return (Outcome("failed", why) if why else Outcome("pass")), list(names)


def check_family(family: Family | str, seed: int = 0) -> FamilyResult:
    """Both routes of one family against its eager model (see the module docstring)."""
    fam = family if isinstance(family, Family) else family_by_name(family)
    t0 = time.perf_counter()
    try:
        ref = build_model(fam, seed)
        ids = _inputs()
        y0 = _forward(ref, ids)
        w = torch.randn(y0.shape, generator=torch.Generator().manual_seed(5))
        ref.zero_grad(set_to_none=True)
        y_ref = _run(ref, ids, w)
    except Exception as e:
        bad = Outcome("failed", "the tiny eager model does not run: " + _short(e))
        return FamilyResult(fam, bad, bad, time.perf_counter() - t0)
    g_ref = {n: p.grad for n, p in ref.named_parameters() if p.grad is not None}
    m = _check_moekit_route(fam, ref, ids, w, y_ref, g_ref)
    p, names = _check_patch_route(ref, ids, w, y_ref, g_ref)
    return FamilyResult(fam, m, p, time.perf_counter() - t0, names)


def run_all(families=None, *, log=None) -> list[FamilyResult]:
    """:func:`check_family` for every family of :func:`find_families` (or ``families``)."""
    import transformers

    transformers.logging.set_verbosity_error()
    fams = find_families()
    if families is not None:
        want = set(families)
        unknown = want - {f.name for f in fams}
        if unknown:
            found = [f.name for f in fams]
            raise ValueError(f"unknown MoE families {sorted(unknown)}; found: {found}")
        fams = [f for f in fams if f.name in want]
    out = []
    for f in fams:
        r = check_family(f)
        if log is not None:
            log(f"{f.name:24s} moekit: {r.moekit.cell()[:70]:70s} patch: {r.patch.cell()[:90]} "
                f"({r.seconds:.1f}s)")
        out.append(r)
    return out


# ------------------------------------------------------------------------------ table
def summary(results: list[FamilyResult]) -> dict:
    def count(route):
        c = {"pass": 0, "refused": 0, "failed": 0}
        for r in results:
            c[getattr(r, route).status] += 1
        return c

    return {
        "families": len(results),
        "decorated": sum(r.family.decorated for r in results),
        "moekit": count("moekit"),
        "patch": count("patch"),
    }


def markdown_table(results: list[FamilyResult]) -> str:
    import transformers

    s = summary(results)
    m, p = s["moekit"], s["patch"]
    lines = [
        f"transformers {transformers.__version__}: {s['families']} MoE families "
        f"({s['decorated']} with decorated experts). "
        f"`experts_implementation=\"moekit\"`: {m['pass']} pass, {m['refused']} refused, "
        f"{m['failed']} failed. `patch`: {p['pass']} pass, {p['refused']} refused, "
        f"{p['failed']} failed.",
        "",
        "| family | model type | `experts_implementation=\"moekit\"` | `patch` |",
        "|---|---|---|---|",
    ]
    for r in results:
        cells = [c.cell().replace("|", "\\|") for c in (r.moekit, r.patch)]
        lines.append(f"| {r.family.name} | {r.family.model_type} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines) + "\n"


BEGIN, END = "<!-- coverage-table:begin -->", "<!-- coverage-table:end -->"


def write_table(path: str, results: list[FamilyResult]) -> None:
    """Replace the text between the coverage-table markers of ``path`` by the table."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if BEGIN not in text or END not in text:
        raise ValueError(f"{path} has no {BEGIN} ... {END} markers")
    head, rest = text.split(BEGIN, 1)
    _, tail = rest.split(END, 1)
    with open(path, "w", encoding="utf-8") as f:
        f.write(f"{head}{BEGIN}\n{markdown_table(results)}{END}{tail}")


def main(argv=None) -> int:
    import argparse

    ap = argparse.ArgumentParser(
        prog="python -m moekit.hf.coverage",
        description="Check every MoE family of the installed transformers through both routes.",
    )
    ap.add_argument("--families", help="comma-separated family names (default: all)")
    ap.add_argument("--write", metavar="MD", help="write the table into MD (e.g. docs/hf.md)")
    a = ap.parse_args(argv)
    fams = a.families.split(",") if a.families else None
    results = run_all(fams, log=print)
    print()
    print(markdown_table(results))
    if a.write:
        write_table(a.write, results)
        print(f"wrote the table into {a.write}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
