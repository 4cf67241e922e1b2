"""`guidance` command line: one dispatcher, each subcommand owned by the part it drives.

Each subcommand module exposes `add_parser(subparsers)` (registers its arguments and sets
`func`) so that the parts stay independent and this file stays a table of contents.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

from guidance import DISCLAIMER, __version__
from guidance.errors import GuidanceError

# subcommand -> module that owns it (imported lazily so `guidance run` pays for nothing else)
SUBCOMMANDS: dict[str, str] = {
    "run": "guidance.app",
    "evaluate": "guidance.evaluation.cli",
    "compare": "guidance.evaluation.compare",
    "calibrate": "calibration.cli",
    "undistort": "calibration.cli",
    "bridge": "firmware_bridge.cli",
}


def requested_command(argv: list[str]) -> str | None:
    """The subcommand named on the command line, or None where the whole parser is wanted
    (help or version asked before one, none named, or an unknown one: argparse says so)."""
    for arg in argv:
        if arg in ("-h", "--help", "--version"):
            return None
        if not arg.startswith("-"):
            return arg if arg in SUBCOMMANDS else None
    return None


def build_parser(command: str | None = None) -> argparse.ArgumentParser:
    """The parser; with `command`, only the module that owns it is imported (the others'
    imports would only delay it: `guidance evaluate` starts its workers sooner)."""
    parser = argparse.ArgumentParser(
        prog="guidance",
        description="Fluoroscopic cement-injection guidance. " + DISCLAIMER,
    )
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    parser.add_argument("-v", "--verbose", action="count", default=0, help="more log output")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    registered: set[str] = set()
    for name, module_name in SUBCOMMANDS.items():
        if module_name in registered or (command is not None and name != command):
            continue
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as exc:  # a part not built yet, or an optional extra missing
            if exc.name and module_name.startswith(exc.name):
                continue
            raise
        module.add_parser(sub)
        registered.add(module_name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser(requested_command(sys.argv[1:] if argv is None else argv))
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose > 1 else logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except GuidanceError as err:
        print(f"guidance {args.command}: error: {err}", file=sys.stderr)
        return err.exit_code
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
