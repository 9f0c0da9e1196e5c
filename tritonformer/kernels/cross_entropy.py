"""Cross-entropy over a vocabulary: forward (loss, logsumexp) and backward (dlogits) kernels.

Each program takes BLOCK_M rows and loops over the vocabulary in blocks of BLOCK_V columns,
so any vocabulary size works with a bounded block. The forward reads the logits once: an
online logsumexp (running max, running sum of exponentials rescaled to it), the sum of the
logits when label smoothing is on, and the target's logit by one gather per row. It stores
the fp32 logsumexp and the fp32 loss of each row. The backward reads the logits once more,
recomputes softmax = exp(logits - lse) and writes

    dlogits = (softmax - (1 - eps) * onehot(target) - eps / V) * g

in the logits' dtype, where g is the row's loss gradient already scaled by the reduction; it
needs no buffer besides dlogits itself, and may write it over the logits (in place). Where g
is known before the forward (the fused LM head's "mean"/"sum"), one kernel does both per row
(``cross_entropy_fwd_bwd``), part of its second read of a row coming from L2. Rows
whose target is ``ignore_index`` read nothing and get loss 0 and gradient 0. A row whose target
is neither ``ignore_index`` nor in [0, V) gets a NaN loss and a NaN gradient row (never a
silent answer when the host-side value check is off) and never reads outside its row. Row
offsets are int64, so N * V may exceed 2**31.

Loss of row i (torch's definition, eps = label_smoothing, x = logits[i], t = target[i]):
    (1 - eps) * (lse - x[t]) + eps * (lse - sum(x) / V) = lse - (1 - eps) x[t] - eps sum(x) / V
"""

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, empty, launch

# Launch parameters, one table for the family. Under the interpreter the vocabulary block is
# small enough that V = 3000 takes two blocks (the loop runs) and tiles hold many rows.
#   block_v: vocabulary block width (capped at next_power_of_2(V))
#   tile:    elements per program; rows per program = max(1, tile // block width)
#   warps:   warps per program (about 512 elements per warp: 16-byte accesses, several
#            loads in flight per thread)
CONFIG = (
    {"block_v": 2048, "tile": 1 << 15, "warps": 4}
    if INTERPRET
    else {"block_v": 8192, "tile": 8192, "warps": 16}
)


@triton.jit
def _rows(block, target_ptr, n_rows, n_cols, ignore_index, BLOCK_M: tl.constexpr):
    """Row block ``block``: (indices, in range, target as int64, active = in range and not
    ignored, bad = active with a target outside [0, V): flagged with NaN)."""
    rows = block * BLOCK_M + tl.arange(0, BLOCK_M)
    row_mask = rows < n_rows
    target = tl.load(target_ptr + rows, mask=row_mask, other=ignore_index).to(tl.int64)
    active = row_mask & (target != ignore_index)
    bad = active & ((target < 0) | (target >= n_cols))
    return rows, row_mask, target, active, bad


@triton.jit
def _column_mask(active, start, cols, n_cols, FULL: tl.constexpr):
    """The mask of the rows' columns [start, start + BLOCK_V): per row only for a block
    inside the vocabulary (FULL), so that its loads and stores stay 16-byte vectors where a
    per-column mask of an odd V (GPT-2's 50257) splits them into 2-byte accesses (H100, the
    fused forward + backward of 2432 x 50257 bf16 logits in rows of 50304: 585 us with a
    column mask everywhere, 267 us this way; V = 50304, no tail: 243 us)."""
    if FULL:
        return tl.broadcast_to(active[:, None], [active.shape[0], cols.shape[1]])
    return active[:, None] & (start + cols < n_cols)


@triton.jit
def _lse_block(x_rows, start, cols, active, n_cols, m, s, x_sum, SMOOTH: tl.constexpr,
               FULL: tl.constexpr):
    """One block of the online logsumexp: (running max, sum of exponentials, sum of logits)
    updated with columns [start, start + BLOCK_V)."""
    mask = _column_mask(active, start, cols, n_cols, FULL)
    x = tl.load(x_rows[:, None] + start + cols, mask=mask, other=float("-inf"))
    x = x.to(tl.float32)
    m_new = tl.maximum(m, tl.max(x, axis=1))
    # Shift by 0 while the max is still -inf (ignored rows, chunks of only -inf), so
    # that exp(-inf - -inf) = NaN never enters the sum.
    shift = tl.where(m_new == float("-inf"), 0.0, m_new)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift[:, None]), axis=1)
    if SMOOTH:
        x_sum += tl.sum(tl.where(mask, x, 0.0), axis=1)
    return m_new, s, x_sum


@triton.jit
def _loss(x_rows, rows, target, active, bad, row_mask, n_cols, label_smoothing, lse_ptr,
          loss_ptr, BLOCK_M: tl.constexpr, BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr):
    """The rows' online logsumexp over the vocabulary and their loss, stored; returns lse."""
    valid = active & ~bad
    x_target = tl.load(x_rows + tl.where(valid, target, 0), mask=valid, other=0.0)
    cols = tl.arange(0, BLOCK_V)[None, :]
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s = tl.zeros([BLOCK_M], tl.float32)
    x_sum = tl.zeros([BLOCK_M], tl.float32)
    full_end = n_cols // BLOCK_V * BLOCK_V
    for start in range(0, full_end, BLOCK_V):
        m, s, x_sum = _lse_block(x_rows, start, cols, active, n_cols, m, s, x_sum, SMOOTH, True)
    if full_end < n_cols:
        m, s, x_sum = _lse_block(x_rows, full_end, cols, active, n_cols, m, s, x_sum, SMOOTH,
                                 False)
    lse = m + tl.log(tl.where(active, s, 1.0))  # -inf for ignored rows, no log(0)
    loss = lse - x_target.to(tl.float32)
    if SMOOTH:
        loss = lse - (1.0 - label_smoothing) * x_target.to(tl.float32) - (
            label_smoothing / n_cols
        ) * x_sum
    tl.store(lse_ptr + rows, lse, mask=row_mask)
    loss = tl.where(bad, float("nan"), tl.where(active, loss, 0.0))
    tl.store(loss_ptr + rows, loss, mask=row_mask)
    return lse


@triton.jit
def _grad_block(x_rows, d_rows, start, cols, target, active, bad, row_mask, lse, g, n_cols,
                label_smoothing, SMOOTH: tl.constexpr, FULL: tl.constexpr):
    """dlogits of the rows' columns [start, start + BLOCK_V), read before written."""
    x = tl.load(x_rows[:, None] + start + cols,
                mask=_column_mask(active, start, cols, n_cols, FULL), other=0.0)
    d = tl.exp(x.to(tl.float32) - lse[:, None])
    if SMOOTH:
        d -= label_smoothing / n_cols
    d = tl.where(start + cols == target[:, None], d - (1.0 - label_smoothing), d) * g[:, None]
    d = tl.where(bad[:, None], float("nan"), d)
    tl.store(d_rows[:, None] + start + cols, d.to(d_rows.dtype.element_ty),
             mask=_column_mask(row_mask, start, cols, n_cols, FULL))


@triton.jit
def _grad(x_rows, d_rows, rows, target, active, bad, row_mask, lse, grad_ptr, grad_stride,
          n_cols, label_smoothing, BLOCK_V: tl.constexpr, SMOOTH: tl.constexpr,
          REVERSE: tl.constexpr):
    """dlogits = (exp(logits - lse) - (1 - eps) onehot(target) - eps / V) * grad of the
    rows, written block by block (each block read before it is written: in place works);
    REVERSE: last block first (the blocks a forward pass read last are likeliest in L2)."""
    # Ignored rows get g = 0 and read no logits: their gradient is exactly 0.
    g = tl.load(grad_ptr + rows.to(tl.int64) * grad_stride, mask=active, other=0.0)
    lse = tl.where(active, lse, 0.0)
    cols = tl.arange(0, BLOCK_V)[None, :]
    n_full = n_cols // BLOCK_V
    if REVERSE:
        if n_full * BLOCK_V < n_cols:
            _grad_block(x_rows, d_rows, n_full * BLOCK_V, cols, target, active, bad, row_mask,
                        lse, g, n_cols, label_smoothing, SMOOTH, False)
    for i in range(0, n_full):
        start = (n_full - 1 - i if REVERSE else i) * BLOCK_V
        _grad_block(x_rows, d_rows, start, cols, target, active, bad, row_mask, lse, g, n_cols,
                    label_smoothing, SMOOTH, True)
    if not REVERSE:
        if n_full * BLOCK_V < n_cols:
            _grad_block(x_rows, d_rows, n_full * BLOCK_V, cols, target, active, bad, row_mask,
                        lse, g, n_cols, label_smoothing, SMOOTH, False)


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr,  # logits, [n_rows, n_cols], unit column stride, fp32/fp16/bf16
    target_ptr,  # class index per row, [n_rows], int64 or int32
    lse_ptr,  # output: logsumexp per row, [n_rows], fp32 (unspecified for ignored rows)
    loss_ptr,  # output: loss per row, [n_rows], fp32 (0 for ignored rows)
    n_rows,  # number of rows N
    n_cols,  # vocabulary size V
    row_stride,  # elements between rows of logits
    ignore_index,  # target value whose rows are ignored
    label_smoothing,  # eps in [0, 1]
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary block width
    SMOOTH: tl.constexpr,  # label_smoothing > 0: also sum the logits
):
    """Per-row logsumexp and loss, BLOCK_M rows per program, looping over the vocabulary."""
    rows, row_mask, target, active, bad = _rows(tl.program_id(0), target_ptr, n_rows, n_cols,
                                                ignore_index, BLOCK_M)
    x_rows = logits_ptr + rows.to(tl.int64) * row_stride
    _loss(x_rows, rows, target, active, bad, row_mask, n_cols, label_smoothing, lse_ptr,
          loss_ptr, BLOCK_M, BLOCK_V, SMOOTH)


@triton.jit
def cross_entropy_bwd_kernel(
    logits_ptr,  # logits, [n_rows, n_cols], unit column stride
    target_ptr,  # class index per row, [n_rows], int64 or int32
    lse_ptr,  # logsumexp per row, [n_rows], fp32: from the forward, or (FORWARD) output
    loss_ptr,  # FORWARD: output, loss per row, [n_rows], fp32; else unused
    grad_ptr,  # loss gradient already scaled by the reduction: [n_rows] or one value, fp32
    dlogits_ptr,  # output: gradient of the logits, [n_rows, n_cols], unit column stride;
                  # may be logits_ptr itself (each element is read before it is written)
    n_rows,  # number of rows N
    n_cols,  # vocabulary size V
    row_stride,  # elements between rows of logits
    dlogits_row_stride,  # elements between rows of dlogits
    grad_stride,  # elements between rows' values in grad_ptr (0: one value for all rows)
    ignore_index,  # target value whose rows are ignored
    label_smoothing,  # eps in [0, 1]
    BLOCK_M: tl.constexpr,  # rows per program
    BLOCK_V: tl.constexpr,  # vocabulary block width
    SMOOTH: tl.constexpr,  # label_smoothing > 0
    FORWARD: tl.constexpr,  # also the forward: lse and loss computed and stored first
):
    """dlogits = (exp(logits - lse) - (1 - eps) onehot(target) - eps / V) * grad per row.

    With FORWARD the program first runs the forward over its rows, then the gradient's pass
    from each row's last block, which the first pass read last: more of it comes from L2
    (H100, 2432 x 50304 bf16: 242 us against 278 us for the two kernels; from the first
    block, or with fewer programs in flight, 253-340 us)."""
    rows, row_mask, target, active, bad = _rows(tl.program_id(0), target_ptr, n_rows, n_cols,
                                                ignore_index, BLOCK_M)
    x_rows = logits_ptr + rows.to(tl.int64) * row_stride
    if FORWARD:
        lse = _loss(x_rows, rows, target, active, bad, row_mask, n_cols, label_smoothing,
                    lse_ptr, loss_ptr, BLOCK_M, BLOCK_V, SMOOTH)
    else:
        lse = tl.load(lse_ptr + rows, mask=active, other=0.0)
    _grad(x_rows, dlogits_ptr + rows.to(tl.int64) * dlogits_row_stride, rows, target, active,
          bad, row_mask, lse, grad_ptr, grad_stride, n_cols, label_smoothing, BLOCK_V, SMOOTH,
          FORWARD)


def _launch_params(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_V, grid size) for ``n_rows`` rows of ``n_cols`` logits."""
    block_v = min(CONFIG["block_v"], triton.next_power_of_2(n_cols))
    block_m = min(max(1, CONFIG["tile"] // block_v), triton.next_power_of_2(n_rows))
    return block_m, block_v, triton.cdiv(n_rows, block_m)


def cross_entropy_fwd(
    logits: torch.Tensor, target: torch.Tensor, ignore_index: int, label_smoothing: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lse, loss), both fp32 [N], for logits [N, V] (unit column stride, any row
    stride) and target [N] (contiguous int64/int32, each in [0, V) or ``ignore_index``;
    another value gives its row a NaN loss)."""
    n_rows, n_cols = logits.shape
    lse = empty((n_rows,), torch.float32, logits.device)
    loss = empty((n_rows,), torch.float32, logits.device)
    block_m, block_v, grid = _launch_params(n_rows, n_cols)
    launch(cross_entropy_fwd_kernel, grid,
           (logits, target, lse, loss, n_rows, n_cols, logits.stride(0), ignore_index,
            label_smoothing),
           dict(BLOCK_M=block_m, BLOCK_V=block_v, SMOOTH=label_smoothing > 0),
           num_warps=CONFIG["warps"])
    return lse, loss


def cross_entropy_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    lse: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """dlogits [N, V] in logits' dtype, from the forward's inputs and ``lse``.

    ``grad``: fp32, either [N] (one loss gradient per row) or 0-d (the same gradient for
    every row), already scaled by the reduction (1/count for mean). ``out``: where to write
    dlogits, [N, V] with unit column stride, logits' dtype; may be ``logits`` itself (in
    place). Default: a new contiguous tensor. Returns ``out``.
    """
    dlogits = empty(logits.shape, logits.dtype, logits.device) if out is None else out
    _bwd_launch(logits, target, lse, None, grad, dlogits, ignore_index, label_smoothing)
    return dlogits


def cross_entropy_fwd_bwd(
    logits: torch.Tensor,
    target: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
    out: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``cross_entropy_fwd`` and ``cross_entropy_bwd`` in one pass over the rows, for a loss
    gradient known before the forward (``grad`` as in cross_entropy_bwd: fp32, [N] or 0-d,
    scaled by the reduction). Writes dlogits into ``out`` ([N, V], unit column stride,
    logits' dtype; may be ``logits`` itself) and returns the per-row (lse, loss), fp32 [N]."""
    lse = empty(logits.shape[:1], torch.float32, logits.device)
    loss = empty(logits.shape[:1], torch.float32, logits.device)
    _bwd_launch(logits, target, lse, loss, grad, out, ignore_index, label_smoothing)
    return lse, loss


def _bwd_launch(logits, target, lse, loss, grad, dlogits, ignore_index, label_smoothing):
    """cross_entropy_bwd_kernel over every row; with ``loss`` (not None) the forward first
    (FORWARD), writing lse and loss."""
    n_rows, n_cols = logits.shape
    block_m, block_v, grid = _launch_params(n_rows, n_cols)
    launch(cross_entropy_bwd_kernel, grid,
           (logits, target, lse, loss, grad, dlogits, n_rows, n_cols, logits.stride(0),
            dlogits.stride(0), grad.stride(0) if grad.dim() == 1 else 0, ignore_index,
            label_smoothing),
           dict(BLOCK_M=block_m, BLOCK_V=block_v, SMOOTH=label_smoothing > 0,
                FORWARD=loss is not None),
           num_warps=CONFIG["warps"])
