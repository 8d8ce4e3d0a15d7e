"""The experts benchmark's report: the device name and versions, the JSON ``meta``, one line
per row (``_fmt``), the table text, the Markdown table, ``write_results`` (``<device>.json``
and ``.png``) and the bar chart (``plot``). Used by ``moekit.benchmark``.
"""

from __future__ import annotations

import datetime as _dt
import json
import os
import subprocess
import sys
from pathlib import Path

import torch


def _device_name(device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device).replace("NVIDIA ", "").replace(" ", "-")
    return "cpu"


def _versions() -> dict:
    """Every version a row depends on: python, torch, triton, transformers, moekit (and its
    git commit when run from a checkout), ScatterMoE (the commit its folder records, if any)."""
    import moekit

    v = {"torch": torch.__version__, "python": sys.version.split()[0], "moekit": moekit.__version__}
    for mod in ("triton", "transformers"):
        try:
            v[mod] = __import__(mod).__version__
        except Exception:  # noqa: BLE001 - optional
            v[mod] = None
    root = Path(moekit.__file__).resolve().parents[2]
    v["moekit_commit"] = os.environ.get("MOEKIT_COMMIT")  # a copy of the tree may carry a stale .git
    try:
        v["moekit_commit"] = v["moekit_commit"] or subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True,
            text=True, timeout=10, check=True).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        pass
    try:
        import scattermoe

        commit = Path(scattermoe.__file__).parent / "COMMIT"
        v["scattermoe"] = commit.read_text().strip() if commit.exists() else "unknown commit"
    except Exception:  # noqa: BLE001 - optional peer
        v["scattermoe"] = None
    return v


def _meta(dev, dtype, ceil, rounds: int = 1) -> dict:
    return {"device": _device_name(dev), "date": _dt.datetime.now(_dt.timezone.utc).isoformat(),
            "timing": f"median of triton.testing.do_bench; training shapes: median over {rounds} "
                      "round(s) of the impls timed in turn",
            "dtype": str(dtype).replace("torch.", ""), "ceilings": ceil, "versions": _versions(),
            "cpu_smoke_test": dev.type != "cuda",
            "flops": "forward 6*T*K*D*F, forward+backward 18*T*K*D*F",
            "peak_mem": "max allocated during one forward+backward, minus what was allocated before",
            "saved_mem": "allocated after a training forward (output + tensors saved for backward), "
                         "minus what was allocated before"}


def _fmt(r: dict) -> str:
    if "error" in r:
        return f"{r['shape']:<24} {r['impl']:<34} ERROR {r['error'][:120]}"

    def f(v, spec):
        return format(v, spec) if isinstance(v, (int, float)) else "-"

    extra = ""
    if "weight_gbps" in r:
        extra = (f" weight GB/s {f(r['weight_gbps'], '.0f')} (graph {f(r.get('fwd_ms_graph'), '.3f')}"
                 f" plan-given {f(r.get('fwd_ms_plan_given'), '.3f')}"
                 f" plan-given-graph {f(r.get('fwd_ms_plan_given_graph'), '.3f')} ms)")
    return (f"{r['shape']:<24} {r['impl']:<34} fwd {f(r['fwd_ms'], '8.3f')} ms  fwd+bwd "
            f"{f(r.get('fwd_bwd_ms'), '8.3f')} ms  {f(r.get('fwd_bwd_tflops'), '6.1f')} TF/s  mem "
            f"{f(r.get('peak_mem_gib'), '6.2f')} GiB  saved {f(r.get('saved_mem_gib'), '5.2f')} GiB  "
            f"err {f(r.get('rel_err'), '.1e')}" + extra)


def table_text(rows: list[dict], meta: dict) -> str:
    lines = [f"# {meta['device']} {meta['dtype']} {meta['date'][:10]} ceilings {meta['ceilings']}"]
    lines += [_fmt(r) for r in rows]
    return "\n".join(lines)


def markdown_table(rows: list[dict]) -> str:
    """The results as a Markdown table (for docs/performance.md)."""
    head = ("| shape | impl | fwd ms | fwd+bwd ms | fwd TFLOP/s | fwd+bwd TFLOP/s | peak GiB | "
            "rel err |\n|---|---|---:|---:|---:|---:|---:|---:|")
    out = [head]
    for r in rows:
        if "error" in r:
            out.append(f"| {r['shape']} | {r['impl']} | error | | | | | |")
            continue

        def f(k, spec, r=r):
            v = r.get(k)
            return format(v, spec) if isinstance(v, (int, float)) else "-"
        out.append(f"| {r['shape']} | {r['impl']} | {f('fwd_ms', '.3f')} | {f('fwd_bwd_ms', '.3f')} | "
                   f"{f('fwd_tflops', '.0f')} | {f('fwd_bwd_tflops', '.0f')} | {f('peak_mem_gib', '.2f')} | "
                   f"{f('rel_err', '.1e')} |")
    return "\n".join(out)


def write_results(out_dir, meta: dict, rows: list[dict], png: bool = True) -> tuple[Path, Path | None]:
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    stem = meta["device"]
    jpath = out / f"{stem}.json"
    for r in rows:
        for k in ("shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
                  "peak_mem_gib", "rel_err", "device"):
            r.setdefault(k, None)
    jpath.write_text(json.dumps({"meta": meta, "rows": rows}, indent=1, default=float))
    ppath = out / f"{stem}.png"
    if not png:
        return jpath, None
    try:
        plot(rows, meta, ppath)
    except ImportError:
        ppath = None
    return jpath, ppath


def plot(rows: list[dict], meta: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    good = [r for r in rows if "error" not in r and not r.get("sweep")]
    shapes = list(dict.fromkeys(r["shape"] for r in good))
    impls = list(dict.fromkeys(r["impl"] for r in good))
    fig, axes = plt.subplots(1, 2, figsize=(max(10, 1.6 * len(shapes)), 5))
    width = 0.8 / max(1, len(impls))
    for ax, key, title in ((axes[0], "fwd_bwd_ms", "forward+backward (ms, lower is better)"),
                           (axes[1], "fwd_ms", "forward (ms, lower is better)")):
        for i, impl in enumerate(impls):
            xs, hs = [], []
            for j, s in enumerate(shapes):
                r = next((r for r in good if r["shape"] == s and r["impl"] == impl), None)
                v = None if r is None else r.get(key)
                if v:
                    xs.append(j + i * width)
                    hs.append(v)
            ax.bar(xs, hs, width, label=impl)
        ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
        ax.set_xticklabels(shapes, rotation=30, ha="right", fontsize=8)
        ax.set_yscale("log")
        ax.set_title(title, fontsize=10)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"moekit experts benchmark: {meta['device']} {meta['dtype']} {meta['date'][:10]}",
                 fontsize=11)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
