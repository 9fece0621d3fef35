"""The ``bml-pipeline`` command line: parse, call the library, print. Nothing else lives here.

Exit codes: 0 success, 1 failure of the pipeline itself, 2 bad input or usage (one line on stderr
naming the file and the problem; ``--debug`` shows the traceback), 3 a batch that finished with
failures (see ``batch``), 130 interrupted.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import pkgutil
import sys

from bml_pipeline import __version__, commands
from bml_pipeline.errors import BmlError, InputError

EXIT_OK, EXIT_FAILURE, EXIT_BAD_INPUT, EXIT_INTERRUPTED = 0, 1, 2, 130


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every subcommand found in :mod:`bml_pipeline.commands`."""
    parser = argparse.ArgumentParser(
        prog="bml-pipeline",
        description="Bone marrow lesion and cartilage measurement for knee MRI, in physical units.",
    )
    parser.add_argument("--version", action="version", version=f"bml-pipeline {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", help="only warnings and errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda m: m.name):
        module = importlib.import_module(f"{commands.__name__}.{info.name}")
        command = getattr(module, "COMMAND", None)
        if command is None:
            continue
        help_text = command.help.replace("%", "%%")  # argparse %-formats help strings
        sp = sub.add_parser(command.name, help=help_text, description=command.help)
        command.add_arguments(sp)
        sp.set_defaults(_run=command.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``bml-pipeline``; returns the exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if getattr(args, "_run", None) is None:
        parser.print_help(sys.stderr)
        return EXIT_BAD_INPUT
    level = logging.DEBUG if args.debug else logging.WARNING if args.quiet else logging.INFO
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        return int(args._run(args) or 0)
    except InputError as exc:
        if args.debug:
            raise
        print(f"bml-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    except BmlError as exc:
        if args.debug:
            raise
        print(f"bml-pipeline: error: {exc}", file=sys.stderr)
        return EXIT_FAILURE
    except KeyboardInterrupt:
        print("bml-pipeline: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
