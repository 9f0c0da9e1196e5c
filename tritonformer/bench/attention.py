"""Benchmark: flash attention, bf16, causal, forward and backward, against SDPA's FLASH and
cuDNN backends (PyTorch's own fused attention kernels), plus ALiBi against plain causal.

Shapes: head dims 64 and 128 with H = 2048 / D heads (a 2048-wide model) and B * S = 16384
tokens per batch, S = 1k, 2k, 4k, 8k. FLOPs of causal attention: 4 * B * H * S^2 * D / 2 for
the forward (two GEMMs, half the score matrix), 2.5 times that for the backward (five GEMMs).
The eager reference and torch.compile of it are left out: they materialise the B x H x S x S
scores (up to 8 GiB here); the SDPA backends are PyTorch's real baselines.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from .. import ops
from .harness import Bench, Result

HEAD_DIMS = (64, 128)
SEQ_LENS = (1024, 2048, 4096, 8192)
TOKENS = 16384
MODEL_WIDTH = 2048


def _sdpa(backend: SDPBackend):
    def fn(q, k, v):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)

    return fn


def providers(h: int) -> dict:
    slopes = ops.alibi_slopes(h)
    return {
        "tritonformer": lambda q, k, v: ops.attention(q, k, v, causal=True),
        "tritonformer+alibi": lambda q, k, v: ops.attention(q, k, v, causal=True,
                                                            alibi_slopes=slopes),
        "sdpa-flash": _sdpa(SDPBackend.FLASH_ATTENTION),
        "sdpa-cudnn": _sdpa(SDPBackend.CUDNN_ATTENTION),
    }


def case_name(d: int, s: int) -> str:
    return f"B{TOKENS // s} H{MODEL_WIDTH // d} S{s} D{d} causal"


def run() -> list[Result]:
    dtype = torch.bfloat16
    b = Bench("attention", dtype)
    for d in HEAD_DIMS:
        h = MODEL_WIDTH // d
        for s in SEQ_LENS:
            bsz = TOKENS // s
            q, k, v = (torch.randn(bsz, h, s, d, device="cuda", dtype=dtype, requires_grad=True)
                       for _ in range(3))
            dout = torch.randn_like(q)
            fwd_flops = 4 * bsz * h * s * s * d / 2
            for name, fn in providers(h).items():
                b.run(f"{case_name(d, s)} fwd", name, lambda fn=fn, x=(q, k, v): fn(*x),
                      flops=fwd_flops, memory=False)
                out = fn(q, k, v)
                b.run(f"{case_name(d, s)} bwd", name,
                      lambda out=out, x=(q, k, v), g=dout: torch.autograd.grad(
                          out, x, g, retain_graph=True),
                      flops=2.5 * fwd_flops, memory=False)
                del out
    return b.results


def summary(results: list[Result]) -> str:
    """A table of TFLOP/s per case: ours, FLASH, cuDNN, the ratios the targets name
    (forward vs cuDNN, backward vs FLASH) and ALiBi's cost over plain causal."""
    by = {(r.case, r.provider): r for r in results if r.op == "attention"}
    lines = [
        f"{'case':<26} {'pass':<4} {'ours':>6} {'flash':>6} {'cudnn':>6} "
        f"{'/cudnn':>7} {'/flash':>7} {'alibi':>7}"
    ]
    for d in HEAD_DIMS:
        for s in SEQ_LENS:
            for phase in ("fwd", "bwd"):
                case = f"{case_name(d, s)} {phase}"
                if (case, "tritonformer") not in by:
                    continue
                ours, alibi = by[(case, "tritonformer")], by[(case, "tritonformer+alibi")]
                flash, cudnn = by[(case, "sdpa-flash")], by[(case, "sdpa-cudnn")]
                lines.append(
                    f"{case_name(d, s)[:26]:<26} {phase:<4} {ours.metric:6.0f} {flash.metric:6.0f} "
                    f"{cudnn.metric:6.0f} {ours.metric / cudnn.metric:7.2f} "
                    f"{ours.metric / flash.metric:7.2f} {alibi.ms / ours.ms - 1:+7.1%}"
                )
    return "\n".join(lines)
