"""Dropout with a counter-based RNG: the mask is regenerated from (seed, offset), never stored."""

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, empty_like

# Elements per program: large under the interpreter, which pays per program, not per element.
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 8


@triton.jit
def dropout_kernel(
    x_ptr,  # input (forward: x; backward: dy), contiguous, n elements
    y_ptr,  # output (forward: y; backward: dx), contiguous, n elements
    n,  # number of elements
    p,  # drop probability, 0 <= p < 1
    seed,  # Philox seed: the same seed gives the same mask
    BLOCK: tl.constexpr,
):
    """y = x * keep / (1 - p) with keep = rand(seed, offset) >= p.

    The backward is the same kernel on dy with the forward's seed.
    """
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    keep = tl.rand(seed, offs) >= p
    y = tl.where(keep, x / (1.0 - p), 0.0)
    tl.store(y_ptr + offs, y.to(y_ptr.dtype.element_ty), mask=mask)


def dropout(x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
    """Launch ``dropout_kernel`` on a contiguous tensor; returns a new tensor like x."""
    y = empty_like(x)
    n = x.numel()
    dropout_kernel[(triton.cdiv(n, BLOCK),)](x, y, n, p, seed, BLOCK=BLOCK, num_warps=NUM_WARPS)
    return y
