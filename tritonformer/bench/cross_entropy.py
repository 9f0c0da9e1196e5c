"""Benchmark: cross-entropy forward+backward on LM-head-sized bf16 logits, against PyTorch
eager and torch.compile of what a user runs under autocast (F.cross_entropy on the logits
cast to fp32, which is what autocast does)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Bench, Result, compiled


def _case(
    b: Bench, fn: Callable, provider: str, logits: torch.Tensor, target: torch.Tensor
) -> None:
    n, v = logits.shape
    nb = logits.numel() * logits.element_size()

    def fwd():
        with torch.no_grad():
            fn(logits, target)

    def fwd_bwd():
        fn(logits, target).backward()
        # Freed inside the call, so the extra-memory figure sees the gradient allocated once
        # (and subtracts it as output_bytes) rather than the previous call's being replaced.
        logits.grad = None

    # forward reads the logits once
    b.run(f"{n}x{v} fwd", provider, fwd, bytes=nb, memory=False)
    # forward reads the logits; backward reads them again and writes their gradient
    b.run(f"{n}x{v} fwd+bwd", provider, fwd_bwd, bytes=3 * nb, output_bytes=nb)


def run() -> list[Result]:
    dtype = torch.bfloat16
    b = Bench("cross_entropy", dtype)
    eager = lambda logits, target: F.cross_entropy(logits.float(), target)
    providers = {"tritonformer": ops.cross_entropy, "torch": eager,
                 "torch.compile": compiled(eager)}
    for n, v in [(16384, 50304), (8192, 128256)]:
        logits = torch.randn(n, v, device="cuda", dtype=dtype, requires_grad=True)
        target = torch.randint(0, v, (n,), device="cuda")
        for provider, fn in providers.items():
            _case(b, fn, provider, logits, target)
        del logits, target
    return b.results
