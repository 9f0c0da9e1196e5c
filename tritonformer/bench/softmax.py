"""Benchmark: softmax over the last dimension, forward and forward+backward, against PyTorch
eager and torch.compile."""

from __future__ import annotations

from collections.abc import Callable

import torch

from .. import ops
from .harness import Bench, Result, compiled


def _case(b: Bench, fn: Callable, provider: str, x: torch.Tensor, dy: torch.Tensor) -> None:
    rows, cols = x.shape
    n = x.numel() * x.element_size()

    def fwd_bwd():
        x.grad = None
        fn(x).backward(dy)

    # forward reads x and writes y
    b.run(f"{rows}x{cols} fwd", provider, lambda: fn(x), bytes=2 * n, memory=False)
    # forward reads x, writes y; backward reads y and dy, writes dx
    b.run(f"{rows}x{cols} fwd+bwd", provider, fwd_bwd, bytes=5 * n, memory=False)


def run() -> list[Result]:
    dtype = torch.bfloat16
    b = Bench("softmax", dtype)
    eager = lambda x: torch.softmax(x, dim=-1)
    providers = {"tritonformer": ops.softmax, "torch": eager, "torch.compile": compiled(eager)}
    # 4096: one block per row; 32768: longer than the single-block limit, chunked
    for rows, cols in [(16384, 4096), (4096, 32768)]:
        x = torch.randn(rows, cols, device="cuda", dtype=dtype, requires_grad=True)
        dy = torch.randn_like(x)
        for provider, fn in providers.items():
            _case(b, fn, provider, x, dy)
    return b.results
