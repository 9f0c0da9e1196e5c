"""Tune and benchmark the GEMM kernels on the GPU (one device call; see gpu_matmul.sh).

    python scripts/tune_matmul.py warm I N     compile the sweep's and the benchmark's
                                               kernels (rows I, I+N, ...; run N in parallel)
    python scripts/tune_matmul.py tune CSV     sweep candidate configs per table class
                                               against cuBLAS, put the winners in the tables
                                               (in this process), then run the benchmark
                                               with them: ratio table, CSV rows

Each sweep row checks its result against torch before it is timed, so a
config that computes garbage cannot win. Copy the printed winners into
``tritonformer/kernels/matmul.py``'s tables.
"""

from __future__ import annotations

import math
import sys
import time
from collections.abc import Callable

import torch
import triton

from tritonformer.bench import matmul as bench
from tritonformer.bench.harness import append_csv
from tritonformer.kernels import matmul as km
from tritonformer.kernels.matmul import GemmConfig

T = 16384


def rn(*shape: int, dtype=torch.bfloat16, scale: float = 1.0) -> torch.Tensor:
    return (torch.randn(*shape, device="cuda") * scale).to(dtype)


def C(bm, bn, bk, st, w, **kw) -> GemmConfig:
    return GemmConfig(bm, bn, bk, st, w, **kw)


# Problem: (name, table key, make() -> dict of gemm arguments + "torch" baseline fn + checks).
def linear_fwd(t, d_in, d_out, act=None, save_z=False):
    def make():
        x, w, bias = rn(t, d_in), rn(d_out, d_in, scale=d_in**-0.5), rn(d_out)
        f = torch.nn.functional

        def ref():
            if act is None:
                return f.linear(x, w)
            return f.gelu(f.linear(x, w, bias), approximate="tanh")
        return dict(a=x, b=w.t(), bias=None if act is None else bias, activation_name=act,
                    save_z=save_z, torch=ref, flops=2.0 * t * d_in * d_out)
    return make


def dx(t, d_in, d_out):
    def make():
        dy, w = rn(t, d_out), rn(d_out, d_in, scale=d_out**-0.5)
        return dict(a=dy, b=w, torch=lambda: dy @ w, flops=2.0 * t * d_in * d_out)
    return make


def dw(t, d_in, d_out):
    def make():
        dy, x = rn(t, d_out, scale=0.1), rn(t, d_in)
        return dict(a=dy.t(), b=x, torch=lambda: dy.t() @ x, flops=2.0 * t * d_in * d_out)
    return make


def square(n, dtype=torch.bfloat16):
    def make():
        a, b = rn(n, n, dtype=dtype), rn(n, n, dtype=dtype, scale=n**-0.5)
        return dict(a=a, b=b, torch=lambda: a @ b, flops=2.0 * n**3)
    return make


PROBLEMS: list[tuple[str, tuple[str, str], Callable[[], dict]]] = [
    ("fwd qkv d768", ("16bit", "plain"), linear_fwd(T, 768, 2304)),
    ("fwd proj d768", ("16bit", "plain"), linear_fwd(T, 3072, 768)),
    ("fwd lm_head", ("16bit", "plain"), linear_fwd(T, 768, 50304)),
    ("dX qkv d768", ("16bit", "plain"), dx(T, 768, 2304)),
    ("square 8192", ("16bit", "plain"), square(8192)),
    ("dW attn d768", ("16bit", "plain"), dw(T, 768, 768)),
    ("dW qkv d768", ("16bit", "plain"), dw(T, 768, 2304)),
    ("dW fc d768", ("16bit", "plain"), dw(T, 768, 3072)),
    ("dW proj d768", ("16bit", "plain"), dw(T, 3072, 768)),
    ("dW attn d1024", ("16bit", "plain"), dw(T, 1024, 1024)),
    ("dW attn d2048", ("16bit", "plain"), dw(T, 2048, 2048)),
    ("fwd fc+gelu+z", ("16bit", "epilogue"), linear_fwd(T, 768, 3072, "gelu_tanh", True)),
    ("fwd fc+gelu", ("16bit", "epilogue"), linear_fwd(T, 768, 3072, "gelu_tanh")),
    ("tf32 square 4096", ("tf32", "plain"), square(4096, torch.float32)),
]
CANDIDATES = {
    ("16bit", "plain"): [C(128, 256, 64, 3, 8, epilogue_split=2),
                         C(128, 256, 64, 4, 8, epilogue_split=4),
                         C(128, 256, 64, 3, 8, epilogue_split=2, group_m=16),
                         C(256, 128, 64, 3, 8, epilogue_split=2)],
    ("16bit", "epilogue"): [C(128, 256, 64, 3, 8, epilogue_split=2),
                            C(128, 256, 64, 3, 8, epilogue_split=4),
                            C(128, 256, 64, 4, 8, epilogue_split=4),
                            C(128, 128, 64, 4, 8)],
    ("tf32", "plain"): [C(128, 128, 32, 3, 8, epilogue_split=2), C(128, 128, 32, 4, 4),
                        C(128, 256, 32, 3, 8, epilogue_split=2)],
}
SPLITS = {"dW attn d768": [2, 4, 7, 10], "dW qkv d768": [1, 2, 3, 5], "dW fc d768": [1, 2, 3],
          "dW proj d768": [1, 2, 3], "dW attn d1024": [1, 2, 4], "dW attn d2048": [1, 2]}


def rows():
    """(problem, key, make, label, config or None for the table's, use_tma)."""
    for name, key, make in PROBLEMS:
        yield name, key, make, "table", None, None
        for cfg in CANDIDATES[key]:
            yield name, key, make, f"cand {cfg_label(cfg)}", cfg, True
        base = CANDIDATES[key][0]
        for s in SPLITS.get(name, []):
            forced = GemmConfig(**{**base.__dict__, "split_k": s})
            yield name, key, make, f"split_k={s}", forced, True
        if name == "square 8192":
            yield name, key, make, "portable table", None, False


def cfg_label(c: GemmConfig) -> str:
    return (f"{c.block_m}x{c.block_n}x{c.block_k} s{c.num_stages} w{c.num_warps} "
            f"g{c.group_m} e{c.epilogue_split}")


def call(p: dict, cfg: GemmConfig | None, use_tma: bool | None) -> km.GemmResult:
    return km.gemm(p["a"], p["b"], p["b"].dtype, bias=p.get("bias"),
                   activation_name=p.get("activation_name"), save_z=p.get("save_z", False),
                   config=cfg, use_tma=use_tma)


def rel(x: torch.Tensor, y: torch.Tensor) -> float:
    return ((x.float() - y.float()).norm() / y.float().norm().clamp_min(1e-30)).item()


def check(p: dict, r: km.GemmResult) -> float:
    """Relative error of the result against torch."""
    return rel(r.c, p["torch"]())


def tf32_for(key) -> None:
    torch.backends.cuda.matmul.allow_tf32 = key[0] == "tf32"


def warm(i: int, n: int) -> None:
    made = {}
    for j, (name, key, make, label, cfg, use_tma) in enumerate(rows()):
        if j % n == i:
            tf32_for(key)
            p = made.setdefault(name, make())
            try:
                call(p, cfg, use_tma)
            except Exception as e:  # noqa: BLE001  (reported; the sweep reports it again)
                print(f"warm {name} {label}: {type(e).__name__}: {str(e)[:200]}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    for j, (_case, provider, fn, _, _) in enumerate(bench.cases()):
        if j % n == i and provider != "torch":
            fn()
    torch.cuda.synchronize()


def sweep() -> dict:
    """Time every row; returns {(problem, label): (ms, ratio to torch, err)}."""
    res, made = {}, {}
    for name, key, make, label, cfg, use_tma in rows():
        tf32_for(key)
        if name not in made:
            made.clear()
            torch.cuda.empty_cache()
            made[name] = make()
            p = made[name]
            ms = triton.testing.do_bench(p["torch"], warmup=25, rep=100, return_mode="median")
            res[name, "torch"] = (ms, 1.0, 0.0)
            base = ms
            print(f"{name:>18} {'torch (cuBLAS)':<44} {ms:8.4f} ms {p['flops'] / ms / 1e9:6.1f}"
                  " TF/s", flush=True)
        p = made[name]
        try:
            err = check(p, call(p, cfg, use_tma))
            ms = triton.testing.do_bench(lambda p=p, c=cfg, u=use_tma: call(p, c, u),
                                         warmup=25, rep=100, return_mode="median")
            res[name, label] = (ms, base / ms, err)
            print(f"{name:>18} {label:<44} {ms:8.4f} ms {p['flops'] / ms / 1e9:6.1f} TF/s "
                  f"{base / ms:5.3f}x err {err:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001  (a config that fails is reported, not fatal)
            print(f"{name:>18} {label:<44} FAILED {type(e).__name__}: {str(e)[:150]}", flush=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    return res


def choose(res: dict) -> None:
    """Per table key: the candidate with the best geometric-mean ratio over its problems
    (errors under 2e-2 on all of them), if it beats the table's entry; set it in the table."""
    print("\nwinners (geometric mean of ratio to cuBLAS over the class's problems):")
    for key, cands in CANDIDATES.items():
        names = [n for n, k, _ in PROBLEMS if k == key]
        scores = {}
        for label in ["table"] + [f"cand {cfg_label(c)}" for c in cands]:
            got = [res.get((n, label)) for n in names]
            if all(g is not None and g[2] < 2e-2 for g in got):
                scores[label] = math.exp(sum(math.log(g[1]) for g in got) / len(got))
        for label, score in sorted(scores.items(), key=lambda kv: -kv[1]):
            print(f"  {key}: {label:<48} {score:5.3f}")
        best = max(scores, key=scores.get, default="table")
        if best != "table":
            cfg = next(c for c in cands if f"cand {cfg_label(c)}" == best)
            km.TMA_CONFIGS[key] = cfg
        print(f"  -> TMA_CONFIGS[{key}] = {km.TMA_CONFIGS[key]}")


def report_kernels() -> None:
    """Resources of every compiled GEMM kernel: shared memory, registers, spills, and whether
    the PTX has wgmma (Hopper tensor cores) and TMA copies."""
    keys = ["A_T", "B_T", "ACTIVATION", "SAVE_Z", "SPLIT_K",
            "ROUND_TF32", "BM", "BN", "BK", "EPI_SPLIT"]
    print("\nkernel: constexprs | stages warps | smem KB regs spills | wgmma tma-ops")
    for fn in (km.gemm_tma_kernel, km.gemm_kernel):
        for kernel_cache, *_ in fn.device_caches.values():
            for k in kernel_cache.values():
                const = {fn.arg_names[i[0]]: v for i, v in k.src.constants.items()
                         if len(i) == 1}
                label = " ".join(f"{n}={const[n]}" for n in keys if n in const)
                ptx = k.asm.get("ptx", "")
                print(f"{fn.__name__[:8]:8} {label:<100} | {k.metadata.num_stages} "
                      f"{k.metadata.num_warps} | {k.metadata.shared / 1024:5.1f} "
                      f"{getattr(k, 'n_regs', '?')} {getattr(k, 'n_spills', '?')} | "
                      f"{ptx.count('wgmma.mma_async')} {ptx.count('cp.async.bulk.tensor')}")


def tune(csv: str) -> None:
    t0 = time.time()
    res = sweep()
    print(f"\nsweep took {time.time() - t0:.0f} s")
    choose(res)
    t0 = time.time()
    results = bench.run()
    append_csv(results, csv)
    print(f"\nbenchmark took {time.time() - t0:.0f} s; ratio = ours / cuBLAS (TFLOP/s)")
    print(f"{'case':>44} {'ours':>7} {'cuBLAS':>7} {'ratio':>6}")
    for case, ours, ref, ratio in bench.ratios(results):
        print(f"{case:>44} {ours:7.1f} {ref:7.1f} {ratio:6.3f}")
    for case in {r.case for r in results if r.provider == "torch.compile"}:
        m = {r.provider: r.metric for r in results if r.case == case}
        print(f"{case:>44} torch.compile {m['torch.compile']:7.1f} TFLOP/s")
    report_kernels()


if __name__ == "__main__":
    if sys.argv[1] == "warm":
        warm(int(sys.argv[2]), int(sys.argv[3]))
    elif sys.argv[1] == "tune":
        tune(sys.argv[2])
    else:
        raise SystemExit(__doc__)
