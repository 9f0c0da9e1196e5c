"""GEMMs: C = epilogue(prologue(A) @ B), a Hopper TMA kernel and a portable one.

One computation, two kernels:

    A' = A * G                             elementwise, when a G is given (dZ = dY * act'(Z))
    Z = sum_r  A'[o, r] @ B[o, r]
    C[o] = activation(Z + bias)            the epilogue, on the fp32 accumulator
    D[o] = activation'(Z + bias)           optional: what the backward needs
    dZ = A'                                optional side output (2-D problems)
    dbias = column sums of A' over M       optional side output (2-D problems), fp32

``o`` runs over up to two output batch dims and ``r`` over one reduction batch dim (torch's
broadcast batch dims, summed in fp32 inside the kernel). Accumulation is fp32. fp32 operands
use IEEE products, or, when TF32 is allowed, TF32 tensor cores fed operands rounded to TF32
(round to nearest, as cuBLAS does; the hardware alone would truncate).

- ``gemm_tma_kernel`` (sm_90, 2-D problems whose strides TMA can address): a persistent
  kernel over host-side TMA tensor descriptors; either operand may be K-major or MN-major
  (a transposed view), read without copies.
- ``gemm_kernel``: pointer loads with arbitrary strides and masks; every GPU and the
  interpreter.

Both split K across programs when the output has too few tiles to fill the GPU (the
weight-gradient GEMMs reduce every token into a small d x d output): each split writes its
fp32 partial tile to a workspace and ``reduce_splits_kernel`` sums the splits in fp32 and
writes the output dtype (deterministic: no atomics on C).

The activation math is ``kernels/activations.py``'s device functions.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from triton.tools.tensor_descriptor import TensorDescriptor

from ..runtime import INTERPRET, device_index, empty, fp32_uses_tf32, is_hopper, num_sms
from .activations import activation, activation_fwd, activation_grad


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
#   shape class:   "plain" (operands straight from shared memory), "epilogue" (bias and/or
#                  activation), "prologue" (A goes through registers: A * G, dZ, dbias).
# Chosen by scripts/tune_matmul.py on an H200 (bf16, 16384-token GPT shapes; the numbers are
# in docs/perf/matmul.md). "prologue" stays at 4 warps in both tables: 8-warp
# TMA configs gave wrong results when the A tile fed both the wgmma and a register reduction
# (dbias without an activation); 4-warp ones were exact.
# The interpreter entry uses few, large blocks: it pays per program and per op.
TMA_CONFIGS: dict[tuple[str, str], GemmConfig] = {
    ("16bit", "plain"): GemmConfig(128, 256, 64, num_stages=4, num_warps=8, epilogue_split=4),
    ("16bit", "epilogue"): GemmConfig(128, 256, 64, num_stages=3, num_warps=8, epilogue_split=2),
    ("16bit", "prologue"): GemmConfig(64, 256, 64, num_stages=3, num_warps=4),
    ("tf32", "plain"): GemmConfig(128, 256, 32, num_stages=3, num_warps=8, epilogue_split=2),
    ("tf32", "epilogue"): GemmConfig(128, 128, 32, num_stages=3, num_warps=8, epilogue_split=2),
    ("tf32", "prologue"): GemmConfig(128, 128, 32, num_stages=2, num_warps=8, epilogue_split=2),
}
PORTABLE_CONFIGS: dict[tuple[str, str], GemmConfig] = {
    ("16bit", "plain"): GemmConfig(128, 128, 64, num_stages=4, num_warps=8),
    ("16bit", "epilogue"): GemmConfig(128, 128, 64, num_stages=4, num_warps=8),
    ("16bit", "prologue"): GemmConfig(64, 128, 64, num_stages=3, num_warps=4),
    ("tf32", "plain"): GemmConfig(128, 128, 32, num_stages=3, num_warps=8),
    ("tf32", "epilogue"): GemmConfig(128, 128, 32, num_stages=3, num_warps=8),
    ("tf32", "prologue"): GemmConfig(64, 128, 32, num_stages=3, num_warps=4),
    ("ieee", "plain"): GemmConfig(64, 64, 32, num_stages=3, num_warps=4),
    ("ieee", "epilogue"): GemmConfig(64, 64, 32, num_stages=3, num_warps=4),
    ("ieee", "prologue"): GemmConfig(64, 64, 32, num_stages=3, num_warps=4),
}
# Interpreter: blocks up to this size, shrunk to the problem (its dots cost per padded
# element, and each program and op costs Python time).
INTERPRET_CONFIG = GemmConfig(256, 256, 256, num_stages=1, num_warps=4)
# dZ / dbias elementwise kernel (when no dX GEMM runs to produce them): rows, columns.
DZ_BLOCK = (256, 256) if INTERPRET else (32, 128)

# Split-K cost model (units: one BLOCK_K step of one tile): writing a split's fp32 tile and
# reading it back in the reduction cost about REDUCE_STEPS steps, the reduce launch
# FIXED_STEPS. REDUCE_STEPS = 16 picks the best of the splits timed on the H200 for every
# d_model 768/1024/2048 weight-gradient shape (2 for 54 tiles, 3 for 72, 4 for 32, 7 for 18,
# 1 for 128); see docs/perf/matmul.md.
REDUCE_STEPS = 16
FIXED_STEPS = 8
MAX_SPLIT_K = 16
MIN_STEPS_PER_SPLIT = 4
# The TMA kernel's epilogue staging buffer (bytes of C, plus D when stored) is kept under this.
EPILOGUE_SMEM = 64 * 1024
REDUCE_BLOCK = 1 << 16 if INTERPRET else 2048


class GemmResult(NamedTuple):
    c: torch.Tensor  # (O0, O1, M, N)
    dact: torch.Tensor | None  # activation'(Z), like c
    dz: torch.Tensor | None  # A' = A * G, (M, K)
    dbias: torch.Tensor | None  # column sums of A', (K,)


# ---------------------------------------------------------------------------------------------
# Device helpers
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile_coords(unit, num_pid_m, num_pid_n, SPLIT_K: tl.constexpr, GROUP_M: tl.constexpr):
    """Work unit -> (tile row, tile column, K split); GROUP_M rows of tiles walk N together."""
    tile = unit // SPLIT_K
    split = unit - tile * SPLIT_K
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
def _a_side_outputs(a, offs_m, offs_k, M, K, pid_n, dz_ptr, dbias_ptr,
                    A_T: tl.constexpr, DZ_OUT: tl.constexpr, DBIAS: tl.constexpr):
    """For the first tile column only: store the A' tile into dZ (M, K) and add its column
    sums into dbias (K,). ``a`` is fp32, [BM, BK], or [BK, BM] when A_T."""
    first = pid_n == 0
    if DZ_OUT:
        if A_T:
            mask = (offs_k[:, None] < K) & (offs_m[None, :] < M) & first
            ptrs = dz_ptr + offs_m[None, :].to(tl.int64) * K + offs_k[:, None]
        else:
            mask = (offs_m[:, None] < M) & (offs_k[None, :] < K) & first
            ptrs = dz_ptr + offs_m[:, None].to(tl.int64) * K + offs_k[None, :]
        tl.store(ptrs, a.to(dz_ptr.dtype.element_ty), mask=mask)
    if DBIAS:
        if A_T:
            sums = tl.sum(a, axis=1)
        else:
            sums = tl.sum(a, axis=0)
        tl.atomic_add(dbias_ptr + offs_k, sums, mask=(offs_k < K) & first, sem="relaxed")


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
def _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
              SAVE_DACT: tl.constexpr):
    """fp32 tile -> (activation(z), activation'(z) if SAVE_DACT) with z = acc + bias[offs_n]."""
    z = acc
    if HAS_BIAS:
        z += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)[None, :]
    y = activation(z, ACTIVATION)
    dact = y
    if SAVE_DACT:
        dact = activation_grad(z, 1.0, ACTIVATION)
    return y, dact


@triton.jit
def _halves(x, BM: tl.constexpr, WIDTH: tl.constexpr):
    """Split a (BM, WIDTH) tile into its left and right (BM, WIDTH // 2) halves."""
    return tl.split(tl.permute(tl.reshape(x, (BM, 2, WIDTH // 2)), (0, 2, 1)))


@triton.jit
def _tma_store_slice(acc, c_desc, d_desc, bias_ptr, row, on, N,
                     HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_DACT: tl.constexpr,
                     BN_SLICE: tl.constexpr):
    y, dact = _epilogue(acc, bias_ptr, on + tl.arange(0, BN_SLICE), N, HAS_BIAS, ACTIVATION,
                        SAVE_DACT)
    if SAVE_DACT:
        d_desc.store([row, on], dact.to(d_desc.dtype))
    c_desc.store([row, on], y.to(c_desc.dtype))


# ---------------------------------------------------------------------------------------------
# Hopper: persistent kernel over TMA descriptors
# ---------------------------------------------------------------------------------------------


@triton.jit
def gemm_tma_kernel(
    a_desc,  # A (M, K), block [BM, BK]; with A_T its storage (K, M), block [BK, BM]
    g_desc,  # G, same shape and layout as A, block like a_desc (A_MUL), else None
    b_desc,  # B (K, N), block [BK, BN]; with B_T its storage (N, K), block [BN, BK]
    c_desc,  # C (M, N), or with SPLIT_K > 1 the fp32 workspace (SPLIT_K * ws_rows, N);
             # block [BM, BN // EPI_SPLIT]
    d_desc,  # D = activation'(Z) (M, N), block like c_desc (SAVE_DACT), else None
    bias_ptr,  # bias (N,) (HAS_BIAS)
    dz_ptr,  # A' (M, K) contiguous, in B's dtype (DZ_OUT)
    dbias_ptr,  # zeroed fp32 (K,): column sums of A' are added in (DBIAS)
    M, N, K,  # problem size
    steps_per_split,  # BK steps of K per split (all splits equal; TMA zero-fills past K)
    ws_rows,  # workspace rows per split (M rounded up to BM); 0 without split
    A_T: tl.constexpr, B_T: tl.constexpr,  # operand given through its transposed storage
    A_MUL: tl.constexpr,  # A' = A * G (the activation's backward fused into dY)
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, SAVE_DACT: tl.constexpr,
    DZ_OUT: tl.constexpr, DBIAS: tl.constexpr, SPLIT_K: tl.constexpr,
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
                a = a_desc.load([ok, om])
            else:
                a = a_desc.load([om, ok])
            if A_MUL:
                if A_T:
                    g = g_desc.load([ok, om])
                else:
                    g = g_desc.load([om, ok])
                a = a.to(tl.float32) * g.to(tl.float32)
            if DZ_OUT or DBIAS:
                _a_side_outputs(a.to(tl.float32), om + tl.arange(0, BM), ok + tl.arange(0, BK),
                                M, K, pid_n, dz_ptr, dbias_ptr, A_T, DZ_OUT, DBIAS)
            a = a.to(b_desc.dtype)
            if A_T:
                a = a.T
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
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN)
        elif EPI_SPLIT == 2:
            acc0, acc1 = _halves(acc, BM, BN)
            _tma_store_slice(acc0, c_desc, d_desc, bias_ptr, row, on, N,
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN // 2)
            _tma_store_slice(acc1, c_desc, d_desc, bias_ptr, row, on + BN // 2, N,
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN // 2)
        else:
            acc0, acc1 = _halves(acc, BM, BN)
            acc00, acc01 = _halves(acc0, BM, BN // 2)
            acc10, acc11 = _halves(acc1, BM, BN // 2)
            _tma_store_slice(acc00, c_desc, d_desc, bias_ptr, row, on, N,
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN // 4)
            _tma_store_slice(acc01, c_desc, d_desc, bias_ptr, row, on + BN // 4, N,
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN // 4)
            _tma_store_slice(acc10, c_desc, d_desc, bias_ptr, row, on + BN // 2, N,
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN // 4)
            _tma_store_slice(acc11, c_desc, d_desc, bias_ptr, row, on + 3 * (BN // 4), N,
                             HAS_BIAS, ACTIVATION, SAVE_DACT, BN // 4)


# ---------------------------------------------------------------------------------------------
# Portable kernel: pointers, strides, masks; batch dims
# ---------------------------------------------------------------------------------------------


@triton.jit
def gemm_kernel(
    a_ptr,  # A (O0, O1, R, M, K), any strides (0 for broadcast dims)
    g_ptr,  # G, same shape as A, its own strides (A_MUL), else None
    b_ptr,  # B (O0, O1, R, K, N), any strides
    c_ptr,  # C (O0, O1, M, N); with SPLIT_K > 1 the fp32 workspace (SPLIT_K, O0, O1, M, N)
    d_ptr,  # D = activation'(Z), strides of C (SAVE_DACT), else None
    bias_ptr,  # bias (N,) (HAS_BIAS)
    dz_ptr,  # A' (M, K) contiguous, in B's dtype (DZ_OUT; O0 = O1 = R = 1)
    dbias_ptr,  # zeroed fp32 (K,): column sums of A' are added in (DBIAS; O0 = O1 = R = 1)
    M, N, K,  # matrix sizes
    R,  # reduction batch size: C sums R products
    O1,  # size of the second output batch dim (program_id(1) = o0 * O1 + o1)
    steps_per_split,  # (r, BK step) iterations per K split
    s_a0, s_a1, s_ar, s_am, s_ak,  # strides of A
    s_g0, s_g1, s_gr, s_gm, s_gk,  # strides of G
    s_b0, s_b1, s_br, s_bk, s_bn,  # strides of B
    s_c0, s_c1, s_cm, s_cn,  # strides of C (and D)
    s_cs,  # workspace stride between splits (SPLIT_K > 1)
    A_MUL: tl.constexpr, HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr,
    SAVE_DACT: tl.constexpr, DZ_OUT: tl.constexpr, DBIAS: tl.constexpr,
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
    if A_MUL:
        g_rows = g_ptr + o0 * s_g0 + o1 * s_g1 + offs_m[:, None].to(tl.int64) * s_gm
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
        if A_MUL:
            g = tl.load(g_rows + r64 * s_gr + k64[None, :] * s_gk,
                        mask=m_ok[:, None] & k_ok[None, :], other=0.0)
            a = a.to(tl.float32) * g.to(tl.float32)
        if DZ_OUT or DBIAS:
            _a_side_outputs(a.to(tl.float32), offs_m, k, M, K, pid_n, dz_ptr, dbias_ptr,
                            False, DZ_OUT, DBIAS)
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
    y, dact = _epilogue(acc, bias_ptr, offs_n, N, HAS_BIAS, ACTIVATION, SAVE_DACT)
    if SAVE_DACT:
        tl.store(d_ptr + c_off, dact.to(d_ptr.dtype.element_ty), mask=mask)
    tl.store(c_ptr + c_off, y.to(c_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------
# Split-K reduction, and dZ / dbias without a GEMM
# ---------------------------------------------------------------------------------------------


@triton.jit
def reduce_splits_kernel(
    ws_ptr,  # fp32 workspace (SPLIT_K, O, ws_rows, N) of partial sums, contiguous
    out_ptr,  # output (O, M, N) contiguous, any float dtype
    n_out,  # O * M * N
    per_matrix,  # M * N
    ws_matrix,  # ws_rows * N
    ws_split,  # O * ws_rows * N
    SPLIT_K: tl.constexpr, BLOCK: tl.constexpr,
):
    """out = sum over splits of the workspace, in fp32, cast to the output dtype."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_out
    o = offs // per_matrix
    src = o * ws_matrix + (offs - o * per_matrix)
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for s in tl.static_range(SPLIT_K):
        acc += tl.load(ws_ptr + s * ws_split + src, mask=mask, other=0.0)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)


@triton.jit
def dz_kernel(
    dy_ptr,  # dY (M, N), any strides
    g_ptr,  # G (M, N), any strides (A_MUL), else None
    dz_ptr,  # dZ = dY * G (M, N) contiguous (DZ_OUT)
    dbias_ptr,  # zeroed fp32 (N,): column sums of dZ are added in (DBIAS)
    M, N,
    s_ym, s_yn, s_gm, s_gn,  # strides of dY and G
    A_MUL: tl.constexpr, DZ_OUT: tl.constexpr, DBIAS: tl.constexpr,
    BM: tl.constexpr, BN: tl.constexpr,
):
    """dZ = dY * G and its column sums over a (BM, BN) block (when no dX GEMM makes them)."""
    offs_m = tl.program_id(0) * BM + tl.arange(0, BM)
    offs_n = tl.program_id(1) * BN + tl.arange(0, BN)
    rows = offs_m[:, None].to(tl.int64)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    dz = tl.load(dy_ptr + rows * s_ym + offs_n[None, :] * s_yn, mask=mask, other=0.0)
    dz = dz.to(tl.float32)
    if A_MUL:
        dz *= tl.load(g_ptr + rows * s_gm + offs_n[None, :] * s_gn, mask=mask, other=0.0)
    _a_side_outputs(dz, offs_m, offs_n, M, N, 0, dz_ptr, dbias_ptr, False, DZ_OUT, DBIAS)


# ---------------------------------------------------------------------------------------------
# Launch
# ---------------------------------------------------------------------------------------------


def _cdiv(a: int, b: int) -> int:
    # Host-side integer math in plain Python: triton.cdiv is a constexpr-function wrapper
    # costing microseconds per call, which adds up on every launch.
    return -(-a // b)


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
        per = _cdiv(k_steps, s)
        if s > 1 and per < MIN_STEPS_PER_SPLIT:
            break
        waves = _cdiv(tiles * s, sms)
        cost = waves * per + (waves * REDUCE_STEPS + FIXED_STEPS if s > 1 else 0)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
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


def _tma_layouts(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None,
                 out_dtype: torch.dtype) -> tuple | None:
    """(A's, B's, G's TMA layout) when the TMA kernel can run the 2-D problem a @ b (with
    prologue G) on its device, else None."""
    if not is_hopper(a.device) or operand_class(b.dtype) == "ieee":
        return None
    if (b.shape[1] * torch.finfo(out_dtype).bits // 8) % 16:
        return None
    la, lb = _tma_layout(a), _tma_layout(b)
    if la is None or lb is None:
        return None
    lg = None if g is None else _tma_layout(g)
    if g is not None and (lg is None or lg[0] != la[0]):
        return None
    return la, lb, lg


def tma_eligible(a: torch.Tensor, b: torch.Tensor, g: torch.Tensor | None,
                 out_dtype: torch.dtype) -> bool:
    """Whether the TMA kernel can run the 2-D problem a @ b (with prologue G) on its device."""
    return _tma_layouts(a, b, g, out_dtype) is not None


def _descriptor(t: torch.Tensor, layout: tuple, block_rows: int, block_cols: int):
    transposed, shape, strides = layout
    block = [block_cols, block_rows] if transposed else [block_rows, block_cols]
    return TensorDescriptor(t, shape, strides, block)


def _to_dtype(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """An fp32 result in ``dtype`` (the identity activation kernel casts)."""
    return t if dtype == torch.float32 else activation_fwd(t, "none", dtype)


def _pick_config(m: int, n: int, k: int, tma: bool, op_class: str, shape_class: str):
    if INTERPRET:
        fit = lambda block, dim: max(16, min(block, 1 << (dim - 1).bit_length()))
        c = INTERPRET_CONFIG
        return dataclasses.replace(c, block_m=fit(c.block_m, m), block_n=fit(c.block_n, n),
                                   block_k=fit(c.block_k, k))
    return (TMA_CONFIGS if tma else PORTABLE_CONFIGS)[(op_class, shape_class)]


def gemm(
    a: torch.Tensor,
    b: torch.Tensor,
    out_dtype: torch.dtype,
    *,
    g: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    activation_name: str | None = None,
    save_dact: bool = False,
    dz: bool = False,
    dbias_dtype: torch.dtype | None = None,
    config: GemmConfig | None = None,
    use_tma: bool | None = None,
) -> GemmResult:
    """C = activation(sum_r (A * G)[o, r] @ B[o, r] + bias), and what the backward needs.

    Args:
        a: (O0, O1, R, M, K), any strides (stride 0 for broadcast dims); the compute dtype
            is b's, and a (or A * G, computed in fp32) is cast to it in the kernel.
        b: (O0, O1, R, K, N), any strides; fp32, fp16 or bf16.
        out_dtype: dtype of C, written from the fp32 accumulator.
        g: optional (O0, O1, R, M, K) multiplier of A (the saved activation derivative).
        bias: optional (N,), added in fp32 before the activation.
        activation_name: None, "relu", "gelu" or "gelu_tanh".
        save_dact: also return D = activation'(Z + bias) in out_dtype.
        dz: also return A' = A * G (M, K) in b's dtype (2-D problems).
        dbias_dtype: also return the column sums of A' over M, (K,), summed in fp32 and
            returned in this dtype (2-D problems).
        config: force a tuning config (tests, tuning); default from the tables.
        use_tma: force the TMA kernel (True; 2-D problems, TMA-compatible strides) or the
            portable kernel (False); default: TMA on sm_90 when the layout allows.

    Returns:
        GemmResult(c (O0, O1, M, N) contiguous, dact like c or None, dz or None,
        dbias or None).
    """
    o0, o1, r, m, k = a.shape
    n = b.shape[-1]
    act = activation_name or "none"
    dev = a.device
    a2, b2 = a[0, 0, 0], b[0, 0, 0]
    g2 = None if g is None else g[0, 0, 0]
    layouts = _tma_layouts(a2, b2, g2, out_dtype) if o0 * o1 * r == 1 else None
    if use_tma is None:
        use_tma = layouts is not None
    elif use_tma:  # forced (tests, tuning): the layouts, without the device check
        layouts = (_tma_layout(a2), _tma_layout(b2), None if g2 is None else _tma_layout(g2))
    op_class = operand_class(b.dtype)
    if g is not None or dz or dbias_dtype is not None:
        shape_class = "prologue"
    elif bias is not None or act != "none":
        shape_class = "epilogue"
    else:
        shape_class = "plain"
    config = config or _pick_config(m, n, k, use_tma, op_class, shape_class)
    bm, bn, bk = config.block_m, config.block_n, config.block_k
    tiles = _cdiv(m, bm) * _cdiv(n, bn)
    k_steps = r * _cdiv(k, bk)
    sms = num_sms(device_index(a))
    split = config.split_k or split_k_for(tiles * o0 * o1, k_steps, sms)
    if bias is not None or act != "none" or save_dact:
        split = 1  # the epilogue needs the whole sum
    steps = _cdiv(k_steps, split)
    split = _cdiv(k_steps, steps)  # no empty splits

    c = empty((o0, o1, m, n), out_dtype, dev)
    d = empty((o0, o1, m, n), out_dtype, dev) if save_dact else None
    dz_out = empty((m, k), b.dtype, dev) if dz else None
    db = torch.zeros(k, dtype=torch.float32, device=dev) if dbias_dtype is not None else None
    ws_rows = _cdiv(m, bm) * bm if use_tma else m
    ws = (empty((split, o0, o1, ws_rows, n), torch.float32, dev) if split > 1 else None)
    flags = dict(A_MUL=g is not None, HAS_BIAS=bias is not None, ACTIVATION=act,
                 SAVE_DACT=save_dact, DZ_OUT=dz, DBIAS=db is not None, SPLIT_K=split,
                 ROUND_TF32=op_class == "tf32", PRECISION="ieee" if op_class == "ieee" else "tf32",
                 BM=bm, BN=bn, BK=bk, GROUP_M=config.group_m,
                 num_stages=config.num_stages, num_warps=config.num_warps)

    if use_tma:
        epi = config.epilogue_split
        es = 4 if split > 1 else torch.finfo(out_dtype).bits // 8
        while bm * bn * es * (2 if save_dact else 1) // epi > EPILOGUE_SMEM and epi < 4:
            epi *= 2
        la, lb, lg = layouts
        target = c[0, 0] if split == 1 else ws.view(split * ws_rows, n)
        rows_layout = lambda rows: (False, [rows, n], [n, 1])  # contiguous outputs
        gemm_tma_kernel[(sms,)](
            _descriptor(a2, la, bm, bk),
            None if g2 is None else _descriptor(g2, lg, bm, bk),
            _descriptor(b2, lb, bk, bn),
            _descriptor(target, rows_layout(target.shape[0]), bm, bn // epi),
            None if d is None else _descriptor(d[0, 0], rows_layout(m), bm, bn // epi),
            bias, dz_out, db, m, n, k, steps, ws_rows if split > 1 else 0,
            A_T=la[0], B_T=lb[0], EPI_SPLIT=epi, NUM_SMS=sms,
            **flags,
        )
    else:
        if o0 * o1 > 65535:
            raise ValueError(f"at most 65535 batch matrices per launch, got {o0 * o1}")
        gs = g.stride() if g is not None else (0,) * 5
        target = c if split == 1 else ws
        gemm_kernel[(tiles * split, o0 * o1)](
            a, g, b, target, d, bias, dz_out, db,
            m, n, k, r, o1, steps,
            *a.stride(), *gs, *b.stride(), *target.stride()[-4:],
            target.stride(0) if split > 1 else 0,
            **flags,
        )
    if split > 1:
        n_out = o0 * o1 * m * n
        reduce_splits_kernel[(_cdiv(n_out, REDUCE_BLOCK),)](
            ws, c, n_out, m * n, ws_rows * n, o0 * o1 * ws_rows * n,
            SPLIT_K=split, BLOCK=REDUCE_BLOCK, num_warps=8,
        )
    if db is not None:
        db = _to_dtype(db, dbias_dtype)
    return GemmResult(c, d, dz_out, db)


def dz_and_dbias(
    dy: torch.Tensor, g: torch.Tensor | None, dz: bool, dbias_dtype: torch.dtype | None
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """dZ = dY * G (M, N) in dY's dtype and/or its column sums (N,) in ``dbias_dtype``, for
    when no dX GEMM runs to produce them as side outputs. dy, g: (M, N), any strides."""
    m, n = dy.shape
    dz_out = empty((m, n), dy.dtype, dy.device) if dz else None
    db = torch.zeros(n, dtype=torch.float32, device=dy.device) if dbias_dtype else None
    gs = g.stride() if g is not None else (0, 0)
    bm, bn = DZ_BLOCK
    dz_kernel[(_cdiv(m, bm), _cdiv(n, bn))](
        dy, g, dz_out, db, m, n, *dy.stride(), *gs,
        A_MUL=g is not None, DZ_OUT=dz, DBIAS=db is not None, BM=bm, BN=bn, num_warps=4,
    )
    return dz_out, (None if db is None else _to_dtype(db, dbias_dtype))
