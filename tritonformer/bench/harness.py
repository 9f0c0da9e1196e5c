"""The one benchmark harness: time, memory, the device-copy ceiling, and the results CSV.

Every kernel benchmark (``tritonformer/bench/<op>.py``) builds its cases with ``Bench`` and
returns ``Result`` rows; ``tritonformer.bench.__main__`` runs them, prints a table and
appends the rows to a CSV keyed by GPU name and library versions. Timings are the median
(with 20th/80th percentiles) of many warm runs timed with CUDA events
(``triton.testing.do_bench``); baselines (PyTorch eager, torch.compile) are re-run in the
same process on the same card.

Backward passes run on the calling thread (``backward_thread``), as in the trainer: PyTorch's
default hands the backward of a graph on a CUDA device to autograd's per-device thread, where
the Python backward of a Triton op runs 2-3x slower than on the caller (cold caches, thread
switches; docs/perf/layer_norm_softmax.md), while PyTorch's C++ backward nodes do not care.
``--autograd-device-thread`` keeps PyTorch's default; every row records which was used.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import platform
from collections.abc import Callable
from datetime import datetime, timezone

import torch
import triton

GiB = 1 << 30


@dataclasses.dataclass
class Result:
    """One measured (op, case, provider) row of the results CSV."""

    op: str  # "layer_norm", "cross_entropy", ...
    case: str  # shape and variant, e.g. "16384x4096 fwd+bwd"
    dtype: str
    provider: str  # "tritonformer", "torch", "torch.compile", "device-copy", ...
    ms: float  # median
    ms_p20: float
    ms_p80: float
    metric: float  # GB/s or TFLOP/s at the median
    unit: str
    extra_mem_gib: float  # peak memory beyond the inputs, in GiB (nan if not measured)


def add_backward_thread_option(parser) -> None:
    """The benchmarks' ``--autograd-device-thread`` flag (see ``backward_thread``)."""
    parser.add_argument("--autograd-device-thread", action="store_true",
                        help="run backward passes on autograd's device thread (PyTorch's "
                        "default) instead of the calling thread, as the trainer does")


def backward_thread(calling: bool) -> None:
    """Run this thread's backward passes on itself (``calling``) or on autograd's device
    threads (PyTorch's default)."""
    torch.autograd.set_multithreading_enabled(not calling)


def environment() -> dict[str, str]:
    """The keys every row is stored under: GPU, versions, date, and the thread backward
    passes run on."""
    gpu = torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
    return {
        "gpu": gpu,
        "torch": torch.__version__,
        "triton": triton.__version__,
        "cuda": str(torch.version.cuda),
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M"),
        "backward": "autograd-device-thread" if torch._C._is_multithreading_enabled()
        else "calling-thread",
    }


def time_ms(fn: Callable[[], object], warmup_ms: int = 50, rep_ms: int = 300) -> tuple[float, ...]:
    """(median, p20, p80) milliseconds of ``fn`` over warm repeats, timed with CUDA events."""
    return tuple(
        triton.testing.do_bench(fn, warmup=warmup_ms, rep=rep_ms, quantiles=[0.5, 0.2, 0.8])
    )


def extra_memory_gib(fn: Callable[[], object]) -> float:
    """Peak device memory one call of ``fn`` allocates beyond what was allocated before it."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - before) / GiB


class Bench:
    """Collects results for one op: ``bench.run(case, provider, fn, bytes=... or flops=...)``.

    ``bytes`` is what must move through memory (GB/s reported); ``flops`` the arithmetic
    (TFLOP/s reported). ``output_bytes`` is subtracted from the extra-memory figure: it is
    the memory the caller keeps (outputs, gradients), not the op's overhead.
    """

    def __init__(self, op: str, dtype: torch.dtype) -> None:
        self.op = op
        self.dtype = str(dtype).replace("torch.", "")
        self.results: list[Result] = []

    def run(
        self,
        case: str,
        provider: str,
        fn: Callable[[], object],
        *,
        bytes: float | None = None,
        flops: float | None = None,
        output_bytes: float = 0.0,
        memory: bool = True,
    ) -> Result:
        ms, p20, p80 = time_ms(fn)
        if flops is not None:
            metric, unit = flops / ms / 1e9, "TFLOP/s"
        else:
            metric, unit = (bytes or 0.0) / ms / 1e6, "GB/s"
        mem = extra_memory_gib(fn) - output_bytes / GiB if memory else float("nan")
        r = Result(self.op, case, self.dtype, provider, ms, p20, p80, metric, unit, mem)
        self.results.append(r)
        print(
            f"{self.op:>16} {case:>28} {self.dtype:>8} {provider:>14} "
            f"{ms:9.4f} ms {metric:9.1f} {unit:7} {mem:7.3f} GiB",
            flush=True,
        )
        return r


def compiled(fn: Callable) -> Callable:
    """torch.compile of a baseline, the way users would compile it."""
    return torch.compile(fn, dynamic=False)


def device_copy(n_bytes: int = 2 * GiB) -> Result:
    """The memory-bandwidth ceiling of this run: a device-to-device copy (read + write bytes)."""
    src = torch.empty(n_bytes, dtype=torch.uint8, device="cuda").random_()
    dst = torch.empty_like(src)
    b = Bench("device_copy", torch.uint8)
    return b.run(
        f"{n_bytes // 2**20} MiB", "torch", lambda: dst.copy_(src), bytes=2 * n_bytes, memory=False
    )


def append_csv(results: list[Result], path: str) -> None:
    """Append rows, each with the environment keys, to the CSV at ``path``. A file written
    with fewer columns is rewritten first with the new header (its rows keep their values,
    the new columns left empty)."""
    env = environment()
    fields = list(env) + [f.name for f in dataclasses.fields(Result)]
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    old: list[dict] | None = None
    if os.path.exists(path):
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames != fields:
                old = list(reader)
                fields += [c for c in reader.fieldnames or () if c not in fields]
    new = old is not None or not os.path.exists(path)
    with open(path, "w" if old is not None else "a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        if new:
            w.writeheader()
        w.writerows(old or ())
        for r in results:
            w.writerow({**env, **dataclasses.asdict(r)})
