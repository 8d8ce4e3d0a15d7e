"""The benchmark's CPU path (tiny shapes): rows, JSON and PNG are written with sane numbers."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from moekit import benchmark


def _impls():
    impls = ["moekit-grouped_mm", "moekit-loop", "hf-eager"]
    try:
        from transformers.integrations import moe  # noqa: F401

        impls.append("hf-grouped_mm")
    except Exception:  # noqa: BLE001, S110 - transformers is optional here
        pass
    return impls


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke-test path")
def test_cpu_run_writes_json_and_png(tmp_path):
    pytest.importorskip("matplotlib")
    logs = []
    rows = benchmark.run(tmp_path, shapes=["tiny-cpu", "tiny-cpu-decode-T1", "tiny-cpu-layer"],
                         impls=_impls(), rep_ms=5, log=logs.append)
    assert any("no GPU" in line for line in logs)
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert (tmp_path / "cpu.png").stat().st_size > 1000
    assert data["meta"]["cpu_smoke_test"] is True and data["meta"]["device"] == "cpu"
    assert len(data["rows"]) == len(rows) >= 2 * len(_impls()) + 1
    keys = {"shape", "impl", "fwd_ms", "fwd_bwd_ms", "fwd_tflops", "fwd_bwd_tflops",
            "peak_mem_gib", "rel_err", "device"}
    for r in data["rows"]:
        assert keys <= set(r), r
        assert "error" not in r, r
        assert r["device"] == "cpu"
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0
        assert r["fwd_tflops"] > 0 and math.isfinite(r["fwd_bwd_tflops"])
        if r["kind"] != "layer":
            assert r["rel_err"] < 1e-5 and r["grad_rel_err"] < 1e-5, r  # fp32 on CPU
        if r["kind"] == "decode":
            assert r["weight_bytes"] > 0 and r["weight_gbps"] > 0
    assert {r["impl"] for r in data["rows"] if r["kind"] == "layer"} == {"moekit-layer-grouped_mm"}


def test_shapes_table_and_flops():
    names = [s.name for s in benchmark.SHAPES]
    assert {"qwen3-30b-a3b", "olmoe", "gpt-oss-20b", "mixtral-8x7b", "deepseek-v3-64e",
            "qwen3-decode-T1", "qwen3-decode-T8", "qwen3-decode-T64", "qwen3-30b-a3b-layer",
            "deepseek-v3-64e-layer"} == set(names)
    q = next(s for s in benchmark.SHAPES if s.name == "qwen3-30b-a3b")
    assert (q.T, q.D, q.F, q.E, q.K) == (16384, 2048, 768, 128, 8)
    assert q.fwd_flops == 6 * 16384 * 8 * 2048 * 768


def test_markdown_table_and_errors():
    rows = [{"shape": "s", "impl": "a", "fwd_ms": 1.0, "fwd_bwd_ms": 3.0, "fwd_tflops": 10.0,
             "fwd_bwd_tflops": 10.0, "peak_mem_gib": 0.5, "rel_err": 1e-3},
            {"shape": "s", "impl": "b", "error": "RuntimeError('x')"}]
    md = benchmark.markdown_table(rows)
    assert "| s | a | 1.000 | 3.000 |" in md and "| s | b | error |" in md


def test_unknown_impl_is_rejected():
    with pytest.raises(ValueError, match="unknown"):
        benchmark._get_impl("nope")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke-test path")
def test_main_cli(tmp_path):
    assert benchmark.main(["--out", str(tmp_path), "--shapes", "tiny-cpu", "--impls",
                           "moekit-loop", "--rep-ms", "2"]) == 0
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert [r["impl"] for r in data["rows"]] == ["moekit-loop"]


def test_sweep_settings_parse():
    from moekit.benchmark import _sweep_setting

    assert _sweep_setting("128,256,64,8,3") == ("MOEKIT_TRITON_CONFIG", "128,256,64,8,3")
    assert _sweep_setting("dw:128,128,64,8,5") == ("MOEKIT_TRITON_DW_CONFIG", "128,128,64,8,5")
    assert _sweep_setting("MOEKIT_TRITON_PDL=0") == ("MOEKIT_TRITON_PDL", "0")


def test_sweep_env_restores(monkeypatch):
    import os

    from moekit.benchmark import sweep_env

    monkeypatch.setenv("MOEKIT_TRITON_PDL", "1")
    monkeypatch.delenv("MOEKIT_TRITON_DW_CONFIG", raising=False)
    with sweep_env("MOEKIT_TRITON_PDL=0;dw:64,64,32,4,3"):
        assert os.environ["MOEKIT_TRITON_PDL"] == "0"
        assert os.environ["MOEKIT_TRITON_DW_CONFIG"] == "64,64,32,4,3"
    assert os.environ["MOEKIT_TRITON_PDL"] == "1" and "MOEKIT_TRITON_DW_CONFIG" not in os.environ


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU smoke-test path")
def test_rounds_time_the_impls_in_turn_and_report_medians(tmp_path, monkeypatch):
    """``rounds=3``: every training row is timed three times, in the order impl a, b, a, b
    (after each impl's own first pass), and reports the median of its samples."""
    from moekit import bench_measure

    clock = iter(range(1, 1000))

    def fake_time_ms(fn, device, *, rep_ms=100):
        return float(next(clock))

    monkeypatch.setattr(bench_measure, "_time_ms", fake_time_ms)
    rows = benchmark.run(tmp_path, shapes=["tiny-cpu"], impls=["moekit-loop", "moekit-grouped_mm"],
                         rep_ms=2, rounds=3, log=lambda s: None)
    assert [r["impl"] for r in rows] == ["moekit-loop", "moekit-grouped_mm"]
    # first pass: loop fwd 1, fb 2; grouped_mm fwd 3, fb 4; then rounds: loop 5, 6; gmm 7, 8;
    # loop 9, 10; gmm 11, 12
    assert rows[0]["fwd_ms_rounds"] == [1.0, 5.0, 9.0] and rows[0]["fwd_bwd_ms_rounds"] == [2.0, 6.0, 10.0]
    assert rows[1]["fwd_bwd_ms_rounds"] == [4.0, 8.0, 12.0]
    assert rows[0]["fwd_ms"] == 5.0 and rows[1]["fwd_bwd_ms"] == 8.0
    assert rows[1]["fwd_bwd_tflops"] == pytest.approx(3 * benchmark.CPU_SHAPES[0].fwd_flops / 8.0 / 1e9)
    data = json.loads((tmp_path / "cpu.json").read_text())
    assert "3 round(s)" in data["meta"]["timing"]
    with pytest.raises(SystemExit):
        benchmark.main(["--out", str(tmp_path), "--rounds", "0"])


def test_rounds_time_sweep_rows_under_their_settings(monkeypatch):
    """A sweep row is timed again as moekit-triton with its settings in the environment (and
    only then): ``benchmark._timed_as`` through ``retime_rounds``."""
    from moekit import bench_measure

    seen = []

    def fake_time_ms(fn, device, *, rep_ms=100):
        seen.append(os.environ.get("MOEKIT_TRITON_PDL"))
        return 1.0

    monkeypatch.setattr(bench_measure, "_time_ms", fake_time_ms)
    monkeypatch.delenv("MOEKIT_TRITON_PDL", raising=False)
    shape = benchmark.CPU_SHAPES[0]
    inputs = benchmark.make_inputs(shape, torch.device("cpu"), torch.float32)
    rows = [{"impl": "moekit-loop", "fwd_ms": 3.0, "fwd_bwd_ms": 3.0},
            {"impl": "moekit-triton[MOEKIT_TRITON_PDL=0]", "sweep": "MOEKIT_TRITON_PDL=0",
             "fwd_ms": 3.0, "fwd_bwd_ms": 3.0}]
    g = torch.zeros(shape.T, shape.D)
    bench_measure.retime_rounds(rows, shape, torch.device("cpu"), inputs, g, 2, 1, benchmark._timed_as)
    assert seen == [None, None, "0", "0"] and "MOEKIT_TRITON_PDL" not in os.environ
    assert rows[1]["fwd_bwd_ms_rounds"] == [3.0, 1.0] and rows[1]["fwd_bwd_ms"] == 2.0
