# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""The Gluon attention backward on the GPU (sm_90): correctness, then a tiling sweep.

    PYTHONPATH=. python3 scripts/sweep_gluon_attention_bwd.py

1. Against float64 (and the Triton backward, ``GLUON_BWD`` off, alongside) on odd shapes:
   tails, Sq < Skv and Sq > Skv, full and causal, folded ALiBi, D 64 / 128, bf16 / fp16: the
   largest relative error of dq, dk, dv for each (BLOCK_M, BLOCK_N, STAGES, DQ_BUFS) tiling.
2. GPU time of a backward (delta, zero fill, kernel, dQ conversion; calls enqueued behind a
   ``torch.cuda._sleep``, so the host never starves the GPU) at the model benchmark's
   attention shapes, bf16, causal, for each tiling, against the Triton backward and SDPA's
   cuDNN backend in the same process. The picks go to ``attention.GLUON_BWD``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from tritonformer import ops
from tritonformer.kernels import attention as ka

PICKS = dict(ka.GLUON_BWD)  # the current tilings, checked first
VARIANTS = {
    64: [PICKS[64], (64, 64, 2, 2), (64, 64, 1, 1), (64, 128, 1, 2)],
    128: [PICKS[128], (64, 128, 1, 1), (64, 128, 2, 1), (64, 64, 1, 1)],
}
# (B, H, S, D) of the model benchmark's configs: 840m, 1.4b, 410m at 4096 and 2048, gpt2
SHAPES = [(2, 12, 2048, 128), (4, 16, 2048, 128), (2, 16, 4096, 64), (4, 16, 2048, 64),
          (16, 12, 1024, 64)]


def use(d: int, tiling: tuple | None) -> None:
    """The backward at head dim d: the Gluon kernel with ``tiling``, or (None) Triton's."""
    ka.GLUON_BWD = None if tiling is None else {**PICKS, d: tiling}


def reference(q, k, v, do, causal, slopes):
    """dq, dk, dv in float64 (bottom-right causal mask, ALiBi's bias on visible keys)."""
    q64, k64, v64 = (t.detach().double().requires_grad_() for t in (q, k, v))
    sq, skv = q.shape[2], k.shape[2]
    s = q64 @ k64.transpose(-1, -2) / math.sqrt(q.shape[-1])
    rel = (torch.arange(skv, device=q.device)[None] - torch.arange(sq, device=q.device)[:, None]
           - (skv - sq))
    if slopes is not None:
        s = s + slopes.double()[:, None, None] * rel
    if causal:
        s = s.masked_fill(rel > 0, float("-inf"))
    o = torch.softmax(s, -1).nan_to_num(0.0) @ v64
    return torch.autograd.grad(o, (q64, k64, v64), do.double())


def check() -> None:
    cases = [(1, 2, 1000, 1000, 64, True, False), (2, 3, 77, 77, 128, True, True),
             (1, 2, 300, 300, 64, False, False), (1, 1, 130, 200, 128, True, False),
             (1, 2, 200, 130, 64, True, True), (1, 3, 2048, 2048, 128, True, False),
             (1, 2, 517, 517, 128, False, False)]
    for dtype in (torch.bfloat16, torch.float16):
        for b, h, sq, skv, d, causal, alibi in cases:
            q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, h, skv, d, device="cuda", dtype=dtype) for _ in range(2))
            do = torch.randn_like(q)
            slopes = ops.alibi_slopes(h) if alibi else None
            ref = reference(q, k, v, do, causal, slopes)
            line = f"{dtype} B{b} H{h} Sq{sq} Skv{skv} D{d} causal={causal} alibi={alibi}:"
            for tiling in [None, *VARIANTS[d]]:
                use(d, tiling)
                leaves = [t.clone().requires_grad_() for t in (q, k, v)]
                out = ops.attention(*leaves, causal=causal, alibi_slopes=slopes)
                got = torch.autograd.grad(out, leaves, do)
                err = max(((g.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
                          for g, r in zip(got, ref, strict=True))
                finite = all(torch.isfinite(g).all().item() for g in got)
                line += f" {tiling or 'triton'} {err:.2e}{'' if finite else ' NON-FINITE'}"
            print(line, flush=True)


def gpu_us(fn, n: int = 20) -> float:
    """GPU microseconds per call: n calls behind a sleep, the median of 5 batches."""
    fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(5):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda._sleep(100_000_000)
        start.record()
        for _ in range(n):
            fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) / n * 1e3)
    return sorted(times)[2]


def bench() -> None:
    for b, h, s, d in SHAPES:
        q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16,
                               requires_grad=True) for _ in range(3))  # fmt: skip
        do = torch.randn_like(q)

        def backward(attention):
            out = attention(q, k, v)
            return lambda: torch.autograd.grad(out, (q, k, v), do, retain_graph=True)

        with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
            cudnn = gpu_us(backward(lambda q, k, v: F.scaled_dot_product_attention(
                q, k, v, is_causal=True)))
        line = f"B{b} H{h} S{s} D{d}: cuDNN {cudnn:.0f} us"
        for tiling in [None, *VARIANTS[d]]:
            use(d, tiling)
            t = gpu_us(backward(lambda q, k, v: ops.attention(q, k, v, causal=True)))
            line += f" | {tiling or 'triton'} {t:.0f} ({cudnn / t:.2f}x cuDNN)"
        print(line, flush=True)


if __name__ == "__main__":
    torch.autograd.set_multithreading_enabled(False)
    check()
    bench()
    ka.GLUON_BWD = PICKS
