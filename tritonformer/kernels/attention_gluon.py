"""Flash attention for Hopper (sm_90) in Gluon, 16-bit, head dim 64 or 128: the forward, and
the backward (``attn_bwd_gluon_kernel``, described there), exact ALiBi excepted.

Triton 3.6 waits for every wgmma right after issuing it, so the ``tl.dot`` forward
(``attention.attn_fwd_kernel``) never overlaps the softmax of one key block with the tensor
cores. The kernels here issue the wgmmas themselves (FA3's intra-warpgroup pipelining, one
4-warp warpgroup per 64 query rows):

    iteration j:  S_j = Q K_j^T (async)  |  O += P_{j-1} V_{j-1} (async)
                  wait until S_j is done (PV_{j-1} may still run), softmax(S_j) -> P_j
                  wait for PV_{j-1}, rescale O

Two kernels, picked by the tiling's BLOCK_M (``attention.GLUON_FWD``):

- 64 rows, ``attn_fwd_gluon_kernel``: one warpgroup refills its own key and value TMA rings
  (K_STAGES, V_STAGES deep; a key stage is free once its scores are done, one iteration
  before the value stage of the same block). Two or three programs share an SM.
- 128 rows, ``attn_fwd_gluon_ws_kernel`` (FA3's other halves, warp-specialised): a producer
  warp fills key and value rings shared by two consumer warpgroups of 64 rows, which take
  turns at the tensor cores (ping-pong: one issues its wgmmas while the other runs its
  softmax). Persistent, one program per SM (CONSUMER_REGS registers per consumer thread),
  tiles handed out in order by an atomic counter (each head's longest rows first, heads one
  after another, so the programs at work share keys and values in L2); the next tile's loads
  overlap the end of this one.

P stays in registers (the PV wgmma's A operand). ``attention_fwd`` dispatches here on sm_90
for fp16/bf16 at D 64 and 128, except exact ALiBi (non-causal or fp32). Folded ALiBi's column
bias rides on the scores' wgmma as one more k-step (``_alibi_a``, ``_alibi_b``), so the
softmax loop runs the same instructions with and without it.

Same conventions as ``attention.attn_fwd_kernel``: base-2 LSE, +inf for rows that see no
key, causal mask aligned bottom-right, query blocks last to first, ALiBi in the folded form
(causal 16-bit inputs). Tensors are read and written through 4-D TMA descriptors over
(B, H, S, D) with [1, 1, rows, D] boxes (zero-filled past S; stores clipped there). Gluon has
no interpreter: the GPU tier tests these kernels (tests/test_attention.py).
"""

from __future__ import annotations

import torch
import triton
from triton._C.libtriton import ir
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language._core import builtin
from triton.experimental.gluon.language.nvidia.hopper import (
    fence_async_shared,
    mbarrier,
    tma,
    warpgroup_mma,
    warpgroup_mma_wait,
)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

from ..runtime import device_index, empty, launch, num_sms
from .attention import LOG2E, _strides, heads_interleaved
from .matmul_gluon import descriptor

ROWS = gl.constexpr(64)  # query rows per warpgroup
LOG2E_ = gl.constexpr(LOG2E)  # LOG2E inside the kernels (jit globals must be constexprs)
# Registers per thread of the warp-specialised kernel's partitions (setmaxnreg): two consumer
# warpgroups and the producer's, (2 * 240 + 24) * 128 <= the SM's 64K.
CONSUMER_REGS = gl.constexpr(240)
PRODUCER_REGS = gl.constexpr(24)


@gluon.jit
def _issue(desc, smem, bars, j, n_blocks, off_b, off_h, BLOCK_N: gl.constexpr,
           STAGES: gl.constexpr):
    """TMA load of key (or value) block j into stage j % STAGES of its ring (skipped past the
    last block)."""
    slot = j % STAGES
    pred = j < n_blocks
    bar = bars.index(slot)
    mbarrier.expect(bar, desc.block_type.nbytes, pred)
    tma.async_copy_global_to_shared(desc, [off_b, off_h, j * BLOCK_N, 0], bar, smem.index(slot),
                                    pred)


@gluon.jit
def _alibi_a(slope2, qk_scale, s_layout: gl.constexpr):
    """ALiBi's in-block column bias slope2 * c, c = key - BLOCK_N / 2 for the keys of a block
    (centred: half the magnitude, so half the rounding), goes in as one more k-step of 16 of
    the scores' wgmma. This is its A operand [ROWS, 16] (registers): columns (hi, mid, lo) =
    slope2 / qk_scale split over three bf16s; B (``_alibi_b``) has columns (c, c, c). The
    tensor cores then add c * slope2 / qk_scale to every raw score in fp32, so the softmax
    scales it with the scores and spends no instruction on it. bf16 whatever q's dtype: the
    products go into the fp32 accumulator either way, and bf16 has fp32's range."""
    blk: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
    k16 = gl.arange(0, 16, layout=gl.SliceLayout(0, blk))
    r = slope2 / qk_scale
    hi = r.to(gl.bfloat16).to(gl.float32)
    mid = (r - hi).to(gl.bfloat16).to(gl.float32)
    lo = (r - hi - mid).to(gl.bfloat16).to(gl.float32)
    part = gl.where(k16 == 0, hi, gl.where(k16 == 1, mid, gl.where(k16 == 2, lo, 0.0)))
    a = gl.zeros([ROWS, 16], gl.float32, blk) + part[None, :]
    a_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=s_layout, k_width=2)
    return gl.convert_layout(a.to(gl.bfloat16), a_layout)


@gluon.jit
def _alibi_b(b_smem, BLOCK_N: gl.constexpr):
    """Writes the B operand [BLOCK_N, 16] of ALiBi's k-step (``_alibi_a``) into b_smem
    (bf16): columns (c, c, c, 0, ...), c = key - BLOCK_N / 2, exact in bf16 for |c| <= 256.
    Run by 4 warps."""
    blk: gl.constexpr = gl.BlockedLayout([1, 1], [2, 16], [4, 1], [1, 0])
    k16 = gl.arange(0, 16, layout=gl.SliceLayout(0, blk))
    c = (gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, blk)) - BLOCK_N // 2).to(gl.float32)
    b_smem.store(gl.where(k16[None, :] < 3, c[:, None], 0.0).to(gl.bfloat16))


@gluon.jit
def _scores(q2, k_stage, s_zero, bias_a, bias_b, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
            ALIBI: gl.constexpr, IS_ASYNC: gl.constexpr):
    """The raw scores Q K^T of one key stage [BLOCK_N, HEAD_DIM] (with ALIBI 2, plus the
    column bias of ``_alibi_a``): the wgmma's result, or its token if IS_ASYNC."""
    k2 = k_stage.reshape([BLOCK_N, HEAD_DIM])
    s = warpgroup_mma(q2, k2.permute([1, 0]), s_zero, use_acc=False, is_async=IS_ASYNC)
    if ALIBI == 2:
        s = warpgroup_mma(bias_a, bias_b.permute([1, 0]), s, is_async=IS_ASYNC)
    return s


@gluon.jit
def _softmax_step(s, m_i, l_i, j, m0, diag, SKV, qk_scale, slope2, BLOCK_N: gl.constexpr,
                  CAUSAL: gl.constexpr, ALIBI: gl.constexpr, s_layout: gl.constexpr):
    """Online-softmax update for the scores s [ROWS, BLOCK_N] of rows m0.. and key block j:
    returns (p fp32, alpha, m_new, l_new). Masks the causal diagonal and the key tail. ALIBI 2: s
    already holds the in-block column part of slope2 * (key - i - diag) (``_scores``); the
    block's offset slope2 * (start_n + BLOCK_N / 2 - m0 - diag), uniform over the block, goes
    in through the row max, and the per-row part -slope2 * (i - m0) is left to the caller
    (the LSE)."""
    start_n = j * BLOCK_N
    needs_mask = start_n + BLOCK_N > SKV
    if CAUSAL:
        needs_mask = needs_mask | (start_n + BLOCK_N - 1 > m0 + diag)
    if needs_mask:
        cols = start_n + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, s_layout))
        rows = m0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, s_layout))
        keep = cols[None, :] < SKV
        if CAUSAL:
            keep = keep & (cols[None, :] <= rows[:, None] + diag)
        s = gl.where(keep, s, float("-inf"))
    # qk_scale > 0: scale the row max, then one FMA per score
    m_blk = gl.max(s, 1) * qk_scale
    if ALIBI == 2:
        shift = slope2 * (start_n + BLOCK_N // 2 - m0 - diag).to(gl.float32)
        m_new = gl.maximum(m_i, m_blk + shift)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)  # rows that saw no key yet
        p = gl.exp2(s * qk_scale - (m_use - shift)[:, None])
    else:
        m_new = gl.maximum(m_i, m_blk)
        m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
        p = gl.exp2(s * qk_scale - m_use[:, None])
    alpha = gl.exp2(m_i - m_use)
    l_new = l_i * alpha + gl.sum(p, 1)
    return p, alpha, m_new, l_new


@gluon.constexpr_function
def _acc_layout(n):
    """The layout of a wgmma accumulator [ROWS, n] of one warpgroup (scores: n = BLOCK_N;
    O: n = HEAD_DIM)."""
    return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1], instr_shape=[16, n, 16])


@gluon.jit
def _step(q2, k_stage, v_stage, v_ready, v_phase, p_op, acc, m_i, l_i, j, m0, diag, SKV,
          qk_scale, slope2, s_zero, bias_a, bias_b, turn_next, k_free, v_free,
          HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr,
          ALIBI: gl.constexpr, SIGNAL: gl.constexpr):
    """One key block j >= 1 of a warpgroup (its key stage ready): S_j and P_{j-1} V_{j-1}
    issued async (the latter once v_ready's phase v_phase is done), the softmax of S_j while
    P_{j-1} V_{j-1} runs, then O rescaled. Returns (P_j as the next PV's A operand, O, m, l).
    SIGNAL (warp-specialised consumers): arrive on turn_next once both wgmmas are issued, on
    k_free once S_j is read, on v_free once P_{j-1} V_{j-1} is done."""
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_tok = _scores(q2, k_stage, s_zero, bias_a, bias_b, HEAD_DIM, BLOCK_N, ALIBI, True)
    mbarrier.wait(v_ready, v_phase)
    acc_tok = warpgroup_mma(p_op, v_stage.reshape([BLOCK_N, HEAD_DIM]), acc, is_async=True)
    if SIGNAL:
        mbarrier.arrive(turn_next)
    # wgmma groups retire in issue order: S_j first, P_{j-1} V_{j-1} may still run
    s = warpgroup_mma_wait(1, deps=[s_tok])
    if SIGNAL:
        mbarrier.arrive(k_free)
    p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, j, m0, diag, SKV, qk_scale, slope2, BLOCK_N,
                                       CAUSAL, ALIBI, s_layout)
    acc = warpgroup_mma_wait(0, deps=[acc_tok])
    if SIGNAL:
        mbarrier.arrive(v_free)
    acc = acc * gl.convert_layout(alpha, gl.SliceLayout(1, o_layout))[:, None]
    return gl.convert_layout(p.to(p_op.dtype), p_layout), acc, m_i, l_i


@gluon.jit
def _epilogue(acc, m_i, l_i, o_smem, desc_o, LSE, off_bh, H, m0, SQ, slope2,
              ALIBI: gl.constexpr):
    """Rows m0.. of one warpgroup: O = acc / l through o_smem [1, 1, ROWS, D] (its Q stage,
    no longer read) to the output by TMA, and the base-2 LSE m + log2(l) (+inf for rows that
    saw no key; with ALIBI 2 less the per-row part of the bias, -slope2 * (i - m0))."""
    o_rows: gl.constexpr = gl.SliceLayout(1, acc.type.layout)
    empty_row = l_i == 0.0
    l_safe = gl.where(empty_row, 1.0, l_i)
    o = acc / gl.convert_layout(l_safe, o_rows)[:, None]
    o_smem.reshape([ROWS, acc.shape[1]]).store(o.to(o_smem.dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(desc_o, [off_bh // H, off_bh % H, m0, 0], o_smem)
    offs_i = gl.arange(0, ROWS, layout=m_i.type.layout)
    lse2 = m_i + gl.log2(l_safe)
    if ALIBI == 2:
        lse2 -= slope2 * offs_i.to(gl.float32)
    lse = gl.where(empty_row, float("inf"), lse2)
    rows = m0 + offs_i
    gl.store(LSE + off_bh.to(gl.int64) * SQ + rows, lse, mask=rows < SQ)
    tma.store_wait(0)


@gluon.jit
def _tile(qb, n_qb, SQ, SKV, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, CAUSAL: gl.constexpr):
    """Query block qb of n_qb: (first row m0, diag = Skv - Sq, number of key blocks). Under
    the causal mask the blocks run last to first (the longest first)."""
    if CAUSAL:
        qb = n_qb - 1 - qb
    m0 = qb * BLOCK_M
    diag = SKV - SQ
    hi = SKV
    if CAUSAL:
        hi = gl.maximum(gl.minimum(m0 + BLOCK_M + diag, SKV), 0)
    return m0, diag, gl.cdiv(hi, BLOCK_N)


@gluon.jit
def attn_fwd_gluon_kernel(
    desc_q,  # queries, (B, H, SQ, D), box [1, 1, ROWS, D]
    desc_k,  # keys, (B, H, SKV, D), box [1, 1, BLOCK_N, D]
    desc_v,  # values, (B, H, SKV, D), box [1, 1, BLOCK_N, D]
    desc_o,  # output (written), (B, H, SQ, D), box [1, 1, ROWS, D], q's dtype
    LSE,  # logsumexp (written), fp32, contiguous (B, H, SQ), base 2, +inf for empty rows
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    H, SQ, SKV,
    qk_scale,  # softmax scale * log2(e)
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    K_STAGES: gl.constexpr,  # key blocks in flight
    V_STAGES: gl.constexpr,  # value blocks in flight
    CAUSAL: gl.constexpr,
    ALIBI: gl.constexpr,  # 0 none, 2 folded (causal)
):
    """ROWS query rows per program: one warpgroup, which also refills its own rings."""
    dtype: gl.constexpr = desc_q.dtype
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    m0, diag, n_blocks = _tile(gl.program_id(0), gl.num_programs(0), SQ, SKV, ROWS, BLOCK_N,
                               CAUSAL)
    off_bh = gl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    slope2 = 0.0
    bias_a = 0
    bias_b = 0
    if ALIBI != 0:
        slope2 = gl.load(SLOPES + off_h) * LOG2E_
        bias_b = gl.allocate_shared_memory(
            gl.bfloat16, [BLOCK_N, 16],
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], gl.bfloat16))
        _alibi_b(bias_b, BLOCK_N)
        bias_a = _alibi_a(slope2, qk_scale, s_layout)

    q_smem = gl.allocate_shared_memory(dtype, [1, 1, ROWS, HEAD_DIM], desc_q.layout)
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                       desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                       desc_v.layout)
    q_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    # Keys and values have rings of their own: a key stage is free once its scores are done,
    # one iteration before the value stage of the same block.
    k_bars = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_bars = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(q_bar, count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_bars.index(i), count=1)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_bars.index(i), count=1)
    fence_async_shared()
    if ALIBI != 0:
        gl.thread_barrier()  # every thread's part of bias_b is written before a wgmma reads it

    mbarrier.expect(q_bar, desc_q.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_q, [off_b, off_h, m0, 0], q_bar, q_smem)
    for i in gl.static_range(K_STAGES):
        _issue(desc_k, k_smem, k_bars, i, n_blocks, off_b, off_h, BLOCK_N, K_STAGES)
    for i in gl.static_range(V_STAGES):
        _issue(desc_v, v_smem, v_bars, i, n_blocks, off_b, off_h, BLOCK_N, V_STAGES)

    q2 = q_smem.reshape([ROWS, HEAD_DIM])
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
    m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
    l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
    mbarrier.wait(q_bar, 0)

    if n_blocks > 0:
        # block 0: scores and softmax, nothing to overlap yet
        mbarrier.wait(k_bars.index(0), 0)
        s = _scores(q2, k_smem.index(0), s_zero, bias_a, bias_b, HEAD_DIM, BLOCK_N, ALIBI,
                    False)
        p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, m0, diag, SKV, qk_scale, slope2,
                                           BLOCK_N, CAUSAL, ALIBI, s_layout)
        p_op = gl.convert_layout(p.to(dtype), p_layout)
        gl.thread_barrier()  # every warp is done with key stage 0
        _issue(desc_k, k_smem, k_bars, K_STAGES, n_blocks, off_b, off_h, BLOCK_N, K_STAGES)
        for j in range(1, n_blocks):
            slot = j % K_STAGES
            prev = (j - 1) % V_STAGES
            mbarrier.wait(k_bars.index(slot), (j // K_STAGES) & 1)
            p_op, acc, m_i, l_i = _step(q2, k_smem.index(slot), v_smem.index(prev),
                                        v_bars.index(prev), ((j - 1) // V_STAGES) & 1, p_op,
                                        acc, m_i, l_i, j, m0, diag, SKV, qk_scale, slope2,
                                        s_zero, bias_a, bias_b, q_bar, q_bar, q_bar, HEAD_DIM,
                                        BLOCK_N, CAUSAL, ALIBI, False)  # no barrier to signal
            gl.thread_barrier()  # every warp is done with key stage `slot`, value stage `prev`
            _issue(desc_k, k_smem, k_bars, j + K_STAGES, n_blocks, off_b, off_h, BLOCK_N,
                   K_STAGES)
            _issue(desc_v, v_smem, v_bars, j - 1 + V_STAGES, n_blocks, off_b, off_h, BLOCK_N,
                   V_STAGES)
        last = (n_blocks - 1) % V_STAGES
        mbarrier.wait(v_bars.index(last), ((n_blocks - 1) // V_STAGES) & 1)
        acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc)

    _epilogue(acc, m_i, l_i, q_smem, desc_o, LSE, off_bh, H, m0, SQ, slope2, ALIBI)
    mbarrier.invalidate(q_bar)
    for i in gl.static_range(K_STAGES):
        mbarrier.invalidate(k_bars.index(i))
    for i in gl.static_range(V_STAGES):
        mbarrier.invalidate(v_bars.index(i))


@gluon.jit
def _ws_producer(desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, tiles, q_ready, q_empty,
                 k_ready, k_empty, v_ready, v_empty, TILE_COUNTER, H, SQ, SKV, n_tiles,
                 BLOCK_N: gl.constexpr, K_STAGES: gl.constexpr, V_STAGES: gl.constexpr,
                 CAUSAL: gl.constexpr):
    """The producer warp. Tiles: its program id first, then the next of TILE_COUNTER (tiles in
    order: heads outer, each head's longest rows first). Per tile i, once both consumers have
    released buffer i % 2: the tile's index into tiles[i % 2] and both consumers' Q into their
    stage of that buffer; then key and value block c (counted over the program's tiles) into
    stage c % STAGES of its ring once both consumers have released the block there before it.
    Past the last tile, n_tiles in the next tile slot tells the consumers to stop."""
    one: gl.constexpr = gl.BlockedLayout([1], [32], [1], [0])
    n_qb = gl.cdiv(SQ, 2 * ROWS)
    c = 0
    i = 0
    t = gl.program_id(0)
    while t < n_tiles:
        for w in gl.static_range(2):
            mbarrier.wait(q_empty.index((i % 2) * 2 + w), ((i // 2) & 1) ^ 1)  # 1st round passes
        tiles.index(i % 2).store(gl.full([1], t, gl.int32, one))
        gl.thread_barrier()
        off_bh = t // n_qb
        m0, diag, n_blocks = _tile(t % n_qb, n_qb, SQ, SKV, 2 * ROWS, BLOCK_N, CAUSAL)
        off_b = off_bh // H
        off_h = off_bh % H
        for w in gl.static_range(2):
            qs = (i % 2) * 2 + w
            mbarrier.expect(q_ready.index(qs), desc_q.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q, [off_b, off_h, m0 + w * ROWS, 0],
                                            q_ready.index(qs), q_smem.index(qs))
        for j in range(n_blocks):
            ks = c % K_STAGES
            mbarrier.wait(k_empty.index(ks), ((c // K_STAGES) & 1) ^ 1)
            mbarrier.expect(k_ready.index(ks), desc_k.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_k, [off_b, off_h, j * BLOCK_N, 0],
                                            k_ready.index(ks), k_smem.index(ks))
            vs = c % V_STAGES
            mbarrier.wait(v_empty.index(vs), ((c // V_STAGES) & 1) ^ 1)
            mbarrier.expect(v_ready.index(vs), desc_v.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_v, [off_b, off_h, j * BLOCK_N, 0],
                                            v_ready.index(vs), v_smem.index(vs))
            c += 1
        i += 1
        t = gl.atomic_add(TILE_COUNTER, 1) + gl.num_programs(0)
    for w in gl.static_range(2):
        mbarrier.wait(q_empty.index((i % 2) * 2 + w), ((i // 2) & 1) ^ 1)
    tiles.index(i % 2).store(gl.full([1], n_tiles, gl.int32, one))
    gl.thread_barrier()
    for w in gl.static_range(2):
        mbarrier.arrive(q_ready.index((i % 2) * 2 + w))


@gluon.jit
def _ws_consumer(W: gl.constexpr, desc_o, LSE, SLOPES, q_smem, k_smem, v_smem, tiles, bias_b,
                 q_ready, q_empty, k_ready, k_empty, v_ready, v_empty, turn, H, SQ, SKV, n_tiles,
                 qk_scale, HEAD_DIM: gl.constexpr, BLOCK_N: gl.constexpr,
                 K_STAGES: gl.constexpr, V_STAGES: gl.constexpr, CAUSAL: gl.constexpr,
                 ALIBI: gl.constexpr):
    """Consumer warpgroup W, over the tiles the producer hands out (rows m0 + W * ROWS .. of
    each): the loop of ``attn_fwd_gluon_kernel``, with its wgmmas issued only on its turn (it
    waits on turn[W], then hands the turn to the other consumer), its key and value stages
    released to the producer, and its Q stage released once O (staged there) is stored."""
    dtype: gl.constexpr = q_smem.dtype
    one: gl.constexpr = gl.BlockedLayout([1], [32], [4], [0])
    s_layout: gl.constexpr = _acc_layout(BLOCK_N)
    o_layout: gl.constexpr = _acc_layout(HEAD_DIM)
    p_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=o_layout, k_width=2)
    s_zero = gl.zeros([ROWS, BLOCK_N], gl.float32, s_layout)
    n_qb = gl.cdiv(SQ, 2 * ROWS)
    c = 0  # key blocks so far: ring slots and phases, and the turn's phase
    i = 0  # tiles so far: Q buffer and phase
    mbarrier.wait(q_ready.index(W), 0)
    t = gl.max(tiles.index(0).load(one), 0)
    while t < n_tiles:
        qs = (i % 2) * 2 + W
        off_bh = t // n_qb
        m0, diag, n_blocks = _tile(t % n_qb, n_qb, SQ, SKV, 2 * ROWS, BLOCK_N, CAUSAL)
        mw = m0 + W * ROWS
        slope2 = 0.0
        bias_a = 0
        if ALIBI != 0:
            slope2 = gl.load(SLOPES + off_bh % H) * LOG2E_
            bias_a = _alibi_a(slope2, qk_scale, s_layout)
        q2 = q_smem.index(qs).reshape([ROWS, HEAD_DIM])
        acc = gl.zeros([ROWS, HEAD_DIM], gl.float32, o_layout)
        m_i = gl.full([ROWS], float("-inf"), gl.float32, gl.SliceLayout(1, s_layout))
        l_i = gl.zeros([ROWS], gl.float32, gl.SliceLayout(1, s_layout))
        if n_blocks > 0:
            ks = c % K_STAGES
            mbarrier.wait(turn.index(W), c & 1)
            mbarrier.wait(k_ready.index(ks), (c // K_STAGES) & 1)
            s_tok = _scores(q2, k_smem.index(ks), s_zero, bias_a, bias_b, HEAD_DIM, BLOCK_N,
                            ALIBI, True)
            mbarrier.arrive(turn.index(1 - W))
            s = warpgroup_mma_wait(0, deps=[s_tok])
            mbarrier.arrive(k_empty.index(ks))
            p, alpha, m_i, l_i = _softmax_step(s, m_i, l_i, 0, mw, diag, SKV, qk_scale, slope2,
                                               BLOCK_N, CAUSAL, ALIBI, s_layout)
            p_op = gl.convert_layout(p.to(dtype), p_layout)
            for j in range(1, n_blocks):
                cj = c + j
                ks = cj % K_STAGES
                prev = (cj - 1) % V_STAGES
                mbarrier.wait(turn.index(W), cj & 1)
                mbarrier.wait(k_ready.index(ks), (cj // K_STAGES) & 1)
                p_op, acc, m_i, l_i = _step(q2, k_smem.index(ks), v_smem.index(prev),
                                            v_ready.index(prev), ((cj - 1) // V_STAGES) & 1,
                                            p_op, acc, m_i, l_i, j, mw, diag, SKV, qk_scale,
                                            slope2, s_zero, bias_a, bias_b, turn.index(1 - W),
                                            k_empty.index(ks), v_empty.index(prev), HEAD_DIM,
                                            BLOCK_N, CAUSAL, ALIBI, True)
            last = (c + n_blocks - 1) % V_STAGES
            mbarrier.wait(v_ready.index(last), ((c + n_blocks - 1) // V_STAGES) & 1)
            acc = warpgroup_mma(p_op, v_smem.index(last).reshape([BLOCK_N, HEAD_DIM]), acc)
            mbarrier.arrive(v_empty.index(last))
        _epilogue(acc, m_i, l_i, q_smem.index(qs), desc_o, LSE, off_bh, H, mw, SQ, slope2,
                  ALIBI)
        mbarrier.arrive(q_empty.index(qs))
        c += n_blocks
        i += 1
        mbarrier.wait(q_ready.index((i % 2) * 2 + W), (i // 2) & 1)
        t = gl.max(tiles.index(i % 2).load(one), 0)


@gluon.jit
def attn_fwd_gluon_ws_kernel(
    desc_q, desc_k, desc_v, desc_o, LSE, SLOPES, H, SQ, SKV, qk_scale,  # as attn_fwd_gluon_kernel
    n_tiles,  # B * H * cdiv(SQ, 2 * ROWS): (head, query block) tiles, heads outer
    TILE_COUNTER,  # int32, zero: tiles handed out past the first one per program
    HEAD_DIM: gl.constexpr,
    BLOCK_N: gl.constexpr,
    K_STAGES: gl.constexpr,
    V_STAGES: gl.constexpr,
    CAUSAL: gl.constexpr,
    ALIBI: gl.constexpr,
):
    """Persistent: each program (one per SM) takes tiles of 2 * ROWS query rows, its program id
    first, then the next free one (TILE_COUNTER): the longest first, balanced as they finish.
    Two consumer warpgroups (the 4 warps of the launch and a worker partition) and a producer
    warp (``_ws_producer``). Key and value stages hold for both consumers (their empty
    barriers count two arrivals); turn[w] orders the consumers' wgmma issue, starting with
    consumer 0; Q (and the tile index) has two buffers, so the next tile's loads overlap this
    tile's end."""
    dtype: gl.constexpr = desc_q.dtype
    q_smem = gl.allocate_shared_memory(dtype, [4, 1, 1, ROWS, HEAD_DIM], desc_q.layout)
    tiles = gl.allocate_shared_memory(gl.int32, [2, 1], gl.SwizzledSharedLayout(1, 1, 1, [0]))
    k_smem = gl.allocate_shared_memory(dtype, [K_STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                       desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [V_STAGES, 1, 1, BLOCK_N, HEAD_DIM],
                                       desc_v.layout)
    bias_b = 0
    if ALIBI != 0:
        bias_b = gl.allocate_shared_memory(
            gl.bfloat16, [BLOCK_N, 16],
            gl.NVMMASharedLayout.get_default_for([BLOCK_N, 16], gl.bfloat16))
        _alibi_b(bias_b, BLOCK_N)
    q_ready = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    q_empty = gl.allocate_shared_memory(gl.int64, [4, 1], mbarrier.MBarrierLayout())
    turn = gl.allocate_shared_memory(gl.int64, [2, 1], mbarrier.MBarrierLayout())
    k_ready = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    k_empty = gl.allocate_shared_memory(gl.int64, [K_STAGES, 1], mbarrier.MBarrierLayout())
    v_ready = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    v_empty = gl.allocate_shared_memory(gl.int64, [V_STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(4):
        mbarrier.init(q_ready.index(i), count=1)
        mbarrier.init(q_empty.index(i), count=1)
    for i in gl.static_range(2):
        mbarrier.init(turn.index(i), count=1)
    for i in gl.static_range(K_STAGES):
        mbarrier.init(k_ready.index(i), count=1)
        mbarrier.init(k_empty.index(i), count=2)
    for i in gl.static_range(V_STAGES):
        mbarrier.init(v_ready.index(i), count=1)
        mbarrier.init(v_empty.index(i), count=2)
    fence_async_shared()
    gl.thread_barrier()  # bias_b and the barriers are ready before any partition starts
    mbarrier.arrive(turn.index(0))
    gl.warp_specialize(
        [(_ws_consumer, (0, desc_o, LSE, SLOPES, q_smem, k_smem, v_smem, tiles, bias_b, q_ready,
                         q_empty, k_ready, k_empty, v_ready, v_empty, turn, H, SQ, SKV, n_tiles,
                         qk_scale, HEAD_DIM, BLOCK_N, K_STAGES, V_STAGES, CAUSAL, ALIBI)),
         (_ws_consumer, (1, desc_o, LSE, SLOPES, q_smem, k_smem, v_smem, tiles, bias_b, q_ready,
                         q_empty, k_ready, k_empty, v_ready, v_empty, turn, H, SQ, SKV, n_tiles,
                         qk_scale, HEAD_DIM, BLOCK_N, K_STAGES, V_STAGES, CAUSAL, ALIBI)),
         (_ws_producer, (desc_q, desc_k, desc_v, q_smem, k_smem, v_smem, tiles, q_ready,
                         q_empty, k_ready, k_empty, v_ready, v_empty, TILE_COUNTER, H, SQ, SKV,
                         n_tiles, BLOCK_N, K_STAGES, V_STAGES, CAUSAL))],
        [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def _gluon_desc(t: torch.Tensor, rows: int) -> TensorDescriptor:
    """A descriptor over ``t`` (B, H, S, D) with [1, 1, rows, D] boxes, zero-filled past S.
    Built without TensorDescriptor's checks, like ``attention._desc`` (ops/attention.py has
    made the layout TMA-ready; the checks cost ~3 us of host time per descriptor)."""
    return descriptor(t, list(t.shape), _strides(t), [1, 1, rows, t.shape[-1]])


def attention_fwd_gluon(q, k, v, causal: bool, scale: float, slopes: torch.Tensor | None = None,
                        block_m: int = 64, block_n: int = 64, k_stages: int = 2,
                        v_stages: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The forward through ``attn_fwd_gluon_kernel`` (block_m 64) or the warp-specialised
    ``attn_fwd_gluon_ws_kernel`` (block_m 128) on an sm_90 device.

    q (B, H, Sq, D), k, v (B, H, Skv, D): bf16 or fp16, D 64 or 128, layouts TMA can read
    (unit last stride, 16-byte aligned strides; ops/attention.py ensures it). slopes: fp32
    (H,), causal only (folded ALiBi). block_m, block_n, k_stages, v_stages: the tiling
    (``attention.gluon_tiling``).

    Returns (out (B, H, Sq, D) in q's dtype laid out as (B, Sq, H, D), lse fp32 contiguous
    (B, H, Sq)), like ``attention_fwd``.
    """
    if slopes is not None and not causal:
        raise ValueError("the Gluon forward takes ALiBi with the causal mask only")
    if block_m not in (64, 128):
        raise ValueError(f"block_m must be 64 (one warpgroup) or 128 (warp-specialised), "
                         f"got {block_m}")
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    out = heads_interleaved(q.shape, q.dtype, q.device)
    lse = empty((B, H, SQ), torch.float32, q.device)
    args = (_gluon_desc(q, ROWS.value), _gluon_desc(k, block_n), _gluon_desc(v, block_n),
            _gluon_desc(out, ROWS.value), lse, slopes if slopes is not None else lse, H, SQ, SKV,
            scale * LOG2E)
    constexprs = dict(HEAD_DIM=D, BLOCK_N=block_n, K_STAGES=k_stages, V_STAGES=v_stages,
                      CAUSAL=causal, ALIBI=0 if slopes is None else 2)
    if block_m == 64:
        launch(attn_fwd_gluon_kernel, (triton.cdiv(SQ, block_m), B * H), args, constexprs,
               num_warps=4)
    else:
        n_tiles = triton.cdiv(SQ, block_m) * B * H
        programs = min(n_tiles, num_sms(device_index(q)))
        counter = torch.zeros(1, dtype=torch.int32, device=q.device)
        launch(attn_fwd_gluon_ws_kernel, programs, (*args, n_tiles, counter), constexprs,
               num_warps=4)
    return out, lse


# ---------------------------------------------------------------------------------------------
# Backward
# ---------------------------------------------------------------------------------------------


@builtin
def _tma_reduce_add(desc, coord, src, _semantic=None):
    """TMA reduce-add of shared memory ``src`` into the global box of ``desc`` at ``coord``
    (fp32 adds in L2). Triton 3.6's Gluon exposes no reduce for Hopper's TMA, but its builder
    makes the op (``cp.reduce.async.bulk.tensor``) that ``tl``'s descriptor ``atomic_add`` is
    lowered to. Completes like a TMA store (``tma.store_wait``)."""
    coord = _semantic._convert_to_ir_values(coord, require_i64=False)
    _semantic.builder.create_async_tma_reduce(ir.DESCRIPTOR_REDUCE_KIND.ADD, desc.handle, coord,
                                              src.handle)


@gluon.jit
def _issue_rows(desc_q, desc_do, desc_stats, q_smem, do_smem, lse_smem, delta_smem, bars, it,
                n_iter, m_first, off_b, off_h, off_bh, BLOCK_M: gl.constexpr,
                STAGES: gl.constexpr):
    """TMA loads of the Q, dO, LSE and delta rows of iteration it (query block m_first + it)
    into stage it % STAGES, on one barrier (skipped past the last iteration)."""
    slot = it % STAGES
    pred = it < n_iter
    bar = bars.index(slot)
    row = (m_first + it) * BLOCK_M
    mbarrier.expect(bar, desc_q.block_type.nbytes + desc_do.block_type.nbytes
                    + 2 * desc_stats.block_type.nbytes, pred)
    tma.async_copy_global_to_shared(desc_q, [off_b, off_h, row, 0], bar, q_smem.index(slot), pred)
    tma.async_copy_global_to_shared(desc_do, [off_b, off_h, row, 0], bar, do_smem.index(slot),
                                    pred)
    tma.async_copy_global_to_shared(desc_stats, [off_bh, 0, row], bar, lse_smem.index(slot),
                                    pred)
    tma.async_copy_global_to_shared(desc_stats, [off_bh, 1, row], bar, delta_smem.index(slot),
                                    pred)


@gluon.jit
def attn_bwd_gluon_kernel(
    desc_q, desc_do,  # forward queries, output gradient: (B, H, SQ, D), box [1, 1, BLOCK_M, D]
    desc_k, desc_v,  # forward keys, values: (B, H, SKV, D), box [1, 1, BLOCK_N, D]
    desc_dk, desc_dv,  # their gradients (written), (B, H, SKV, D), box [1, 1, BLOCK_N, D]
    desc_dq,  # fp32 dS K accumulator, zero-filled, (B, H, SQ, D), box [1, 1, BLOCK_M, D]
    desc_stats,  # fp32 (B * H, 2, SQP): per (batch, head) the forward's base-2 logsumexp
                 # and rowsum(dO * O), +inf and 0 past SQ, SQP a multiple of BLOCK_M
                 # (attention.attn_bwd_delta_kernel), box [1, 1, BLOCK_M]
    SLOPES,  # ALiBi slopes, fp32, (H,) (unused if ALIBI == 0)
    H, SQ, SKV,
    qk_scale,  # softmax scale * log2(e)
    scale,  # softmax scale
    HEAD_DIM: gl.constexpr,
    BLOCK_M: gl.constexpr,  # query rows per iteration
    BLOCK_N: gl.constexpr,  # keys per program, 64 per warpgroup
    STAGES: gl.constexpr,  # Q / dO blocks in flight
    DQ_BUFS: gl.constexpr,  # dQ staging buffers (1 or 2) for the reduce-adds
    CAUSAL: gl.constexpr,
    ALIBI: gl.constexpr,  # 0 none, 2 folded (causal)
):
    """dK and dV of one key block of one (batch, head), and its share of dQ (reduce-added).
    Grid (cdiv(SKV, BLOCK_N), B * H), BLOCK_N // 16 warps. Works on transposed tiles (keys x
    queries), each warpgroup on 64 keys; per query block (issued async, waited in order):

        S^T = K Q^T, dP^T = V dO^T   |  P^T = exp2(S^T * qk_scale - lse)   (dP^T still running)
        dV += P^T dO                 |  dS^T = P^T (dP^T - delta)           (dV still running)
        dK += dS^T Q, dQ_part = dS K (dS^T through shared memory, both warpgroups' keys)

    then dQ_part is reduce-added into desc_dq by TMA from one of DQ_BUFS shared buffers. Under
    the causal mask the query blocks before the first that sees a key are skipped; blocks
    that cross the diagonal, and key blocks with a tail, are masked. Folded ALiBi (ALIBI 2)
    adds slope2 * (key - query - diag) to the exponent as the Triton backward does: a column
    term within the key block, the rest folded into the LSE row vector (one FADD per score)."""
    dtype: gl.constexpr = desc_q.dtype
    WARPS: gl.constexpr = BLOCK_N // 16
    s_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, BLOCK_M, 16])
    kv_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[WARPS, 1], instr_shape=[16, HEAD_DIM, 16])
    # dQ [BLOCK_M, D]: the warpgroups split its rows if there are enough, else its columns
    DQ_WM: gl.constexpr = min(WARPS, BLOCK_M // 16)
    dq_layout: gl.constexpr = gl.NVMMADistributedLayout(
        version=[3, 0], warps_per_cta=[DQ_WM, WARPS // DQ_WM],
        instr_shape=[16, HEAD_DIM // (WARPS // DQ_WM), 16])
    op_layout: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=kv_layout, k_width=2)
    ds_layout: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M], dtype)

    n0 = gl.program_id(0) * BLOCK_N
    off_bh = gl.program_id(1)
    off_b = off_bh // H
    off_h = off_bh % H
    diag = SKV - SQ
    n_qb = gl.cdiv(SQ, BLOCK_M)
    m_first = 0
    if CAUSAL:  # rows i >= n0 - diag see some key of the block
        m_first = gl.minimum(gl.maximum(n0 - diag, 0) // BLOCK_M, n_qb)
    n_iter = n_qb - m_first
    # query blocks starting before this row cross the diagonal (all of them if keys have a tail)
    full_from = 0
    if CAUSAL:
        full_from = n0 + BLOCK_N - 1 - diag
    if n0 + BLOCK_N > SKV:
        full_from = SQ

    k_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_N, HEAD_DIM], desc_k.layout)
    v_smem = gl.allocate_shared_memory(dtype, [1, 1, BLOCK_N, HEAD_DIM], desc_v.layout)
    q_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM], desc_q.layout)
    do_smem = gl.allocate_shared_memory(dtype, [STAGES, 1, 1, BLOCK_M, HEAD_DIM],
                                        desc_do.layout)
    lse_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M], desc_stats.layout)
    delta_smem = gl.allocate_shared_memory(gl.float32, [STAGES, 1, 1, BLOCK_M],
                                           desc_stats.layout)
    ds_smem = gl.allocate_shared_memory(dtype, [BLOCK_N, BLOCK_M], ds_layout)
    dq_smem = gl.allocate_shared_memory(gl.float32, [DQ_BUFS, 1, 1, BLOCK_M, HEAD_DIM],
                                        desc_dq.layout)
    kv_bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    mbarrier.init(kv_bar, count=1)
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()

    mbarrier.expect(kv_bar, desc_k.block_type.nbytes + desc_v.block_type.nbytes)
    tma.async_copy_global_to_shared(desc_k, [off_b, off_h, n0, 0], kv_bar, k_smem)
    tma.async_copy_global_to_shared(desc_v, [off_b, off_h, n0, 0], kv_bar, v_smem)
    for i in gl.static_range(STAGES):
        _issue_rows(desc_q, desc_do, desc_stats, q_smem, do_smem, lse_smem, delta_smem, bars, i,
                    n_iter, m_first, off_b, off_h, off_bh, BLOCK_M, STAGES)

    offs_m = gl.arange(0, BLOCK_M, layout=gl.SliceLayout(0, s_layout))
    offs_n = gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, s_layout))
    col = gl.zeros([BLOCK_N], gl.float32, gl.SliceLayout(1, s_layout))
    slope2 = 0.0
    if ALIBI != 0:
        slope2 = gl.load(SLOPES + off_h) * LOG2E_
        col = slope2 * offs_n.to(gl.float32)  # the bias's part within the key block
    s_zero = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, s_layout)
    dq_zero = gl.zeros([BLOCK_M, HEAD_DIM], gl.float32, dq_layout)
    dk = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    dv = gl.zeros([BLOCK_N, HEAD_DIM], gl.float32, kv_layout)
    k2 = k_smem.reshape([BLOCK_N, HEAD_DIM])
    v2 = v_smem.reshape([BLOCK_N, HEAD_DIM])
    mbarrier.wait(kv_bar, 0)
    for it in range(n_iter):
        slot = it % STAGES
        start_m = (m_first + it) * BLOCK_M
        mbarrier.wait(bars.index(slot), (it // STAGES) & 1)
        q2 = q_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        do2 = do_smem.index(slot).reshape([BLOCK_M, HEAD_DIM])
        s_tok = warpgroup_mma(k2, q2.permute([1, 0]), s_zero, use_acc=False, is_async=True)
        dp_tok = warpgroup_mma(v2, do2.permute([1, 0]), s_zero, use_acc=False, is_async=True)
        rows = start_m + offs_m
        lse = lse_smem.index(slot).reshape([BLOCK_M]).load(gl.SliceLayout(0, s_layout))
        s = warpgroup_mma_wait(1, deps=[s_tok])
        if ALIBI == 2:
            lse = lse - slope2 * (n0 - rows - diag).to(gl.float32)
            pT = gl.exp2(s * qk_scale + col[:, None] - lse[None, :])
        else:
            pT = gl.exp2(s * qk_scale - lse[None, :])
        if start_m < full_from:
            keep = (n0 + offs_n)[:, None] < SKV
            if CAUSAL:
                keep = keep & ((n0 + offs_n)[:, None] <= rows[None, :] + diag)
            pT = gl.where(keep, pT, 0.0)
        delta = delta_smem.index(slot).reshape([BLOCK_M]).load(gl.SliceLayout(0, s_layout))
        dp = warpgroup_mma_wait(0, deps=[dp_tok])
        ds = (pT * (dp - delta[None, :])).to(dtype)
        dv_tok = warpgroup_mma(gl.convert_layout(pT.to(dtype), op_layout), do2, dv,
                               is_async=True)
        dk_tok = warpgroup_mma(gl.convert_layout(ds, op_layout), q2, dk, is_async=True)
        ds_smem.store(ds)
        fence_async_shared()
        gl.thread_barrier()  # every warpgroup's keys of dS^T are in shared memory
        dq_tok = warpgroup_mma(ds_smem.permute([1, 0]), k2, dq_zero, use_acc=False,
                               is_async=True)
        dv, dk, dq = warpgroup_mma_wait(0, deps=[dv_tok, dk_tok, dq_tok])
        buf = dq_smem.index(it % DQ_BUFS)
        tma.store_wait(DQ_BUFS - 1)  # the last reduce from this buffer has read it
        gl.thread_barrier()  # ... and every warp is done reading stage `slot` and dS^T
        _issue_rows(desc_q, desc_do, desc_stats, q_smem, do_smem, lse_smem, delta_smem, bars,
                    it + STAGES, n_iter, m_first, off_b, off_h, off_bh, BLOCK_M, STAGES)
        buf.reshape([BLOCK_M, HEAD_DIM]).store(dq)
        fence_async_shared()
        gl.thread_barrier()
        _tma_reduce_add(desc_dq, [off_b, off_h, start_m, 0], buf)

    # dK, dV through the key and value buffers (no longer read) to their gradients
    k2.store((dk * scale).to(dtype))
    v2.store(dv.to(dtype))
    fence_async_shared()
    gl.thread_barrier()
    tma.async_copy_shared_to_global(desc_dk, [off_b, off_h, n0, 0], k_smem)
    tma.async_copy_shared_to_global(desc_dv, [off_b, off_h, n0, 0], v_smem)
    tma.store_wait(0)
    mbarrier.invalidate(kv_bar)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))


def _stats_desc(stats: torch.Tensor, rows: int) -> TensorDescriptor:
    """A descriptor over the fp32 contiguous (B * H, 2, SQP) ``stats`` with [1, 1, rows]
    boxes."""
    return descriptor(stats, list(stats.shape), list(stats.stride()), [1, 1, rows])


def attention_bwd_gluon(do, q, k, v, stats, dq_acc, dk, dv, causal: bool, scale: float,
                        slopes: torch.Tensor | None, block_m: int, block_n: int, stages: int,
                        dq_bufs: int) -> None:
    """dK, dV (written) and dS K (reduce-added into dq_acc) through ``attn_bwd_gluon_kernel``
    on an sm_90 device.

    do, q (B, H, Sq, D); k, v, dk, dv (B, H, Skv, D): bf16 or fp16, D 64 or 128, layouts TMA
    can read; stats fp32 contiguous (B * H, 2, Sq rounded up to whole block_m): per row the
    forward's LSE and rowsum(dO * O) (``attention.attn_bwd_delta_kernel`` with STATS);
    dq_acc fp32 contiguous (B, H, Sq, D), zero-filled. slopes: fp32 (H,), causal only (folded
    ALiBi), or None. block_m, block_n, stages, dq_bufs: the tiling
    (``attention.gluon_bwd_tiling``).
    """
    B, H, SQ, D = q.shape
    SKV = k.shape[2]
    launch(attn_bwd_gluon_kernel, (triton.cdiv(SKV, block_n), B * H), (
        _gluon_desc(q, block_m), _gluon_desc(do, block_m), _gluon_desc(k, block_n),
        _gluon_desc(v, block_n), _gluon_desc(dk, block_n), _gluon_desc(dv, block_n),
        _gluon_desc(dq_acc, block_m), _stats_desc(stats, block_m),
        slopes if slopes is not None else stats, H, SQ, SKV, scale * LOG2E, scale,
    ), dict(HEAD_DIM=D, BLOCK_M=block_m, BLOCK_N=block_n, STAGES=stages, DQ_BUFS=dq_bufs,
            CAUSAL=causal, ALIBI=0 if slopes is None else 2),
        num_warps=block_n // 16)
