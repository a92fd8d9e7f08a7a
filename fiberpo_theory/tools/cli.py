"""The ``fiberpo-theory`` command line.

Each subcommand lives in its own module exposing ``add_arguments(parser)``
and ``run(args) -> int``; this file only wires them together.  A module may
also expose ``check_args(args)`` for checks argparse's ``type=`` cannot make
(a target that must import, options that exclude each other): it runs before
any work, and a ValueError it raises is a bad argument, reported in one line
with exit status 2.  A ValueError raised later, by ``run``, is a failure of
the work itself and is not caught here.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "verify": ("fiberpo_theory.tools.verify", "run every claim check and print the verdict table"),
    "derive": ("fiberpo_theory.tools.derive", "write the SymPy derivations as LaTeX"),
    "audit": ("fiberpo_theory.tools.audit", "check a third-party gating map MODULE:FUNCTION"),
    "audit-loss": ("fiberpo_theory.tools.audit_loss", "check a verl-signature policy loss MODULE:FUNCTION (or verl's whole registry)"),
    "figures": ("fiberpo_theory.tools.figures", "render the paper's figures with matplotlib"),
    "bench": ("fiberpo_theory.tools.bench", "time and measure memory of every objective"),
}


def _load(module_name: str):
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        if err.name == module_name:
            return None
        raise


def build_parser(only: str | None = None) -> argparse.ArgumentParser:
    """The full parser; with ``only``, just that subcommand's module is imported (the others stay bare)."""
    parser = argparse.ArgumentParser(prog="fiberpo-theory", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        command = sub.add_parser(name, help=help_text)
        module = _load(module_name) if only in (None, name) else None
        if module is not None:
            module.add_arguments(command)
        else:
            command.add_argument("rest", nargs=argparse.REMAINDER)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    # import only the subcommand asked for: faster, and one module's import cost or defect never reaches another
    chosen = next((arg for arg in argv if not arg.startswith("-")), None)
    args = build_parser(only=chosen if chosen in SUBCOMMANDS else None).parse_args(argv)
    module = _load(SUBCOMMANDS[args.command][0])
    if module is None:
        print(f"fiberpo-theory {args.command}: not built yet", file=sys.stderr)
        return 2
    refusal = _argument_error(module, args)
    if refusal is not None:
        print(f"fiberpo-theory {args.command}: error: {refusal}", file=sys.stderr)
        return 2
    return int(module.run(args) or 0)


def _argument_error(module, args: argparse.Namespace) -> str | None:
    """The first line of the ValueError the subcommand's ``check_args`` raises, or None when the arguments are fine."""
    check = getattr(module, "check_args", None)
    if check is None:
        return None
    try:
        check(args)
    except ValueError as err:
        lines = str(err).strip().splitlines()
        return lines[0] if lines else type(err).__name__
    return None


if __name__ == "__main__":
    sys.exit(main())
