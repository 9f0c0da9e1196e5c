"""Kernel time of one training step of the model benchmark, per kernel, for each provider.

Runs ``tritonformer.bench.model``'s step (forward + backward under autocast) a few times,
then profiles two steps with torch.profiler and prints, per provider, the sum of the CUDA
kernels' times per step and the kernels that took the most of it (name, calls per step,
time per step). The sum is GPU work only: host gaps are not in it, so it compares the kernels
of two providers even where the launched step is host-bound.

Usage: PYTHONPATH=. python scripts/profile_step.py [--config gpt2:1024:16]
       [--providers torch.compile tritonformer] [--top 30]
"""

from __future__ import annotations

import argparse
import functools

import torch
from torch.profiler import ProfilerActivity, profile

from tritonformer.bench.model import ALL_PROVIDERS, _model, _train_step
from tritonformer.model import TransformerConfig

STEPS = 2


def kernel_times(provider: str, preset: str, T: int, B: int) -> dict[str, tuple[float, float]]:
    """{kernel name: (us per step, calls per step)} of one bf16 training step."""
    cfg = TransformerConfig.preset(preset, block_size=max(T, 1024))
    model = _model(provider, cfg)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    step = functools.partial(_train_step, model, idx, torch.bfloat16, None)
    for _ in range(3):  # compile, autotune, warm the caches
        step()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(STEPS):
            step()
        torch.cuda.synchronize()
    times: dict[str, tuple[float, float]] = {}
    for e in prof.events():
        if e.device_type == torch.autograd.DeviceType.CUDA:
            t, n = times.get(e.name, (0.0, 0.0))
            times[e.name] = (t + e.device_time_total / STEPS, n + 1 / STEPS)
    del model
    torch._dynamo.reset()
    return times


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--config", default="gpt2:1024:16", help="preset:seq_len:batch")
    p.add_argument("--providers", nargs="*", choices=ALL_PROVIDERS,
                   default=["torch.compile", "tritonformer"])
    p.add_argument("--top", type=int, default=30, help="kernels listed per provider")
    args = p.parse_args()
    preset, T, B = args.config.split(":")
    for provider in args.providers:
        times = kernel_times(provider, preset, int(T), int(B))
        total = sum(t for t, _ in times.values())
        calls = sum(n for _, n in times.values())
        print(f"== {provider} {args.config}: kernel time per step {total / 1e3:.2f} ms, "
              f"{calls:.0f} kernels")
        for name, (t, n) in sorted(times.items(), key=lambda kv: -kv[1][0])[: args.top]:
            print(f"   {t / 1e3:7.3f} ms  x{n:5.0f}  {name[:110]}")


if __name__ == "__main__":
    main()
