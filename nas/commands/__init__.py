"""Sub-commands of `detforge`; every module here has `register(subparsers)`."""
from __future__ import annotations

import argparse


def command_group(subparsers: argparse._SubParsersAction, name: str, help: str,
                  metavar: str = "ACTION") -> tuple[argparse.ArgumentParser, argparse._SubParsersAction]:
    """A `detforge NAME ACTION` group; `detforge NAME` alone prints the group's help and exits 2."""
    parser = subparsers.add_parser(name, help=help)
    actions = parser.add_subparsers(dest=f"{name}_command", metavar=metavar)

    def usage(args: argparse.Namespace) -> int:
        parser.print_help()
        return 2

    parser.set_defaults(func=usage)
    return parser, actions
