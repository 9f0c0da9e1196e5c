"""``tritonformer check``: run each op once on small random inputs against its reference."""

from __future__ import annotations

import time
from collections.abc import Callable

import torch

from . import ops, reference
from .runtime import INTERPRET, default_device


def _cases(dev: torch.device) -> list[tuple[str, Callable, Callable, list[torch.Tensor]]]:
    x = torch.randn(37, 129, device=dev)
    return [
        ("gelu", lambda x: ops.gelu(x), reference.gelu, [x]),
        ("gelu_tanh", lambda x: ops.gelu(x, "tanh"), reference.gelu_tanh, [x]),
        ("relu", ops.relu, reference.relu, [x]),
    ]


def run_selfcheck() -> int:
    """Print each op's forward and gradient error against float64; return 0 if all pass."""
    dev = default_device()
    print(f"tritonformer self-check on {dev} ({'Triton interpreter' if INTERPRET else 'compiled'})")
    failed = 0
    for name, ours, ref, inputs in _cases(dev):
        t0 = time.perf_counter()
        xs = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
        y = ours(*xs)
        y.backward(torch.ones_like(y))
        xs64 = [t.detach().double().cpu().requires_grad_(t.is_floating_point()) for t in inputs]
        y64 = ref(*xs64)
        y64.backward(torch.ones_like(y64))
        errs = [(y.detach().double().cpu() - y64.detach()).norm() / y64.detach().norm()]
        errs += [(a.grad.double().cpu() - b.grad).norm() / b.grad.norm() for a, b in zip(xs, xs64)
                 if b.grad is not None]
        err = max(float(e) for e in errs)
        ok = err < 1e-5
        failed += not ok
        print(f"  {name:<16} max rel err {err:.2e}  {'ok' if ok else 'FAIL'}  "
              f"({time.perf_counter() - t0:.2f} s)")
    print("all ops match their references" if not failed else f"{failed} op(s) FAILED")
    return 1 if failed else 0
