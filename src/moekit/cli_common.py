"""What the ``moekit`` command's subcommands share: the exit statuses, ``CLIError`` (a user
error: one line, status 2), ``OneLineParser`` (argparse errors as a CLIError), the checks of
numbers, seeds, devices, presets, output folders and optional dependencies, and ``human``.
Used by ``moekit.cli`` and its subcommand modules (``cli_demo``, ``cli_check``); the public
names are also importable from ``moekit.cli``.
"""

from __future__ import annotations

import argparse
import math
import os
from pathlib import Path

import torch

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
