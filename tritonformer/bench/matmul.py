"""Benchmark: every GEMM of a GPT training step against cuBLAS (torch.matmul / F.linear).

bf16, 16384 tokens, d_model 768 / 1024 / 2048 (d_ff = 4 d_model): for each of QKV (d -> 3d),
attention out (d -> d), fc (d -> 4d), proj (4d -> d) and the d=768 LM head (V = 50304),
the forward (x W^T), input gradient (dY W) and weight gradient (dY^T X) GEMMs; the fused
linear + bias + GELU(tanh) against torch's linear then gelu (forward, and forward+backward);
and square 4096^3, 8192^3 products. TFLOP/s = 2 M N K / time.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F

from .. import ops
from .harness import Bench, Result, compiled

TOKENS = 16384
D_MODELS = (768, 1024, 2048)
VOCAB = 50304
DTYPE = torch.bfloat16

Case = tuple[str, str, Callable[[], object], float, bool]  # case, provider, fn, flops, memory


def _randn(*shape: int, scale: float = 1.0, requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, device="cuda", dtype=torch.float32) * scale
    return t.to(DTYPE).requires_grad_(requires_grad)


def _linear_gemms(name: str, t: int, d_in: int, d_out: int) -> Iterator[Case]:
    """Forward, dX and dW of a (t, d_in) -> (t, d_out) linear layer, ours and cuBLAS."""
    x, w, dy = _randn(t, d_in), _randn(d_out, d_in, scale=d_in**-0.5), _randn(t, d_out)
    flops = 2.0 * t * d_in * d_out
    yield (f"{name} fwd {t}x{d_out}x{d_in}", "tritonformer", lambda: ops.linear(x, w), flops,
           False)
    yield f"{name} fwd {t}x{d_out}x{d_in}", "torch", lambda: F.linear(x, w), flops, False
    yield (f"{name} dX {t}x{d_in}x{d_out}", "tritonformer", lambda: ops.matmul(dy, w), flops,
           False)
    yield f"{name} dX {t}x{d_in}x{d_out}", "torch", lambda: dy @ w, flops, False
    yield (f"{name} dW {d_out}x{d_in}x{t}", "tritonformer", lambda: ops.matmul(dy.t(), x), flops,
           False)
    yield f"{name} dW {d_out}x{d_in}x{t}", "torch", lambda: dy.t() @ x, flops, False


def _fused(d: int) -> Iterator[Case]:
    """linear + bias + GELU(tanh) (the MLP's fc layer), forward and forward+backward."""
    t, d_ff = TOKENS, 4 * d
    x = _randn(t, d, requires_grad=True)
    w = _randn(d_ff, d, scale=d**-0.5, requires_grad=True)
    b = _randn(d_ff, requires_grad=True)
    dy = _randn(t, d_ff)

    def torch_fn(x, w, b):
        return F.gelu(F.linear(x, w, b), approximate="tanh")

    providers = {
        "tritonformer": lambda x, w, b: ops.linear(x, w, b, "gelu_tanh"),
        "torch": torch_fn,
        "torch.compile": compiled(torch_fn),
    }
    flops = 2.0 * t * d * d_ff
    for provider, fn in providers.items():
        def fwd(fn=fn):
            with torch.no_grad():
                return fn(x, w, b)

        def fwd_bwd(fn=fn):
            x.grad = w.grad = b.grad = None
            fn(x, w, b).backward(dy)

        yield f"fc+bias+gelu_tanh fwd {t}x{d_ff}x{d}", provider, fwd, flops, False
        yield f"fc+bias+gelu_tanh fwd+bwd {t}x{d_ff}x{d}", provider, fwd_bwd, 3 * flops, True


def _square(n: int) -> Iterator[Case]:
    a, b = _randn(n, n), _randn(n, n, scale=n**-0.5)
    flops = 2.0 * n**3
    yield f"square {n}^3", "tritonformer", lambda: ops.matmul(a, b), flops, False
    yield f"square {n}^3", "torch", lambda: torch.matmul(a, b), flops, False


def cases() -> Iterator[Case]:
    """Every benchmark case (tensors are made lazily, one group at a time)."""
    for d in D_MODELS:
        yield from _linear_gemms(f"d{d} qkv", TOKENS, d, 3 * d)
        yield from _linear_gemms(f"d{d} attn_out", TOKENS, d, d)
        yield from _linear_gemms(f"d{d} fc", TOKENS, d, 4 * d)
        yield from _linear_gemms(f"d{d} proj", TOKENS, 4 * d, d)
    yield from _linear_gemms("d768 lm_head", TOKENS, 768, VOCAB)
    for d in (768, 2048):
        yield from _fused(d)
    for n in (4096, 8192):
        yield from _square(n)


def run() -> list[Result]:
    b = Bench("matmul", DTYPE)
    for case, provider, fn, flops, memory in cases():
        b.run(case, provider, fn, flops=flops, memory=memory)
    return b.results


def ratios(results: list[Result]) -> list[tuple[str, float, float, float]]:
    """(case, ours TFLOP/s, torch TFLOP/s, ours / torch) for every case both ran."""
    by = {(r.case, r.provider): r.metric for r in results}
    return [(case, by[case, "tritonformer"], by[case, "torch"],
             by[case, "tritonformer"] / by[case, "torch"])
            for case, provider in by if provider == "torch" and (case, "tritonformer") in by]
