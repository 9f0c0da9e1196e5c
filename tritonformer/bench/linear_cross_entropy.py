"""Benchmark: the fused LM head + cross-entropy, forward+backward, against PyTorch eager and
torch.compile of what a user writes without it, ``F.cross_entropy((h @ W.T).float(), t)``
(the fp32 cast is what autocast does to cross_entropy's input), all in bf16.

The extra-memory column is the peak beyond the inputs and their gradients (eager and
compiled hold the (tokens x vocabulary) logits and their gradient; the fused op holds one
chunk of them)."""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Bench, Result, compiled


def _case(b: Bench, fn: Callable, provider: str, x: torch.Tensor, w: torch.Tensor,
          target: torch.Tensor) -> None:
    (n, d), v = x.shape, w.shape[0]

    def fwd_bwd():
        fn(x, w, target).backward()
        # Freed inside the call, so the extra-memory figure sees the gradients allocated once
        # (and subtracts them as output_bytes) rather than the previous call's being replaced.
        x.grad = w.grad = None

    # three GEMMs of 2 n d v FLOPs: logits, dX, dW (the loss passes are memory-bound extras)
    b.run(f"{n}x{d}x{v} fwd+bwd", provider, fwd_bwd, flops=6.0 * n * d * v,
          output_bytes=x.nbytes + w.nbytes)


def run() -> list[Result]:
    dtype = torch.bfloat16
    b = Bench("linear_cross_entropy", dtype)
    eager = lambda x, w, target: F.cross_entropy((x @ w.T).float(), target)
    providers = {"tritonformer": ops.linear_cross_entropy, "torch": eager,
                 "torch.compile": compiled(eager)}
    for n, d, v in [(16384, 768, 50304), (8192, 2048, 128256)]:
        x = torch.randn(n, d, device="cuda", dtype=dtype, requires_grad=True)
        w = (torch.randn(v, d, device="cuda", dtype=dtype) * d**-0.5).requires_grad_()
        target = torch.randint(0, v, (n,), device="cuda")
        for provider, fn in providers.items():
            _case(b, fn, provider, x, w, target)
        del x, w, target
    return b.results
