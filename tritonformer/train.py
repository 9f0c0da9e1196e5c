"""The training loop: AdamW, warmup + cosine, AMP, accumulation, eval, checkpoints, DDP.

``train(TrainConfig(...))`` runs one job; the ``tritonformer train`` command builds the
config from its flags. Under ``torchrun`` (WORLD_SIZE > 1) it runs DistributedDataParallel
(NCCL on GPUs, gloo on CPUs), every rank drawing its slice of the same global batch; only
rank 0 logs and writes.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from contextlib import nullcontext

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from . import checkpoint as ckpt
from .data import BatchLoader, get_tokenizer, load_corpus
from .model import Transformer, TransformerConfig
from .runtime import INTERPRET, default_device, no_value_checks

#: Dense bf16/fp16 tensor-core peak by GPU name, for MFU.
PEAK_FLOPS = {"H100": 989e12, "H200": 989e12, "A100": 312e12}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclasses.dataclass
class TrainConfig:
    """One training run. Fields left None get a default for the machine (see ``resolve``)."""

    out_dir: str = "runs/default"
    preset: str | None = None  # model preset; None: "tiny" on CPU, "gpt2" on GPU
    model: dict = dataclasses.field(default_factory=dict)  # TransformerConfig overrides
    backend: str = "triton"
    data: str = "stdlib"  # "stdlib", a text file or directory, or a token .bin file
    tokenizer: str = "byte"
    data_dtype: str | None = None  # uint16 | uint32 for token files; default: the sidecar's
    batch_size: int | None = None  # sequences per micro-batch per rank
    grad_accum: int = 1
    steps: int | None = None
    lr: float | None = None
    min_lr: float | None = None  # default lr / 10
    warmup: int | None = None  # default steps / 20
    weight_decay: float = 0.1
    beta2: float = 0.95
    grad_clip: float = 1.0
    dtype: str | None = None  # bf16 | fp16 | fp32; default bf16 on GPU, fp32 on CPU
    eval_interval: int | None = None
    eval_iters: int | None = None  # default 20 on GPU, 4 on CPU
    ckpt_interval: int | None = None  # default eval_interval
    keep_checkpoints: int = 2
    resume: bool = False
    seed: int = 1337
    log_format: str = "jsonl"  # jsonl | csv
    sample_tokens: int = 0  # tokens generated at the end (printed and logged)
    progress: bool = True
    gradient_checkpointing: bool = False
    cuda_graphs: bool = False  # replay each step's forward/backward from CUDA graphs

    def resolve(self, on_gpu: bool) -> TrainConfig:
        """Fill the machine-dependent defaults: a ~3 minute tiny run on CPU, GPT-2 on GPU."""
        c = dataclasses.replace(self)
        c.preset = c.preset or ("gpt2" if on_gpu else "tiny")
        c.dtype = c.dtype or ("bf16" if on_gpu else "fp32")
        c.batch_size = c.batch_size or (16 if on_gpu else 4)
        c.steps = c.steps or (2000 if on_gpu else 50)
        c.eval_iters = c.eval_iters or (20 if on_gpu else 4)
        c.lr = c.lr or (6e-4 if on_gpu else 3e-3)
        c.min_lr = c.lr / 10 if c.min_lr is None else c.min_lr
        c.warmup = max(1, c.steps // 20) if c.warmup is None else c.warmup
        c.eval_interval = c.eval_interval or max(1, c.steps // 4)
        c.ckpt_interval = c.ckpt_interval or c.eval_interval
        if c.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {c.dtype!r}")
        if c.log_format not in ("jsonl", "csv"):
            raise ValueError(f"log format must be 'jsonl' or 'csv', got {c.log_format!r}")
        for name in (
            "batch_size",
            "grad_accum",
            "steps",
            "eval_interval",
            "ckpt_interval",
            "eval_iters",
            "keep_checkpoints",
        ):
            if getattr(c, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(c, name)}")
        if not on_gpu and INTERPRET and c.backend == "triton" and c.dtype == "bf16":
            raise ValueError(
                "bf16 needs a GPU (Triton's interpreter mis-computes bf16 dots); "
                "use --dtype fp32 or fp16 on CPU"
            )
        return c


class GraphedStep:
    """A training micro-step of ``model`` -- forward, loss, backward -- captured once in one
    CUDA graph and replayed on every call: the CPU no longer launches the ~1000 kernels of a
    step one by one.

    ``step(idx, targets)`` copies the batch, (batch_size, seq_len) int64 on the model's CUDA
    device with valid ids (no value checks run inside a graph; a bad target gives a NaN
    loss), into the graph's inputs, replays it and returns the loss: a tensor the graph owns,
    overwritten by the next call. The backward of ``scale(loss)`` (e.g. a GradScaler's
    ``scale``, a division for gradient accumulation; captured, so it must compute on device
    tensors only) goes to the parameters' ``.grad``, tensors that belong to the graph:

    - ``accumulate=True`` (micro-steps summed before an optimizer step): *added* into
      ``.grad``, allocated once here; zero them in place
      (``optimizer.zero_grad(set_to_none=False)``), never set them to None.
    - ``accumulate=False`` (one micro-step per optimizer step): *written* to ``.grad``, as a
      backward into gradients set to None does, with no zeroing and no add (a step's
      gradients each one pass over memory, not three, and no second copy: about 4 bytes per
      parameter less at the peak). Each call sets ``.grad`` to the graph's tensors again, so
      ``zero_grad(set_to_none=True)`` between calls is fine.

    Autocast (``dtype``) is applied inside the graph. Dropout must be 0 (a replay would
    repeat one random mask), the model on one CUDA device.
    """

    def __init__(self, model: Transformer, batch_size: int, seq_len: int,
                 dtype: torch.dtype | None, scale=lambda loss: loss, warmup: int = 3,
                 accumulate: bool = True) -> None:
        if model.config.dropout != 0.0:
            raise ValueError(f"CUDA graphs need dropout=0 (a replay repeats the captured "
                             f"random mask), got dropout={model.config.dropout}")
        device = next(model.parameters()).device
        if device.type != "cuda":
            raise ValueError(f"CUDA graphs need the model on a CUDA device, got {device}")
        self.idx = torch.randint(0, model.config.vocab_size, (batch_size, seq_len),
                                 device=device)
        self.targets = self.idx.clone()
        params = [p for p in model.parameters() if p.requires_grad]
        self.accumulate = accumulate
        ctx = (torch.autocast("cuda", dtype=dtype, cache_enabled=False) if dtype is not None
               else nullcontext())

        def run() -> torch.Tensor:
            with ctx, no_value_checks():
                loss = model(self.idx, self.targets)[1]
            scale(loss).backward()
            return loss.detach()

        # warm-up (allocator, compiled kernels) and capture on one side stream, as autograd
        # keeps the stream its gradient-accumulation nodes first ran on
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            for _ in range(warmup):
                for p in params:  # no warm-up adds into the last one's gradients: that would
                    p.grad = None  # hold two copies at once, a peak a step never has
                run()
        torch.cuda.current_stream().wait_stream(side)
        for p in params:  # added into zeros, or (set to None) the backward's own tensors
            p.grad = torch.zeros_like(p) if accumulate else None
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph, stream=side):
            self.loss = run()
        self.params, self.grads = params, [p.grad for p in params]
        if accumulate:
            torch._foreach_zero_(self.grads)  # capturing ran nothing, to be sure

    def __call__(self, idx: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
        self.idx.copy_(idx)
        self.targets.copy_(targets)
        if not self.accumulate:
            for p, g in zip(self.params, self.grads, strict=True):
                p.grad = g
        self.graph.replay()
        return self.loss


def lr_at(step: int, c: TrainConfig) -> float:
    """Linear warmup to lr, then cosine decay to min_lr at the last step."""
    if step < c.warmup:
        return c.lr * (step + 1) / c.warmup
    t = (step - c.warmup) / max(1, c.steps - c.warmup)
    return c.min_lr + 0.5 * (c.lr - c.min_lr) * (1 + math.cos(math.pi * min(1.0, t)))


class MetricsLog:
    """Append-only metrics file (JSON lines or CSV) in the run directory."""

    FIELDS = ["step", "loss", "val_loss", "lr", "tokens", "tokens_per_s", "mfu", "time_s"]

    def __init__(self, out_dir: str, fmt: str, truncate_after: int | None) -> None:
        self.path = os.path.join(out_dir, f"metrics.{fmt}")
        self.fmt = fmt
        if truncate_after is not None and os.path.exists(self.path):
            kept = [r for r in read_metrics(self.path) if r["step"] <= truncate_after]
            with open(self.path, "w") as f:
                if fmt == "csv":
                    f.write(",".join(self.FIELDS) + "\n")
            for r in kept:
                self.write(r)
        elif truncate_after is None:
            with open(self.path, "w") as f:
                if fmt == "csv":
                    f.write(",".join(self.FIELDS) + "\n")

    def write(self, row: dict) -> None:
        with open(self.path, "a") as f:
            if self.fmt == "jsonl":
                f.write(
                    json.dumps({k: row[k] for k in self.FIELDS if row.get(k) is not None}) + "\n"
                )
            else:
                f.write(
                    ",".join("" if row.get(k) is None else str(row[k]) for k in self.FIELDS) + "\n"
                )


def read_metrics(path: str) -> list[dict]:
    """Rows of a metrics.jsonl or metrics.csv file (numbers as floats, step as int)."""
    rows = []
    with open(path) as f:
        if path.endswith(".csv"):
            header = f.readline().strip().split(",")
            for line in f:
                vals = line.rstrip("\n").split(",")
                rows.append({k: float(v) for k, v in zip(header, vals, strict=True) if v != ""})
        else:
            rows = [json.loads(line) for line in f if line.strip()]
    for r in rows:
        r["step"] = int(r["step"])
    return rows


def _setup_distributed() -> tuple[int, int, torch.device]:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return 0, 1, default_device()
    on_gpu = torch.cuda.is_available()
    dist.init_process_group("nccl" if on_gpu else "gloo")
    rank = dist.get_rank()
    if on_gpu:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        torch.cuda.set_device(local)
        return rank, world, torch.device("cuda", local)
    return rank, world, torch.device("cpu")


def _rng_state(device: torch.device) -> dict:
    s = {"cpu": torch.get_rng_state()}
    if device.type == "cuda":
        s["cuda"] = torch.cuda.get_rng_state(device)
    return s


def _set_rng_state(s: dict, device: torch.device) -> None:
    torch.set_rng_state(s["cpu"])
    if device.type == "cuda" and "cuda" in s:
        torch.cuda.set_rng_state(s["cuda"], device)


def _peak_flops(device: torch.device, dtype: str) -> float | None:
    if device.type != "cuda" or dtype == "fp32":
        return None
    name = torch.cuda.get_device_name(device)
    return next((v for k, v in PEAK_FLOPS.items() if k in name), None)


def train(config: TrainConfig) -> dict:
    """Run training; returns {"final_loss", "val_loss", "steps", "out_dir", "tokens_per_s"}."""
    rank, world, device = _setup_distributed()
    try:
        return _train(config, rank, world, device)
    finally:
        if world > 1:
            dist.destroy_process_group()


def _train(config: TrainConfig, rank: int, world: int, device: torch.device) -> dict:
    c = config.resolve(device.type == "cuda")
    master = rank == 0
    tok = get_tokenizer(c.tokenizer)
    model_kwargs = {**c.model}
    vocab = model_kwargs.setdefault("vocab_size", tok.vocab_size)
    if vocab < tok.vocab_size:
        raise ValueError(f"vocab_size {vocab} is smaller than the tokenizer's {tok.vocab_size}")
    mcfg = TransformerConfig.preset(c.preset, **model_kwargs)
    train_tokens, val_tokens = load_corpus(c.data, tok, mcfg.vocab_size, c.data_dtype)

    if master:
        os.makedirs(c.out_dir, exist_ok=True)
        if not os.access(c.out_dir, os.W_OK):
            raise PermissionError(f"output directory {c.out_dir!r} is not writable")
    ckpt_root = os.path.join(c.out_dir, "checkpoints")

    torch.manual_seed(c.seed)
    model = Transformer(mcfg, backend=c.backend).to(device)
    model.gradient_checkpointing = c.gradient_checkpointing
    opt = model.configure_optimizers(c.weight_decay, c.lr, (0.9, c.beta2))
    dtype = DTYPES[c.dtype]
    scaler = torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)
    autocast = torch.autocast(device.type, dtype=dtype) if dtype != torch.float32 else nullcontext()
    loader = BatchLoader(train_tokens, c.batch_size, mcfg.block_size, c.seed, rank, world)
    model_config = dataclasses.asdict(mcfg)

    start = 0
    if c.resume:
        if master:
            ckpt.remove_stale(ckpt_root)
        found = ckpt.list_checkpoints(ckpt_root)
        if not found:
            raise FileNotFoundError(f"--resume: no checkpoint under {ckpt_root}")
        state = ckpt.load(found[-1], model, opt, expected_model_config=model_config)
        start = int(state["step"])
        scaler.load_state_dict(state["scaler"])
        loader.set_state(state["loader"])
        _set_rng_state(state["rng"], device)
    log = MetricsLog(c.out_dir, c.log_format, start if c.resume else None) if master else None

    ddp = (
        DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if world > 1
        else model
    )
    graphed = None
    if c.cuda_graphs:
        if world > 1 or device.type != "cuda" or c.gradient_checkpointing:
            raise ValueError(
                "cuda_graphs needs one process on a CUDA device and no gradient checkpointing; "
                f"got {world} process(es) on {device.type}, gradient_checkpointing="
                f"{c.gradient_checkpointing}"
            )
        graphed = GraphedStep(model, c.batch_size, mcfg.block_size,
                              None if dtype == torch.float32 else dtype,
                              lambda loss: scaler.scale(loss / c.grad_accum),
                              accumulate=c.grad_accum > 1)
    tokens_per_step = c.batch_size * c.grad_accum * world * mcfg.block_size
    peak = _peak_flops(device, c.dtype)
    flops_per_token = mcfg.flops_per_token()

    def evaluate() -> float:
        model.eval()
        ev = BatchLoader(val_tokens, c.batch_size, mcfg.block_size, c.seed + 1, rank, world)
        total = torch.zeros((), device=device)
        with torch.no_grad(), autocast, no_value_checks():
            for _ in range(c.eval_iters):
                x, y = ev.next(device)
                total += model(x, y)[1].float()
        if world > 1:
            dist.all_reduce(total)
        model.train()
        return total.item() / (c.eval_iters * world)

    bar = None
    if master and c.progress:
        from tqdm import tqdm

        bar = tqdm(total=c.steps, initial=start, desc="train", dynamic_ncols=True)
    loss_val, val_loss, tps = float("nan"), None, 0.0
    t_last, t0 = time.perf_counter(), time.perf_counter()
    model.train()
    for step in range(start, c.steps):
        lr = lr_at(step, c)
        for g in opt.param_groups:
            g["lr"] = lr
        total = torch.zeros((), device=device)
        for micro in range(c.grad_accum):
            x, y = loader.next(device)
            if graphed is not None:  # forward and backward replayed into the graph's grads
                total += graphed(x, y).float() / c.grad_accum
                continue
            sync = micro == c.grad_accum - 1
            # the corpus was checked once when loaded: no device syncs for value checks
            with ddp.no_sync() if world > 1 and not sync else nullcontext(), autocast, \
                    no_value_checks():
                loss = ddp(x, y)[1] / c.grad_accum
            # on this thread, not autograd's device thread: the Triton ops' Python backwards
            # run 2-3x faster here (docs/perf/layer_norm_softmax.md)
            with torch.autograd.set_multithreading_enabled(False):
                scaler.scale(loss).backward()
            total += loss.detach().float()
        scaler.unscale_(opt)
        torch.nn.utils.clip_grad_norm_(model.parameters(), c.grad_clip)
        scaler.step(opt)
        scaler.update()
        # gradients a graph adds into stay allocated
        opt.zero_grad(set_to_none=graphed is None or not graphed.accumulate)
        if world > 1:
            dist.all_reduce(total)
            total /= world
        loss_val = total.item()
        now = time.perf_counter()
        tps = tokens_per_step / (now - t_last)
        t_last = now
        done = step + 1
        val_loss = evaluate() if done % c.eval_interval == 0 or done == c.steps else None
        if master:
            mfu = flops_per_token * tps / peak if peak else None
            log.write(
                dict(
                    step=done,
                    loss=round(loss_val, 6),
                    val_loss=val_loss,
                    lr=lr,
                    tokens=done * tokens_per_step,
                    tokens_per_s=round(tps, 1),
                    mfu=None if mfu is None else round(mfu, 4),
                    time_s=round(now - t0, 3),
                )
            )
            if bar is not None:
                post = {"loss": f"{loss_val:.4f}", "tok/s": f"{tps:,.0f}"}
                if mfu is not None:
                    post["mfu"] = f"{100 * mfu:.1f}%"
                if val_loss is not None:
                    post["val"] = f"{val_loss:.4f}"
                bar.set_postfix(post)
                bar.update(1)
        if done % c.ckpt_interval == 0 or done == c.steps:
            if master:
                state = dict(
                    step=done,
                    scaler=scaler.state_dict(),
                    loader=loader.state(),
                    rng=_rng_state(device),
                )
                ckpt.save(
                    ckpt_root,
                    done,
                    model,
                    opt,
                    state,
                    {
                        "model": model_config,
                        "train": dataclasses.asdict(c),
                        "tokenizer": c.tokenizer,
                    },
                    keep=c.keep_checkpoints,
                )
            if world > 1:
                dist.barrier()
    if bar is not None:
        bar.close()
    if master and c.sample_tokens > 0:
        prompt = torch.tensor([tok.encode("def ")], device=device)
        with autocast:
            out = model.generate(
                prompt,
                min(c.sample_tokens, mcfg.block_size - prompt.shape[1]),
                temperature=0.8,
                top_k=50,
            )
        print("--- sample ---\n" + tok.decode(out[0].tolist()) + "\n--------------")
    return dict(
        final_loss=loss_val, val_loss=val_loss, steps=c.steps, out_dir=c.out_dir, tokens_per_s=tps
    )
