"""LayerNorm over the last dimension, optionally fused with the residual add before it.

Means divide with ``tl.div_rn`` (IEEE round to nearest): the GPU's default fp32 division is
approximate, and even x / 1 can move by an ulp.

Rows are the flattened leading dimensions: the input is an [M, N] view with a row stride and a
unit column stride. Everything is computed in fp32 whatever the storage dtypes.

Forward (``layer_norm_fwd_kernel``), one tile of BLOCK_M rows at a time::

    s    = x (+ residual, rounded to s's dtype and stored: the new residual stream)
    mean = sum(s) / N,   rstd = 1 / sqrt(sum((s - mean)^2) / N + eps)      (fp32, saved)
    y    = (s - mean) * rstd * weight + bias                               (out dtype)

Backward (``layer_norm_bwd_kernel``), with xhat = (s - mean) * rstd and g = dy * weight::

    ds    = rstd * (g - mean(g * xhat) * xhat - mean(g))  (+ the gradient of the s output)
    dw    = sum over rows of dy * xhat,   db = sum over rows of dy

Both kernels loop over row tiles (program p takes tiles p, p + P, ...), software-pipelined
(``tl.range(num_stages=...)``: the next tiles' loads are in flight while one is reduced). The
forward may run one tile per program instead (P = the number of tiles). The backward runs a
few programs per SM; each keeps its share of dw/db in fp32 registers, then writes one row of
fp32 partial sums; ``layer_norm_reduce_kernel`` adds the partials up. The number of partial
rows is the grid size, a runtime value: no compiled kernel depends on the row count M.

Rows up to a size limit are held whole in registers (a "single" tile); longer rows are walked
in chunks: the forward merges per-chunk (mean, M2) statistics (Chan et al.) and walks the row
a second time to write y; the backward walks the row twice (row sums, then ds) and adds each
chunk's dw/db into the program's partial row in memory.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, cdiv, empty, launch, num_sms

# ---------------------------------------------------------------------------------------------
# Tuning table: every block, warp and pipelining choice of this file.
#
# A tile is BLOCK_M rows x BLOCK_N columns; BLOCK_N is the row length padded to a power of two
# (at least 16), or the chunk width for rows longer than the single-tile limit. Short rows are
# stacked into taller tiles. Each entry is (BLOCK_M, warps, programs per SM, stages):
# - "programs per SM" makes the grid persistent (at most that many programs per SM, each
#   looping over tiles); None gives one tile per program (forward only). A persistent
#   kernel's registers are capped so that its programs fit one SM together (65536 registers
#   per SM / threads), which is what keeps the backward's fp32 dw/db accumulators from
#   lowering the occupancy the grid was sized for.
# - "stages" is the software-pipelining depth of the loop over tiles (1: none): the loads
#   of the next tiles go to shared memory while the current one is reduced.
# - The partial-sum reduction uses tiles of "reduce_tile" elements, its column block sized so
#   that about one program per SM runs.
# Entries from 1024 to 4096 come from sweeps on the H100 (bf16, 16384 rows, fifth session),
# those from 8192 to 16384 (and the backward's at 512) from sweeps on an H200 (see
# docs/perf/layer_norm_softmax.md): the forward wants ~32 elements per thread (several
# 16-byte loads in flight each) and one tile per program; the backward 3-stage pipelining
# (most configs 1.2-2.6x slower without), 2 rows per tile and 4 to 16 elements per thread.
# The other entries are untuned.
# Under the interpreter, which pays per program and per op rather than per element, tiles are
# large and the single-tile limits small (so the chunked paths are cheap to test).
# ---------------------------------------------------------------------------------------------
# fmt: off
_CONFIGS = {
    "gpu": {
        #          BLOCK_N: (forward entry,        backward entry)
        "table": {16:      ((64, 4, None, 1),  (64, 8, 4, 1)),
                  32:      ((32, 4, None, 1),  (32, 8, 4, 1)),
                  64:      ((16, 4, None, 1),  (16, 8, 4, 1)),
                  128:     ((8,  4, None, 1),  (8,  8, 4, 1)),
                  256:     ((4,  4, None, 1),  (4,  8, 4, 3)),
                  512:     ((2,  4, None, 1),  (2,  8, 4, 3)),
                  1024:    ((4,  4, None, 1),  (2,  4, 4, 3)),
                  2048:    ((2,  4, None, 1),  (2,  4, 2, 3)),
                  4096:    ((1,  4, None, 1),  (2,  8, 1, 3)),
                  8192:    ((1,  8, None, 1),  (1, 16, 1, 3)),
                  16384:   ((1, 16, None, 1),  None)},
        # rows longer than max_single: (BLOCK_M, chunk width, warps, programs per SM); the
        # backward's read-modify-write of its partial row is shared by BLOCK_M rows
        "chunked": {"fwd": (1, 4096, 16, None), "bwd": (2, 2048, 16, 2)},
        "max_single": {"fwd": 16384, "bwd": 8192},
        "reduce_tile": 2048, "reduce_warps": 4,
    },
    "interpret": {
        "table": {16:  ((256, 1, None, 1), (32, 1, 3, 1)),
                  32:  ((256, 1, None, 1), (32, 1, 3, 1)),
                  64:  ((128, 1, None, 1), (32, 1, 3, 1)),
                  128: ((64,  1, None, 1), (32, 1, 3, 1)),
                  256: ((32,  1, None, 1), (32, 1, 3, 1)),  # three programs: num_sms is 1
                  512: ((16,  1, None, 1), (16, 1, 3, 1))},
        "chunked": {"fwd": (4, 512, 1, None), "bwd": (4, 512, 1, 3)},
        "max_single": {"fwd": 512, "bwd": 512},
        "reduce_tile": 1 << 16, "reduce_warps": 1,
    },
}
# fmt: on
CONFIG = _CONFIGS["interpret" if INTERPRET else "gpu"]
MIN_BLOCK_N = 16
REGISTERS_PER_SM = 65536  # every NVIDIA GPU from sm_70 to sm_90
MAX_REGISTERS = 255  # per thread


class Tile(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    single: bool  # the tile holds whole rows
    programs_per_sm: int | None  # None: one tile per program
    num_stages: int  # pipelining depth of the loop over tiles


def _next_power_of_2(n: int) -> int:
    return 1 << (n - 1).bit_length()


def tile_config(n: int, backward: bool) -> Tile:
    """The tile for rows of length ``n``, forward or backward, from the table above."""
    d = "bwd" if backward else "fwd"
    if n <= CONFIG["max_single"][d]:
        block_n = max(MIN_BLOCK_N, _next_power_of_2(n))
        block_m, warps, per_sm, stages = CONFIG["table"][block_n][int(backward)]
        return Tile(block_m, block_n, warps, True, per_sm, stages)
    block_m, block_n, warps, per_sm = CONFIG["chunked"][d]
    return Tile(block_m, block_n, warps, False, per_sm, 1)


class Plan(NamedTuple):
    """Everything a launch needs but the row count (cached per row length and device)."""

    tile: Tile
    max_programs: int  # grid = min(row tiles, max_programs)
    maxnreg: int | None  # register cap per thread (persistent grids), None: the compiler's
    reduce_grid: int  # the partials reduction (backward): programs,
    reduce_block_n: int  # columns per program,
    reduce_block_p: int  # and partial rows per step


@functools.cache
def _plan(n: int, backward: bool, device: int | None) -> Plan:
    """The plan for rows of length ``n`` on CUDA device ``device`` (None under the
    interpreter)."""
    t = tile_config(n, backward)
    sms = num_sms(device or 0)
    if t.programs_per_sm is None:
        max_programs, maxnreg = 1 << 31, None
    else:
        max_programs = sms * t.programs_per_sm
        per_thread = REGISTERS_PER_SM // (t.programs_per_sm * t.num_warps * 32) // 8 * 8
        maxnreg = per_thread if per_thread < MAX_REGISTERS and not INTERPRET else None
    # About one reduction program per SM: columns split across programs, partial rows looped.
    block_n = min(max(_next_power_of_2(cdiv(n, sms)), 4), CONFIG["reduce_tile"])
    return Plan(t, max_programs, maxnreg, cdiv(n, block_n), block_n,
                max(1, CONFIG["reduce_tile"] // block_n))  # fmt: skip


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _load_input(
    x_ptr, r_ptr, s_ptr, rows, cols, mask, stride_xm, stride_rm, N,
    HAS_RESIDUAL: tl.constexpr, STORE_SUM: tl.constexpr,
):
    """The LayerNorm input of a [BLOCK_M, BLOCK_N] tile, in fp32, 0 where ``mask`` is off.

    Without a residual that is x; with one it is s = x + residual rounded to s's dtype (the
    tensor torch's ``x + residual`` gives), which is stored to ``s_ptr`` when STORE_SUM.
    """
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    x = x.to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(r_ptr + rows[:, None] * stride_rm + cols[None, :], mask=mask, other=0.0)
        s = (x + r.to(tl.float32)).to(s_ptr.dtype.element_ty)
        if STORE_SUM:
            tl.store(s_ptr + rows[:, None] * N + cols[None, :], s, mask=mask)
        x = s.to(tl.float32)
    return x


@triton.jit
def _normalize_store(
    x, mean, rstd, w_ptr, b_ptr, y_ptr, rows, cols, mask, N,
    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr,
):
    """Store y = (x - mean) * rstd * weight + bias for a tile, in y's dtype."""
    y = (x - mean[:, None]) * rstd[:, None]
    col_mask = cols < N
    if HAS_WEIGHT:
        y = y * tl.load(w_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        y = y + tl.load(b_ptr + cols, mask=col_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(y_ptr + rows[:, None] * N + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _load_weight(w_ptr, cols, N, HAS_WEIGHT: tl.constexpr):
    """The weight at ``cols`` in fp32 (0 past N), or 1.0 without a weight."""
    if HAS_WEIGHT:
        return tl.load(w_ptr + cols, mask=cols < N, other=0.0).to(tl.float32)
    else:
        return 1.0


@triton.jit
def _bwd_load(
    x_ptr, dy_ptr, w, rows, cols, mask, mean, rstd, stride_xm, stride_dym,
    HAS_WEIGHT: tl.constexpr,
):
    """(xhat, dy, dy * w) of a tile in fp32, 0 where ``mask`` is off; ``w`` from _load_weight."""
    x = tl.load(x_ptr + rows[:, None] * stride_xm + cols[None, :], mask=mask, other=0.0)
    xhat = tl.where(mask, (x.to(tl.float32) - mean[:, None]) * rstd[:, None], 0.0)
    dy = tl.load(dy_ptr + rows[:, None] * stride_dym + cols[None, :], mask=mask, other=0.0)
    dy = dy.to(tl.float32)
    if HAS_WEIGHT:
        wdy = dy * w[None, :]
    else:
        wdy = dy
    return xhat, dy, wdy


@triton.jit
def _store_dx(
    xhat, wdy, c1, c2, rstd, ds_ptr, dx_ptr, dr_ptr, rows, cols, mask, stride_dsm, N,
    HAS_DS: tl.constexpr, STORE_DR: tl.constexpr,
):
    """Store dx = rstd * (wdy - xhat * c1 - c2) (+ ds) to dx_ptr (and dr_ptr), in their dtypes.

    ``c1`` and ``c2`` are the per-row means of xhat * wdy and of wdy.
    """
    dx = (wdy - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    if HAS_DS:
        ds = tl.load(ds_ptr + rows[:, None] * stride_dsm + cols[None, :], mask=mask, other=0.0)
        dx = dx + ds.to(tl.float32)
    offs = rows[:, None] * N + cols[None, :]
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)
    if STORE_DR:
        tl.store(dr_ptr + offs, dx.to(dr_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Kernels
# ---------------------------------------------------------------------------------------------


@triton.jit(do_not_specialize=["M"])
def layer_norm_fwd_kernel(
    x_ptr,  # input [M, N], row stride stride_xm, unit column stride, any float dtype
    r_ptr,  # residual [M, N], row stride stride_rm, any float dtype (read when HAS_RESIDUAL)
    s_ptr,  # output x + residual, contiguous [M, N], in the sum's dtype (when HAS_RESIDUAL)
    w_ptr,  # weight [N], any float dtype (read when HAS_WEIGHT)
    b_ptr,  # bias [N], any float dtype (read when HAS_BIAS)
    y_ptr,  # output, contiguous [M, N], in the output dtype
    mean_ptr,  # output [M] fp32: each row's mean
    rstd_ptr,  # output [M] fp32: each row's 1 / sqrt(var + eps)
    M,  # number of rows (not specialised on: any M runs the same binary)
    N,  # row length (the normalised size)
    stride_xm,  # row stride of x, in elements
    stride_rm,  # row stride of residual, in elements
    eps,  # added to the variance
    HAS_RESIDUAL: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    SINGLE: tl.constexpr,  # True: BLOCK_N >= N, the tile holds whole rows
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile: the padded row, or the chunk width
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop over tiles
):
    """LayerNorm (after the residual add when HAS_RESIDUAL) of BLOCK_M-row tiles; program p
    takes tiles p, p + P, p + 2P, ... (P programs; P = the number of tiles gives one each)."""
    num_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    for tile in tl.range(tl.program_id(0), num_tiles, tl.num_programs(0), num_stages=NUM_STAGES):
        rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
        row_mask = rows < M
        if SINGLE:
            mask = row_mask[:, None] & (cols < N)[None, :]
            x = _load_input(x_ptr, r_ptr, s_ptr, rows, cols, mask, stride_xm, stride_rm, N,
                            HAS_RESIDUAL, True)
            mean = tl.div_rn(tl.sum(x, axis=1), N * 1.0)
            xc = tl.where(mask, x - mean[:, None], 0.0)
            rstd = tl.rsqrt(tl.div_rn(tl.sum(xc * xc, axis=1), N * 1.0) + eps)
            _normalize_store(x, mean, rstd, w_ptr, b_ptr, y_ptr, rows, cols, mask, N,
                             HAS_WEIGHT, HAS_BIAS)
        else:
            # Pass 1: merge each chunk's (count, mean, M2) into the running ones (Chan et
            # al.); all chunks before `start` are full, so the running count is `start`.
            mean = tl.zeros([BLOCK_M], dtype=tl.float32)
            m2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                x = _load_input(x_ptr, r_ptr, s_ptr, rows, c, mask, stride_xm, stride_rm, N,
                                HAS_RESIDUAL, True)
                n_b = tl.minimum(N - start, BLOCK_N).to(tl.float32)
                n_a = start * 1.0  # as fp32
                mean_b = tl.div_rn(tl.sum(x, axis=1), n_b)
                xc = tl.where(mask, x - mean_b[:, None], 0.0)
                delta = mean_b - mean
                mean += delta * (n_b / (n_a + n_b))
                m2 += tl.sum(xc * xc, axis=1) + delta * delta * (n_a * n_b / (n_a + n_b))
            rstd = tl.rsqrt(tl.div_rn(m2, N * 1.0) + eps)
            # Pass 2: normalise (the residual sum is recomputed, not re-read from s).
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                x = _load_input(x_ptr, r_ptr, s_ptr, rows, c, mask, stride_xm, stride_rm, N,
                                HAS_RESIDUAL, False)
                _normalize_store(x, mean, rstd, w_ptr, b_ptr, y_ptr, rows, c, mask, N,
                                 HAS_WEIGHT, HAS_BIAS)
        tl.store(mean_ptr + rows, mean, mask=row_mask)
        tl.store(rstd_ptr + rows, rstd, mask=row_mask)


@triton.jit(do_not_specialize=["M"])
def layer_norm_bwd_kernel(
    x_ptr,  # the forward's LayerNorm input (x, or s), [M, N], row stride stride_xm
    w_ptr,  # weight [N], any float dtype (read when HAS_WEIGHT)
    dy_ptr,  # gradient of y, [M, N], row stride stride_dym, any float dtype
    ds_ptr,  # gradient of the s output, [M, N], row stride stride_dsm (read when HAS_DS)
    mean_ptr,  # [M] fp32 saved by the forward
    rstd_ptr,  # [M] fp32 saved by the forward
    dx_ptr,  # output: input gradient, contiguous [M, N], in its dtype (when COMPUTE_DX)
    dr_ptr,  # output: the same gradient in a second dtype, contiguous [M, N] (when STORE_DR)
    part_ptr,  # output fp32 partial sums, contiguous: [P, N] of dw (when COMPUTE_DW), then
    #            [P, N] of db (when COMPUTE_DB); row p is program p's share (P programs)
    M,  # number of rows (not specialised on)
    N,  # row length
    stride_xm,  # row strides, in elements
    stride_dym,
    stride_dsm,
    HAS_WEIGHT: tl.constexpr,
    HAS_DS: tl.constexpr,
    COMPUTE_DX: tl.constexpr,
    STORE_DR: tl.constexpr,
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    SINGLE: tl.constexpr,  # True: BLOCK_N >= N, the tile holds whole rows
    BLOCK_M: tl.constexpr,  # rows per tile
    BLOCK_N: tl.constexpr,  # columns per tile: the padded row, or the chunk width
    NUM_STAGES: tl.constexpr,  # software-pipelining depth of the loop over tiles (SINGLE)
):
    """LayerNorm backward; program p handles row tiles p, p + P, p + 2P, ... (P programs)."""
    pid = tl.program_id(0)
    num_programs = tl.num_programs(0)
    num_tiles = tl.cdiv(M, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    if COMPUTE_DW or COMPUTE_DB:
        dw_part = part_ptr + pid.to(tl.int64) * N  # this program's rows of the partial sums
        if COMPUTE_DW:
            db_part = dw_part + num_programs.to(tl.int64) * N
        else:
            db_part = dw_part
    if SINGLE:
        w = _load_weight(w_ptr, cols, N, HAS_WEIGHT)  # once: every tile reuses it
        dw_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        db_acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for tile in tl.range(pid, num_tiles, num_programs, num_stages=NUM_STAGES):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            row_mask = rows < M
            mask = row_mask[:, None] & (cols < N)[None, :]
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            xhat, dy, wdy = _bwd_load(x_ptr, dy_ptr, w, rows, cols, mask, mean, rstd,
                                      stride_xm, stride_dym, HAS_WEIGHT)
            if COMPUTE_DX:
                c1 = tl.div_rn(tl.sum(xhat * wdy, axis=1), N * 1.0)
                c2 = tl.div_rn(tl.sum(wdy, axis=1), N * 1.0)
                _store_dx(xhat, wdy, c1, c2, rstd, ds_ptr, dx_ptr, dr_ptr, rows, cols, mask,
                          stride_dsm, N, HAS_DS, STORE_DR)
            if COMPUTE_DW:
                dw_acc += dy * xhat
            if COMPUTE_DB:
                db_acc += dy
        if COMPUTE_DW:
            tl.store(dw_part + cols, tl.sum(dw_acc, axis=0), mask=cols < N)
        if COMPUTE_DB:
            tl.store(db_part + cols, tl.sum(db_acc, axis=0), mask=cols < N)
    else:
        if COMPUTE_DW or COMPUTE_DB:
            for start in range(0, N, BLOCK_N):
                c = start + cols
                if COMPUTE_DW:
                    tl.store(dw_part + c, tl.zeros([BLOCK_N], tl.float32), mask=c < N)
                if COMPUTE_DB:
                    tl.store(db_part + c, tl.zeros([BLOCK_N], tl.float32), mask=c < N)
            tl.debug_barrier()
        for tile in range(pid, num_tiles, num_programs):
            rows = tile * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
            row_mask = rows < M
            mean = tl.load(mean_ptr + rows, mask=row_mask, other=0.0)
            rstd = tl.load(rstd_ptr + rows, mask=row_mask, other=0.0)
            c1 = tl.zeros([BLOCK_M], dtype=tl.float32)
            c2 = tl.zeros([BLOCK_M], dtype=tl.float32)
            if COMPUTE_DX:
                for start in range(0, N, BLOCK_N):
                    c = start + cols
                    mask = row_mask[:, None] & (c < N)[None, :]
                    w = _load_weight(w_ptr, c, N, HAS_WEIGHT)
                    xhat, dy, wdy = _bwd_load(x_ptr, dy_ptr, w, rows, c, mask, mean, rstd,
                                              stride_xm, stride_dym, HAS_WEIGHT)
                    c1 += tl.sum(xhat * wdy, axis=1)
                    c2 += tl.sum(wdy, axis=1)
                c1 = tl.div_rn(c1, N * 1.0)
                c2 = tl.div_rn(c2, N * 1.0)
            for start in range(0, N, BLOCK_N):
                c = start + cols
                mask = row_mask[:, None] & (c < N)[None, :]
                w = _load_weight(w_ptr, c, N, HAS_WEIGHT)
                xhat, dy, wdy = _bwd_load(x_ptr, dy_ptr, w, rows, c, mask, mean, rstd,
                                          stride_xm, stride_dym, HAS_WEIGHT)
                if COMPUTE_DX:
                    _store_dx(xhat, wdy, c1, c2, rstd, ds_ptr, dx_ptr, dr_ptr, rows, c, mask,
                              stride_dsm, N, HAS_DS, STORE_DR)
                if COMPUTE_DW:
                    acc = tl.load(dw_part + c, mask=c < N, other=0.0)
                    tl.store(dw_part + c, acc + tl.sum(dy * xhat, axis=0), mask=c < N)
                if COMPUTE_DB:
                    acc = tl.load(db_part + c, mask=c < N, other=0.0)
                    tl.store(db_part + c, acc + tl.sum(dy, axis=0), mask=c < N)
            # The next tile re-reads the partial row, possibly from other threads' writes.
            tl.debug_barrier()


@triton.jit(do_not_specialize=["P"])
def layer_norm_reduce_kernel(
    part_ptr,  # [P, N] fp32 partial sums of dw (when COMPUTE_DW), then [P, N] of db
    dw_ptr,  # output [N], in the weight's dtype
    db_ptr,  # output [N], in the bias's dtype
    P,  # number of partial rows of each (the backward's grid size; not specialised on)
    N,  # row length
    COMPUTE_DW: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_P: tl.constexpr,  # partial rows per step
    BLOCK_N: tl.constexpr,  # columns per program
):
    """dw = sum of the dw partials over their P rows (same for db), in fp32; BLOCK_N columns
    per program."""
    cols = tl.program_id(0).to(tl.int64) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if COMPUTE_DW:
        db_part = part_ptr + P.to(tl.int64) * N
    else:
        db_part = part_ptr
    dw = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_P, BLOCK_N], dtype=tl.float32)
    for start in range(0, P, BLOCK_P):
        p = start + tl.arange(0, BLOCK_P)
        mask = (p < P)[:, None] & col_mask[None, :]
        offs = p.to(tl.int64)[:, None] * N + cols[None, :]
        if COMPUTE_DW:
            dw += tl.load(part_ptr + offs, mask=mask, other=0.0)
        if COMPUTE_DB:
            db += tl.load(db_part + offs, mask=mask, other=0.0)
    if COMPUTE_DW:
        tl.store(dw_ptr + cols, tl.sum(dw, axis=0).to(dw_ptr.dtype.element_ty), mask=col_mask)
    if COMPUTE_DB:
        tl.store(db_ptr + cols, tl.sum(db, axis=0).to(db_ptr.dtype.element_ty), mask=col_mask)


# ---------------------------------------------------------------------------------------------
# Launch functions (checked tensors in, outputs allocated here)
# ---------------------------------------------------------------------------------------------


def layer_norm_fwd(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    sum_dtype: torch.dtype | None,
    shape: torch.Size,
) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor]:
    """Launch ``layer_norm_fwd_kernel``.

    Args:
        x: [M, N] with unit column stride (any row stride), any float dtype.
        residual: None, or [M, N] like x (any float dtype); then the kernel normalises
            s = x + residual and also returns s.
        weight, bias: None or contiguous [N].
        eps: added to the variance.
        out_dtype: dtype of y.
        sum_dtype: dtype of s (with a residual).
        shape: the shape of the returned y and s (M * N elements).

    Returns:
        (y, s or None, mean, rstd): y and s contiguous of ``shape``, mean and rstd fp32 [M].
    """
    m, n = x.shape
    dev = x.device
    y = empty(shape, out_dtype, dev)
    s = empty(shape, sum_dtype, dev) if residual is not None else None
    mean = empty((m,), torch.float32, dev)
    rstd = empty((m,), torch.float32, dev)
    p = _plan(n, False, dev.index)
    t = p.tile
    launch(
        layer_norm_fwd_kernel, min(cdiv(m, t.block_m), p.max_programs),
        (x, residual, s, weight, bias, y, mean, rstd, m, n, x.stride(0),
         residual.stride(0) if residual is not None else 0, eps),
        dict(HAS_RESIDUAL=residual is not None, HAS_WEIGHT=weight is not None,
             HAS_BIAS=bias is not None, SINGLE=t.single, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
             NUM_STAGES=t.num_stages),
        num_warps=t.num_warps, maxnreg=p.maxnreg,
    )  # fmt: skip
    return y, s, mean, rstd


def layer_norm_bwd(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    dy: torch.Tensor,
    ds: torch.Tensor | None,
    mean: torch.Tensor,
    rstd: torch.Tensor,
    dx_dtype: torch.dtype | None,
    dr_dtype: torch.dtype | None,
    dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None,
    shape: torch.Size,
) -> tuple[torch.Tensor | None, ...]:
    """Launch ``layer_norm_bwd_kernel`` (and the partials reduction).

    Args:
        x: the forward's LayerNorm input, [M, N] with unit column stride.
        weight: None or contiguous [N].
        dy: gradient of y, [M, N] with unit column stride, any float dtype.
        ds: None, or the gradient of the residual-sum output s, [M, N] like dy; added to dx.
        mean, rstd: fp32 [M] from the forward.
        dx_dtype: dtype of the input gradient dx, None if not wanted.
        dr_dtype: None, or a second dtype in which the same input gradient is also written
            (the residual's, in ``add_layer_norm``); needs ``dx_dtype``.
        dw_dtype, db_dtype: dtypes of the weight and bias gradients, None if not wanted.
        shape: the shape of the returned dx and dr.

    Returns:
        (dx, dr, dw, db), each None where not wanted: dx and dr contiguous of ``shape``,
        dw and db of shape [N].
    """
    m, n = x.shape
    dev = x.device
    dx = empty(shape, dx_dtype, dev) if dx_dtype is not None else None
    dr = empty(shape, dr_dtype, dev) if dr_dtype is not None else None
    p = _plan(n, True, dev.index)
    t = p.tile
    programs = min(cdiv(m, t.block_m), p.max_programs)
    want_dw, want_db = dw_dtype is not None, db_dtype is not None
    n_parts = want_dw + want_db
    part = empty((n_parts, programs, n), torch.float32, dev) if n_parts else None
    launch(
        layer_norm_bwd_kernel, programs,
        (x, weight, dy, ds, mean, rstd, dx, dr, part, m, n, x.stride(0), dy.stride(0),
         ds.stride(0) if ds is not None else 0),
        dict(HAS_WEIGHT=weight is not None, HAS_DS=ds is not None, COMPUTE_DX=dx is not None,
             STORE_DR=dr is not None, COMPUTE_DW=want_dw, COMPUTE_DB=want_db, SINGLE=t.single,
             BLOCK_M=t.block_m, BLOCK_N=t.block_n, NUM_STAGES=t.num_stages),
        num_warps=t.num_warps, maxnreg=p.maxnreg,
    )  # fmt: skip
    if not n_parts:
        return dx, dr, None, None
    dw = empty((n,), dw_dtype, dev) if want_dw else None
    db = empty((n,), db_dtype, dev) if want_db else None
    launch(
        layer_norm_reduce_kernel, p.reduce_grid, (part, dw, db, programs, n),
        dict(COMPUTE_DW=want_dw, COMPUTE_DB=want_db, BLOCK_P=p.reduce_block_p,
             BLOCK_N=p.reduce_block_n),
        num_warps=CONFIG["reduce_warps"],
    )  # fmt: skip
    return dx, dr, dw, db
