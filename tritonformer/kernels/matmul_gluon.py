"""Warp-specialised persistent GEMM for Hopper (sm_90) in Gluon, 16-bit operands.

C = activation(A @ B + bias) for 2-D operands TMA can read (either may be given through its
transposed storage), in C's dtype, and D = A @ B + bias (the activation's input, which the
backward differentiates at) when asked: the plain
products with a 16-bit C (the weight gradients above all) and the forwards of the linear
layers, whose bias and activation need whole tiles (``matmul.gluon_tiling`` picks the
schedule, ``matmul.gemm`` launches it).

Tiles are CONSUMERS * 64 rows (two or three consumer warpgroups of 64 rows) by BN columns,
plus TAIL_N more in a second accumulator (128 x 160 = 128 + 32): sizes that fill the 132 SMs
in one wave where 128 x 256 cannot; or 128 x (128 + 128), the tail staged after the block
through the same buffer, which leaves shared memory for a fourth stage. The work units:
the first dp_tiles tiles whole (all of K, stored to C), then every other tile's K in
``GluonSchedule.sk_splits`` pieces (all of those tiles' first pieces, then their second,
...), each stored as fp32 partial sums to a workspace that ``matmul.reduce_splits_kernel``
adds up into C. Those split tiles are whole rows of tiles (or, with the tiles in column
order, whole columns) at the end of the order, so the workspace covers one block of C.
dp_tiles = 0 is plain split-K; no split tiles, a plain GEMM.

One program per SM walks the units ``unit = pid + i * NUM_SMS`` with these partitions:

- a producer warp fills a ring of STAGES stages by TMA: per stage A's CONSUMERS 64-row blocks
  of BK columns, B's [BK, BN] block (and its tail block);
- the consumer warpgroups, one per 64-row block of the tile, each issuing its wgmmas
  asynchronously with one step in flight and freeing a stage once its wgmmas are done (a
  stage's empty barrier counts every consumer);
- each consumer's epilogue stages its accumulators in shared memory and stores them by TMA,
  while the producer already loads the next unit's stages.

Triton's ``tl.dot`` pipeline (``matmul.gemm_tma_kernel``) waits on a CTA-wide barrier before
every TMA issue and runs the epilogue in between; here the loads never wait for the math.
Gluon has no interpreter: the GPU tier tests this kernel (tests/test_matmul.py).
"""

from __future__ import annotations

import functools

import torch
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from .activations import activation

ROWS = gl.constexpr(64)  # tile rows per consumer warpgroup
# Registers per thread (setmaxnreg) of the consumer warpgroups (two or three) and the producer
# warp's group: (2 * 232 + 40) * 128 and (3 * 160 + 40) * 128 <= the SM's 64K.
CONSUMER_REGS = gl.constexpr(232)
CONSUMER_REGS_3 = gl.constexpr(160)
PRODUCER_REGS = gl.constexpr(40)


@gluon.jit
def _unit(unit, M, N, dp_tiles, sk_steps, k_steps, TM: gl.constexpr,
          TN: gl.constexpr, GROUP_M: gl.constexpr):
    """Work unit -> (first row, first column, first BK step, BK steps, split?, split index).

    Units below dp_tiles are whole tiles (all of K); the others split each remaining tile's K
    into pieces of sk_steps steps, piece by piece: the units that run together share K
    ranges, so that their A and B blocks are read from DRAM once (at K ~ 50k, tile by tile,
    each wave re-read them). Tiles in order, GROUP_M rows of tiles walking N together (the
    order of ``matmul._tile_coords``)."""
    num_pid_m = gl.cdiv(M, TM)
    num_pid_n = gl.cdiv(N, TN)
    sk = unit >= dp_tiles
    u = gl.maximum(unit - dp_tiles, 0)
    sk_tiles = gl.maximum(num_pid_m * num_pid_n - dp_tiles, 1)
    tile = gl.where(sk, dp_tiles + u % sk_tiles, unit)
    split = gl.where(sk, u // sk_tiles, 0)
    k0 = split * sk_steps
    n_steps = gl.where(sk, gl.minimum(sk_steps, k_steps - k0), k_steps)
    width = GROUP_M * num_pid_n
    first_m = (tile // width) * GROUP_M
    size_m = gl.minimum(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (tile % width) % size_m
    pid_n = (tile % width) // size_m
    return pid_m * TM, pid_n * TN, k0, n_steps, sk, split


@gluon.jit
def _load(desc, row, col, bar, dst, TRANSPOSED: gl.constexpr):
    """TMA load of the block at (row, col) of a logical operand, or at (col, row) of its
    transposed storage."""
    if TRANSPOSED:
        tma.async_copy_global_to_shared(desc, [col, row], bar, dst)
    else:
        tma.async_copy_global_to_shared(desc, [row, col], bar, dst)


@gluon.jit
def _stage_store(acc, acc_t, desc, desc_t, smem, smem_t, row, col, BN: gl.constexpr,
                 TAIL_N: gl.constexpr):
    """One consumer's epilogue: its accumulators (and the tail's) through shared memory to
    (row, col) of desc (and col + BN of desc_t) by TMA, once the previous stores have read
    the staging buffers (a tail as wide as the block: through smem, after the block)."""
    tma.store_wait(0)
    smem.store(acc.to(desc.dtype))
    if TAIL_N > 0 and TAIL_N != BN:
        smem_t.store(acc_t.to(desc.dtype))
    fence_async_shared()
    gl.thread_barrier()  # every thread's part is staged before the TMA stores read it
    tma.async_copy_shared_to_global(desc, [row, col], smem)
    if TAIL_N == BN:  # the tail shares the staging buffer: staged once the store has read it
        tma.store_wait(0)
        smem.store(acc_t.to(desc.dtype))
        fence_async_shared()
        gl.thread_barrier()
    if TAIL_N > 0:
        tma.async_copy_shared_to_global(desc_t, [row, col + BN], smem_t)


@gluon.jit
def _add_bias(acc, bias_ptr, col0, N, WIDTH: gl.constexpr, layout: gl.constexpr):
    """acc (ROWS x WIDTH, fp32, in ``layout``) plus bias[col0 : col0 + WIDTH] per column."""
    cols = col0 + gl.arange(0, WIDTH, layout=gl.SliceLayout(0, layout))
    bias = gl.load(bias_ptr + cols, mask=cols < N, other=0.0).to(gl.float32)
    return acc + gl.expand_dims(bias, 0)


@gluon.jit
def _producer(a_desc, b_desc, bt_desc, a_smem, b_smem, bt_smem, ready, empty, M, N, units,
              dp_tiles, sk_steps, k_steps, A_T: gl.constexpr, B_T: gl.constexpr,
              BN: gl.constexpr, TAIL_N: gl.constexpr, BK: gl.constexpr, STAGES: gl.constexpr,
              CONSUMERS: gl.constexpr, GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr):
    """The producer warp: stage c % STAGES takes the program's c-th BK step (counted over its
    units) once every consumer has freed it: A's CONSUMERS row blocks, B's block and B's tail
    block."""
    nbytes: gl.constexpr = CONSUMERS * a_desc.block_type.nbytes + b_desc.block_type.nbytes
    tail_bytes: gl.constexpr = bt_desc.block_type.nbytes if TAIL_N > 0 else 0
    c = 0
    for unit in range(gl.program_id(0), units, NUM_SMS):
        om, on, k0, n_steps, sk, split = _unit(unit, M, N, dp_tiles, sk_steps,
                                               k_steps, CONSUMERS * ROWS, BN + TAIL_N, GROUP_M)
        for ks in range(n_steps):
            s = c % STAGES
            mbarrier.wait(empty.index(s), ((c // STAGES) & 1) ^ 1)  # the first round passes
            bar = ready.index(s)
            mbarrier.expect(bar, nbytes + tail_bytes)
            ok = (k0 + ks) * BK
            for w in gl.static_range(CONSUMERS):
                _load(a_desc, om + w * ROWS, ok, bar, a_smem.index(CONSUMERS * s + w), A_T)
            _load(b_desc, ok, on, bar, b_smem.index(s), B_T)
            if TAIL_N > 0:
                _load(bt_desc, ok, on + BN, bar, bt_smem.index(s), B_T)
            c += 1


@gluon.jit
def _consumer(W: gl.constexpr, args, A_T: gl.constexpr, B_T: gl.constexpr, BN: gl.constexpr,
              TAIL_N: gl.constexpr, STAGES: gl.constexpr, CONSUMERS: gl.constexpr,
              HAS_BIAS: gl.constexpr, ACTIVATION: gl.constexpr, SAVE_Z: gl.constexpr,
              GROUP_M: gl.constexpr, NUM_SMS: gl.constexpr):
    """Consumer warpgroup W: rows W * ROWS.. of every unit's tile, accumulated in registers
    (the tail columns in a second accumulator); a whole tile's Z (plus the bias, in fp32,
    with HAS_BIAS) is stored to C as activation(Z) (with SAVE_Z, Z itself to D first,
    through the same staging buffers: a TMA store has read them long before the activation
    is computed), a K split's partial sums to (split * ws_rows + row - tail_row0,
    column - tail_col0) of the fp32 workspace. ``args``: the tensors and buffers
    gemm_gluon_kernel passes every consumer (W picks its staging buffers)."""
    (c_desc, ct_desc, w_desc, wt_desc, d_desc, dt_desc, bias_ptr, a_smem, b_smem, bt_smem,
     c_smem, ct_smem, w_smem, wt_smem, ready, empty, M, N, units, dp_tiles, sk_steps,
     k_steps, ws_rows, tail_row0, tail_col0) = args
    # with whole and split tiles C is staged within the workspace's buffer, viewed as two
    # 16-bit buffers per consumer (see gemm_gluon_kernel); else one buffer per consumer
    c_smem = c_smem.index(W * (c_smem.shape[0] // CONSUMERS))
    ct_smem = ct_smem.index(W * (ct_smem.shape[0] // CONSUMERS))
    w_smem = w_smem.index(W)
    wt_smem = wt_smem.index(W)
    acc_layout: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                                         instr_shape=[16, BN, 16])
    if TAIL_N > 0:
        tail_layout: gl.constexpr = gl.NVMMADistributedLayout(
            version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, TAIL_N, 16])
    c = 0
    for unit in range(gl.program_id(0), units, NUM_SMS):
        om, on, k0, n_steps, sk, split = _unit(unit, M, N, dp_tiles, sk_steps,
                                               k_steps, CONSUMERS * ROWS, BN + TAIL_N, GROUP_M)
        acc = gl.zeros([ROWS, BN], gl.float32, acc_layout)
        acc_t = acc
        if TAIL_N > 0:
            acc_t = gl.zeros([ROWS, TAIL_N], gl.float32, tail_layout)
        for ks in range(n_steps):
            s = c % STAGES
            mbarrier.wait(ready.index(s), (c // STAGES) & 1)
            a = a_smem.index(CONSUMERS * s + W)
            if A_T:
                a = a.permute([1, 0])
            b = b_smem.index(s)
            if B_T:
                b = b.permute([1, 0])
            acc = warpgroup_mma(a, b, acc, is_async=True)
            if TAIL_N > 0:
                bt = bt_smem.index(s)
                if B_T:
                    bt = bt.permute([1, 0])
                acc_t = warpgroup_mma(a, bt, acc_t, is_async=True)
                # this step's two wgmma groups may run on: the previous step's are done
                acc, acc_t = warpgroup_mma_wait(2, deps=[acc, acc_t])
            else:
                acc = warpgroup_mma_wait(1, deps=[acc])  # the previous step's wgmma is done
            if ks > 0:
                mbarrier.arrive(empty.index((c - 1) % STAGES))
            c += 1
        if TAIL_N > 0:
            acc, acc_t = warpgroup_mma_wait(0, deps=[acc, acc_t])
        else:
            acc = warpgroup_mma_wait(0, deps=[acc])
        mbarrier.arrive(empty.index((c - 1) % STAGES))
        if sk:
            _stage_store(acc, acc_t, w_desc, wt_desc, w_smem, wt_smem,
                         split * ws_rows + om - tail_row0 + W * ROWS, on - tail_col0, BN,
                         TAIL_N)
        else:
            if HAS_BIAS:
                acc = _add_bias(acc, bias_ptr, on, N, BN, acc_layout)
                if TAIL_N > 0:
                    acc_t = _add_bias(acc_t, bias_ptr, on + BN, N, TAIL_N, tail_layout)
            if SAVE_Z:
                _stage_store(acc, acc_t, d_desc, dt_desc, c_smem, ct_smem, om + W * ROWS, on,
                             BN, TAIL_N)
            acc = activation(acc, ACTIVATION)
            if TAIL_N > 0:
                acc_t = activation(acc_t, ACTIVATION)
            _stage_store(acc, acc_t, c_desc, ct_desc, c_smem, ct_smem, om + W * ROWS, on, BN,
                         TAIL_N)
    tma.store_wait(0)


@gluon.jit
def gemm_gluon_kernel(
    a_desc,  # A (M, K), block [ROWS, BK]; with A_T its storage (K, M), block [BK, ROWS]
    b_desc,  # B (K, N), block [BK, BN]; with B_T its storage (N, K), block [BN, BK]
    # (each descriptor the host encodes costs launch time: the kernel reuses the main ones
    # for tails as wide as the block, and C's and the workspace's for each other)
    bt_desc,  # 0 < TAIL_N != BN: B again, block [BK, TAIL_N] (B_T: [TAIL_N, BK]); else None
    c_desc,  # HAS_DP: C (M, N), block [ROWS, BN]; else None
    ct_desc,  # HAS_DP and 0 < TAIL_N != BN: C again, block [ROWS, TAIL_N]; else None
    w_desc,  # HAS_SK: the fp32 workspace (pieces * ws_rows, N - tail_col0), block
             # [ROWS, BN]; else None
    wt_desc,  # HAS_SK and 0 < TAIL_N != BN: the workspace, block [ROWS, TAIL_N]; else None
    d_desc,  # SAVE_Z: D (M, N), C's dtype, block [ROWS, BN]; else None
    dt_desc,  # SAVE_Z and 0 < TAIL_N != BN: D again, block [ROWS, TAIL_N]; else None
    bias_ptr,  # HAS_BIAS: (N,) any float dtype, added in fp32 to every whole tile; else None
    M, N,
    units,  # dp_tiles + (tiles - dp_tiles) * the K pieces of each other tile
    dp_tiles,  # the first tiles, each one unit over all of K
    sk_steps,  # BK steps per piece (the last may have fewer)
    k_steps,  # BK steps of K (TMA zero-fills past K)
    ws_rows,  # workspace rows per piece: the split tiles' rows, from C row tail_row0
    tail_row0, tail_col0,  # C's (row, column) where the split tiles start: they are whole
                           # rows of tiles from tail_row0 (or columns from tail_col0) on
    A_T: gl.constexpr, B_T: gl.constexpr,  # operand given through its transposed storage
    BN: gl.constexpr, TAIL_N: gl.constexpr,  # tiles of CONSUMERS * ROWS x (BN + TAIL_N)
    BK: gl.constexpr, STAGES: gl.constexpr,
    CONSUMERS: gl.constexpr,  # 2 or 3 consumer warpgroups, ROWS rows of the tile each
    HAS_DP: gl.constexpr, HAS_SK: gl.constexpr,  # dp_tiles > 0, dp_tiles < tiles
    HAS_BIAS: gl.constexpr,  # (whole tiles only: no split tiles with a bias or activation)
    ACTIVATION: gl.constexpr,  # "none", "relu", "gelu" or "gelu_tanh" (kernels/activations.py)
    SAVE_Z: gl.constexpr,  # also store D = Z
    GROUP_M: gl.constexpr,
    NUM_SMS: gl.constexpr,  # programs launched; each walks every NUM_SMS-th unit
):
    """Persistent, warp-specialised: see the module docstring."""
    # (a name is rebound to descriptors only: a None rebound in a static if loses its type)
    if TAIL_N == BN:
        bt_desc = b_desc
        if HAS_DP:
            ct_desc = c_desc
        if HAS_SK:
            wt_desc = w_desc
        if SAVE_Z:
            dt_desc = d_desc
    if not HAS_DP:  # C's descriptors stand in where only the workspace is written, and back
        c_desc = w_desc
        if TAIL_N > 0:
            ct_desc = wt_desc
    if not HAS_SK:
        w_desc = c_desc
        if TAIL_N > 0:
            wt_desc = ct_desc
    dtype: gl.constexpr = a_desc.dtype
    if A_T:
        a_smem = gl.allocate_shared_memory(dtype, [CONSUMERS * STAGES, BK, ROWS], a_desc.layout)
    else:
        a_smem = gl.allocate_shared_memory(dtype, [CONSUMERS * STAGES, ROWS, BK], a_desc.layout)
    if B_T:
        b_smem = gl.allocate_shared_memory(dtype, [STAGES, BN, BK], b_desc.layout)
    else:
        b_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, BN], b_desc.layout)
    bt_smem = b_smem
    if TAIL_N > 0:
        if B_T:
            bt_smem = gl.allocate_shared_memory(dtype, [STAGES, TAIL_N, BK], bt_desc.layout)
        else:
            bt_smem = gl.allocate_shared_memory(dtype, [STAGES, BK, TAIL_N], bt_desc.layout)
    # each consumer stages its [ROWS, BN] part of a tile (and [ROWS, TAIL_N] of the tail, in
    # the same buffer after it when as wide) for C and, split, for the workspace. With both,
    # C's staging is the first half of the consumer's fp32 workspace staging, viewed as two
    # 16-bit buffers per consumer (a consumer's stores wait for its previous ones to read).
    w_smem = gl.allocate_shared_memory(w_desc.dtype, [CONSUMERS, ROWS, BN], w_desc.layout)
    c_smem = w_smem
    if HAS_DP and HAS_SK:
        c_smem = w_smem._reinterpret(c_desc.dtype, [2 * CONSUMERS, ROWS, BN], c_desc.layout)
    wt_smem = w_smem
    ct_smem = c_smem
    if TAIL_N > 0 and TAIL_N != BN:
        wt_smem = gl.allocate_shared_memory(w_desc.dtype, [CONSUMERS, ROWS, TAIL_N],
                                            wt_desc.layout)
        ct_smem = wt_smem
        if HAS_DP and HAS_SK:
            ct_smem = wt_smem._reinterpret(c_desc.dtype, [2 * CONSUMERS, ROWS, TAIL_N],
                                           ct_desc.layout)
    ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(ready.index(i), count=1)
        mbarrier.init(empty.index(i), count=CONSUMERS)
    fence_async_shared()
    gl.thread_barrier()
    # the consumers' tensors and buffers in one tuple, their constexprs passed one by one (a
    # tuple built here turns constexprs into tensors); one warp_specialize per consumer count
    args = (c_desc, ct_desc, w_desc, wt_desc, d_desc, dt_desc, bias_ptr, a_smem, b_smem, bt_smem,
            c_smem, ct_smem, w_smem, wt_smem, ready, empty, M, N, units, dp_tiles, sk_steps,
            k_steps, ws_rows, tail_row0, tail_col0)
    if CONSUMERS == 2:
        gl.warp_specialize(
            [(_consumer, (0, args, A_T, B_T, BN, TAIL_N, STAGES, CONSUMERS, HAS_BIAS,
                          ACTIVATION, SAVE_Z, GROUP_M, NUM_SMS)),
             (_consumer, (1, args, A_T, B_T, BN, TAIL_N, STAGES, CONSUMERS, HAS_BIAS,
                          ACTIVATION, SAVE_Z, GROUP_M, NUM_SMS)),
             (_producer, (a_desc, b_desc, bt_desc, a_smem, b_smem, bt_smem, ready, empty, M, N,
                          units, dp_tiles, sk_steps, k_steps, A_T, B_T, BN, TAIL_N,
                          BK, STAGES, CONSUMERS, GROUP_M, NUM_SMS))],
            [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
    else:
        gl.warp_specialize(
            [(_consumer, (0, args, A_T, B_T, BN, TAIL_N, STAGES, CONSUMERS, HAS_BIAS,
                          ACTIVATION, SAVE_Z, GROUP_M, NUM_SMS)),
             (_consumer, (1, args, A_T, B_T, BN, TAIL_N, STAGES, CONSUMERS, HAS_BIAS,
                          ACTIVATION, SAVE_Z, GROUP_M, NUM_SMS)),
             (_consumer, (2, args, A_T, B_T, BN, TAIL_N, STAGES, CONSUMERS, HAS_BIAS,
                          ACTIVATION, SAVE_Z, GROUP_M, NUM_SMS)),
             (_producer, (a_desc, b_desc, bt_desc, a_smem, b_smem, bt_smem, ready, empty, M, N,
                          units, dp_tiles, sk_steps, k_steps, A_T, B_T, BN, TAIL_N,
                          BK, STAGES, CONSUMERS, GROUP_M, NUM_SMS))],
            [4, 4, 1], [CONSUMER_REGS_3, CONSUMER_REGS_3, PRODUCER_REGS])


_GL_DTYPES = {torch.bfloat16: gl.bfloat16, torch.float16: gl.float16, torch.float32: gl.float32}


@functools.cache
def _layout(block: tuple[int, ...], dtype: torch.dtype) -> gl.NVMMASharedLayout:
    return gl.NVMMASharedLayout.get_default_for(list(block), _GL_DTYPES[dtype])


def descriptor(t: torch.Tensor, shape: list[int], strides: list[int],
               block: list[int]) -> TensorDescriptor:
    """A Gluon TMA descriptor over ``t`` viewed as ``shape``/``strides`` (a layout TMA can
    read, checked by the caller: ``matmul._tma_layout``, ops/attention.py), zero-filled past
    the edges, with the default shared layout of its ``block`` (cached)."""
    d = object.__new__(TensorDescriptor)
    d.base, d.shape, d.strides, d.block_shape, d.padding = t, shape, strides, block, "zero"
    d.layout = _layout(tuple(block), t.dtype)
    return d

