"""Command line: ``ufm measure`` and the other verbs, one module per verb group (registered in
:data:`COMMANDS`, in the order ``ufm --help`` lists them).

Bad flags or data print one line, ``ufm: error: ...``, and exit with status 2; never a traceback.

The verb modules share :mod:`ufm.cli.common` and never import this package or one another.
"""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any, Callable, Sequence

from ufm.cli import audit, designs, influence, measure, privacy, reproduce, runs
from ufm.cli.common import (StderrProgress, UsageError, add_experiment_args, check_out, config_from_args, finite_float,
                     int_in, open_store)
from ufm.cli.measure import summary_lines

__all__ = ["COMMANDS", "StderrProgress", "UsageError", "add_experiment_args", "build_parser", "check_out",
           "config_from_args", "finite_float", "int_in", "main", "open_store", "summary_lines"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a command cut off by `| head`

# measure; influence, sweep-canaries, explain; runs, studies; designs; audit (ONNX models ufm did
# not train); privacy-audit; reproduce.
COMMANDS: list[Callable[[Any], None]] = [measure.register, influence.register, runs.register, designs.register,
                                         audit.register, privacy.register, reproduce.register]


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, not usage + error
        # "argument --seed: must be >= 0" -> "--seed: must be >= 0": the flag leads the message
        if message.startswith("argument ") and ": " in message:
            message = message[len("argument "):]
        raise UsageError(f"{message} (see '{self.prog} --help')")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ufm", description="Measure unique feature memorisation (Hartley & Tsaftaris).")
    sub = parser.add_subparsers(dest="command", parser_class=_Parser, metavar="COMMAND")
    for register in COMMANDS:
        register(sub)
    return parser


def _user_errors() -> tuple[type[BaseException], ...]:
    errors: list[type[BaseException]] = [UsageError, ValueError, FileNotFoundError, PermissionError]
    # Their exceptions can only come from code that imported them: importing them here would load
    # torch (seconds) just to print a one-line error of 'ufm runs cancel'.
    for module, name in (("ufm.core.data", "DataUnavailable"), ("ufm.core.train", "TrainingDiverged")):
        if module in sys.modules:
            errors.append(getattr(sys.modules[module], name))
    return tuple(errors)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if not getattr(args, "command", None):
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("\nufm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return _broken_pipe()
    except Exception as exc:  # noqa: BLE001 - filtered just below
        if isinstance(exc, _user_errors()):
            msg = " ".join(str(exc).split())
            print(f"ufm: error: {msg}", file=sys.stderr)
            return EXIT_USAGE
        raise


def _broken_pipe() -> int:
    """The reader of stdout went away (``ufm runs show ID | head``): stop quietly.

    Python's recipe: point stdout at /dev/null so the flush at exit does not raise a second
    BrokenPipeError ("Exception ignored ...") on the closed pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass  # stdout is not a real file (tests capture it): nothing will be flushed to the pipe
    return EXIT_BROKEN_PIPE
