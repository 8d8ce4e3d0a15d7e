"""The ``moekit`` command end to end, in-process (``moekit.cli.main``) at small sizes.

The demo test checks the real measured numbers: the aux-loss-free run (and the aux-loss run)
must end with a lower max/mean expert load than the unbalanced run, on the same held-out
tokens. With these settings that holds on every seed tried (0..9) by a margin >= 0.25.
"""

from __future__ import annotations

import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit import cli
from moekit.presets import PRESETS, get_preset, preset_sizes

DEMO_ARGS = ["--steps", "100", "--batch-size", "8", "--seed", "0"]


@pytest.fixture(scope="module")
def demo_out(tmp_path_factory):
    pytest.importorskip("matplotlib")
    pytest.importorskip("tqdm")
    out = tmp_path_factory.mktemp("demo")
    rc = cli.main(["demo", *DEMO_ARGS, "--out", str(out)])
    assert rc == 0
    return out


def test_demo_table_and_files(demo_out, capsys):
    s = json.loads((demo_out / "demo.json").read_text())
    table = {r["run"]: r for r in s["table"]}
    assert list(table) == ["no balancing", "aux loss", "aux-loss-free bias"]
    E, K = s["moe"]["num_experts"], s["moe"]["top_k"]
    L = s["config"]["n_layers"]
    for r in s["runs"]:
        assert len(r["loss_curve"]) == 100
        # the model learns: from ~ln(128) = 4.85 nats/byte to well below
        assert math.isfinite(r["final_loss"]) and r["final_loss"] < 3.0
        assert r["loss_curve"][0] > r["final_loss"] + 1.0
        # the per-step loads are real counts: every step routes B*S*K slots in each layer
        loads = torch.tensor(r["load_per_step"])  # [steps, L, E]
        assert loads.shape == (100, L, E)
        assert torch.all(loads.sum(-1) == 8 * 64 * K)
        # the table's numbers are those of the held-out counts
        ev = torch.tensor(r["eval_tokens_per_expert"])  # [L, E]
        assert torch.all(ev.sum(-1) == s["config"]["eval_seqs"] * 64 * K)
        mm = (ev.max(-1).values / ev.mean(-1)).max().item()
        assert r["max_over_mean"] == pytest.approx(mm)
        assert r["dead_experts"] == int((ev == 0).sum())
        frac = torch.tensor(r["domain_expert_fraction"])  # [L, domains, E]
        assert frac.shape == (L, 4, E)
        assert torch.allclose(frac.sum(-1), torch.ones(L, 4))
    # aux loss only in the aux run; the losses are about the same in all three
    assert all(v == 0 for v in s["runs"][0]["aux_loss_curve"])
    assert all(v > 0 for v in s["runs"][1]["aux_loss_curve"])
    # the claim of the demo, on the real measured loads
    none = table["no balancing"]["max_over_mean"]
    assert none > 1.5, f"the unbalanced run is not unbalanced: max/mean {none:.2f}"
    assert table["aux-loss-free bias"]["max_over_mean"] < none - 0.2
    assert table["aux loss"]["max_over_mean"] < none - 0.1
    png = demo_out / "demo.png"
    assert png.stat().st_size > 20_000
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_demo_prints_table(tmp_path, capsys):
    rc = cli.main(["demo", "--steps", "5", "--batch-size", "4", "--eval-seqs", "4", "--no-plot",
                   "--no-progress", "--layers", "1", "--preset", "deepseek-v3", "--out", str(tmp_path)])
    assert rc == 0
    out = capsys.readouterr().out
    for word in ("final loss", "max/mean load", "dead experts", "no balancing", "aux loss",
                 "aux-loss-free bias", "demo.json"):
        assert word in out
    assert (tmp_path / "demo.json").exists() and not (tmp_path / "demo.png").exists()
    s = json.loads((tmp_path / "demo.json").read_text())
    assert s["moe"]["num_experts"] == get_preset("deepseek-v3", tiny=True).num_experts


def _user_error(capsys, argv, *needles):
    rc = cli.main(argv)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and err.startswith("moekit: error:")
    for n in needles:
        assert n in err, err
    return err


def test_unknown_preset(capsys):
    _user_error(capsys, ["demo", "--preset", "gpt-5"], "unknown preset 'gpt-5'", *PRESETS)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_no_gpu(capsys, tmp_path):
    _user_error(capsys, ["demo", "--device", "cuda", "--out", str(tmp_path)], "no CUDA GPU")
    _user_error(capsys, ["bench", "--device", "cuda", "--out", str(tmp_path)], "no CUDA GPU")
    _user_error(capsys, ["check", "--tiny", "mixtral", "--device", "cuda"], "no CUDA GPU")


def test_bad_device(capsys):
    _user_error(capsys, ["demo", "--device", "gpu0"], "not a device name")


def test_missing_extras(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    _user_error(capsys, ["demo", "--out", str(tmp_path)], "pip install 'moekit[demo]'", "--no-plot")
    monkeypatch.setitem(sys.modules, "transformers", None)
    _user_error(capsys, ["check", "--tiny", "mixtral"], "pip install 'moekit[hf]'")


def test_check_usage_errors(capsys):
    _user_error(capsys, ["check"], "MODEL", "--tiny")
    _user_error(capsys, ["check", "--tiny", "gpt4"], "unknown tiny family", "mixtral")


# ---------------------------------------------------------------------------- presets
def test_presets(capsys, tmp_path):
    rc = cli.main(["presets", "--json", str(tmp_path / "p.json")])
    assert rc == 0
    out = capsys.readouterr().out
    rows = json.loads((tmp_path / "p.json").read_text())
    assert [r["preset"] for r in rows] == list(PRESETS)
    for r in rows:
        s = preset_sizes(get_preset(r["preset"]))
        assert (r["params"], r["active_params"], r["flops_per_token"]) == (
            s.params, s.active_params, s.flops_per_token
        )
        assert r["preset"] in out and cli.human(s.params) in out
    assert "11.3B" in out  # DeepSeek-V3: one layer of 256 experts
    assert cli.human(11_300_000_000) == "11.3B" and cli.human(38_000_000) == "38.0M"
    assert cli.main(["presets", "--tiny"]) == 0


# ---------------------------------------------------------------------------- bench
def test_bench(capsys, tmp_path):
    pytest.importorskip("moekit.benchmark")
    if torch.cuda.is_available():
        pytest.skip("the CPU smoke shapes are checked on a machine without a GPU")
    rc = cli.main(["bench", "--out", str(tmp_path), "--shapes", "tiny-cpu",
                   "--impls", "moekit-grouped_mm", "moekit-loop", "--rep-ms", "5"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "no GPU" in out
    files = list(tmp_path.glob("*.json"))
    assert len(files) == 1
    rows = json.loads(files[0].read_text())["rows"]
    assert {r["impl"] for r in rows} == {"moekit-grouped_mm", "moekit-loop"}
    for r in rows:
        assert r["fwd_ms"] > 0 and r["fwd_bwd_ms"] > 0 and r["rel_err"] < 1e-4
    assert list(tmp_path.glob("*.png"))


def test_bench_help(capsys):
    pytest.importorskip("moekit.benchmark")
    assert cli.main(["bench", "--help"]) == 0
    assert "moekit bench" in capsys.readouterr().out


# ---------------------------------------------------------------------------- check
@pytest.mark.parametrize("family", ["mixtral", "qwen3_moe", "deepseek_v3", "llama4"])
def test_check_tiny(family, capsys, tmp_path):
    pytest.importorskip("transformers", minversion="5.0")
    pytest.importorskip("moekit.hf", reason="moekit.hf (the HF integration) is not there yet")
    rc = cli.main(["check", "--tiny", family, "--json", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert rc == 0, out
    r = json.loads((tmp_path / "c.json").read_text())
    assert r["ok"] and r["patched"]
    assert r["logits_rel_diff"] <= 1e-4 and r["grads_max_rel_diff"] <= 1e-4
    assert r["grads_compared"] > 10 and not r["grads_unmatched"]
    assert [x["layer"] for x in r["routing"]] == r["patched"]
    assert all(x["agreement"] == 1.0 for x in r["routing"])
    assert "parity OK" in out and "routing agreement" in out


def test_check_detects_a_difference(monkeypatch):
    """A perturbed router must show up as a parity failure and a routing disagreement."""
    pytest.importorskip("transformers", minversion="5.0")
    mh = pytest.importorskip("moekit.hf", reason="moekit.hf (the HF integration) is not there yet")
    real = mh.patch

    def patch_then_perturb(model, **kw):
        names = real(model, **kw)
        gate = model.get_submodule(names[-1]).router.gate.weight
        with torch.no_grad():
            gate.add_(torch.randn(gate.shape, generator=torch.Generator().manual_seed(0)))
        return names

    monkeypatch.setattr(mh, "patch", patch_then_perturb)
    r = cli.run_check(tiny="mixtral", log=lambda *_: None)
    assert not r["ok"] and r["logits_rel_diff"] > 1e-3
    assert r["routing"][-1]["agreement"] < 1.0 and r["routing"][0]["agreement"] == 1.0


# ---------------------------------------------------------------------------- entry points
def _cmd():
    exe = shutil.which("moekit")
    return [exe] if exe else [sys.executable, "-m", "moekit"]


@pytest.mark.parametrize("cmd", ["console script", "python -m moekit"])
@pytest.mark.parametrize("argv", [["--help"], ["demo", "--help"]])
def test_help_subprocess(cmd, argv):
    exe = _cmd() if cmd == "console script" else [sys.executable, "-m", "moekit"]
    p = subprocess.run([*exe, *argv], check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "usage: moekit" in p.stdout
    if argv == ["--help"]:
        for sub in ("demo", "bench", "check", "presets"):
            assert sub in p.stdout
    else:
        for flag in ("--preset", "--steps", "--device", "--seed", "--out", "--batch-size"):
            assert flag in p.stdout


def test_python_m_moekit_presets():
    p = subprocess.run([sys.executable, "-m", "moekit", "presets"], check=False,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert "deepseek-v3" in p.stdout and "FLOPs/token" in p.stdout


def test_no_command_prints_help(capsys):
    assert cli.main([]) == 2
    assert "demo" in capsys.readouterr().out


def test_console_script_declared():
    root = Path(__file__).resolve().parents[1]
    text = (root / "pyproject.toml").read_text()
    assert 'moekit = "moekit.cli:main"' in text


def test_check_local_path(tmp_path, capsys):
    """``moekit check MODEL`` with MODEL a local folder (what ``from_pretrained`` loads)."""
    pytest.importorskip("transformers", minversion="5.0")
    pytest.importorskip("moekit.hf", reason="moekit.hf (the HF integration) is not there yet")
    cli._tiny_model("qwen2_moe", seed=0).save_pretrained(tmp_path / "tiny-qwen2-moe")
    rc = cli.main(["check", str(tmp_path / "tiny-qwen2-moe"), "--seq-len", "8"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert "parity OK" in out and "model.layers.1.mlp" in out


def test_tiny_families_match_the_hf_package():
    pytest.importorskip("transformers")
    from moekit.hf.tiny import TINY_FAMILIES

    assert cli.TINY_FAMILIES == TINY_FAMILIES
