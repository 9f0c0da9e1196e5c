"""Model benchmark: a training step's forward + backward, Tritonformer vs PyTorch eager and
torch.compile of the same model (backend "torch"), in one run on one card.

TFLOP/s use PaLM's convention, per token: 6 * N_matmul + 12 * n_layer * d_model * T
(N_matmul: the parameters of every matmul, the LM head included; T: sequence length).
Writes a markdown table, a JSON file and a bar chart.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import os
import sys

import torch

from ..model import Transformer, TransformerConfig
from ..runtime import no_value_checks
from ..train import GraphedStep
from .harness import GiB, add_backward_thread_option, backward_thread, environment, time_ms

#: (preset, sequence length, batch size)
CONFIGS = [
    ("gpt2", 1024, 16),
    ("410m", 2048, 4),
    ("410m", 4096, 2),
    ("840m", 2048, 2),
    ("1.4b", 2048, 4),
]
# The baselines run first (a provider can leave state behind: caches, compile workers).
# "tritonformer+graphs": the Triton model's forward and backward each replayed from one CUDA
# graph (train.GraphedStep). "tritonformer+compile" (not run by default: --providers): the
# Triton model under torch.compile, its kernels as custom ops (tritonformer/library.py).
PROVIDERS = ("torch", "torch.compile", "tritonformer", "tritonformer+graphs")
ALL_PROVIDERS = (*PROVIDERS, "tritonformer+compile")


def _model(provider: str, cfg: TransformerConfig) -> torch.nn.Module:
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg, backend="torch" if provider.startswith("torch") else "triton")
    if provider.endswith("compile"):
        model = torch.compile(model)
    return model


def _train_step(model: torch.nn.Module, idx: torch.Tensor, dtype: torch.dtype,
                graphed: GraphedStep | None = None) -> None:
    """Forward + backward of one batch under autocast; gradients dropped afterwards (a graph
    writes them, as a backward into gradients set to None does). The value checks' device
    syncs are off, as in the trainer (its data is checked once)."""
    if graphed is not None:
        graphed(idx, idx)
    else:
        with no_value_checks():
            with torch.autocast("cuda", dtype=dtype):
                loss = model(idx, idx)[1]
            loss.backward()
    for p in model.parameters():
        p.grad = None


def bench_config(preset: str, T: int, B: int, dtype: torch.dtype,
                 providers: tuple[str, ...] = PROVIDERS) -> list[dict]:
    cfg = TransformerConfig.preset(preset, block_size=max(T, 1024))
    flops_per_token = cfg.flops_per_token(seq_len=T)
    rows = []
    for provider in providers:
        model = _model(provider, cfg)
        idx = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        # a graph's memory pool is allocated during its capture: the peak counts from there
        graphed = (GraphedStep(model, B, T, dtype, accumulate=False)
                   if provider.endswith("graphs") else None)
        step = functools.partial(_train_step, model, idx, dtype, graphed)
        step()  # compile / autotune outside the timing
        torch.cuda.synchronize()
        if graphed is None:
            torch.cuda.reset_peak_memory_stats()
        step()
        torch.cuda.synchronize()
        peak = torch.cuda.max_memory_allocated() / GiB
        ms, p20, p80 = time_ms(step, warmup_ms=200, rep_ms=1500)
        tflops = flops_per_token * B * T / ms / 1e9
        row = dict(
            config=f"{preset} T={T} B={B}",
            provider=provider,
            dtype=str(dtype)[6:],
            ms=ms,
            ms_p20=p20,
            ms_p80=p80,
            tflops=tflops,
            tokens_per_s=B * T / ms * 1e3,
            peak_gib=peak,
        )
        print(
            f"{row['config']:>22} {provider:>14} {ms:8.2f} ms  {tflops:6.1f} TFLOP/s  "
            f"{row['tokens_per_s']:>10,.0f} tok/s  peak {peak:6.2f} GiB",
            flush=True,
        )
        rows.append(row)
        del model, graphed, step
        gc.collect()
        torch.cuda.empty_cache()
        torch._dynamo.reset()
    return rows


def markdown(rows: list[dict]) -> str:
    head = (
        "| config | provider | ms/step | TFLOP/s | tokens/s | peak GiB | vs eager | "
        "vs compile |\n|---|---|---|---|---|---|---|---|\n"
    )
    by = {(r["config"], r["provider"]): r for r in rows}

    def ratio(r: dict, baseline: str) -> str:  # "-" where --providers left the baseline out
        b = by.get((r["config"], baseline))
        return f"{r['tflops'] / b['tflops']:.2f}x" if b else "-"

    lines = [
        f"| {r['config']} | {r['provider']} | {r['ms']:.2f} | {r['tflops']:.1f} | "
        f"{r['tokens_per_s']:,.0f} | {r['peak_gib']:.2f} | {ratio(r, 'torch')} | "
        f"{ratio(r, 'torch.compile')} |"
        for r in rows
    ]
    return head + "\n".join(lines) + "\n"


def chart(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    configs = list(dict.fromkeys(r["config"] for r in rows))
    fig, ax = plt.subplots(figsize=(10, 4.5))
    providers = list(dict.fromkeys(r["provider"] for r in rows))
    w = 0.8 / len(providers)
    for i, prov in enumerate(providers):
        vals = [
            next((r["tflops"] for r in rows if r["config"] == c and r["provider"] == prov), 0)
            for c in configs
        ]
        ax.bar([x + i * w for x in range(len(configs))], vals, w, label=prov)
    ax.set_xticks(
        [x + w * (len(providers) - 1) / 2 for x in range(len(configs))], configs, rotation=15
    )
    ax.set_ylabel("TFLOP/s (fwd+bwd, PaLM count)")
    ax.set_title(f"Training step throughput, {rows[0]['dtype']} autocast")
    ax.legend()
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tritonformer bench model", description=__doc__)
    p.add_argument("--dtype", default="bf16", choices=["bf16", "fp16"])
    p.add_argument("--configs", nargs="*", help="subset, e.g. 'gpt2:1024:16'")
    p.add_argument("--providers", nargs="*", choices=ALL_PROVIDERS, default=list(PROVIDERS))
    p.add_argument("--out", default="benchmarks/model", help="prefix of .md/.json/.png outputs")
    add_backward_thread_option(p)
    a = p.parse_args(argv)
    if not torch.cuda.is_available():
        print("the model benchmark needs a CUDA device", file=sys.stderr)
        return 2
    configs = (
        [(c.split(":")[0], int(c.split(":")[1]), int(c.split(":")[2])) for c in a.configs]
        if a.configs
        else CONFIGS
    )
    dtype = torch.bfloat16 if a.dtype == "bf16" else torch.float16
    backward_thread(calling=not a.autograd_device_thread)
    env = environment()
    print(env, flush=True)
    rows = [r for c in configs for r in bench_config(*c, dtype, tuple(a.providers))]
    os.makedirs(os.path.dirname(a.out) or ".", exist_ok=True)
    with open(a.out + ".json", "w") as f:
        json.dump({"environment": env, "rows": rows}, f, indent=1)
    table = markdown(rows)
    with open(a.out + ".md", "w") as f:
        f.write(f"{env}\n\n{table}")
    chart(rows, a.out + ".png")
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
