"""The fused LM head's loss pass for Hopper (sm_90) in Gluon: per-row loss and logsumexp and
the logits' gradient written over them, reading every row from DRAM once.

``cross_entropy.cross_entropy_fwd_bwd`` reads a row of logits twice (the logsumexp, then the
gradient), and at 50k classes its second read mostly misses L2 as well: 4096 x 50304 bf16
logits took 396 us on the H100, 2.1 TB/s counting one read and one write (a copy of that
size: 3.0 TB/s). Here persistent programs (two per SM, see CONFIG) stream their rows (rows
pid, pid + programs, ...) by TMA into a ring of SLOTS shared-memory chunks, up to a row
ahead, and keep each row there while they compute the row's logsumexp (pass 1) and then the
gradient (pass 2), which they store over the logits; a chunk's slot is refilled once pass 2
has read it.

Layout: the logits are one contiguous (rows, Vp) buffer of 16-bit values with Vp a multiple
of LINE = 64 (the fused LM head pads its rows so), the classes the first n_cols <= Vp
columns. TMA reads it as (rows * Vp / 64, 64) lines; a chunk is BOX_ROWS lines (the box), a
row CHUNKS = cdiv(Vp / 64, BOX_ROWS) chunks, the last reaching into the next row (or past
the buffer: zero-filled), which the column masks drop. Columns n_cols..Vp get gradient 0.

Pass 1 keeps a running max and sum of exponentials per line of the chunk (reductions within a
warp, one exponential per element), combined once per row; the target's logit is read from
memory before pass 2 overwrites it. Pass 2 writes exp(x - lse) * g (less eps / V) and then
the target's element again with its one-hot term. Same conventions as the Triton kernel:
loss = lse - (1 - eps) x[t] - eps sum(x) / V; dlogits = (softmax - (1 - eps) onehot(t) -
eps / V) * g; an ignored row gets loss 0, lse -inf and gradient 0; a target outside
[0, n_cols) gets a NaN loss and NaN gradients. Gluon has no interpreter: the GPU tier tests
this kernel (tests/test_linear_cross_entropy.py).
"""

from __future__ import annotations

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import fence_async_shared, mbarrier, tma

from ..runtime import INTERPRET, device_index, empty, is_hopper, launch, num_sms
from .matmul_gluon import descriptor

LINE = 64  # elements of one TMA line (128 bytes of 16-bit values)
# Launch parameters: box_rows: lines per chunk (one TMA box); warps per program; smem: bytes
# of the SM's shared memory for the rings (227 KiB less the programs' barriers). Two programs
# share an SM where two rings of a row or more fit (rows of up to 14 chunks: 57344 classes),
# else one (28 chunks: 114688 classes); longer rows take the Triton kernel. On the H100,
# 4096 x 50304 bf16 in place: 323 us with two programs of 8 warps per SM and 64-line chunks
# (2.5 TB/s counting one read and one write; an in-place scale of it 277 us), 375-442 us with
# one program of 16 or 32 warps, the Triton kernel 394 us (docs/perf/matmul.md v13).
CONFIG = {"box_rows": 64, "warps": 8, "smem": 227 * 1024 - 2048}


def _plan(vp: int) -> tuple[int, int, int] | None:
    """(chunks per row, ring slots, programs per SM) for rows of vp columns, or None when a
    row does not fit one ring."""
    chunk_bytes = CONFIG["box_rows"] * LINE * 2
    chunks = -(-(vp // LINE) // CONFIG["box_rows"])
    for per_sm in (2, 1):
        slots = CONFIG["smem"] // per_sm // chunk_bytes
        if chunks <= slots:
            return chunks, slots, per_sm
    return None


def eligible(logits: torch.Tensor, n_cols: int) -> bool:
    """Whether ``lm_head_loss_grad_gluon`` runs ``logits`` (rows of n_cols classes) on its
    device."""
    if INTERPRET or not is_hopper(logits.device):
        return False
    if logits.dtype not in (torch.float16, torch.bfloat16) or not logits.is_contiguous():
        return False
    vp = logits.shape[1]
    return vp % LINE == 0 and n_cols <= vp and _plan(vp) is not None


@gluon.jit
def _issue(desc, ring, bars, it, total, pid, n_programs, lines_per_row,
           CHUNKS: gl.constexpr, SLOTS: gl.constexpr):
    """TMA load of the program's it-th chunk (chunk it % CHUNKS of its row it // CHUNKS) into
    slot it % SLOTS; nothing past the program's last chunk (``total``)."""
    box_rows: gl.constexpr = desc.block_type.shape[0]
    slot = it % SLOTS
    pred = it < total
    row = pid + (it // CHUNKS) * n_programs
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred)
    tma.async_copy_global_to_shared(desc, [row * lines_per_row + (it % CHUNKS) * box_rows, 0],
                                    bar, ring.index(slot), pred)


@gluon.jit
def _lse_chunk(x, m, s, x_sum, SMOOTH: gl.constexpr):
    """Pass 1 over one chunk x (fp32, -inf past the classes): the lines' running max m, sum
    of exponentials s (rescaled to m) and, with SMOOTH, sum of logits."""
    m_new = gl.maximum(m, gl.max(x, 1))
    shift = gl.where(m_new == float("-inf"), 0.0, m_new)  # lines wholly past the classes
    s = s * gl.exp(m - shift) + gl.sum(gl.exp(x - gl.expand_dims(shift, 1)), 1)
    if SMOOTH:
        x_sum += gl.sum(gl.where(x == float("-inf"), 0.0, x), 1)
    return m_new, s, x_sum


@gluon.jit
def lm_head_loss_grad_kernel(
    desc,  # the logits as (n_rows * lines_per_row, LINE) lines, block [BOX_ROWS, LINE]
    logits_ptr,  # the same (n_rows, lines_per_row * LINE) buffer: dlogits written over it
    target_ptr,  # class index per row, [n_rows], int64 or int32
    lse_ptr,  # output: logsumexp per row, [n_rows], fp32 (-inf for ignored rows)
    loss_ptr,  # output: loss per row, [n_rows], fp32 (0 for ignored rows)
    grad_ptr,  # loss gradient, already scaled by the reduction: [n_rows] or one value, fp32
    n_rows,
    n_cols,  # classes: the first n_cols columns of a row
    lines_per_row,  # Vp / LINE
    grad_stride,  # elements between rows' values in grad_ptr (0: one value for all rows)
    ignore_index,
    label_smoothing,
    CHUNKS: gl.constexpr,  # chunks per row
    SLOTS: gl.constexpr,  # chunks in the ring, >= CHUNKS
    SMOOTH: gl.constexpr,  # label_smoothing > 0
    NUM_WARPS: gl.constexpr,
):
    """Persistent: see the module docstring."""
    BOX_ROWS: gl.constexpr = desc.block_type.shape[0]
    WIDTH: gl.constexpr = desc.block_type.shape[1]
    CHUNK: gl.constexpr = BOX_ROWS * WIDTH
    layout: gl.constexpr = gl.BlockedLayout([1, 8], [4, 8], [NUM_WARPS, 1], [1, 0])
    lines: gl.constexpr = gl.SliceLayout(1, layout)
    ring = gl.allocate_shared_memory(desc.dtype, [SLOTS, BOX_ROWS, WIDTH], desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [SLOTS, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(SLOTS):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    pid = gl.program_id(0)
    n_programs = gl.num_programs(0)
    n_mine = gl.cdiv(n_rows - pid, n_programs)
    total = n_mine * CHUNKS
    for i in gl.static_range(SLOTS):
        _issue(desc, ring, bars, i, total, pid, n_programs, lines_per_row, CHUNKS, SLOTS)

    # column of each element within a chunk
    offs = (gl.expand_dims(gl.arange(0, BOX_ROWS, layout=lines), 1) * WIDTH
            + gl.expand_dims(gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout)), 0))
    row_len = lines_per_row * WIDTH
    full = n_cols // CHUNK  # chunks wholly inside the classes: no column masks
    for j in range(n_mine):
        row = pid + j * n_programs
        out = logits_ptr + row.to(gl.int64) * row_len
        target = gl.load(target_ptr + row).to(gl.int64)
        active = target != ignore_index
        bad = active & ((target < 0) | (target >= n_cols))
        target = gl.where(active & ~bad, target, 0).to(gl.int32)
        x_t = gl.load(out + target).to(gl.float32)  # before pass 2 overwrites it
        # pass 1: per line, a running max and the sum of exponentials rescaled to it
        m = gl.full([BOX_ROWS], float("-inf"), gl.float32, lines)
        s = gl.zeros([BOX_ROWS], gl.float32, lines)
        x_sum = gl.zeros([BOX_ROWS], gl.float32, lines)
        for c in range(CHUNKS):
            it = j * CHUNKS + c
            mbarrier.wait(bars.index(it % SLOTS), (it // SLOTS) & 1)
            x = ring.index(it % SLOTS).load(layout).to(gl.float32)
            if c >= full:
                x = gl.where(c * CHUNK + offs < n_cols, x, float("-inf"))
            m, s, x_sum = _lse_chunk(x, m, s, x_sum, SMOOTH)
        m_row = gl.max(m, 0)
        lse = m_row + gl.log(gl.sum(s * gl.exp(m - m_row), 0))
        loss = lse - x_t
        if SMOOTH:
            loss = lse - (1.0 - label_smoothing) * x_t - (label_smoothing / n_cols) * gl.sum(
                x_sum, 0)
        gl.store(lse_ptr + row, gl.where(active, lse, float("-inf")))
        gl.store(loss_ptr + row, gl.where(bad, float("nan"), gl.where(active, loss, 0.0)))

        # pass 2: the gradient from the same chunks, over the logits; g folds in the row's
        # state (0 for an ignored row, whose exponentials stay <= 1 against its lse; NaN for
        # a bad target) and the target's element is rewritten with its one-hot term at the end
        g = gl.load(grad_ptr + row.to(gl.int64) * grad_stride)
        g = gl.where(bad, float("nan"), gl.where(active, g, 0.0))
        for c in range(CHUNKS):
            it = j * CHUNKS + c
            col = c * CHUNK + offs
            x = ring.index(it % SLOTS).load(layout).to(gl.float32)
            d = gl.exp(x - lse)
            if SMOOTH:
                d -= label_smoothing / n_cols
            d *= g
            if c >= full:  # the classes end here: 0 past them, nothing past the row
                d = gl.where(col < n_cols, d, 0.0)
                gl.store(out + col, d.to(logits_ptr.dtype.element_ty), mask=col < row_len)
            else:
                gl.store(out + col, d.to(logits_ptr.dtype.element_ty))
            gl.thread_barrier()  # every warp has read the slot (and stored its part)
            fence_async_shared()  # those reads come before the TMA write that refills it
            _issue(desc, ring, bars, it + SLOTS, total, pid, n_programs, lines_per_row,
                   CHUNKS, SLOTS)
        d_t = gl.exp(x_t - lse)
        if SMOOTH:
            d_t -= label_smoothing / n_cols
        d_t = (d_t - (1.0 - label_smoothing)) * g
        gl.store(out + target, d_t.to(logits_ptr.dtype.element_ty), mask=active & ~bad)
    for i in gl.static_range(SLOTS):
        mbarrier.invalidate(bars.index(i))


def lm_head_loss_grad_gluon(logits: torch.Tensor, n_cols: int, target: torch.Tensor,
                            grad: torch.Tensor, ignore_index: int,
                            label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lse, loss), fp32 [N], of logits (N, Vp) whose first n_cols columns are the
    classes (``eligible`` must hold), writing dlogits over the logits (columns n_cols.. get
    0). target: [N] contiguous int64/int32; grad: fp32, [N] or 0-d, scaled by the reduction
    (as in ``cross_entropy.cross_entropy_bwd``)."""
    n_rows, vp = logits.shape
    lse = empty((n_rows,), torch.float32, logits.device)
    loss = empty((n_rows,), torch.float32, logits.device)
    chunks, slots, per_sm = _plan(vp)
    lines = logits.view(n_rows * vp // LINE, LINE)
    desc = descriptor(lines, list(lines.shape), [LINE, 1], [CONFIG["box_rows"], LINE])
    programs = min(n_rows, per_sm * num_sms(device_index(logits)))
    launch(lm_head_loss_grad_kernel, programs,
           (desc, logits, target, lse, loss, grad, n_rows, n_cols, vp // LINE,
            grad.stride(0) if grad.dim() == 1 else 0, ignore_index, label_smoothing),
           dict(CHUNKS=chunks, SLOTS=slots, SMOOTH=label_smoothing > 0,
                NUM_WARPS=CONFIG["warps"]),
           num_warps=CONFIG["warps"])
    return lse, loss
