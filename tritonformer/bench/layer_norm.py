"""Benchmark: LayerNorm and residual-add + LayerNorm, forward and forward+backward, bf16,
against PyTorch eager (F.layer_norm) and torch.compile of it.

Bytes are what must move, per (rows x N) tensor of n bytes:
- layer_norm: forward reads x, writes y (2n); forward+backward also reads x and dy and writes
  dx (5n). weight, bias and the per-row statistics are negligible.
- add_layer_norm: forward reads x and residual, writes s and y (4n); forward+backward also
  reads s, dy and ds and writes the one gradient both inputs share (8n).

Each LayerNorm size also times a device copy of the forward's bytes (x into y, 2n),
provider "device-copy": what memory delivers at that size under the same timing (the
2 GiB copy of the run is the ceiling the percentages refer to).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Bench, Result, compiled

ROWS = 16384
HIDDEN = (1024, 2048, 4096)


def _ln(x, w, b):
    return F.layer_norm(x, x.shape[-1:], w, b)


def _add_ln(x, r, w, b):
    s = x + r
    return s, F.layer_norm(s, s.shape[-1:], w, b)


def _bench_size(bench: Bench, add_bench: Bench, n: int, ln: dict, add_ln: dict) -> None:
    dtype = torch.bfloat16
    case = f"{ROWS}x{n}"
    x = torch.randn(ROWS, n, device="cuda", dtype=dtype, requires_grad=True)
    r = torch.randn(ROWS, n, device="cuda", dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(n, device="cuda", dtype=dtype)).requires_grad_()
    b = (0.1 * torch.randn(n, device="cuda", dtype=dtype)).requires_grad_()
    dy, ds = torch.randn_like(x), torch.randn_like(x)
    nbytes = x.numel() * x.element_size()
    src, dst = x.detach(), torch.empty_like(x, requires_grad=False)
    bench.run(f"{case} fwd", "device-copy", lambda: dst.copy_(src), bytes=2 * nbytes,
              memory=False)

    def clear() -> None:
        for t in (x, r, w, b):
            t.grad = None

    for name, fn in ln.items():

        def fwd_bwd(fn=fn) -> None:
            clear()
            fn(x, w, b).backward(dy)

        bench.run(f"{case} fwd", name, lambda fn=fn: fn(x, w, b), bytes=2 * nbytes, memory=False)
        bench.run(f"{case} fwd+bwd", name, fwd_bwd, bytes=5 * nbytes, memory=False)

    for name, fn in add_ln.items():

        def add_fwd_bwd(fn=fn) -> None:
            clear()
            torch.autograd.backward(fn(x, r, w, b), (ds, dy))

        add_bench.run(f"{case} fwd", name, lambda fn=fn: fn(x, r, w, b), bytes=4 * nbytes,
                      memory=False)  # fmt: skip
        add_bench.run(f"{case} fwd+bwd", name, add_fwd_bwd, bytes=8 * nbytes, memory=False)


def run() -> list[Result]:
    bench = Bench("layer_norm", torch.bfloat16)
    add_bench = Bench("add_layer_norm", torch.bfloat16)
    ln = {"tritonformer": ops.layer_norm, "torch": _ln, "torch.compile": compiled(_ln)}
    add_ln = {"tritonformer": ops.add_layer_norm, "torch": _add_ln,
              "torch.compile": compiled(_add_ln)}  # fmt: skip
    for n in HIDDEN:
        _bench_size(bench, add_bench, n, ln, add_ln)
    return bench.results + add_bench.results
