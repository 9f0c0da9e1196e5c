"""GPU-only time of forced GEMM configs and split-K counts against cuBLAS, on the shapes where
the tables and the split-K cost model are decided (one device call):

    PYTHONPATH=. python scripts/probe_gemm.py [fwd] [dw] [lm]

Times are CUDA-graph replays (``triton.testing.do_bench_cudagraph``: no host time, no L2
flush), so they compare kernels, not launch paths (``scripts/profile_host.py`` splits host
and GPU time; ``tritonformer.bench`` times the ops as users call them). "det" rows run under
``torch.use_deterministic_algorithms(True)`` (the split-K workspace path)."""

from __future__ import annotations

import sys

import torch
import triton
from tune_matmul import T, dw, dx, linear_fwd  # the same problems (scripts/ is on the path)

from tritonformer.kernels import matmul as km
from tritonformer.kernels.matmul import GemmConfig

MAKERS = {"fwd": linear_fwd, "dX": dx, "dW": dw}


def gpu_ms(fn):
    return triton.testing.do_bench_cudagraph(fn, rep=60, return_mode="median")


def C(bm, bn, bk, st, w, **kw):
    return GemmConfig(bm, bn, bk, st, w, **kw)


TILES = [C(128, 256, 64, 4, 8, epilogue_split=4), C(128, 256, 64, 3, 8, epilogue_split=2),
         C(128, 256, 64, 4, 8, epilogue_split=4, group_m=16),
         C(128, 256, 64, 3, 8, epilogue_split=4, group_m=16)]


def label(c):
    if c is None:
        return "table"
    return (f"{c.block_m}x{c.block_n}x{c.block_k} s{c.num_stages} w{c.num_warps} g{c.group_m} "
            f"e{c.epilogue_split} split{c.split_k}")


def sweep(kind, d_in, d_out, configs):
    p = MAKERS[kind](T, d_in, d_out)()
    a, b, ref, flops = p["a"], p["b"], p["torch"], p["flops"]
    base = gpu_ms(ref)
    want = ref()
    print(f"-- {kind} {d_in}->{d_out}: cuBLAS {base * 1e3:7.1f} us {flops / base / 1e9:5.0f} TF/s",
          flush=True)
    for cfg, det in configs:
        def fn(cfg=cfg, det=det):
            torch.use_deterministic_algorithms(det)
            try:
                return km.gemm(a, b, torch.bfloat16, config=cfg, use_tma=True).c
            finally:
                torch.use_deterministic_algorithms(False)
        try:
            got = fn()
            assert not got.isnan().any()
            err = ((got.float() - want.float()).norm() / want.float().norm()).item()
            ms = gpu_ms(fn)
            name = label(cfg) + (" det" if det else "")
            print(f"   {name:44s} {ms * 1e3:7.1f} us {base / ms:5.3f}x err {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001
            print(f"   {label(cfg):44s} FAILED {type(e).__name__}: {str(e)[:120]}", flush=True)


def variants(splits=(1, 2, 3, 4, 5, 7, 9, 11)):
    t = C(128, 256, 64, 4, 8, epilogue_split=4)
    return [(None, False), (None, True)] + [
        (GemmConfig(**{**t.__dict__, "split_k": sk}), False) for sk in splits]


def main():
    what = sys.argv[1:] or ["fwd", "dw", "lm"]
    if "fwd" in what:
        for d in (768, 1024):
            sweep("fwd", d, d, [(t, False) for t in TILES])
            sweep("dX", d, d, [(t, False) for t in TILES])
    if "dw" in what:
        for d_in, d_out in ((768, 768), (768, 2304), (768, 3072), (3072, 768), (1024, 1024),
                            (1024, 3072), (4096, 1024), (2048, 2048)):
            sweep("dW", d_in, d_out, variants())
    if "lm" in what:
        sweep("fwd", 768, 50304, [(t, False) for t in TILES]
              + [(C(128, 256, 64, 3, 8, epilogue_split=1, group_m=16), False)])


if __name__ == "__main__":
    main()
