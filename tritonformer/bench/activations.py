"""Benchmark: elementwise GELU (tanh) forward+backward against PyTorch eager and compile."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Bench, Result, compiled


def run() -> list[Result]:
    dtype = torch.bfloat16
    b = Bench("gelu_tanh", dtype)
    eager = lambda x: F.gelu(x, approximate="tanh")
    providers = {
        "tritonformer": lambda x: ops.gelu(x, "tanh"),
        "torch": eager,
        "torch.compile": compiled(eager),
    }
    for rows, cols in [(16384, 4096), (16384, 8192)]:
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        n = x.numel() * x.element_size()
        for name, fn in providers.items():
            b.run(f"{rows}x{cols} fwd", name, functools.partial(fn, x), bytes=2 * n, memory=False)

            def fwd_bwd(fn=fn, x=x, dy=dy):
                x.grad = None
                fn(x).backward(dy)

            # forward reads x, writes y; backward reads x and dy, writes dx
            b.run(f"{rows}x{cols} fwd+bwd", name, fwd_bwd, bytes=5 * n, memory=False)
    return b.results
