"""The ``tritonformer`` command."""

from __future__ import annotations

import argparse
import sys


def _check(args: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return run_selfcheck()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="tritonformer", description="A GPT on Triton kernels.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("check", help="run every kernel once against its PyTorch reference")
    p.set_defaults(fn=_check)
    args = parser.parse_args(argv)
    return args.fn(args)


if __name__ == "__main__":
    sys.exit(main())
