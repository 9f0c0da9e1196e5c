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
        ("matmul", ops.matmul, reference.matmul, [x, x.t()]),
        (
            "linear",
            lambda x, w, b: ops.linear(x, w, b, "gelu_tanh"),
            lambda x, w, b: reference.linear(x, w, b, "gelu_tanh"),
            [x, x[:17], x[0, :17]],
        ),
        # squared / multiplied: the gradient of sum(layer_norm) alone is ~0
        (
            "layer_norm",
            lambda x, w, b: ops.layer_norm(x, w, b) ** 2,
            lambda x, w, b: reference.layer_norm(x, w, b) ** 2,
            [x, x[0] + 1, x[1]],
        ),
        (
            "add_layer_norm",
            lambda x, r: torch.mul(*ops.add_layer_norm(x, r)),
            lambda x, r: torch.mul(*reference.add_layer_norm(x, r)),
            [x, x.flip(0)],
        ),
        # squared: the gradient of sum(softmax) alone is ~0
        ("softmax", lambda x: ops.softmax(x, 0) ** 2, lambda x: reference.softmax(x, 0) ** 2, [x]),
        (
            "cross_entropy",
            lambda x, t: ops.cross_entropy(x, t, label_smoothing=0.1),
            lambda x, t: reference.cross_entropy(x, t.long(), label_smoothing=0.1),
            [x, torch.randint(0, x.shape[1], (x.shape[0],), device=dev)],
        ),
        (
            "linear_cross_entropy",
            lambda x, w, t: ops.linear_cross_entropy(x, w, t, label_smoothing=0.1),
            lambda x, w, t: reference.linear_cross_entropy(x, w, t.long(), label_smoothing=0.1),
            [x, torch.randn(50, x.shape[1], device=dev) * 0.1,
             torch.randint(0, 50, (x.shape[0],), device=dev)],
        ),
        (
            "attention",
            lambda q, k, v: ops.attention(q, k, v, alibi_slopes=ops.alibi_slopes(2)),
            lambda q, k, v: reference.attention(q, k, v, True, ops.alibi_slopes(2).double().cpu()),
            [torch.randn(1, 2, 37, 32, device=dev) for _ in range(3)],
        ),
        (
            "attention_packed",
            lambda qkv: ops.attention_packed(qkv, alibi_slopes=ops.alibi_slopes(2)),
            lambda qkv: reference.attention_packed(qkv, True, ops.alibi_slopes(2).double().cpu()),
            [torch.randn(1, 37, 3, 2, 32, device=dev)],
        ),
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
        errs += [
            (a.grad.double().cpu() - b.grad).norm() / b.grad.norm()
            for a, b in zip(xs, xs64, strict=True)
            if b.grad is not None
        ]
        err = max(float(e) for e in errs)
        ok = err < 1e-5
        failed += not ok
        print(
            f"  {name:<22} max rel err {err:.2e}  {'ok' if ok else 'FAIL'}  "
            f"({time.perf_counter() - t0:.2f} s)"
        )
    print("all ops match their references" if not failed else f"{failed} op(s) FAILED")
    return 1 if failed else 0
