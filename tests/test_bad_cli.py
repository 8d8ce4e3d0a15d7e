"""Bad command lines: one line on stderr, exit status 2, no traceback, nothing long started.

In-process through ``moekit.cli.main`` (which returns the status); one subprocess checks the
real exit status and that ``--debug`` brings the traceback back. Every case here is rejected
before any training, benchmark or model load starts, so each takes milliseconds.
"""

from __future__ import annotations

import subprocess
import sys

import pytest

from moekit import cli


def run(capsys, argv):
    rc = cli.main(argv)
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _unwritable(tmp_path):
    f = tmp_path / "a-file"
    f.write_text("x")
    return str(f)


CASES = [
    # demo: every number, the preset, the device, the output folder
    ("demo-unknown-preset", ["demo", "--preset", "gpt-5"], "unknown preset 'gpt-5'"),
    ("demo-steps-zero", ["demo", "--steps", "0"], "--steps must be >= 1"),
    ("demo-batch-size-3", ["demo", "--batch-size", "3"], "--batch-size and --eval-seqs must be >= 4"),
    ("demo-seq-len-negative", ["demo", "--seq-len", "-5"], "--seq-len must be >= 1"),
    ("demo-layers-not-int", ["demo", "--layers", "two"], "argument --layers: invalid int value: 'two'"),
    ("demo-lr-nan", ["demo", "--lr", "nan"], "--lr must be a finite number > 0, got nan"),
    ("demo-lr-zero", ["demo", "--lr", "0"], "--lr must be a finite number > 0"),
    ("demo-lr-inf", ["demo", "--lr", "inf"], "got inf"),
    ("demo-aux-coeff-negative", ["demo", "--aux-loss-coeff", "-1"], "--aux-loss-coeff must be a finite number >= 0"),
    ("demo-aux-coeff-nan", ["demo", "--aux-loss-coeff", "nan"], "--aux-loss-coeff"),
    ("demo-bias-rate-inf", ["demo", "--bias-update-rate", "inf"], "--bias-update-rate must be a finite number > 0"),
    ("demo-bias-rate-zero", ["demo", "--bias-update-rate", "0"], "--bias-update-rate"),
    ("demo-router-std-negative", ["demo", "--router-init-std", "-0.1"], "--router-init-std"),
    ("demo-seed-negative", ["demo", "--seed", "-1"], "--seed must be in [0, 2**63)"),
    ("demo-seed-huge", ["demo", "--seed", str(2**64)], "--seed must be in [0, 2**63)"),
    ("demo-device-unknown", ["demo", "--device", "banana"], "'banana' is not a device name"),
    ("demo-device-tpu", ["demo", "--device", "xla"], "run on cpu, cuda or mps"),
    ("demo-out-unwritable", ["demo", "--out", "/proc/moekit-no"], "--out '/proc/moekit-no' is not writable"),
    ("demo-out-is-a-file", ["demo", "--out", "{file}"], "is a file, not a folder"),
    ("demo-unknown-option", ["demo", "--stpes", "3"], "unrecognized arguments: --stpes"),
    # check
    ("check-unknown-family", ["check", "--tiny", "gpt4"], "unknown tiny family 'gpt4'"),
    ("check-model-and-tiny", ["check", "org/model", "--tiny", "mixtral"], "not both or neither"),
    ("check-nothing", ["check"], "not both or neither"),
    ("check-unknown-backend", ["check", "--tiny", "mixtral", "--backend", "fast"], "unknown --backend 'fast'"),
    ("check-triton-on-cpu", ["check", "--tiny", "mixtral", "--backend", "triton"], "--backend triton"),
    ("check-batch-zero", ["check", "--tiny", "mixtral", "--batch-size", "0"], "--batch-size must be >= 1"),
    ("check-seq-len-negative", ["check", "--tiny", "mixtral", "--seq-len", "-1"], "--seq-len must be >= 1"),
    ("check-tol-nan", ["check", "--tiny", "mixtral", "--tol", "nan"], "--tol must be a finite number > 0"),
    ("check-tol-negative", ["check", "--tiny", "mixtral", "--tol", "-1"], "--tol"),
    ("check-json-unwritable", ["check", "--tiny", "mixtral", "--json", "/proc/moekit-no/r.json"], "not writable"),
    ("check-json-is-a-folder", ["check", "--tiny", "mixtral", "--json", "{tmp}"], "is a folder"),
    # bench: unknown names are errors, not an empty table
    ("bench-unknown-shape", ["bench", "--shapes", "no-such-shape", "--out", "{tmp}"], "unknown shape(s) ['no-such-shape']"),
    ("bench-gpu-shape-on-cpu", ["bench", "--shapes", "qwen3-30b-a3b", "--out", "{tmp}"], "the GPU shapes need CUDA"),
    ("bench-unknown-impl", ["bench", "--impls", "fastest", "--out", "{tmp}"], "unknown implementation(s) ['fastest']"),
    ("bench-empty-shapes", ["bench", "--shapes", "--out", "{tmp}"], "--shapes was given without a name"),
    ("bench-rep-ms-zero", ["bench", "--rep-ms", "0", "--out", "{tmp}"], "--rep-ms must be > 0"),
    ("bench-rep-ms-not-int", ["bench", "--rep-ms", "fast"], "invalid int value: 'fast'"),
    ("bench-unknown-option", ["bench", "--fastest"], "unrecognized arguments"),
    ("bench-bad-sweep", ["bench", "--sweep", "64,64", "--out", "{tmp}"], "is not a triton config"),
    ("bench-unknown-sweep-shape", ["bench", "--sweep-shapes", "nope", "--out", "{tmp}"], "--sweep-shapes: unknown shape"),
    ("bench-unknown-profile-shape", ["bench", "--profile", "nope", "--out", "{tmp}"], "--profile: unknown shape"),
    ("bench-peers-missing", ["bench", "--peers", "/no/such/folder", "--out", "{tmp}"], "--peers '/no/such/folder' is not a folder"),
    ("bench-out-unwritable", ["bench", "--out", "/proc/moekit-no"], "is not writable"),
    ("bench-device-unknown", ["bench", "--device", "banana"], "not a device name"),
    # presets and the top level
    ("presets-json-unwritable", ["presets", "--json", "/proc/moekit-no/p.json"], "not writable"),
    ("presets-json-is-a-folder", ["presets", "--json", "{tmp}"], "is a folder"),
    ("unknown-command", ["train"], "invalid choice: 'train'"),
    ("no-command", [], "a COMMAND is needed"),
]


@pytest.mark.parametrize("argv,phrase", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_command_line(argv, phrase, capsys, tmp_path):
    argv = [a.replace("{tmp}", str(tmp_path)).replace("{file}", _unwritable(tmp_path)) for a in argv]
    rc, _, err = run(capsys, argv)
    assert rc == 2, (rc, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("moekit: error: ") and "Traceback" not in err
    assert phrase in lines[0], lines[0]


def test_nothing_is_written_or_run_on_error(capsys, tmp_path):
    out = tmp_path / "demo-out"
    rc, _, _ = run(capsys, ["demo", "--lr", "nan", "--out", str(out)])
    assert rc == 2 and not out.exists()


def test_help_and_version_return_zero(capsys):
    rc, out, err = run(capsys, ["--version"])
    assert rc == 0 and out.startswith("moekit ") and err == ""
    rc, out, _ = run(capsys, ["demo", "--help"])
    assert rc == 0 and "--bias-update-rate" in out


def test_internal_error_is_one_line_and_debug_shows_it(capsys, monkeypatch):
    """An unexpected exception is still one line (status 2); --debug re-raises it."""
    def boom(a):
        raise RuntimeError("kaboom\nsecond line")

    parser = cli.build_parser()
    monkeypatch.setattr(cli, "build_parser", lambda: parser)
    parser._subparsers._group_actions[0].choices["presets"].set_defaults(func=boom)
    rc, _, err = run(capsys, ["presets"])
    assert rc == 2 and err.strip() == "moekit: error: RuntimeError: kaboom (run with --debug for the traceback)"
    with pytest.raises(RuntimeError, match="kaboom"):
        cli.main(["presets", "--debug"])


def test_exit_status_and_traceback_in_a_real_process():
    bad = [sys.executable, "-m", "moekit", "demo", "--lr", "nan"]
    p = subprocess.run(bad, check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 2 and p.stderr.strip().count("\n") == 0 and "--lr" in p.stderr
    p = subprocess.run([*bad, "--debug"], check=False, capture_output=True, text=True, timeout=120)
    assert p.returncode == 1 and "Traceback" in p.stderr and "CLIError" in p.stderr
