"""Softmax over the last dimension of a 2-D view: forward and backward kernels.

Each program takes a tile of BLOCK_M rows by BLOCK_N columns. A row of at most
``CONFIG["max_single_n"]`` elements is done in one block: loaded once, its max, sum and
output computed from registers. A longer row is done in chunks of ``CONFIG["chunk_n"]``
columns, in two passes: the first keeps a running max and a running sum of exponentials
rescaled to that max (online softmax), the second reads the row again and writes. The
backward, dx = y * (dy - sum(dy * y)), is chunked the same way. All math is in fp32; the
output is written in whatever dtype its buffer has (fp32 under autocast, the input's
dtype otherwise), so no separate cast pass is needed.
"""

import functools

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, cdiv, empty, launch

# Launch parameters, one table for the family. Under the interpreter, which pays per program
# and per op rather than per element, tiles are large and the single-block limit is small
# so that the chunked path runs on cheap test sizes (a row of 2500 takes 3 chunks).
#   max_single_n:   longest row done in one block (a power of two)
#   chunk_n:        chunk width for longer rows (a power of two)
#   tile:           elements per program; rows per program = tile // block width
#   elems_per_warp: warps = elements per program / elems_per_warp, at least 4 ...
#   max_warps:      ... and at most this
CONFIG = (
    {"max_single_n": 1024, "chunk_n": 1024, "tile": 1 << 15, "elems_per_warp": 512,
     "max_warps": 4}
    if INTERPRET
    else {"max_single_n": 16384, "chunk_n": 4096, "tile": 4096, "elems_per_warp": 512,
          "max_warps": 16}
)  # fmt: skip


@triton.jit
def _finite_shift(m):
    """The row max ``m`` to subtract before exp, with -inf (a row or chunk of only -inf,
    or a padding row) replaced by 0 so that exp(-inf - -inf) = NaN never appears."""
    return tl.where(m == float("-inf"), 0.0, m)


@triton.jit
def _inverse_sum(s, row_mask):
    """1 / s, correctly rounded, for the rows in ``row_mask`` (1 for padding rows)."""
    return tl.math.div_rn(tl.full(s.shape, 1.0, tl.float32), tl.where(row_mask, s, 1.0))


@triton.jit
def softmax_fwd_kernel(
    x_ptr,  # input, [n_rows, n_cols], unit column stride
    y_ptr,  # output, [n_rows, n_cols], unit column stride, any float dtype
    n_rows,  # number of rows
    n_cols,  # softmax length (columns per row)
    x_row_stride,  # elements between rows of x
    y_row_stride,  # elements between rows of y
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per block: >= n_cols when SINGLE, else the chunk width
    SINGLE: tl.constexpr,  # whether a row fits in one block
):
    """y = exp(x - max) / sum(exp(x - max)) per row, for BLOCK_M rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * x_row_stride
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride
    cols = tl.arange(0, BLOCK_N)[None, :]
    if SINGLE:
        mask = row_mask[:, None] & (cols < n_cols)
        x = tl.load(x_rows + cols, mask=mask, other=float("-inf")).to(tl.float32)
        e = tl.exp(x - _finite_shift(tl.max(x, axis=1))[:, None])
        inv = _inverse_sum(tl.sum(e, axis=1), row_mask)
        tl.store(y_rows + cols, (e * inv[:, None]).to(y_ptr.dtype.element_ty), mask=mask)
    else:
        m = tl.full([BLOCK_M], float("-inf"), tl.float32)
        s = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            m_new = tl.maximum(m, tl.max(x, axis=1))
            shift = _finite_shift(m_new)
            s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
            m = m_new
        shift = _finite_shift(m)
        inv = _inverse_sum(s, row_mask)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)
            x = tl.load(x_rows + start + cols, mask=mask, other=float("-inf")).to(tl.float32)
            y = tl.exp(x - shift[:, None]) * inv[:, None]
            tl.store(y_rows + start + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def softmax_bwd_kernel(
    y_ptr,  # the forward's output, [n_rows, n_cols], unit column stride
    dy_ptr,  # gradient of y, [n_rows, n_cols], unit column stride
    dx_ptr,  # gradient of x (output), [n_rows, n_cols], unit column stride, x's dtype
    n_rows,  # number of rows
    n_cols,  # softmax length
    y_row_stride,  # elements between rows of y
    dy_row_stride,  # elements between rows of dy
    dx_row_stride,  # elements between rows of dx
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_N: tl.constexpr,  # columns per block: >= n_cols when SINGLE, else the chunk width
    SINGLE: tl.constexpr,  # whether a row fits in one block
):
    """dx = y * (dy - sum(dy * y)) per row, for BLOCK_M rows per program."""
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    y_rows = y_ptr + rows.to(tl.int64)[:, None] * y_row_stride
    dy_rows = dy_ptr + rows.to(tl.int64)[:, None] * dy_row_stride
    dx_rows = dx_ptr + rows.to(tl.int64)[:, None] * dx_row_stride
    cols = tl.arange(0, BLOCK_N)[None, :]
    if SINGLE:
        mask = row_mask[:, None] & (cols < n_cols)
        y = tl.load(y_rows + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_rows + cols, mask=mask, other=0.0).to(tl.float32)
        dot = tl.sum(y * dy, axis=1)
        tl.store(dx_rows + cols, (y * (dy - dot[:, None])).to(dx_ptr.dtype.element_ty), mask=mask)
    else:
        dot = tl.zeros([BLOCK_M], tl.float32)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)
            y = tl.load(y_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            dot += tl.sum(y * dy, axis=1)
        for start in range(0, n_cols, BLOCK_N):
            mask = row_mask[:, None] & (start + cols < n_cols)
            y = tl.load(y_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_rows + start + cols, mask=mask, other=0.0).to(tl.float32)
            dx = y * (dy - dot[:, None])
            tl.store(dx_rows + start + cols, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


@functools.lru_cache(maxsize=256)
def _launch_params(n_rows: int, n_cols: int) -> tuple[int, int, bool, int, int]:
    """(BLOCK_M, BLOCK_N, SINGLE, grid size, num_warps) for rows of ``n_cols`` elements
    (plain integer math, cached: ``triton.cdiv`` and friends cost microseconds per call)."""
    single = n_cols <= CONFIG["max_single_n"]
    block_n = _next_power_of_2(n_cols) if single else CONFIG["chunk_n"]
    block_m = min(max(1, CONFIG["tile"] // block_n), _next_power_of_2(n_rows))
    warps = min(CONFIG["max_warps"], max(4, block_m * block_n // CONFIG["elems_per_warp"]))
    return block_m, block_n, single, cdiv(n_rows, block_m), warps


def softmax_fwd(x: torch.Tensor, out_dtype: torch.dtype) -> torch.Tensor:
    """Softmax of each row of ``x`` ([n_rows, n_cols], unit column stride, any row stride).

    Returns a contiguous [n_rows, n_cols] tensor of ``out_dtype``.
    """
    n_rows, n_cols = x.shape
    y = empty((n_rows, n_cols), out_dtype, x.device)
    block_m, block_n, single, grid, warps = _launch_params(n_rows, n_cols)
    launch(
        softmax_fwd_kernel, grid, (x, y, n_rows, n_cols, x.stride(0), y.stride(0)),
        dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single), num_warps=warps,
    )
    return y


def softmax_bwd(y: torch.Tensor, dy: torch.Tensor, dx_dtype: torch.dtype) -> torch.Tensor:
    """Gradient of the row softmax from its output ``y`` and the output's gradient ``dy``.

    ``y`` and ``dy``: [n_rows, n_cols], unit column stride, any row stride. Returns a
    contiguous [n_rows, n_cols] tensor of ``dx_dtype``.
    """
    n_rows, n_cols = y.shape
    dx = empty((n_rows, n_cols), dx_dtype, y.device)
    block_m, block_n, single, grid, warps = _launch_params(n_rows, n_cols)
    launch(
        softmax_bwd_kernel, grid,
        (y, dy, dx, n_rows, n_cols, y.stride(0), dy.stride(0), dx.stride(0)),
        dict(BLOCK_M=block_m, BLOCK_N=block_n, SINGLE=single), num_warps=warps,
    )  # fmt: skip
    return dx
