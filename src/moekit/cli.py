"""The ``moekit`` command: a thin argparse front end over library functions.

    moekit demo                 train a tiny MoE LM three ways on CPU; table + JSON + PNG
    moekit bench [ARGS]         the experts benchmark (moekit.benchmark); CPU smoke test without a GPU
    moekit check MODEL          patch an HF model with moekit; logits/grads parity, routing agreement
    moekit check --tiny FAMILY  the same on a random tiny model built offline
    moekit presets              the presets with their sizes

Every argument is checked before any long work starts. Every error (an unknown preset, shape,
implementation or family, a bad number, a device that is not there, an output folder that
cannot be written, a missing optional dependency) prints one line on stderr naming the problem
and the fix, and exits with status 2; no traceback unless ``--debug`` is given (anywhere on the
command line). ``main(argv)`` returns the exit status, so the tests call it in-process.

The subcommands live beside it: ``moekit.cli_demo`` (demo, presets), ``moekit.cli_check``
(check, ``run_check``), and what they share (``CLIError``, ``OneLineParser``, the argument
checks, the exit statuses) in ``moekit.cli_common``; this module is the parser, ``main`` and
``moekit bench`` (which forwards to ``moekit.benchmark.main``), and re-exports the names that
other modules and the tests import from ``moekit.cli``.
"""

from __future__ import annotations

import argparse
import sys

# the names in __all__ and those marked re-exported are what other modules and the tests
# import from moekit.cli
from .cli_check import (
    TINY_FAMILIES,
    _add_check,
    _tiny_model,  # noqa: F401 - re-exported
    run_check,
)
from .cli_common import (
    EXIT_CHECK_FAILED,  # noqa: F401 - re-exported
    EXIT_USER_ERROR,
    CLIError,
    OneLineParser,
    _check_device,
    check_number,  # noqa: F401 - re-exported
    check_writable_dir,
    human,
)
from .cli_demo import (
    _add_demo,
    _add_presets,
    preset_rows,  # noqa: F401 - re-exported
)

__all__ = ["TINY_FAMILIES", "CLIError", "check_writable_dir", "human", "main", "run_check"]


# ---------------------------------------------------------------------------- bench
BENCH_HELP = "the experts benchmark (moekit.benchmark): table, JSON and PNG; CPU smoke test without a GPU"


def _cmd_bench(argv: list[str]) -> int:
    """Forward ``argv`` to ``moekit.benchmark.main`` (which owns the options and says when it
    runs the small CPU shapes for want of a GPU); ``--out`` defaults to moekit-out/bench."""
    try:
        from . import benchmark
    except ImportError as e:
        if "--help" in argv or "-h" in argv:
            print("usage: moekit bench [ARGS...]\n\n" + BENCH_HELP)
        raise CLIError(
            f"moekit bench: the benchmark module is not available ({e}); it ships with moekit "
            "from source (src/moekit/benchmark.py)"
        ) from None
    entry = getattr(benchmark, "main", None)
    if entry is None:
        raise CLIError("moekit bench: moekit.benchmark has no main(argv)")
    if "-h" not in argv and "--help" not in argv:
        dev = next((argv[i + 1] for i, x in enumerate(argv[:-1]) if x == "--device"), None)
        dev = dev or next((x.split("=", 1)[1] for x in argv if x.startswith("--device=")), None)
        if dev is not None:
            _check_device(dev)
    rc = entry(list(argv), default_out="moekit-out/bench", parser_class=OneLineParser)
    return 0 if rc is None else int(rc)


# ---------------------------------------------------------------------------- main
def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = OneLineParser(
        prog="moekit",
        description="moekit: Mixture-of-Experts layers for PyTorch. Start with `moekit demo`.",
    )
    p.add_argument("--version", action="version", version=f"moekit {__version__}")
    p.add_argument("--debug", action="store_true",
                   help="show the Python traceback of an error (accepted anywhere on the line)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    _add_demo(sub)
    sub.add_parser("bench", help=BENCH_HELP, add_help=False,
                   description=BENCH_HELP + " (`moekit bench --help` for its options)")
    _add_check(sub)
    _add_presets(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv
    argv = [x for x in argv if x != "--debug"]
    try:
        if argv and argv[0] == "bench":  # its own argparse (moekit.benchmark.main) owns the options
            return _cmd_bench(argv[1:])
        parser = build_parser()
        a = parser.parse_args(argv)
        if a.command is None:
            parser.print_help()
            print("moekit: error: a COMMAND is needed (demo, bench, check or presets)", file=sys.stderr)
            return EXIT_USER_ERROR
        return a.func(a)
    except SystemExit as e:  # --help and --version end here (status 0)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else EXIT_USER_ERROR)
    except KeyboardInterrupt:
        print("moekit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:  # one line for every error, the traceback on --debug
        if debug:
            raise
        msg = str(e).strip().splitlines()[0] if str(e).strip() else ""
        if isinstance(e, CLIError):
            print(f"moekit: error: {msg}", file=sys.stderr)
        else:
            print(f"moekit: error: {type(e).__name__}: {msg} (run with --debug for the traceback)",
                  file=sys.stderr)
        return EXIT_USER_ERROR


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
