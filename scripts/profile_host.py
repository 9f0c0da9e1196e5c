# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""Host (CPU) cost vs GPU cost of the ops and of a model step, measured apart.

A long ``torch.cuda._sleep`` is queued first, so the calls that follow are enqueued while the
GPU is still busy: the wall time of the enqueue loop is pure CPU cost, and CUDA events around
the calls give pure GPU time (no host gaps). Usage: PYTHONPATH=. python scripts/profile_host.py
"""

from __future__ import annotations

import time

import torch
import triton
import triton.language as tl

import tritonformer.ops as ops
from tritonformer.model import Transformer, TransformerConfig
from tritonformer.runtime import no_value_checks

CYCLES_PER_MS = 2_000_000


@triton.jit
def tiny(x_ptr, n, a, b, c, BLOCK: tl.constexpr):
    """A kernel that does nothing: the cost of a launch."""


def split_cost(fn, n: int, sleep_ms: float) -> tuple[float, float]:
    """(CPU us per call, GPU us per call) of fn over n calls."""
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(int(sleep_ms * CYCLES_PER_MS))
    start.record()
    t = time.perf_counter()
    for _ in range(n):
        fn()
    cpu = time.perf_counter() - t
    end.record()
    torch.cuda.synchronize()
    return cpu / n * 1e6, start.elapsed_time(end) / n * 1e3


def case(name: str, fn, n: int = 50, sleep_ms: float = 100) -> None:
    cpu, gpu = split_cost(fn, n, sleep_ms)
    cpu2, gpu2 = split_cost(fn, n, sleep_ms)
    print(f"{name:48s} cpu {min(cpu, cpu2):9.1f} us   gpu {min(gpu, gpu2):9.1f} us", flush=True)


def host_breakdown() -> None:
    """CPU microseconds of the pieces of one GEMM call (no GPU wait: the queue is kept short)."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from tritonformer.kernels import matmul as km

    x = torch.randn(16384, 768, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(2304, 768, device="cuda", dtype=torch.bfloat16)

    def per_call(fn, n=300):
        fn()
        torch.cuda.synchronize()
        best = float("inf")
        for _ in range(5):
            t = time.perf_counter()
            for _ in range(n):
                fn()
            best = min(best, (time.perf_counter() - t) / n * 1e6)
            torch.cuda.synchronize()
        return best

    small = torch.empty(16, device="cuda")
    pieces = {
        "tiny triton launch (5 args)": lambda: tiny[(1,)](small, 1, 2, 3, 4, BLOCK=16),
        "torch.empty": lambda: torch.empty((16384, 2304), device="cuda", dtype=torch.bfloat16),
        "TensorDescriptor x1": lambda: TensorDescriptor(x, [16384, 768], [768, 1], [128, 64]),
        "x.t() view": lambda: w.t(),
        "km.gemm fwd (TMA)": lambda: km.gemm(x, w.t(), torch.bfloat16),
        "ops.matmul": lambda: ops.matmul(x, w.t()),
        "ops.linear (no grad)": lambda: ops.linear(x, w),
        "F.linear": lambda: torch.nn.functional.linear(x, w),
    }
    for name, fn in pieces.items():
        print(f"host {name:40s} {per_call(fn):8.1f} us", flush=True)


def main() -> None:
    dev, dt = "cuda", torch.bfloat16
    host_breakdown()
    for d in (768, 1024):
        for k, n in ((d, 3 * d), (d, 4 * d), (4 * d, d)):
            x = torch.randn(16384, k, device=dev, dtype=dt, requires_grad=True)
            w = torch.randn(n, k, device=dev, dtype=dt, requires_grad=True)
            b = torch.randn(n, device=dev, dtype=dt, requires_grad=True)
            dy = torch.randn(16384, n, device=dev, dtype=dt)
            xd, wd, bd = x.detach(), w.detach(), b.detach()
            s = f"{k}->{n}"
            case(f"ops.linear fwd {s}", lambda: ops.linear(xd, wd, bd))
            case(f"F.linear fwd {s}", lambda: torch.nn.functional.linear(xd, wd, bd))
            case(f"ops.matmul dX {s}", lambda: ops.matmul(dy, wd))
            case(f"torch dX {s}", lambda: dy @ wd)
            case(f"ops.matmul dW {s}", lambda: ops.matmul(dy.t(), xd))
            case(f"torch dW {s}", lambda: dy.t() @ xd)
            case(f"ops.linear fwd+bwd {s}", lambda: ops.linear(x, w, b).backward(dy))
            case(f"F.linear fwd+bwd {s}",
                 lambda: torch.nn.functional.linear(x, w, b).backward(dy))
    for d in (1024, 2048, 4096):
        x = torch.randn(16384, d, device=dev, dtype=dt, requires_grad=True)
        w = torch.randn(d, device=dev, dtype=dt, requires_grad=True)
        dy = torch.randn_like(x)
        case(f"ops.layer_norm fwd+bwd 16384x{d}", lambda: ops.layer_norm(x, w, w).backward(dy))
        case(f"F.layer_norm fwd+bwd 16384x{d}",
             lambda: torch.nn.functional.layer_norm(x, (d,), w, w).backward(dy))
    q = torch.randn(16, 12, 1024, 64, device=dev, dtype=dt, requires_grad=True)
    do = torch.randn_like(q)
    case("ops.attention fwd+bwd 16x12x1024x64", lambda: ops.attention(q, q, q).backward(do))

    cfg = TransformerConfig.preset("gpt2")
    for backend in ("triton", "torch"):
        torch.manual_seed(0)
        with torch.device(dev):
            model = Transformer(cfg, backend=backend)
        idx = torch.randint(0, cfg.vocab_size, (16, 1024), device=dev)

        def step(model=model, idx=idx):
            with torch.autocast("cuda", dtype=dt):
                loss = model(idx, idx)[1]
            loss.backward()
            for p in model.parameters():
                p.grad = None

        with no_value_checks():
            case(f"gpt2 B16 T1024 step, {backend}", step, n=3, sleep_ms=400)


if __name__ == "__main__":
    main()
