"""GEMMs: C = epilogue(A @ B), a Hopper TMA kernel and a portable one (and, for 16-bit
products on Hopper, the Gluon kernel of ``matmul_gluon.py``); and the linear
backward's elementwise pass (dZ = dY * act'(Z) with the bias gradient's column sums).

One computation, two kernels here:

    Z = sum_r  A[o, r] @ B[o, r]
    C[o] = activation(Z + bias)            the epilogue, on the fp32 accumulator
    D[o] = Z + bias                        optional: what the backward needs

``o`` runs over up to two output batch dims and ``r`` over one reduction batch dim (torch's
broadcast batch dims, summed in fp32 inside the kernel). Accumulation is fp32. fp32 operands
use IEEE products, or, when TF32 is allowed, TF32 tensor cores fed operands rounded to TF32
(round to nearest, as cuBLAS does; the hardware alone would truncate).

- ``gemm_tma_kernel`` (sm_90, 2-D problems whose strides TMA can address): a persistent
  kernel over host-side TMA tensor descriptors; either operand may be K-major or MN-major
  (a transposed view), read without copies.
- ``gemm_kernel``: pointer loads with arbitrary strides and masks; every GPU and the
  interpreter.

On sm_90 a 2-D product of 16-bit operands into a 16-bit C runs
``matmul_gluon.gemm_gluon_kernel`` instead, warp-specialised, with the tiles and K splits of
``gluon_tiling`` (a bias or activation on whole tiles only; exact GELU by a separate
elementwise pass over Z, see GLUON_EPILOGUE_ACTIVATIONS); the TMA kernel there serves the
rest (fp32, an fp32 C, accumulation into C, batched products).

Both split K across programs when the output has too few tiles to fill the GPU (the
weight-gradient GEMMs reduce every token into a small d x d output): each split writes its
fp32 partial tile to a workspace and ``reduce_splits_kernel`` sums the splits in fp32 and
writes the output dtype (deterministic: no atomics on C). The compiled TMA kernel instead
adds each split's tile into one fp32 (M, N) sum with a TMA reduce-add, in L2 (C itself when
C is fp32, else a buffer the reduction kernel then casts): less memory traffic, so more splits
pay, but the order of the fp32 additions varies from run to run, as in torch's own atomic
kernels; under ``torch.use_deterministic_algorithms(True)`` it takes the workspace path.

Operands go from shared memory straight into the tensor cores: nothing is applied to A on
its way in (doing dY * act'(Z) there, through registers, ran at ~0.3x a plain GEMM on the
H200). The linear backward instead runs ``dz_dbias_kernel`` (one read of dY and Z, act'(Z)
computed there, one write of dZ, the dbias column sums on the way) and then two plain GEMMs.

The activation math is ``kernels/activations.py``'s device functions.
"""

from __future__ import annotations

import dataclasses
import functools
import itertools
from collections.abc import Iterator
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.language.extra.cuda import gdc_wait
from triton.tools.tensor_descriptor import TensorDescriptor

from ..runtime import (
    INTERPRET,
    bind,
    cdiv,
    device_index,
    empty,
    fp32_uses_tf32,
    is_hopper,
    launch,
    num_sms,
)
from .activations import activation, activation_grad, activation_into
from .matmul_gluon import descriptor as gluon_descriptor
from .matmul_gluon import gemm_gluon_kernel


@dataclasses.dataclass(frozen=True)
class GemmConfig:
    """Tile and launch parameters of one GEMM launch."""

    block_m: int
    block_n: int
    block_k: int
    num_stages: int
    num_warps: int
    group_m: int = 8  # tiles of this many rows of tiles share B columns in L2
    split_k: int = 0  # 0: chosen from the shape (``split_k_for``); n >= 1: forced
    epilogue_split: int = 1  # TMA kernel: the C tile is stored in this many column slices


# ---------------------------------------------------------------------------------------------
# Tuning tables, one per kernel, keyed by (operand class, shape class).
#   operand class: "16bit" (fp16/bf16), "tf32", "ieee" (fp32 without TF32).
#   shape class:   "plain" (C = A @ B), "epilogue" (bias and/or activation).
# Chosen by scripts/tune_matmul.py on an H200 (bf16, 16384-token GPT shapes; the numbers are
# in docs/perf/matmul.md); "plain" group_m 16 from scripts/probe_gemm.py on an H100 (the LM
# head forward 0.95x -> 1.0x of cuBLAS, the other forward/dX shapes unchanged).
# The interpreter entry uses few, large blocks: it pays per program and per op.
TMA_CONFIGS: dict[tuple[str, str], GemmConfig] = {
    ("16bit", "plain"): GemmConfig(128, 256, 64, num_stages=4, num_warps=8, group_m=16,
                                   epilogue_split=4),
    ("16bit", "epilogue"): GemmConfig(128, 256, 64, num_stages=3, num_warps=8, epilogue_split=2),
    ("tf32", "plain"): GemmConfig(128, 256, 32, num_stages=3, num_warps=8, epilogue_split=2),
    ("tf32", "epilogue"): GemmConfig(128, 128, 32, num_stages=3, num_warps=8, epilogue_split=2),
}
PORTABLE_CONFIGS: dict[tuple[str, str], GemmConfig] = {
    ("16bit", "plain"): GemmConfig(128, 128, 64, num_stages=4, num_warps=8),
    ("16bit", "epilogue"): GemmConfig(128, 128, 64, num_stages=4, num_warps=8),
    ("tf32", "plain"): GemmConfig(128, 128, 32, num_stages=3, num_warps=8),
    ("tf32", "epilogue"): GemmConfig(128, 128, 32, num_stages=3, num_warps=8),
    ("ieee", "plain"): GemmConfig(64, 64, 32, num_stages=3, num_warps=4),
    ("ieee", "epilogue"): GemmConfig(64, 64, 32, num_stages=3, num_warps=4),
}
# Interpreter: blocks up to this size, shrunk to the problem (its dots cost per padded
# element, and each program and op costs Python time).
INTERPRET_CONFIG = GemmConfig(256, 256, 256, num_stages=1, num_warps=4)
# dZ / dbias pass: (rows, columns) per block; each program walks a range of rows of one column
# block, and about DZ_PROGRAMS_PER_SM programs per SM run (fewer, larger ones interpreted).
# Swept on the H100 (16384 rows, bf16; docs/perf/matmul.md v9):
# 64 x 64 with 8 per SM ran dbias over 768 / 2304 / 3072 columns in 14 / 37 / 47 us (32 x
# 128 with 4 per SM: 19+ / 59+ / 75 us; torch's sum 26 / 44 / 51 us) and dZ + dbias of GELU
# over 3072 columns in 127 us (138 us; torch's gelu_backward + sum 150 us).
DZ_BLOCK = (256, 256) if INTERPRET else (64, 64)
DZ_PROGRAMS_PER_SM = 8


@dataclasses.dataclass(frozen=True)
class GluonTiling:
    """A tiling of the warp-specialised Gluon kernel (kernels/matmul_gluon.py): tiles of
    64 * consumers rows x (block_n + tail_n) columns."""

    consumers: int  # consumer warpgroups, 64 rows each: 2 or 3
    block_n: int
    tail_n: int  # extra columns in a second accumulator (0: none)
    num_stages: int
    speed: float  # time per BK step and unit of tile area, relative to 128 x 256 (measured)
    block_k: int = 64

    def smem(self, staged_bytes: int) -> int:
        """Shared memory of the operand ring (16-bit A and B) and the epilogue's staging of
        staged_bytes per output element: 2 for a 16-bit C, 4 for the fp32 workspace (or both:
        C is staged within the workspace's buffer)."""
        cols = self.block_n + self.tail_n
        stage = 2 * self.block_k * (64 * self.consumers + cols)
        # a tail as wide as the block is staged after it, through the same buffer
        staged_cols = self.block_n if self.tail_n == self.block_n else cols
        return self.num_stages * stage + self.consumers * 64 * staged_cols * staged_bytes


class GluonSchedule(NamedTuple):
    """How the Gluon kernel covers a product: the tiling; the first dp_tiles tiles whole (all
    of K), each other tile's K in sk_splits pieces (into an fp32 workspace, summed after)."""

    tiling: GluonTiling
    dp_tiles: int
    sk_splits: int
    column_tail: bool = False  # tiles in column order: the split ones are whole columns of
    # tiles (else whole rows)


# Plain 2-D products of 16-bit operands into a 16-bit C on sm_90 run the Gluon kernel. Where
# 128 x 256 tiles fill the SMs GLUON_MAX_WAVES times or more, those tiles whole (kernel-only
# on the H100, GPT forward/dX shapes: 0.98-1.11x cuBLAS, the Triton kernel 0.94-1.10x); else
# (the weight gradients, small batches) the schedule of least cost by the split-K cost model
# below (``gluon_tiling``), a step's cost scaled by the tile's area and speed, ties going to
# the earlier entry. Narrower tiles fill 132 SMs in one wave where 128 x 256 cannot: 192 x
# 128 (3072 x 1024: 128 tiles), 128 x 128 (2304 x 768: 108 tiles), 128 x 160 (3072 x 768 with
# K 4096: 120 tiles); or whole tiles for one wave and the rest split across the SMs (3072 x
# 768: 132 + 12 tiles of 128 x 128, C's staging inside the workspace's so that five stages
# fit: 0.94 -> 0.98x cuBLAS, docs/perf/matmul.md v14). Stages and speeds measured on an H100
# (kernel time per tile step: 0.73, 0.75, 0.78-0.80, 0.73 us), docs/perf/matmul.md v7. Between
# GLUON_MAX_WAVES and GLUON_DEEP_WAVES waves of 128 x 256 tiles with K up to GLUON_DEEP_MAX_K
# (16384 tokens into 768 features) the same tiles as two 128-column accumulators staged one
# after the other (GLUON_DEEP), which leaves room for a fourth stage: 0.94-0.95 -> 0.96-0.99x
# cuBLAS there, slower from 3.9 waves on and at K = 16384 (v14). An fp32 C (an fp32
# weight's gradient under autocast) stays with the Triton kernel: staging fp32 tiles leaves
# shared memory for slower schedules only (0.79-0.97x cuBLAS against the Triton kernel's
# 0.82-1.0x on the d_model 768/1024 weight gradients), as do a bias or an activation on a
# schedule with split tiles, accumulation into C, batched products and fp32 operands. A bias
# and an activation (and the activation's input Z, stored through C's staging buffers first)
# are applied in the Gluon kernel's epilogue, on schedules of whole tiles (the Triton
# kernel's "epilogue" entry ran d768 attn_out / proj forwards at 0.71x / 0.79x of cuBLAS's
# F.linear on the H100, docs/perf/matmul.md v8).
GLUON_TILINGS = (
    GluonTiling(2, 256, 0, 3, speed=1.0),  # first: the tiling of large products
    GluonTiling(3, 128, 0, 4, speed=1.03),
    GluonTiling(2, 128, 32, 4, speed=1.08),
    GluonTiling(2, 128, 0, 5, speed=1.0),
)
GLUON_MAX_WAVES = 2
GLUON_DEEP = GluonTiling(2, 128, 128, 4, speed=1.0)
GLUON_DEEP_WAVES = 3
GLUON_DEEP_MAX_K = 4096
# The activations the Gluon kernel applies in its epilogue; the others (exact GELU) go
# through a separate elementwise pass over Z (``activations.activation_into``). Both consumer
# warpgroups finish a tile together, so its epilogue is not hidden behind wgmmas, and erf
# there is latency-bound (the accumulator holds most of the registers; it spills): on the
# H100, bf16, 8192 x 4096 x 1024 with a bias and Z saved (410m's fc forward), exact GELU in
# the epilogue took 380 us, GELU (tanh) 152 us, none 105 us (docs/perf/matmul.md v11).
GLUON_EPILOGUE_ACTIVATIONS = ("none", "relu", "gelu_tanh")
GLUON_SMEM = 227 * 1024 - 1024  # the SM's shared memory, less the barriers
# Tile order: GROUP_M rows of tiles at a time. Whole tiles with N up to GLUON_NARROW_N take
# GLUON_GROUP_M_NARROW. On the H100, on the benchmark's whole-tile forward and dX products,
# 4 instead of 8 took 0.994x the time on average up to N = 4096 (d2048 attn_out fwd 0.987x,
# d2048 qkv dX 0.983x) but 1.03-1.08x at N = 8192 and 50304 (docs/perf/matmul.md v16).
GLUON_GROUP_M = 8
GLUON_GROUP_M_NARROW = 4
GLUON_NARROW_N = 4096

# Split-K cost model (units: one BLOCK_K step of one 128 x 256 tile): each wave of split
# tiles costs about REDUCE_STEPS more (its fp32 partial tiles stored or reduce-added, the
# pipeline drained and refilled), and splitting at all FIXED_STEPS (zeroing, the reduction or
# cast launch). Fitted to forced splits of the d_model 768-2048 weight-gradient shapes on an
# H100 (docs/perf/matmul.md): it picks the fastest split of each (7 for 18 tiles, 4 for 32,
# 2 for 54, 3 for 72, 1 for 96 and more).
REDUCE_STEPS = 20
FIXED_STEPS = 28
MAX_SPLIT_K = 16
MIN_STEPS_PER_SPLIT = 4
# The TMA kernel's epilogue staging buffers (C, plus D when stored, plus C read back when
# accumulating) are kept under this many bytes.
EPILOGUE_SMEM = 64 * 1024
REDUCE_BLOCK = 1 << 16 if INTERPRET else 2048
# The reduction is launched as a programmatic dependent of the GEMM (PDL): its programs are
# placed on the SMs as the GEMM's programs exit and wait for the whole GEMM (``gdc_wait``),
# which hides the launch gap between the two (d768 / d1024 attn_out dW 0.95 / 0.94 -> 0.99 /
# 0.97x cuBLAS, docs/perf/matmul.md v16). Not under the interpreter (no ``griddepcontrol``).
REDUCE_PDL = not INTERPRET


class GemmResult(NamedTuple):
    c: torch.Tensor  # (M, N), or (O0, O1, M, N) for batched operands
    z: torch.Tensor | None  # Z = A @ B + bias, the activation's input (save_z), like c


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(unit, num_pid_m, num_pid_n, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Work unit -> (tile row, tile column, K split): split by split (units that run together
    share K ranges), GROUP_M rows of tiles walking N together."""
    tiles = num_pid_m * num_pid_n
    split = unit // tiles
    tile = unit - split * tiles
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    size_m = tl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m, pid_n, split


@triton.jit
def _round_tf32(x):
    """fp32 -> the nearest TF32 value (ties away from zero), NaN kept."""
    bits = x.to(tl.uint32, bitcast=True)
    r = (((bits + 0x1000) >> 13) << 13).to(tl.float32, bitcast=True)  # keep 10 mantissa bits
    return tl.where(x == x, r, x)


@triton.jit
def _accumulate(acc, a, b, one, PRECISION: tl.constexpr):
    """acc + a @ b. IEEE fp32 sums each BK-long block apart, then adds it to the running sum:
    the rounding error grows with BK + K / BK rather than K, close to cuBLAS's fp32 GEMM.
    ``one`` is 1.0 computed at run time: the compiler folds ``acc + dot(a, b)`` back into
    ``dot(a, b, acc)``, but not ``acc + dot(a, b) * one``."""
    if PRECISION == "ieee":
        return acc + tl.dot(a, b, input_precision=PRECISION) * one
    return tl.dot(a, b, acc, input_precision=PRECISION)


@triton.jit
def _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr):
    """fp32 tile -> (activation(z), z) with z = acc + bias[offs_n]."""
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    return activation(z, ACTIVATION), z


@triton.jit
def _halves(x, BM: tl.constexpr, WIDTH: tl.constexpr):
    """Split a (BM, WIDTH) tile into its left and right (BM, WIDTH // 2) halves."""
    return tl.split(tl.permute(tl.reshape(x, (BM, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _tma_store_slice(acc, c_desc, d_desc, bias_ptr, row, on, N,
                     HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_Z: tl.constexpr,
                     ACCUMULATE: tl.constexpr, REDUCE_ADD: tl.constexpr, BN_SLICE: tl.constexpr):
    y, z = _epilogue(acc, bias_ptr, on + tl.arange(0, BN_SLICE), N, HAS_BIAS, ACTIVATION)
    if ACCUMULATE:  # C += A @ B (plain GEMMs only: no bias or activation)
        y += c_desc.load([row, on]).to(tl.float32)
    if SAVE_Z:
        d_desc.store([row, on], z.to(d_desc.dtype))
    if REDUCE_ADD:  # a split's partial sum, added in L2 (fp32 C)
        c_desc.atomic_add([row, on], y)
    else:
        c_desc.store([row, on], y.to(c_desc.dtype))


# ---------------------------------------------------------------------------------------------
# Hopper: persistent kernel over TMA descriptors
# ---------------------------------------------------------------------------------------------


@triton.jit
def gemm_tma_kernel(
    a_desc,  # A (M, K), block [BM, BK]; with A_T its storage (K, M), block [BK, BM]
    b_desc,  # B (K, N), block [BK, BN]; with B_T its storage (N, K), block [BN, BK]
    c_desc,  # C (M, N); with SPLIT_K > 1 the fp32 workspace (SPLIT_K * ws_rows, N), or with
             # REDUCE_ADD an fp32 (M, N) sum the splits are added into;
             # block [BM, BN // EPI_SPLIT]
    d_desc,  # D = Z (M, N), the activation's input, block like c_desc (SAVE_Z), else None
    bias_ptr,  # bias (N,) (HAS_BIAS)
    M, N, K,  # problem size
    steps_per_split,  # BK steps of K per split (all splits equal; TMA zero-fills past K)
    ws_rows,  # workspace rows per split (M rounded up to BM); 0 without one
    A_T: tl.constexpr, B_T: tl.constexpr,  # operand given through its transposed storage
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_Z: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # C += the product (SPLIT_K == 1; plain GEMMs)
    SPLIT_K: tl.constexpr,
    REDUCE_ADD: tl.constexpr,  # splits reduce-add into c_desc (TMA, in L2; order varies)
    ROUND_TF32: tl.constexpr,  # fp32 operands: round to TF32 for TF32 tensor cores
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands: "tf32" or "ieee"
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
    EPI_SPLIT: tl.constexpr,  # 1, 2 or 4 column slices for the epilogue stores
    NUM_SMS: tl.constexpr,  # programs launched (one per SM); each walks every NUM_SMS-th unit
):
    """Persistent GEMM: each program loops over (tile, K split) units, TMA loads, wgmma."""
    start = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BM)
    one = tl.where(K > 0, 1.0, 0.0)  # 1.0, unknown to the compiler (see _accumulate)
    num_pid_n = tl.cdiv(N, BN)
    units = num_pid_m * num_pid_n * SPLIT_K
    unit_c = start - NUM_SMS  # the epilogue's own copy of the unit counter
    for unit in tl.range(start, units, NUM_SMS, flatten=True):
        pid_m, pid_n, split = _tile_coords(unit, num_pid_m, num_pid_n, SPLIT_K, GROUP_M)
        om = pid_m * BM
        on = pid_n * BN
        k0 = split * steps_per_split * BK
        acc = tl.zeros((BM, BN), dtype=tl.float32)
        for ks in range(steps_per_split):
            ok = k0 + ks * BK
            if A_T:
                a = a_desc.load([ok, om]).T
            else:
                a = a_desc.load([om, ok])
            if B_T:
                b = b_desc.load([on, ok]).T
            else:
                b = b_desc.load([ok, on])
            if ROUND_TF32:
                a = _round_tf32(a)
                b = _round_tf32(b)
            acc = _accumulate(acc, a, b, one, PRECISION)

        unit_c += NUM_SMS
        pid_m, pid_n, split = _tile_coords(unit_c, num_pid_m, num_pid_n, SPLIT_K, GROUP_M)
        row = split * ws_rows + pid_m * BM
        on = pid_n * BN
        if EPI_SPLIT == 1:
            _tma_store_slice(acc, c_desc, d_desc, bias_ptr, row, on, N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN)
        elif EPI_SPLIT == 2:
            acc0, acc1 = _halves(acc, BM, BN)
            _tma_store_slice(acc0, c_desc, d_desc, bias_ptr, row, on, N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN // 2)
            _tma_store_slice(acc1, c_desc, d_desc, bias_ptr, row, on + BN // 2, N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN // 2)
        else:
            acc0, acc1 = _halves(acc, BM, BN)
            acc00, acc01 = _halves(acc0, BM, BN // 2)
            acc10, acc11 = _halves(acc1, BM, BN // 2)
            _tma_store_slice(acc00, c_desc, d_desc, bias_ptr, row, on, N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN // 4)
            _tma_store_slice(acc01, c_desc, d_desc, bias_ptr, row, on + BN // 4, N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN // 4)
            _tma_store_slice(acc10, c_desc, d_desc, bias_ptr, row, on + BN // 2, N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN // 4)
            _tma_store_slice(acc11, c_desc, d_desc, bias_ptr, row, on + 3 * (BN // 4), N,
                             HAS_BIAS, ACTIVATION, SAVE_Z, ACCUMULATE, REDUCE_ADD, BN // 4)


# ---------------------------------------------------------------------------------------------
# Portable kernel: pointers, strides, masks; batch dims
# ---------------------------------------------------------------------------------------------


@triton.jit
def gemm_kernel(
    a_ptr,  # A (O0, O1, R, M, K), any strides (0 for broadcast dims); cast to B's dtype
    b_ptr,  # B (O0, O1, R, K, N), any strides
    c_ptr,  # C (O0, O1, M, N); with SPLIT_K > 1 the fp32 workspace (SPLIT_K, O0, O1, M, N)
    d_ptr,  # D = Z, the activation's input, strides of C (SAVE_Z), else None
    bias_ptr,  # bias (N,) (HAS_BIAS)
    M, N, K,  # matrix sizes
    R,  # reduction batch size: C sums R products
    O1,  # size of the second output batch dim (program_id(1) = o0 * O1 + o1)
    steps_per_split,  # (r, BK step) iterations per K split
    s_a0, s_a1, s_ar, s_am, s_ak,  # strides of A
    s_b0, s_b1, s_br, s_bk, s_bn,  # strides of B
    s_c0, s_c1, s_cm, s_cn,  # strides of C (and D)
    s_cs,  # workspace stride between splits (SPLIT_K > 1)
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_Z: tl.constexpr,
    ACCUMULATE: tl.constexpr,  # C += the product (SPLIT_K == 1; plain GEMMs)
    SPLIT_K: tl.constexpr, ROUND_TF32: tl.constexpr,
    PRECISION: tl.constexpr,  # tl.dot input_precision for fp32 operands
    BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, GROUP_M: tl.constexpr,
):
    """One (tile, K split) per program along axis 0, one output batch index along axis 1."""
    num_pid_m = tl.cdiv(M, BM)
    one = tl.where(K > 0, 1.0, 0.0)  # 1.0, unknown to the compiler (see _accumulate)
    num_pid_n = tl.cdiv(N, BN)
    pid_m, pid_n, split = _tile_coords(tl.program_id(0), num_pid_m, num_pid_n, SPLIT_K, GROUP_M)
    batch = tl.program_id(1)
    o0 = (batch // O1).to(tl.int64)
    o1 = (batch % O1).to(tl.int64)

    offs_m = pid_m * BM + tl.arange(0, BM)
    offs_n = pid_n * BN + tl.arange(0, BN)
    m_ok = offs_m < M
    n_ok = offs_n < N
    a_rows = a_ptr + o0 * s_a0 + o1 * s_a1 + offs_m[:, None].to(tl.int64) * s_am
    b_cols = b_ptr + o0 * s_b0 + o1 * s_b1 + offs_n[None, :].to(tl.int64) * s_bn

    k_steps = tl.cdiv(K, BK)
    lo = split * steps_per_split
    hi = tl.minimum(lo + steps_per_split, R * k_steps)
    acc = tl.zeros((BM, BN), dtype=tl.float32)
    for i in range(lo, hi):
        r = i // k_steps
        k = (i - r * k_steps) * BK + tl.arange(0, BK)
        k_ok = k < K
        k64 = k.to(tl.int64)
        r64 = r.to(tl.int64)
        a = tl.load(a_rows + r64 * s_ar + k64[None, :] * s_ak,
                    mask=m_ok[:, None] & k_ok[None, :], other=0.0)
        b = tl.load(b_cols + r64 * s_br + k64[:, None] * s_bk,
                    mask=k_ok[:, None] & n_ok[None, :], other=0.0)
        a = a.to(b.dtype)
        if ROUND_TF32:
            a = _round_tf32(a)
            b = _round_tf32(b)
        acc = _accumulate(acc, a, b, one, PRECISION)

    c_off = (split.to(tl.int64) * s_cs + o0 * s_c0 + o1 * s_c1 + offs_m[:, None].to(tl.int64) * s_cm
             + offs_n[None, :].to(tl.int64) * s_cn)
    mask = m_ok[:, None] & n_ok[None, :]
    y, z = _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION)
    if ACCUMULATE:
        y += tl.load(c_ptr + c_off, mask=mask).to(tl.float32)
    if SAVE_Z:
        tl.store(d_ptr + c_off, z.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Split-K reduction; the linear backward's dZ / dbias pass
# ---------------------------------------------------------------------------------------------


@triton.jit
def reduce_splits_kernel(
    ws_ptr,  # fp32 workspace (SPLIT_K, O, ws_rows, cols) of partial sums, contiguous
    out_ptr,  # output (O, rows, cols) contiguous, or (rows, cols) rows out_stride apart
    n_out,  # O * rows * cols
    per_matrix,  # rows * cols
    ws_matrix,  # ws_rows * cols
    ws_split,  # O * ws_rows * cols
    cols, out_stride,  # the output's columns and row stride (STRIDED)
    ACCUMULATE: tl.constexpr,  # out += the sum
    STRIDED: tl.constexpr,  # one output matrix, rows out_stride apart; else contiguous
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
    PDL: tl.constexpr,  # launched as a programmatic dependent of the GEMM: wait for it first
):
    """out = sum over splits of the workspace (+ out), in fp32, cast to the output dtype."""
    if PDL:
        gdc_wait()  # (before any memory access: the GEMM's writes are visible after it)
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    o = offs // per_matrix
    src = o * ws_matrix + (offs - o * per_matrix)
    dst = out_ptr + offs
    if STRIDED:
        row = offs // cols
        dst = out_ptr + row * out_stride + (offs - row * cols)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    if ACCUMULATE:
        acc += tl.load(dst, mask=mask).to(tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * ws_split + src, mask=mask, other=0.0)
    tl.store(dst, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dz_dbias_kernel(
    dy_ptr,  # dY (M, N), any strides
    z_ptr,  # Z, the activation's input (M, N), any strides (ACTIVATION != "none"), else None
    dz_ptr,  # dZ = dY * activation'(Z) (M, N) contiguous, in its own dtype (DZ_OUT), else None
    sums_ptr,  # column sums of dZ per row range (P, N) contiguous, any float dtype (SUMS)
    M, N,
    rows_per_range,  # rows of each range, a multiple of BM; program_id(1) = range index
    s_ym, s_yn, s_zm, s_zn,  # strides of dY and Z
    ACTIVATION: tl.constexpr,  # "none" (dZ = dY) or the forward's (kernels/activations.py)
    DZ_OUT: tl.constexpr, SUMS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """dZ = dY * activation'(Z) over one column block and one range of rows, and that range's
    column sums (accumulated in fp32 from the unrounded values)."""
    cols = tl.program_id(0) * BN + tl.arange(0, BN)
    col_ok = cols < N
    cols64 = cols[None, :].to(tl.int64)
    lo = tl.program_id(1) * rows_per_range
    hi = tl.minimum(lo + rows_per_range, M)
    acc = tl.zeros((BN,), dtype=tl.float32)
    for m0 in range(lo, hi, BM):
        offs_m = m0 + tl.arange(0, BM)
        rows = offs_m[:, None].to(tl.int64)
        mask = (offs_m[:, None] < hi) & col_ok[None, :]
        dz = tl.load(dy_ptr + rows * s_ym + cols64 * s_yn, mask=mask, other=0.0).to(tl.float32)
        if ACTIVATION != "none":
            z = tl.load(z_ptr + rows * s_zm + cols64 * s_zn, mask=mask, other=0.0)
            dz = activation_grad(z.to(tl.float32), dz, ACTIVATION)
        if DZ_OUT:
            tl.store(dz_ptr + rows * N + cols64, dz.to(dz_ptr.dtype.element_ty), mask=mask)
        if SUMS:
            acc += tl.sum(dz, axis=0)
    if SUMS:
        tl.store(sums_ptr + tl.program_id(1).to(tl.int64) * N + cols,
                 acc.to(sums_ptr.dtype.element_ty), mask=col_ok)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


def operand_class(dtype: torch.dtype) -> str:
    """The tuning table's operand class of a compute dtype ("16bit", "tf32" or "ieee")."""
    if dtype != torch.float32:
        return "16bit"
    return "tf32" if fp32_uses_tf32() else "ieee"


@functools.lru_cache(maxsize=4096)
def split_k_for(tiles: int, k_steps: int, sms: int) -> int:
    """Number of K splits that finishes soonest by the cost model above (1 when tiles fill)."""
    best, best_cost = 1, None
    for s in range(1, MAX_SPLIT_K + 1):
        per = cdiv(k_steps, s)
        if s > 1 and per < MIN_STEPS_PER_SPLIT:
            break
        waves = cdiv(tiles * s, sms)
        cost = waves * per + (waves * REDUCE_STEPS + FIXED_STEPS if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
    return best


def _schedule_cost(tiles: int, dp: int, splits: int, k_steps: int, sms: int) -> int:
    """Cost by the split-K cost model (units: BK steps of one tile) of dp whole tiles and the
    other tiles' K in ``splits`` pieces, the units dealt round-robin to min(sms, units)
    programs: the busiest program's steps, plus REDUCE_STEPS per split unit it runs and
    FIXED_STEPS for splitting at all."""
    sk_units = (tiles - dp) * splits
    programs = min(sms, dp + sk_units)
    per = cdiv(k_steps, splits)
    worst = 0
    for p in range(programs):
        n_dp = cdiv(dp - p, programs) if p < dp else 0
        first_sk = p + n_dp * programs  # this program's first unit past the whole tiles
        n_sk = cdiv(dp + sk_units - first_sk, programs) if first_sk < dp + sk_units else 0
        worst = max(worst, n_dp * k_steps + n_sk * (per + REDUCE_STEPS))
    return worst + (FIXED_STEPS if sk_units else 0)


def gluon_tiling(m: int, n: int, k: int, sms: int, whole: bool = False) -> GluonSchedule:
    """The Gluon kernel's schedule for an (m, k) @ (k, n) product with a 16-bit output: 128 x
    256 tiles whole once they fill the SMs GLUON_MAX_WAVES times (as GLUON_DEEP's two
    accumulators below GLUON_DEEP_WAVES and GLUON_DEEP_MAX_K), else the least cost of, per
    tiling: every tile whole; every tile's K split evenly; and, with more tiles than SMs,
    whole tiles for full waves and the rest (whole rows or columns of tiles, last in order)
    split across all the SMs. With ``whole``, whole tiles only (for a bias or an activation,
    applied in the epilogue)."""
    tiles = cdiv(m, 128) * cdiv(n, 256)
    if tiles >= GLUON_MAX_WAVES * sms:
        deep = tiles < GLUON_DEEP_WAVES * sms and k <= GLUON_DEEP_MAX_K
        return GluonSchedule(GLUON_DEEP if deep else GLUON_TILINGS[0], tiles, 1)
    best, best_cost = None, None
    for t in GLUON_TILINGS:
        n_rows, n_cols = cdiv(m, 64 * t.consumers), cdiv(n, t.block_n + t.tail_n)
        tiles = n_rows * n_cols
        area = 64 * t.consumers * (t.block_n + t.tail_n) / (128 * 256) * t.speed
        k_steps = cdiv(k, t.block_k)
        # the tiles past the full waves, rounded up to whole rows or columns of tiles
        rest = tiles - tiles // sms * sms if tiles > sms else tiles
        tails = [(cdiv(rest, n_cols) * n_cols, False), (cdiv(rest, n_rows) * n_rows, True)]
        candidates = [(tiles, 1, False, 2)]
        for s in range(2, 1 if whole else MAX_SPLIT_K + 1):
            if cdiv(k_steps, s) < MIN_STEPS_PER_SPLIT:
                break
            candidates.append((0, s, False, 4))
            candidates += [(tiles - tail, s, cols, 4) for tail, cols in tails if tail < tiles]
        for dp, s, cols, staged in candidates:
            if t.smem(staged) > GLUON_SMEM:
                continue
            cost = _schedule_cost(tiles, dp, s, k_steps, sms) * area
            if best_cost is None or cost < best_cost:  # (_gluon_plan drops empty pieces)
                best, best_cost = GluonSchedule(t, dp, s, cols), cost
    return best


def _tma_layout(t: torch.Tensor) -> tuple[bool, list[int], list[int]] | None:
    """How TMA can read the 2-D view ``t``: (through its transpose?, shape, strides), or None.

    TMA needs a 16-byte aligned base, a unit last stride and 16-byte aligned other strides.
    """
    es = t.element_size()
    if t.data_ptr() % 16:
        return None
    rows, cols = t.shape
    s0, s1 = t.stride()
    if s1 == 1 and (s0 * es) % 16 == 0:
        return False, [rows, cols], [s0, 1]
    if s0 == 1 and (s1 * es) % 16 == 0:
        return True, [cols, rows], [s1, 1]
    return None


def _tma_layouts(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> tuple | None:
    """(A's, B's TMA layout) when the TMA kernel can run the 2-D problem a @ b on its device,
    else None."""
    if not is_hopper(a.device) or operand_class(b.dtype) == "ieee":
        return None
    if (b.shape[1] * torch.finfo(out_dtype).bits // 8) % 16:
        return None
    la, lb = _tma_layout(a), _tma_layout(b)
    if la is None or lb is None:
        return None
    return la, lb


def tma_eligible(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype) -> bool:
    """Whether the TMA kernel can run the 2-D problem a @ b on its device."""
    return _tma_layouts(a, b, out_dtype) is not None


def _pick_config(m: int, n: int, k: int, tma: bool, op_class: str, shape_class: str):
    if INTERPRET:
        fit = lambda block, dim: max(16, min(block, 1 << (dim - 1).bit_length()))
        c = INTERPRET_CONFIG
        return dataclasses.replace(c, block_m=fit(c.block_m, m), block_n=fit(c.block_n, n),
                                   block_k=fit(c.block_k, k))
    return (TMA_CONFIGS if tma else PORTABLE_CONFIGS)[(op_class, shape_class)]


class _Plan(NamedTuple):
    """Everything about one GEMM launch that depends on shapes, strides and dtypes only."""

    kernel: object  # gemm_tma_kernel, gemm_kernel or matmul_gluon.gemm_gluon_kernel
    tma: bool
    batched: bool
    dims: tuple[int, int, int, int, int, int]  # O0, O1, R, M, N, K
    out_shape: tuple[int, ...]
    split: int
    steps: int  # BK steps per split
    ws_rows: int  # workspace rows per split and batch matrix
    reduce_add: bool  # the splits are summed by TMA reduce-adds into one fp32 (M, N) tensor
    descs: tuple  # TMA: (A's, B's (transposed?, shape, strides, block)), C's and D's blocks;
    # Gluon: A's, B's, B's tail (or None) as (shape, strides, block), and per output (C, the
    # workspace, D) None or the (shape, strides, block) of its descriptor and of its tail's
    grid: tuple[int, int]
    constexprs: dict  # the kernel's constexpr arguments, in signature order
    options: dict  # num_warps, num_stages
    launch_id: int  # the launches' key (runtime.launch): one per plan made, so that a plan
    # made again for the same arguments (tables that tests change) gets its own compiled kernel
    ws_shape: tuple  # the fp32 workspace of the splits' partial sums; () for none
    reduce: tuple  # reduce_splits_kernel's (grid, arguments after ws and out, constexprs,
    # offset of its output in C) when the splits are summed or cast by it; () otherwise
    gluon_args: tuple = ()  # Gluon: units, dp_tiles, sk_steps, k_steps, ws_rows,
    # tail_row0, tail_col0 (see gemm_gluon_kernel)
    activation_pass: str | None = None  # Gluon: the kernel writes Z and this activation is
    # applied by a separate elementwise pass (not in GLUON_EPILOGUE_ACTIVATIONS); else None


def _reduce_launch(n_mats: int, m: int, n: int, rows: int, splits: int, origin: tuple[int, int],
                   accumulate: bool) -> tuple:
    """``_Plan.reduce`` for summing ``splits`` workspace blocks of ``rows`` rows into C's
    n_mats (m, n) matrices from (row, column) ``origin`` on (a strided block when the column
    is not 0)."""
    row0, col0 = origin
    cols = n - col0
    per_matrix = (m - row0) * cols
    args = (n_mats * per_matrix, per_matrix, rows * cols, n_mats * rows * cols, cols, n)
    constexprs = dict(ACCUMULATE=accumulate, STRIDED=col0 > 0, SPLIT_K=splits,
                      BLOCK=REDUCE_BLOCK, PDL=REDUCE_PDL)
    return cdiv(n_mats * per_matrix, REDUCE_BLOCK), args, constexprs, row0 * n + col0


def _make_plan(a: torch.Tensor, b: torch.Tensor, out_dtype: torch.dtype, has_bias: bool,
               act: str, save_z: bool, accumulate: bool, config: GemmConfig | None,
               use_tma: bool | None, deterministic: bool) -> _Plan:
    batched = a.dim() == 5
    if batched:
        o0, o1, r, m, k = a.shape
        a2, b2 = (a[0, 0, 0], b[0, 0, 0]) if o0 * o1 * r == 1 else (None, None)
    else:
        o0 = o1 = r = 1
        m, k = a.shape
        a2, b2 = a, b
    n = b.shape[-1]
    layouts = None if a2 is None else _tma_layouts(a2, b2, out_dtype)
    auto_tma = use_tma is None
    if use_tma is None:
        use_tma = layouts is not None
    elif use_tma:  # forced (tests, tuning): the layouts, without the device check
        layouts = (_tma_layout(a2), _tma_layout(b2))
    op_class = operand_class(b.dtype)
    epilogue = has_bias or act != "none" or save_z
    if (use_tma and auto_tma and config is None and out_dtype != torch.float32
            and not (INTERPRET or batched or accumulate) and op_class == "16bit"):
        sms = num_sms(device_index(a))
        schedule = gluon_tiling(m, n, k, sms, whole=epilogue)
        t = schedule.tiling
        whole = schedule.dp_tiles == cdiv(m, 64 * t.consumers) * cdiv(n, t.block_n + t.tail_n)
        if whole or not epilogue:  # a bias or activation is applied to whole tiles only
            return _gluon_plan(m, n, k, layouts, schedule, sms, has_bias, act, save_z)
    # accumulate reads C in the epilogue: the "epilogue" configs leave shared memory for it
    config = config or _pick_config(m, n, k, use_tma, op_class,
                                    "epilogue" if epilogue or accumulate else "plain")
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    tiles = cdiv(m, bm) * cdiv(n, bn)
    k_steps = r * cdiv(k, bk)
    sms = num_sms(device_index(a))
    split = 1 if epilogue else config.split_k or split_k_for(tiles * o0 * o1, k_steps, sms)
    steps = cdiv(k_steps, split)
    split = cdiv(k_steps, steps)  # no empty splits
    # TMA kernel: splits summed by reduce-adds in L2 (compiled, order not fixed) unless
    # torch.use_deterministic_algorithms asks for a fixed order (a workspace and a reduction)
    reduce_add = use_tma and split > 1 and not (INTERPRET or deterministic)
    flags = dict(HAS_BIAS=has_bias, ACTIVATION=act, SAVE_Z=save_z,
                 ACCUMULATE=accumulate and split == 1, SPLIT_K=split, REDUCE_ADD=reduce_add,
                 ROUND_TF32=op_class == "tf32", PRECISION="ieee" if op_class == "ieee" else "tf32",
                 BM=bm, BN=bn, BK=bk, GROUP_M=config.group_m)
    descs: tuple = ()
    if use_tma:
        epi = config.epilogue_split
        es = 4 if split > 1 else torch.finfo(out_dtype).bits // 8
        tiles_staged = 1 + save_z + (accumulate and split == 1)  # C, Z, C read back
        while bm * bn * es * tiles_staged // epi > EPILOGUE_SMEM and epi < 4:
            epi *= 2

        def desc(layout, rows, cols):
            transposed, shape, strides = layout
            return shape, strides, [cols, rows] if transposed else [rows, cols]

        (la, lb), out_block = layouts, [bm, bn // epi]
        descs = (desc(la, bm, bk), desc(lb, bk, bn), out_block)
        flags.update(A_T=la[0], B_T=lb[0], EPI_SPLIT=epi, NUM_SMS=sms)
        grid = (sms, 1)
    else:
        if o0 * o1 > 65535:
            raise ValueError(f"at most 65535 batch matrices per launch, got {o0 * o1}")
        grid = (tiles * split, o0 * o1)
    kernel = gemm_tma_kernel if use_tma else gemm_kernel
    constexprs = {name: flags[name] for name in kernel.arg_names if name in flags}
    options = dict(num_stages=config.num_stages, num_warps=config.num_warps)
    ws_rows = cdiv(m, bm) * bm if use_tma else m
    ws_shape, reduce = (), ()
    if split > 1 and not reduce_add:  # a workspace per split, summed
        ws_shape = (split, o0, o1, ws_rows, n)
        reduce = _reduce_launch(o0 * o1, m, n, ws_rows, split, (0, 0), accumulate)
    elif reduce_add and out_dtype != torch.float32:  # one fp32 sum, cast into C
        reduce = _reduce_launch(1, m, n, m, 1, (0, 0), accumulate)
    return _Plan(kernel, use_tma, batched, (o0, o1, r, m, n, k),
                 (o0, o1, m, n) if batched else (m, n), split, steps, ws_rows, reduce_add, descs,
                 grid, constexprs, options, next(_LAUNCH_IDS), ws_shape, reduce)


def _gluon_plan(m: int, n: int, k: int, layouts: tuple, schedule: GluonSchedule, sms: int,
                has_bias: bool, act: str, save_z: bool) -> _Plan:
    """The plan of a 2-D product through ``matmul_gluon.gemm_gluon_kernel`` by ``schedule``
    (with a bias or an activation: whole tiles only; an activation not in
    GLUON_EPILOGUE_ACTIVATIONS is left to a separate pass over the kernel's Z).
    The split tiles' K pieces go to an fp32 workspace, one (rows, columns) block per piece
    covering those tiles, which ``reduce_splits_kernel`` sums (in a fixed order:
    deterministic) into C from the first split tile on."""
    t, dp, splits, column_tail = schedule
    (la, lb), bk = layouts, t.block_k
    tm, tn = 64 * t.consumers, t.block_n + t.tail_n
    n_rows, n_cols = cdiv(m, tm), cdiv(n, tn)
    k_steps = cdiv(k, bk)
    split_tiles = n_rows * n_cols - dp
    splits = cdiv(k_steps, cdiv(k_steps, splits)) if split_tiles else 1  # no empty pieces
    units = dp + split_tiles * splits
    programs = min(sms, units)
    # the split tiles: whole rows (or columns) of tiles from this row (or column) of C on
    origin = (0, dp // n_rows * tn) if column_tail else (dp // n_cols * tm, 0)
    ws_rows = n_rows * tm - origin[0]

    def desc(layout, rows, cols):
        transposed, shape, strides = layout
        return shape, strides, [cols, rows] if transposed else [rows, cols]

    ws_shape = (splits * ws_rows, n - origin[1]) if split_tiles else ()
    fused = act in GLUON_EPILOGUE_ACTIVATIONS
    tail = t.tail_n and t.tail_n != t.block_n

    def out(shape):  # an output's descriptors: the main one's (shape, strides, block) and the
        # tail's (None: no tail, or one as wide as the block, whose descriptors the kernel reuses)
        return (([*shape], [shape[1], 1], [64, t.block_n]),
                ([*shape], [shape[1], 1], [64, t.tail_n]) if tail else None)

    outs = (out((m, n)) if dp else None, out(ws_shape) if split_tiles else None,
            out((m, n)) if save_z and fused else None)  # C, the workspace, D (None: not written)
    descs = (desc(la, 64, bk), desc(lb, bk, t.block_n), desc(lb, bk, t.tail_n) if tail else None,
             outs)
    # tile order: rows of GROUP_M rows of tiles; one row at a time (all rows, i.e. column
    # order) so that the split tiles come last as whole rows (columns)
    if 0 < dp < dp + split_tiles:
        group_m = n_rows if column_tail else 1
    elif split_tiles == 0 and n <= GLUON_NARROW_N:
        group_m = GLUON_GROUP_M_NARROW
    else:
        group_m = GLUON_GROUP_M
    constexprs = dict(A_T=la[0], B_T=lb[0], BN=t.block_n, TAIL_N=t.tail_n, BK=bk,
                      STAGES=t.num_stages, CONSUMERS=t.consumers, HAS_DP=dp > 0,
                      HAS_SK=split_tiles > 0, HAS_BIAS=has_bias,
                      ACTIVATION=act if fused else "none", SAVE_Z=save_z and fused,
                      GROUP_M=group_m, NUM_SMS=programs)
    gluon_args = (units, dp, cdiv(k_steps, splits), k_steps, ws_rows, *origin)
    reduce = _reduce_launch(1, m, n, ws_rows, splits, origin, False) if split_tiles else ()
    grid = (programs, 1)
    return _Plan(gemm_gluon_kernel, True, False, (1, 1, 1, m, n, k), (m, n), splits, 0,
                 ws_rows, False, descs, grid, constexprs, dict(num_warps=4),
                 next(_LAUNCH_IDS), ws_shape, reduce, gluon_args, None if fused else act)


#: launch plans by (shapes, strides, dtypes, alignment, options): a training step repeats the
#: same few dozen GEMMs, and planning one costs more CPU time than launching it.
_PLANS: dict[tuple, _Plan] = {}
_LAUNCH_IDS = itertools.count()
#: repeatable launches (runtime.bind) by (plan's launch id, the tensors' addresses)
_BOUND: dict[tuple, tuple] = {}


def _descriptor(base: torch.Tensor, shape: list[int], strides: list[int],
                block: list[int]) -> TensorDescriptor:
    """A host TMA descriptor of a layout ``_tma_layout`` has checked (TensorDescriptor's own
    constructor validates it again, ~3 us of host time per descriptor)."""
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = base, shape, strides, block, "zero"
    return d


def _launches(plan: _Plan, a: torch.Tensor, b: torch.Tensor, c: torch.Tensor,
              ws: torch.Tensor | None, d: torch.Tensor | None, z: torch.Tensor | None,
              bias: torch.Tensor | None) -> Iterator[tuple]:
    """The launches of ``plan`` on these tensors, in order, as (kernel, grid, arguments,
    constexprs, launch key, options): the GEMM (into z when an activation pass follows), then
    the reduction of its splits when it has one."""
    _, o1, r, m, n, k = plan.dims
    split, key = plan.split, plan.launch_id
    if plan.kernel is gemm_gluon_kernel:
        sa, sb, sbt, outs = plan.descs
        args = [gluon_descriptor(a, *sa), gluon_descriptor(b, *sb),
                sbt and gluon_descriptor(b, *sbt)]
        for t, spec in zip((c if z is None else z, ws, d), outs, strict=True):
            main, tail = spec or (None, None)  # (None passed: the kernel reuses another's)
            args += (main and gluon_descriptor(t, *main), tail and gluon_descriptor(t, *tail))
        args += (bias, m, n, *plan.gluon_args)
    elif plan.tma:
        a2, b2 = (a[0, 0, 0], b[0, 0, 0]) if plan.batched else (a, b)
        (sa, sb, out_block) = plan.descs
        if split == 1:
            target = c.view(m, n)
        else:
            target = ws.view(m if plan.reduce_add else split * plan.ws_rows, n)
        args = (_descriptor(a2, *sa), _descriptor(b2, *sb),
                _descriptor(target, [target.shape[0], n], [n, 1], out_block),
                None if d is None else _descriptor(d.view(m, n), [m, n], [n, 1], out_block),
                bias, m, n, k, plan.steps,
                plan.ws_rows if split > 1 and not plan.reduce_add else 0)  # fmt: skip
    else:
        a_strides = a.stride() if plan.batched else (0, 0, 0, *a.stride())
        b_strides = b.stride() if plan.batched else (0, 0, 0, *b.stride())
        if split > 1:
            target, c_strides, s_split = ws, ws.stride()[-4:], ws.stride(0)
        else:
            target, s_split = c, 0
            c_strides = c.stride() if plan.batched else (0, 0, *c.stride())
        args = (a, b, target, d, bias, m, n, k, r, o1, plan.steps,
                *a_strides, *b_strides, *c_strides, s_split)  # fmt: skip
    yield plan.kernel, plan.grid, tuple(args), plan.constexprs, key, plan.options
    if plan.reduce:  # sum the workspace's splits, or cast the fp32 sum (into C from offset on)
        grid, reduce_args, constexprs, offset = plan.reduce
        yield (reduce_splits_kernel, grid,
               (ws, c.view(-1)[offset:] if offset else c, *reduce_args), constexprs,
               (key, 1), dict(num_warps=8, launch_pdl=REDUCE_PDL))


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    bias: torch.Tensor | None = None,
    activation_name: str | None = None,
    save_z: bool = False,
    out: torch.Tensor | None = None,
    accumulate: bool = False,
    config: GemmConfig | None = None,
    use_tma: bool | None = None,
) -> GemmResult:
    """C = activation(sum_r A[o, r] @ B[o, r] + bias), and what the backward needs.

    Args:
        a: (M, K), or batched (O0, O1, R, M, K); any strides (stride 0 for broadcast dims).
            Its values are cast to b's dtype, the compute dtype, in the kernel.
        b: (K, N), or batched (O0, O1, R, K, N); any strides; fp32, fp16 or bf16.
        out_dtype: dtype of C, written from the fp32 accumulator.
        bias: optional (N,), added in fp32 before the activation.
        activation_name: None, "relu", "gelu" or "gelu_tanh".
        save_z: also return Z = sum_r A[o, r] @ B[o, r] + bias (the activation's input, which
            the backward's ``dz_and_dbias`` differentiates at) in out_dtype.
        out: optional contiguous C to write (shape of the result, dtype out_dtype).
        accumulate: C = out + A @ B, summed in fp32 (needs ``out``; plain products only, no
            bias or activation): a weight gradient accumulated over chunks of rows.
        config: force a tuning config (tests, tuning); default from the tables.
        use_tma: force the TMA kernel (True; 2-D problems, TMA-compatible strides) or the
            portable kernel (False); default: TMA on sm_90 when the layout allows.

    Returns:
        GemmResult(c: (M, N), or (O0, O1, M, N) when batched, contiguous; z like c or
        None).
    """
    act = activation_name or "none"
    if accumulate and (out is None or bias is not None or act != "none" or save_z):
        raise ValueError("accumulate=True needs out= and a plain product (no bias/activation)")
    # everything that decides the plan and the launch's specialisation (so that the compiled
    # kernel can be launched directly, see runtime.launch)
    pa, pb, pbias = a.data_ptr(), b.data_ptr(), None if bias is None else bias.data_ptr()
    key = (a.shape, a.stride(), b.shape, b.stride(), a.dtype, b.dtype, out_dtype, a.device,
           pa % 16, pb % 16, None if bias is None else bias.dtype,
           None if bias is None else pbias % 16,
           None if out is None else out.data_ptr() % 16, act, save_z, accumulate,
           config, use_tma, b.dtype == torch.float32 and fp32_uses_tf32(),
           torch.are_deterministic_algorithms_enabled())
    plan = _PLANS.get(key)
    if plan is None:
        if len(_PLANS) > 4096:  # many shapes (variable lengths): start over, stay bounded
            _PLANS.clear()
        plan = _PLANS[key] = _make_plan(a, b, out_dtype, bias is not None, act, save_z,
                                        accumulate, config, use_tma, key[-1])
    m, n = plan.dims[3:5]
    dev = a.device
    if out is None:
        c = empty(plan.out_shape, out_dtype, dev)
    elif out.shape != plan.out_shape or out.dtype != out_dtype or not out.is_contiguous():
        raise ValueError(f"out must be a contiguous {out_dtype} tensor of shape "
                         f"{plan.out_shape}, got {out.dtype} {tuple(out.shape)}")
    else:
        c = out
    d = empty(plan.out_shape, out_dtype, dev) if save_z else None
    ws = None
    if plan.reduce_add:  # one fp32 sum: C itself when fp32, else a buffer cast below
        if out_dtype == torch.float32:
            ws = c if accumulate else c.zero_()
        else:
            ws = torch.zeros((m, n), dtype=torch.float32, device=dev)
    elif plan.ws_shape:
        ws = empty(plan.ws_shape, torch.float32, dev)
    z = None
    if plan.activation_pass:  # the kernel's C is Z (D when it is returned)
        z = d if save_z else empty(plan.out_shape, out_dtype, dev)
    # the launches repeat by the plan and the addresses (see runtime.bind)
    addresses = (plan.launch_id, pa, pb, c.data_ptr(), None if ws is None else ws.data_ptr(),
                 None if d is None else d.data_ptr(), None if z is None else z.data_ptr(), pbias)
    bound = _BOUND.get(addresses)
    if bound is not None and bound[0]():  # (then the others launch directly too)
        for again in bound[1:]:
            again()
    else:
        bound = tuple(bind(kernel, grid, args, constexprs, key=launch_key, **options)
                      for kernel, grid, args, constexprs, launch_key, options
                      in _launches(plan, a, b, c, ws, d, z, bias))
        if None not in bound:
            if len(_BOUND) > 4096:  # many shapes or addresses: stay bounded
                _BOUND.clear()
            _BOUND[addresses] = bound
    if z is not None:
        activation_into(z, c, plan.activation_pass)
    return GemmResult(c, d)


def _dz_launch(dy: torch.Tensor, z: torch.Tensor | None, activation_name: str,
               dz: torch.Tensor | None, sums: torch.Tensor | None, rows_per_range: int) -> None:
    m, n = dy.shape
    bm, bn = DZ_BLOCK
    zs = z.stride() if z is not None else (0, 0)
    launch(dz_dbias_kernel, (cdiv(n, bn), cdiv(m, rows_per_range)),
           (dy, z, dz, sums, m, n, rows_per_range, *dy.stride(), *zs),
           dict(ACTIVATION=activation_name, DZ_OUT=dz is not None, SUMS=sums is not None,
                BM=bm, BN=bn),
           num_warps=4)


def dz_and_dbias(
    dy: torch.Tensor, z: torch.Tensor | None, activation_name: str | None, dz: bool,
    dbias_dtype: torch.dtype | None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """The linear backward's elementwise pass: dZ = dY * activation'(Z) and/or dbias = column
    sums of dZ.

    Args:
        dy: (M, N) output gradient, any strides.
        z: (M, N) the activation's input Z saved by the forward (``gemm(save_z=True)``), any
            strides; None without an activation (dZ = dY).
        activation_name: the forward's activation (see ``gemm``), or None.
        dz: whether to return dZ, (M, N) contiguous in dy's dtype.
        dbias_dtype: when not None, also return dbias (N,) in this dtype, summed in fp32.

    Each program walks a range of rows of one column block: the rows are cut into about
    DZ_PROGRAMS_PER_SM ranges per SM, each range's fp32 column sums go to a (ranges, N)
    buffer, and a second launch of the same kernel sums those (deterministic, no atomics).
    """
    act = activation_name or "none"
    if (z is None) != (act == "none"):
        raise ValueError("dz_and_dbias needs z with an activation, and neither without one")
    m, n = dy.shape
    bm, bn = DZ_BLOCK
    row_blocks = cdiv(m, bm)
    want = cdiv(DZ_PROGRAMS_PER_SM * num_sms(device_index(dy)), cdiv(n, bn))
    per = cdiv(row_blocks, max(1, min(row_blocks, want))) * bm
    ranges = cdiv(m, per)
    dz_out = empty((m, n), dy.dtype, dy.device) if dz else None
    sums = None
    if dbias_dtype is not None:
        sums = empty((ranges, n), torch.float32 if ranges > 1 else dbias_dtype, dy.device)
    _dz_launch(dy, z, act, dz_out, sums, per)
    if sums is not None and ranges > 1:
        db = empty((1, n), dbias_dtype, dy.device)
        _dz_launch(sums, None, "none", None, db, cdiv(ranges, bm) * bm)
        sums = db
    return dz_out, None if sums is None else sums[0]
