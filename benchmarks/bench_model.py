"""End-to-end model benchmark (``moekit.bench_model``): a transformers model of each family's
real layer dimensions, a few layers, random weights; one training step and one prefill with the
experts run by transformers' grouped_mm, by ``experts_implementation="moekit"`` and by
``moekit.hf.patch``.

    PYTHONPATH=src python benchmarks/bench_model.py --families qwen3_moe olmoe gpt_oss deepseek_v3 \\
        --layers 2 --batch 4 --seq 2048 --out benchmarks/results
"""

import argparse
import json
import sys
from pathlib import Path

import torch

from moekit.bench_model import FAMILIES, MODES, format_table, rows_to_dicts, run
from moekit.benchmark import _device_name, _versions


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=sorted(FAMILIES))
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=2048)
    p.add_argument("--vocab", type=int, default=32768)
    p.add_argument("--iters", type=int, default=5, help="timed steps per mode and round")
    p.add_argument("--rounds", type=int, default=3, help="rounds, each putting the model in every mode in turn")
    p.add_argument("--out", default=None, help="folder for <device>-model.json and .md")
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        p.error("the model benchmark needs a CUDA GPU (tests run it small on CPU through moekit.bench_model)")
    rows = []
    for fam in a.families:  # one family at a time, so that a failure keeps the rows before it
        rows += run([fam], layers=a.layers, batch=a.batch, seq=a.seq, vocab=a.vocab,
                    modes=a.modes, iters=a.iters, rounds=a.rounds)
        print(format_table(rows), flush=True)
    dev = torch.device("cuda")
    meta = {"device": _device_name(dev), "versions": _versions(), "layers": a.layers,
            "tokens": a.batch * a.seq, "batch": a.batch, "seq": a.seq, "vocab": a.vocab,
            "dtype": "bfloat16", "timing": f"median of {a.rounds} rounds x {a.iters} steps, the modes in turn in each "
                      "round, each after 2 warm-up steps"}
    if a.out:
        out = Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"{meta['device']}-model.json").write_text(
            json.dumps({"meta": meta, "rows": rows_to_dicts(rows)}, indent=1))
        (out / f"{meta['device']}-model.md").write_text(format_table(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
