"""``python -m tritonformer.bench [op ...] [--csv PATH]``: run kernel benchmarks on the GPU."""

from __future__ import annotations

import argparse
import importlib
import sys

import torch

from . import KERNEL_BENCHMARKS
from .harness import (
    add_backward_thread_option,
    append_csv,
    backward_thread,
    device_copy,
    environment,
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonformer.bench", description=__doc__)
    p.add_argument(
        "ops", nargs="*", help=f"op families (default: all of {list(KERNEL_BENCHMARKS)})"
    )
    p.add_argument("--csv", default="benchmarks/results.csv", help="CSV the rows are appended to")
    add_backward_thread_option(p)
    args = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("benchmarks need a CUDA device", file=sys.stderr)
        return 2
    unknown = [o for o in args.ops if o not in KERNEL_BENCHMARKS]
    if unknown:
        p.error(f"unknown op(s) {unknown}; choose from {list(KERNEL_BENCHMARKS)}")
    backward_thread(calling=not args.autograd_device_thread)
    print(environment(), flush=True)
    results = [device_copy()]
    for op in args.ops or list(KERNEL_BENCHMARKS):
        results += importlib.import_module(KERNEL_BENCHMARKS[op]).run()
    append_csv(results, args.csv)
    print(f"appended {len(results)} rows to {args.csv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
