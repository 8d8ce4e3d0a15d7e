"""The experts benchmark: moekit's backends and their peers, same routing, same weights, one
process.

``run(out_dir, ...)`` times every (shape, impl) pair, writes ``<out_dir>/<device>.json`` (``meta``:
device, versions, date, measured bf16 matmul and copy ceilings; ``rows``: one dict per pair with
``shape, impl, fwd_ms, fwd_bwd_ms, fwd_tflops, fwd_bwd_tflops, peak_mem_gib, rel_err, device``
and a few extras) and a bar chart ``<out_dir>/<device>.png`` beside it. ``main(argv)`` is the
command line (``python benchmarks/bench_experts.py --help``; ``moekit bench`` calls it too).

Impls: ``moekit-triton`` (the fused kernels), ``moekit-grouped_mm`` (torch grouped_mm stages),
``hf-grouped_mm`` / ``hf-batched_mm`` (transformers' ``integrations.moe`` experts functions, on
the same ``[E, 2F, D]`` weights: they use the non-transposed layout), ``hf-eager`` (a replica of
transformers' per-expert eager loop), ``scattermoe`` (when ``import scattermoe`` works: put its
package on ``sys.path``; it is not a dependency). FLOPs: forward ``6*T*K*D*F``, backward twice
that. Peak memory is measured above the inputs (weights, x, routing), over one forward+backward
that returns the gradients. ``rel_err`` is ``|y - ref| / |ref|`` (Frobenius) on the first
``slice_tokens`` tokens against an fp32 per-expert loop on upcast inputs; ``grad_rel_err`` the
same for dx. Without a GPU it runs tiny CPU shapes (and says so): a smoke test, not a benchmark.

The parts live beside it: the shapes, inputs and implementations in ``moekit.bench_impls``,
the timers and the measurement of one row in ``moekit.bench_measure``, the report (table,
Markdown, JSON, plot) in ``moekit.bench_report``; this module is the driver (``run``,
``main``, the argument checks and the sweeps) and re-exports their public names.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

# the names marked re-exported are not used here: benchmarks/*.py and the tests import them
from .bench_impls import (
    CPU_SHAPES,
    IMPLS,
    SHAPES,
    Shape,
    _get_impl,  # noqa: F401 - re-exported
    make_inputs,
)
from .bench_measure import (
    _bench_experts_g,
    _bench_layer,
    _graph_ms,  # noqa: F401 - re-exported
    _profile,
    _reference,
    _time_ms,  # noqa: F401 - re-exported
    layer_config,  # noqa: F401 - re-exported
    measure_ceilings,
    retime_rounds,
)
from .bench_report import (
    _device_name,
    _fmt,
    _meta,
    _versions,  # noqa: F401 - re-exported
    markdown_table,  # noqa: F401 - re-exported
    plot,  # noqa: F401 - re-exported
    table_text,
    write_results,
)

__all__ = ["CPU_SHAPES", "IMPLS", "SHAPES", "Shape", "main", "measure_ceilings", "run"]


# ----------------------------------------------------------------------------- driver
def _default_impls(device, shape: Shape) -> list[str]:
    if device.type != "cuda":
        impls = ["moekit-grouped_mm", "moekit-loop", "hf-grouped_mm", "hf-eager"]
        if os.environ.get("TRITON_INTERPRET") == "1":
            impls.insert(0, "moekit-triton")
        return impls
    impls = ["moekit-triton", "moekit-grouped_mm", "hf-grouped_mm", "scattermoe"]
    if shape.kind == "decode":
        impls += ["hf-batched_mm"] + (["hf-eager"] if shape.T <= 8 else [])
    elif shape.E <= 8:
        impls += ["hf-eager"]  # a python loop over experts: only where there are few
    return impls


@contextlib.contextmanager
def sweep_env(spec: str):
    """Apply one sweep entry (settings joined by ``;``, each as ``_sweep_setting`` reads it) to
    the environment for the duration of the block, then restore what was there."""
    settings = dict(_sweep_setting(part) for part in spec.split(";") if part)
    old = {var: os.environ.get(var) for var in settings}
    os.environ.update(settings)
    try:
        yield
    finally:
        for var, v in old.items():
            if v is None:
                os.environ.pop(var, None)
            else:
                os.environ[var] = v


def _timed_as(row: dict):
    """``(impl, context)`` to time a row again under: a sweep row's impl under its settings."""
    if "sweep" in row:
        return "moekit-triton", sweep_env(row["sweep"])
    return row["impl"], contextlib.nullcontext()


def _sweep_setting(part: str) -> tuple[str, str]:
    """One ``--sweep`` setting: ``BM,BN,BK,warps,stages`` (row GEMMs), ``dw:BO,BI,BK,warps,stages``
    (weight grads) or ``VAR=VALUE`` (any environment setting)."""
    if part.startswith("dw:"):
        return "MOEKIT_TRITON_DW_CONFIG", part[3:]
    if "=" in part:
        var, val = part.split("=", 1)
        return var, val
    return "MOEKIT_TRITON_CONFIG", part


def run(
    out_dir: str | os.PathLike = "benchmarks/results",
    *,
    shapes: list[str] | None = None,
    impls: list[str] | None = None,
    device: str | None = None,
    dtype: torch.dtype = torch.bfloat16,
    rep_ms: int = 100,
    rounds: int = 1,
    slice_tokens: int = 256,
    sweep: list[str] | None = None,
    sweep_shapes: list[str] | None = None,
    profile: list[str] | None = None,
    log: Callable[[str], None] = print,
) -> list[dict]:
    """Run the benchmark; write ``<out_dir>/<device>.json`` and ``.png``; return the rows.

    ``shapes``/``impls`` filter by name (default: all shapes and the impls that make sense on
    this device). Without a GPU it runs ``CPU_SHAPES`` in fp32 and says so. ``sweep`` is a
    list of settings to time moekit-triton under at the first training shape (see
    ``_sweep_setting``; several joined by ``;``). ``rounds`` > 1: at the training shapes the
    impls (and the sweep's settings) are timed that many times in turn and each row reports
    the medians (``bench_measure.retime_rounds``).
    """
    dev = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if dev.type != "cuda":
        log("benchmark: no GPU here: running tiny CPU shapes in fp32 (a smoke test, not a benchmark)")
        dtype = torch.float32
        table = CPU_SHAPES
    else:
        table = SHAPES
    todo = [s for s in table if shapes is None or s.name in shapes]
    ceil = measure_ceilings(dev)
    log(f"ceilings on {_device_name(dev)}: {ceil}")
    rows: list[dict] = []
    prof_txt: list[str] = []
    for shape in todo:
        if shape.kind == "layer":
            for backend in ("triton", "grouped_mm"):
                if impls is not None and f"moekit-{backend}" not in impls:
                    continue
                if backend == "triton" and dev.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
                    continue
                try:
                    r = _bench_layer(shape, backend, dev, dtype, rep_ms=rep_ms)
                except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
                    r = {"shape": shape.name, "impl": f"moekit-layer-{backend}", "error": repr(exc)[:300]}
                    log(traceback.format_exc()[-1500:])
                r["device"] = _device_name(dev)
                rows.append(r)
                log(_fmt(r))
            write_results(out_dir, _meta(dev, dtype, ceil, rounds), rows, png=False)
            continue
        inputs = make_inputs(shape, dev, dtype)
        ref = _reference(shape, inputs, slice_tokens)
        # fp32 reference dx on the slice for the same output grad as the timed backward
        g_full = torch.randn(shape.T, shape.D, device=dev, dtype=dtype,
                             generator=torch.Generator(device=dev).manual_seed(7))
        ref["dx"] = torch.autograd.grad(ref["y_out"], ref["y_leaf"], g_full[: ref["slice"]].float())[0]
        shape_rows = []
        for impl in (impls or _default_impls(dev, shape)):
            if impl == "hf-batched_mm" and shape.T * shape.K * 3 * shape.D * shape.F * 2 > 8 * 2**30:
                continue
            shape_rows.append(_one(shape, impl, dev, dtype, inputs, ref, g_full, rep_ms, log))
        if sweep and shape.kind == "train" and shape.name in (sweep_shapes or [todo[0].name]):
            for cfg in sweep:
                with sweep_env(cfg):
                    r = _one(shape, "moekit-triton", dev, dtype, inputs, ref, g_full, rep_ms, log)
                r["impl"] = f"moekit-triton[{cfg}]"
                r["sweep"] = cfg
                shape_rows.append(r)
        if rounds > 1 and shape.kind == "train":
            retime_rounds(shape_rows, shape, dev, inputs, g_full, rounds, rep_ms, _timed_as)
            for r in shape_rows:
                log(_fmt(r) + (f"  (median of {rounds} rounds)" if "fwd_bwd_ms_rounds" in r else ""))
        rows += shape_rows
        if profile and shape.name in profile and dev.type == "cuda":
            prof_txt.append(_profile(shape, "moekit-triton", dev, dtype, inputs, g_full))
            log(prof_txt[-1])
        del inputs, ref
        if dev.type == "cuda":
            torch.cuda.empty_cache()
        write_results(out_dir, _meta(dev, dtype, ceil, rounds), rows, png=False)  # partial results survive
    meta = _meta(dev, dtype, ceil, rounds)
    write_results(out_dir, meta, rows)
    if prof_txt:
        (Path(out_dir) / f"{meta['device']}-profile.txt").write_text("\n\n".join(prof_txt))
    log(table_text(rows, meta))
    return rows

def _one(shape, impl, dev, dtype, inputs, ref, g_full, rep_ms, log) -> dict:
    try:
        r = _bench_experts_g(shape, impl, dev, dtype, inputs, ref, g_full, rep_ms=rep_ms)
    except Exception as exc:  # noqa: BLE001 - a failing impl is a row, not a crash
        r = {"shape": shape.name, "impl": impl, "error": repr(exc)[:300]}
        log(traceback.format_exc()[-1500:])
    r["device"] = _device_name(dev)
    log(_fmt(r))
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    return r


def check_args(a: argparse.Namespace) -> None:
    """Every option of ``main`` against what this machine will run (ValueError naming the
    option and the allowed values), before anything is measured."""
    try:
        dev = torch.device(a.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    except (RuntimeError, ValueError):
        raise ValueError(f"--device {a.device!r} is not a device name; use cuda or cpu") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA GPU is visible; use --device cpu")
    table = SHAPES if dev.type == "cuda" else CPU_SHAPES
    names = [s.name for s in table]
    where = "on a GPU" if dev.type == "cuda" else "without a GPU (the GPU shapes need CUDA)"
    for opt in ("shapes", "sweep_shapes", "profile"):
        bad = [n for n in (getattr(a, opt) or []) if n not in names]
        if bad:
            raise ValueError(f"--{opt.replace('_', '-')}: unknown shape(s) {bad}; allowed {where}: {names}")
    bad = [i for i in (a.impls or []) if i not in IMPLS]
    if bad:
        raise ValueError(f"--impls: unknown implementation(s) {bad}; allowed: {IMPLS}")
    for opt in ("shapes", "impls"):
        if getattr(a, opt) == []:
            raise ValueError(f"--{opt} was given without a name; leave it out for all")
    if a.rep_ms <= 0:
        raise ValueError(f"--rep-ms must be > 0, got {a.rep_ms}")
    if a.rounds < 1:
        raise ValueError(f"--rounds must be >= 1, got {a.rounds}")
    for spec in a.sweep or []:
        for part in spec.split(";"):
            _check_sweep_part(part)
    if a.peers is not None and not Path(a.peers).is_dir():
        raise ValueError(f"--peers {a.peers!r} is not a folder")
    from .cli import CLIError, check_writable_dir

    try:
        check_writable_dir(a.out)
    except CLIError as e:
        raise ValueError(str(e)) from None


def _check_sweep_part(part: str) -> None:
    cfg = part[3:] if part.startswith("dw:") else part
    if "=" in part and not part.startswith("dw:"):
        var = part.split("=", 1)[0]
        if not var.isidentifier():
            raise ValueError(f"--sweep: {part!r} is not VAR=VALUE")
        return
    fields = cfg.split(",")
    if len(fields) != 5 or not all(f.strip().isdigit() and int(f) > 0 for f in fields):
        raise ValueError(
            f"--sweep: {part!r} is not a triton config 'BM,BN,BK,warps,stages' (or 'dw:BO,BI,BK,warps,stages', "
            "or VAR=VALUE): five positive integers"
        )


def main(argv: list[str] | None = None, *, default_out: str = "benchmarks/results",
         parser_class: type[argparse.ArgumentParser] = argparse.ArgumentParser) -> int:
    """``parser_class``: the ArgumentParser to use (the ``moekit`` command passes one whose
    errors are one line)."""
    p = parser_class(prog="moekit bench", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=default_out, help="output folder (default %(default)s)")
    p.add_argument("--shapes", nargs="*", default=None, help="shape names (default: all)")
    p.add_argument("--impls", nargs="*", default=None, help=f"impls (default: by device); of {IMPLS}")
    p.add_argument("--device", default=None, help="cuda or cpu (default: cuda when present)")
    p.add_argument("--rep-ms", type=int, default=100, help="timing budget per measurement")
    p.add_argument("--rounds", type=int, default=1,
                   help="training shapes: time the impls this many times in turn, report medians")
    p.add_argument("--sweep", nargs="*", default=None,
                   help="settings to time moekit-triton under at the first training shape: triton configs "
                        "'BM,BN,BK,warps,stages' (row GEMMs), 'dw:BO,BI,BK,warps,stages' (weight grads) or "
                        "VAR=VALUE, several joined by ';'")
    p.add_argument("--sweep-shapes", nargs="*", default=None, help="shapes for --sweep (default: first)")
    p.add_argument("--profile", nargs="*", default=None, help="shapes to profile moekit-triton at")
    p.add_argument("--peers", default=None, help="folder to put on sys.path (e.g. .peers for scattermoe)")
    a = p.parse_args(argv)
    try:
        check_args(a)
    except ValueError as e:
        p.error(str(e))
    if a.peers:
        sys.path.insert(0, a.peers)
    run(a.out, shapes=a.shapes, impls=a.impls, device=a.device, rep_ms=a.rep_ms, rounds=a.rounds,
        sweep=a.sweep, sweep_shapes=a.sweep_shapes, profile=a.profile)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
