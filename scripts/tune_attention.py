#!/usr/bin/env python3
"""Flash attention on the GPU in one call: tests, a tuning sweep, the benchmark.

    python3 scripts/tune_attention.py [--out DIR] [--no-tests] [--no-sweep]

1. In parallel: the attention tests (both tiers) on the GPU, sharded over processes, and the
   compilation of every sweep variant, each checked against SDPA at a small size.
2. Alone on the GPU: each variant timed (bf16, causal, D 64 and 128, S 1k, 2k and 8k,
   B * S = 16384 tokens, H = 2048 / D); the fastest per head dim is printed as CONFIGS rows.
3. The benchmark (tritonformer.bench.attention) with those picks; its summary table last.
Logs and the results CSV go to --out ($OUT, else ./out).
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Sweep variants, per head dim. Forward: (block_m, block_n, warps, stages). dK/dV:
# (block_m, block_n, warps, stages, dq_atomic). dQ: (block_m, block_n, warps, stages).
# Pruned offline: each compiles for sm_90 within shared memory and spills at most a little.
_FWD64 = [(128, 64, 4, 3), (128, 64, 4, 2), (64, 64, 4, 3), (64, 64, 4, 2), (128, 32, 4, 3),
          (64, 32, 4, 3), (128, 64, 8, 3)]
_FWD128 = [(64, 64, 4, 3), (64, 64, 4, 2), (64, 64, 4, 4), (64, 32, 4, 3), (128, 64, 8, 3),
           (128, 128, 8, 2)]
VARIANTS = {
    64: {
        "fwd": _FWD64,
        "dkdv": [(64, 64, 4, 2, True), (64, 64, 4, 1, True), (64, 64, 4, 3, True),
                 (32, 64, 4, 2, True), (128, 64, 8, 2, True), (64, 128, 8, 2, True),
                 (64, 64, 4, 2, False)],
        "dq": [(64, 64, 4, 2), (128, 32, 4, 3), (64, 32, 4, 3), (64, 64, 4, 3)],
    },
    128: {
        "fwd": _FWD128,
        "dkdv": [(64, 64, 4, 2, False), (64, 64, 4, 2, True), (64, 64, 4, 1, True),
                 (64, 64, 4, 3, False), (32, 64, 4, 2, False), (64, 128, 8, 2, False),
                 (64, 128, 8, 2, True)],
        "dq": [(128, 64, 8, 3), (128, 64, 8, 2), (64, 64, 4, 2), (128, 64, 8, 4), (64, 32, 4, 3)],
    },
}
SWEEP_SEQ = (1024, 2048, 8192)


def log(msg: str) -> None:
    print(msg, flush=True)


def set_config(d: int, fwd=None, dkdv=None, dq=None) -> None:
    """Replace parts of the CONFIGS entries (both masks) of bf16/fp16 at head dim d."""
    from tritonformer.kernels import attention as ka

    for causal in (True, False):
        key = (d, "16-bit", causal)
        f, b = ka.CONFIGS[key]
        if fwd is not None:
            f = ka.FwdConfig(*fwd)
        if dkdv is not None:
            b = b._replace(block_m=dkdv[0], block_n=dkdv[1], num_warps=dkdv[2],
                           num_stages=dkdv[3], dq_atomic=dkdv[4])
        if dq is not None:
            b = b._replace(dq_block_m=dq[0], dq_block_n=dq[1], dq_num_warps=dq[2],
                           dq_num_stages=dq[3])
        ka.CONFIGS[key] = (f, b)


def make_inputs(d: int, s: int, batch: int | None = None):
    import torch

    h = 2048 // d
    b = batch if batch is not None else 16384 // s
    q, k, v = (torch.randn(b, h, s, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
               for _ in range(3))
    return q, k, v, torch.randn_like(q)


def warm(jobs: list[tuple]) -> list[tuple]:
    """Compile each (d, kind, variant) job and check it at S=1024, plain (against SDPA FLASH)
    and with ALiBi (against SDPA with the bias as a mask)."""
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from tritonformer import ops, reference

    results = []
    lost = False
    for d, kind, variant in jobs:
        if lost:
            results.append((d, kind, variant, False, "skipped: CUDA context lost"))
            continue
        try:
            set_config(d, **{kind: variant})
            q, k, v, dout = make_inputs(d, 1024, batch=1)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            gref = torch.autograd.grad(ref, (q, k, v), dout)
            slopes = ops.alibi_slopes(q.shape[1])
            bias = reference.alibi_bias(slopes, 1024, 1024).masked_fill(
                torch.ones(1024, 1024, dtype=torch.bool, device="cuda").triu(1), float("-inf"))
            ref_alibi = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                                       attn_mask=bias)
            gref_alibi = torch.autograd.grad(ref_alibi, (q, k, v), dout.float())
            errs = []
            for s, r, g in ((None, ref, gref), (slopes, ref_alibi, gref_alibi)):
                out = ops.attention(q, k, v, causal=True, alibi_slopes=s)
                grads = torch.autograd.grad(out, (q, k, v), dout)
                errs += [((a.float() - b.float()).norm() / b.float().norm()).item()
                         for a, b in zip((out, *grads), (r, *g), strict=True)]
            torch.cuda.synchronize()
            ok = all(math.isfinite(e) and e < 2e-2 for e in errs)
            results.append((d, kind, variant, ok, " ".join(f"{e:.1e}" for e in errs)))
        except Exception as e:  # noqa: BLE001 - a variant that fails is reported, not fatal
            msg = repr(e).splitlines()[0][:300]
            lost = "CUDA" in msg or "illegal" in msg
            results.append((d, kind, variant, False, msg))
    return results


def start_tests(out: str, shards: int) -> list[subprocess.Popen]:
    ids = subprocess.run(
        [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
         "-m", "gpu or not gpu", "tests/test_attention.py"],
        cwd=ROOT, capture_output=True, text=True).stdout.split()
    ids = [i for i in ids if "::" in i]
    procs = []
    for n in range(shards):
        part = ids[n::shards]
        if part:
            f = open(os.path.join(out, f"tests_{n}.log"), "w")
            procs.append(subprocess.Popen(
                [sys.executable, "-m", "pytest", "-q", "-rfE", "-p", "no:cacheprovider",
                 "-m", "gpu or not gpu", *part], cwd=ROOT, stdout=f, stderr=subprocess.STDOUT))
    log(f"tests: {len(ids)} in {len(procs)} shards")
    return procs


def time_variants(d: int, picks: dict) -> dict:
    """Time each variant at SWEEP_SEQ; returns the fastest of each kind (geomean over S)."""
    import torch

    from tritonformer import ops
    from tritonformer.bench.harness import time_ms

    cases = {s: make_inputs(d, s) for s in SWEEP_SEQ}

    def fwd_ms(s):
        q, k, v, _ = cases[s]
        return time_ms(lambda: ops.attention(q, k, v, causal=True), 25, 150)[0]

    def bwd_ms(s):
        q, k, v, dout = cases[s]
        out = ops.attention(q, k, v, causal=True)
        return time_ms(lambda: torch.autograd.grad(out, (q, k, v), dout, retain_graph=True),
                       25, 150)[0]

    def flops(s, phase):
        q = cases[s][0]
        f = 4 * q.shape[0] * q.shape[1] * s * s * d / 2
        return f * (2.5 if phase == "bwd" else 1.0)

    def sweep(kind, variants, timer):
        rows = []
        for variant in variants:
            set_config(d, **{kind: variant})
            try:
                ms = [timer(s) for s in SWEEP_SEQ]
            except Exception as e:  # noqa: BLE001
                log(f"  D{d} {kind} {variant} FAILED {repr(e)[:200]}")
                continue
            phase = "fwd" if kind == "fwd" else "bwd"
            tf = [flops(s, phase) / m / 1e9 for s, m in zip(SWEEP_SEQ, ms, strict=True)]
            rows.append((math.prod(ms) ** (1 / len(ms)), variant, ms, tf))
            cells = zip(SWEEP_SEQ, ms, tf, strict=True)
            log(f"  D{d} {kind:<4} {str(variant):<26} "
                + "  ".join(f"S{s}: {m:7.3f} ms {t:5.0f} TF/s" for s, m, t in cells))
        return rows

    best = {}
    rows = sweep("fwd", picks["fwd"], fwd_ms)
    if rows:
        best["fwd"] = min(rows)
        set_config(d, fwd=best["fwd"][1])
    rows = sweep("dkdv", picks["dkdv"], bwd_ms)
    separate = [r for r in rows if not r[1][4]]
    atomic = [r for r in rows if r[1][4]]
    if separate:  # tune the dQ kernel behind the best separate dK/dV kernel
        best["dkdv"] = min(separate)
        set_config(d, dkdv=best["dkdv"][1])
        dq_rows = sweep("dq", picks["dq"], bwd_ms)
        if dq_rows:
            best["dq"] = min(dq_rows)
            set_config(d, dq=best["dq"][1])
    if atomic and (not separate or min(atomic) < best.get("dq", best["dkdv"])):
        best["dkdv"] = min(atomic)
        best.pop("dq", None)
        set_config(d, dkdv=best["dkdv"][1])
    return best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--out", default=os.environ.get("OUT", "out"))
    p.add_argument("--no-tests", action="store_true")
    p.add_argument("--no-sweep", action="store_true")
    p.add_argument("--test-shards", type=int, default=4)
    p.add_argument("--warm-workers", type=int, default=10)
    p.add_argument("--test-timeout", type=float, default=220.0)
    p.add_argument("--warm-timeout", type=float, default=200.0)
    p.add_argument("--sweep-until", type=float, default=300.0,
                   help="seconds after start past which no further head dim is swept")
    args = p.parse_args()
    os.makedirs(args.out, exist_ok=True)
    t0 = time.time()

    import torch
    import triton

    log(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__}")
    procs = [] if args.no_tests else start_tests(args.out, args.test_shards)

    warm_report = []
    if not args.no_sweep:
        jobs = [(d, kind, v) for d, kinds in VARIANTS.items() for kind, vs in kinds.items()
                for v in vs]
        chunks = [jobs[i::args.warm_workers] for i in range(args.warm_workers)]
        with mp.get_context("spawn").Pool(args.warm_workers) as pool:
            pending = pool.map_async(warm, chunks)
            try:
                for part in pending.get(timeout=args.warm_timeout):
                    warm_report += part
            except mp.TimeoutError:
                log("compile/check workers timed out: sweeping nothing")
            pool.terminate()
        log(f"compiled + checked {len(jobs)} variants in {time.time() - t0:.0f} s")
        for d, kind, v, ok, msg in sorted(warm_report, key=lambda r: (r[0], r[1], r[2])):
            if not ok:
                log(f"  variant D{d} {kind} {v} rejected: {msg}")

    test_lines = []
    for n, proc in enumerate(procs):
        try:
            proc.wait(timeout=max(1.0, args.test_timeout - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            proc.kill()
            test_lines.append(f"shard {n}: killed after the test timeout")
        with open(os.path.join(args.out, f"tests_{n}.log")) as f:
            lines = f.read().splitlines()
        test_lines += [ln for ln in lines if ln.startswith(("FAILED", "ERROR"))][:20]
        test_lines += [f"shard {n}: {lines[-1] if lines else 'no output'}"]
    log(f"tests done at {time.time() - t0:.0f} s")

    picks = {}
    if not args.no_sweep:
        good = {(d, kind, v) for d, kind, v, ok, _ in warm_report if ok}
        for d, kinds in VARIANTS.items():
            if time.time() - t0 > args.sweep_until:
                log(f"no time left to sweep D{d}")
                continue
            ok_kinds = {kind: [v for v in vs if (d, kind, v) in good] for kind, vs in kinds.items()}
            log(f"sweep D{d} (bf16 causal, B*S=16384, H={2048 // d})")
            picks[d] = time_variants(d, ok_kinds)
        log(f"sweep done at {time.time() - t0:.0f} s")

    from tritonformer.bench import attention as bench
    from tritonformer.bench.harness import append_csv

    results = bench.run()
    append_csv(results, os.path.join(args.out, "results.csv"))
    log(f"bench done at {time.time() - t0:.0f} s")

    print("\n===== summary =====")
    print("\n".join(test_lines) or "tests not run")
    for d, best in picks.items():
        for kind, (_, variant, _, tf) in best.items():
            print(f"best D{d} {kind:<4} {str(variant):<26} " + " ".join(f"{t:.0f}" for t in tf)
                  + " TF/s at S=" + ",".join(map(str, SWEEP_SEQ)))
    print(bench.summary(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
