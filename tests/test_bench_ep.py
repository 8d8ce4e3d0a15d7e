"""``benchmarks/bench_ep.py`` on CPU (torchrun, 2 gloo processes, tiny shapes): it runs every
configuration it is asked for and its JSON says what the GPU runs rely on."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_ep_cpu_smoke(tmp_path):
    out = tmp_path / "ep.json"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
           str(ROOT / "benchmarks" / "bench_ep.py"), "--device", "cpu", "--tokens", "48",
           "--dim", "16", "--hidden", "8", "--experts-per-rank", "4", "--topk", "4",
           "--eq-tokens", "24", "--chunks", "1,2", "--warmup", "1", "--iters", "1",
           "--backend", "grouped_mm", "--balanced", "1", "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT / "src"))
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stdout[-2000:] + res.stderr[-4000:]
    d = json.loads(out.read_text())
    configs = {(r.get("exchange"), r.get("partials"), r["chunks"]) for r in d["rows"]}
    want = {(None, None, None)} | {("rows", None, c) for c in (1, 2)} | {
        ("tokens", p, c) for p in ("float32", "input") for c in (1, 2)}
    assert configs == want, configs
    eq = d["equality_bf16"]
    assert eq["output_bitwise_equal_to_1gpu"] is True  # the row exchange: the same bits
    assert set(eq["max_ratio_per_config"]) == {
        "rows/chunks=1", "rows/chunks=2", "tokens/chunks=1/partials=float32",
        "tokens/chunks=2/partials=float32", "tokens/chunks=1/partials=input",
        "tokens/chunks=2/partials=input"}
    assert all(r <= 2.0 for r in eq["max_ratio_per_config"].values()), eq["max_ratio_per_config"]
    # balanced routing: every rank receives the same rows (half of both ranks' 48 x 4 slots);
    # the token exchange sends each token once per rank that holds any of its experts (here
    # every token's 4 experts span both ranks: 2 x 48 tokens in), not once per expert
    got = d["rows_received_per_rank"]
    assert got["rows"] == [48 * 4, 48 * 4] and got["tokens"] == [96, 96], got
    assert d["shape"]["balanced_routing"] is True
    a2a = d["all_to_all"]
    assert a2a["tokens"]["rows_sent_per_rank"] < a2a["rows"]["rows_sent_per_rank"]
