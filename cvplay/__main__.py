"""``python -m cvplay COMMAND``: the project's command line (besides the DVC stages).

Each subcommand is a module with ``add_arguments(parser)`` and ``run(args) -> exit status``.
Exit status 2: a usage error (bad arguments, a missing or unloadable checkpoint), shown as
one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cvplay import predict
from cvplay.errors import CvplayError

COMMANDS = {
    "predict": (predict, "classify image files and folders with a trained checkpoint"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m cvplay")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for name, (module, help_text) in COMMANDS.items():
        cmd = sub.add_parser(name, help=help_text, description=help_text)
        module.add_arguments(cmd)
        cmd.set_defaults(run=module.run)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # exits 2 on a usage error
    try:
        return args.run(args)
    except CvplayError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted (SIGINT)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
