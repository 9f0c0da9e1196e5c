"""The ``tritonformer`` command: train, generate, prepare, plot, bench, check.

Errors a user can fix (bad data, paths, flags, checkpoints) print one line and exit with
status 2; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import sys


def _train(a: argparse.Namespace) -> int:
    from .train import TrainConfig, train

    model = {}
    for field in (
        "block_size",
        "n_layer",
        "n_head",
        "d_model",
        "d_ff",
        "vocab_size",
        "dropout",
        "position",
        "activation",
    ):
        value = getattr(a, field)
        if value is not None:
            model[field] = value
    cfg = TrainConfig(
        out_dir=a.out_dir,
        preset=a.preset,
        model=model,
        backend=a.backend,
        data=a.data,
        tokenizer=a.tokenizer,
        data_dtype=a.data_dtype,
        batch_size=a.batch_size,
        grad_accum=a.grad_accum,
        steps=a.steps,
        lr=a.lr,
        warmup=a.warmup,
        weight_decay=a.weight_decay,
        grad_clip=a.grad_clip,
        dtype=a.dtype,
        eval_interval=a.eval_interval,
        eval_iters=a.eval_iters,
        ckpt_interval=a.ckpt_interval,
        keep_checkpoints=a.keep_checkpoints,
        resume=a.resume,
        seed=a.seed,
        log_format=a.log_format,
        sample_tokens=a.sample_tokens,
        progress=not a.no_progress,
        gradient_checkpointing=a.gradient_checkpointing,
        cuda_graphs=a.cuda_graphs,
    )
    result = train(cfg)
    if int(__import__("os").environ.get("RANK", "0")) == 0:
        val = result["val_loss"]
        print(
            f"done: {result['steps']} steps, final train loss {result['final_loss']:.4f}"
            + (f", val loss {val:.4f}" if val is not None else "")
            + f"; metrics and checkpoints in {result['out_dir']}"
        )
    return 0


def _generate(a: argparse.Namespace) -> int:
    import torch

    from . import checkpoint as ckpt
    from .data import get_tokenizer
    from .model import Transformer, TransformerConfig
    from .runtime import default_device

    device = default_device()
    if a.hf:
        model = Transformer.from_pretrained(a.hf)
        tok = get_tokenizer(a.tokenizer or "gpt2")
    else:
        found = ckpt.list_checkpoints(a.run.rstrip("/") + "/checkpoints") or (
            [a.run] if __import__("os").path.isfile(a.run + "/model.safetensors") else []
        )
        if not found:
            raise FileNotFoundError(
                f"no checkpoint in {a.run!r} (give a run directory or "
                "a checkpoint directory, or --hf PATH)"
            )
        conf = ckpt.read_config(found[-1])
        model = Transformer(TransformerConfig(**conf["model"]))
        ckpt.load(found[-1], model, None)
        tok = get_tokenizer(a.tokenizer or conf.get("tokenizer", "byte"))
    model.to(device).eval()
    idx = torch.tensor([tok.encode(a.prompt) or [0]], device=device)
    g = torch.Generator(device=device).manual_seed(a.seed)
    out = model.generate(
        idx,
        a.max_new_tokens,
        temperature=a.temperature,
        top_k=a.top_k,
        top_p=a.top_p,
        eos_token_id=tok.eos_token_id,
        generator=g,
    )
    print(tok.decode(out[0].tolist()))
    return 0


def _prepare(a: argparse.Namespace) -> int:
    from .data import get_tokenizer, text_files, tokenize_files, write_tokens

    tok = get_tokenizer(a.tokenizer)
    tokens = tokenize_files(text_files(a.data), tok)
    write_tokens(a.out, tokens, tok.vocab_size, a.tokenizer)
    print(f"wrote {tokens.size:,} {tokens.dtype} tokens to {a.out} (+ {a.out}.json)")
    return 0


def _plot(a: argparse.Namespace) -> int:
    from .plot import plot_runs

    plot_runs(a.runs, a.out, labels=a.labels)
    print(f"wrote {a.out}")
    return 0


def _bench(a: argparse.Namespace) -> int:
    from .bench.__main__ import main as bench_main

    if a.rest[:1] == ["kernels"]:
        return bench_main(a.rest[1:])
    if a.rest[:1] == ["model"]:
        from .bench.model import main as model_main

        return model_main(a.rest[1:])
    raise ValueError("usage: tritonformer bench kernels [op ...] | tritonformer bench model ...")


def _check(a: argparse.Namespace) -> int:
    from .selfcheck import run_selfcheck

    return run_selfcheck()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="tritonformer", description="A GPT on Triton kernels.")
    p.add_argument("--debug", action="store_true", help="show tracebacks for errors")
    sub = p.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="train a model (no flags: a complete run for this machine)")
    t.set_defaults(fn=_train)
    t.add_argument("--out-dir", default="runs/default", help="metrics and checkpoints go here")
    t.add_argument(
        "--preset",
        help="model preset (tiny, gpt2, gpt2-medium, 410m, 840m, 1.4b); "
        "default tiny on CPU, gpt2 on GPU",
    )
    for name, typ in (
        ("block-size", int),
        ("n-layer", int),
        ("n-head", int),
        ("d-model", int),
        ("d-ff", int),
        ("vocab-size", int),
        ("dropout", float),
    ):
        t.add_argument(
            f"--{name}",
            type=typ,
            dest=name.replace("-", "_"),
            help="override the preset's " + name.replace("-", "_"),
        )
    t.add_argument("--position", choices=["learned", "alibi"])
    t.add_argument("--activation", choices=["gelu_tanh", "gelu", "relu"])
    t.add_argument("--backend", default="triton", choices=["triton", "torch"])
    t.add_argument(
        "--data",
        default="stdlib",
        help="'stdlib' (the Python standard library's sources), a text file or "
        "directory, or a token .bin file",
    )
    t.add_argument("--tokenizer", default="byte", help="byte, gpt2 (tiktoken) or tokenizer.json")
    t.add_argument(
        "--data-dtype",
        choices=["uint16", "uint32"],
        help="dtype of a token .bin file (default: its .json sidecar's, else uint16)",
    )
    t.add_argument("--batch-size", type=int, help="sequences per micro-batch per process")
    t.add_argument("--grad-accum", type=int, default=1)
    t.add_argument("--steps", type=int)
    t.add_argument("--lr", type=float)
    t.add_argument("--warmup", type=int)
    t.add_argument("--weight-decay", type=float, default=0.1)
    t.add_argument("--grad-clip", type=float, default=1.0)
    t.add_argument(
        "--dtype",
        choices=["bf16", "fp16", "fp32"],
        help="default bf16 on GPU (fp16 uses a GradScaler), fp32 on CPU",
    )
    t.add_argument("--eval-interval", type=int)
    t.add_argument("--eval-iters", type=int, help="batches per eval (default 20 GPU, 4 CPU)")
    t.add_argument("--ckpt-interval", type=int)
    t.add_argument("--keep-checkpoints", type=int, default=2)
    t.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    t.add_argument("--seed", type=int, default=1337)
    t.add_argument("--log-format", default="jsonl", choices=["jsonl", "csv"])
    t.add_argument("--sample-tokens", type=int, default=200, help="sample this many at the end")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--gradient-checkpointing", action="store_true")
    t.add_argument("--cuda-graphs", action="store_true",
                   help="replay each step's forward and backward from CUDA graphs (one GPU, "
                        "dropout 0): no per-kernel launch cost on the CPU")

    g = sub.add_parser("generate", help="generate text from a trained run or a GPT-2 checkpoint")
    g.set_defaults(fn=_generate)
    src = g.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", help="a run directory (its latest checkpoint) or checkpoint dir")
    src.add_argument("--hf", help="a local Hugging Face GPT-2 checkpoint directory")
    g.add_argument("--tokenizer", help="default: the run's tokenizer, or gpt2 for --hf")
    g.add_argument("--prompt", default="\n")
    g.add_argument("--max-new-tokens", type=int, default=200)
    g.add_argument("--temperature", type=float, default=0.8)
    g.add_argument("--top-k", type=int, default=50)
    g.add_argument("--top-p", type=float)
    g.add_argument("--seed", type=int, default=0)

    r = sub.add_parser("prepare", help="tokenise a corpus once into a token .bin file")
    r.set_defaults(fn=_prepare)
    r.add_argument("--data", default="stdlib")
    r.add_argument("--tokenizer", default="byte")
    r.add_argument("--out", required=True, help="output .bin path")

    pl = sub.add_parser("plot", help="draw loss curves of one or more runs to a PNG")
    pl.set_defaults(fn=_plot)
    pl.add_argument("runs", nargs="+", help="run directories (or metrics files)")
    pl.add_argument("--out", default="loss.png")
    pl.add_argument("--labels", nargs="*")

    b = sub.add_parser("bench", help="benchmarks (GPU): 'kernels [op ...]' or 'model'")
    b.set_defaults(fn=_bench)
    b.add_argument("rest", nargs=argparse.REMAINDER)

    c = sub.add_parser("check", help="run every kernel once against its PyTorch reference")
    c.set_defaults(fn=_check)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.debug:
        return args.fn(args)
    try:
        return args.fn(args)
    except (ValueError, TypeError, OSError, RuntimeError) as e:
        print(f"tritonformer {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
