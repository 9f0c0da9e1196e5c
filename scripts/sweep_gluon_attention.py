# ruff: noqa: B023  (each lambda is timed at once, inside its loop iteration)
"""The Gluon attention forward on the GPU (sm_90): correctness, then a tiling sweep.

    PYTHONPATH=. python3 scripts/sweep_gluon_attention.py

1. Against the Triton forward (``attention_fwd`` with ``GLUON_FWD`` off) on odd shapes: tails,
   Sq < Skv, Sq = 1, full and causal, folded ALiBi, D 64 / 128, bf16 / fp16: outputs and LSE,
   with each tiling of ``GLUON_FWD``.
2. Speed on the benchmark shapes (B * S = 16384, H = 2048 / D, bf16, causal) of each
   (BLOCK_M, BLOCK_N, K_STAGES, V_STAGES) variant, against the Triton forward and
   SDPA's cuDNN backend in the same process. The picks go to ``attention.GLUON_FWD``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
from torch.nn.attention import SDPBackend, sdpa_kernel

from tritonformer import ops
from tritonformer.kernels import attention as ka
from tritonformer.kernels.attention import attention_fwd
from tritonformer.kernels.attention_gluon import attention_fwd_gluon

PICKS = ka.GLUON_FWD  # the current tilings, checked first
ka.GLUON_FWD = None  # attention_fwd: the Triton kernel, the reference here


def check(variant: tuple) -> bool:
    ok = True
    print("variant", variant, flush=True)
    cases = [(2, 3, 100, 100, 64, True), (1, 2, 257, 257, 128, True), (2, 2, 65, 300, 64, True),
             (1, 4, 1, 500, 128, True), (2, 3, 200, 130, 64, True), (1, 2, 333, 333, 128, False),
             (2, 2, 1024, 1024, 64, True), (1, 2, 2048, 2048, 128, True)]
    for dtype in (torch.bfloat16, torch.float16):
        for b, h, sq, skv, d, causal in cases:
            q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype)
            k, v = (torch.randn(b, h, skv, d, device="cuda", dtype=dtype) for _ in range(2))
            slopes = (torch.rand(h, device="cuda") * 0.5) if causal and sq % 2 else None
            want, want_lse = attention_fwd(q, k, v, slopes, causal, d**-0.5, False)
            try:
                got, got_lse = attention_fwd_gluon(q, k, v, causal, d**-0.5, slopes, *variant)
                torch.cuda.synchronize()
            except Exception as e:  # noqa: BLE001
                print(f"FAIL {b, h, sq, skv, d, causal, dtype}: {type(e).__name__}: {e}")
                ok = False
                continue
            err = (got.float() - want.float()).abs().max().item()
            finite = torch.isfinite(want_lse)
            lse_err = (got_lse[finite] - want_lse[finite]).abs().max().item() if finite.any() else 0
            same_inf = torch.equal(torch.isinf(got_lse), torch.isinf(want_lse))
            good = err < 2e-2 and lse_err < 1e-3 and same_inf and not got.isnan().any()
            ok &= good
            print(f"{'ok  ' if good else 'FAIL'} B{b} H{h} Sq{sq} Skv{skv} D{d} causal={causal} "
                  f"alibi={slopes is not None} {dtype}: max|dO| {err:.1e}, "
                  f"max|dLSE| {lse_err:.1e}", flush=True)
    return ok


# (BLOCK_M, BLOCK_N, K_STAGES, V_STAGES): BLOCK_M 64 fits two or more programs per SM, 128
# (warp-specialised) one.
VARIANTS = {64: [(64, 128, 2, 2), (64, 128, 2, 1), (64, 64, 2, 2), (64, 64, 3, 2),
                 (128, 128, 2, 2)],
            128: [(64, 64, 2, 1), (64, 64, 2, 2), (128, 128, 2, 2), (128, 128, 2, 1),
                  (128, 64, 2, 2)]}


def bench() -> None:
    """TFLOP/s (and the ratio to cuDNN's plain causal forward) of each variant, plain causal
    and with ALiBi."""
    def t(fn):
        return triton.testing.do_bench(fn, warmup=25, rep=200, return_mode="median")

    for d in (64, 128):
        h = 2048 // d
        slopes = ops.alibi_slopes(h)
        for s in (1024, 2048, 4096, 8192):
            b = 16384 // s
            q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16)
                       for _ in range(3))
            fl = 4 * b * h * s * s * d / 2
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                cud = t(lambda: F.scaled_dot_product_attention(q, k, v, is_causal=True))
            tri = t(lambda: attention_fwd(q, k, v, None, True, d**-0.5, False))
            tri_a = t(lambda: attention_fwd(q, k, v, slopes, True, d**-0.5, False))
            print(f"D{d} S{s}: cudnn {fl / cud / 1e9:.0f} | triton {fl / tri / 1e9:.0f}, "
                  f"alibi {fl / tri_a / 1e9:.0f}", flush=True)
            for var in VARIANTS[d]:
                line = f"    {var}:"
                for sl in (None, slopes):
                    try:
                        g = t(lambda: attention_fwd_gluon(q, k, v, True, d**-0.5, sl, *var))
                        line += f" {'alibi' if sl is not None else 'plain'} {fl / g / 1e9:.0f}"
                        line += f" ({cud / g:.2f}x cudnn)"
                    except Exception as e:  # noqa: BLE001
                        line += f" FAIL {type(e).__name__}"
                print(line, flush=True)


if __name__ == "__main__":
    print(torch.cuda.get_device_name(), torch.__version__, triton.__version__, flush=True)
    if all([check(v) for v in sorted({t for picks in PICKS.values() for _, t in picks})]):
        bench()
