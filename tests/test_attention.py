import contextlib
import math

import pytest
import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from helpers import (
    ALL_DTYPES,
    DEVICE,
    assert_close,
    f64,
    gpu,
    randn,
    rel_err,
    requires_gpu,
    requires_grad_copy,
    roundoff,
)
from tritonformer import ops, reference
from tritonformer.kernels import attention as ka
from tritonformer.runtime import DEVICE_TYPE, INTERPRET


def torch_attention(q, k, v, causal, slopes, scale):
    """PyTorch's own attention at q's dtype: SDPA with an explicit float mask (ALiBi and the
    bottom-right causal mask), or the reference at that dtype where a row sees no key (SDPA
    returns NaN there)."""
    sq, skv = q.shape[-2], k.shape[-2]
    if causal and sq > skv:
        return reference.attention(q, k, v, causal, slopes, scale)
    bias = torch.zeros(q.shape[1], sq, skv, dtype=torch.float32, device=q.device)
    if slopes is not None:
        bias = bias + reference.alibi_bias(slopes, sq, skv)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
        j = torch.arange(skv, device=q.device)[None, :]
        bias = bias.masked_fill(j > i, float("-inf"))
    return F.scaled_dot_product_attention(q, k, v, attn_mask=bias.to(q.dtype), scale=scale)


def make_qkv(b, h, sq, skv, d, dtype, layout="bhsd"):
    """Fresh leaf q, k, v; layout "bshd" gives (B, H, S, D) views of (B, S, H, D) tensors."""
    def one(s):
        if layout == "bshd":
            return randn(b, s, h, d, dtype=dtype, requires_grad=True)
        return randn(b, h, s, d, dtype=dtype, requires_grad=True)

    return one(sq), one(skv), one(skv)


def check_attention(b, h, sq, skv, d, dtype, causal, alibi, scale=None, layout="bhsd"):
    leaves = make_qkv(b, h, sq, skv, d, dtype, layout)
    view = (lambda t: t.transpose(1, 2)) if layout == "bshd" else (lambda t: t)
    q, k, v = (view(t) for t in leaves)
    slopes = ops.alibi_slopes(h) if alibi else None
    out = ops.attention(q, k, v, causal=causal, alibi_slopes=slopes, scale=scale)
    dout = randn(*out.shape, dtype=dtype)
    out.backward(dout)

    leaves64 = [f64(t) for t in leaves]
    s64 = slopes.double().cpu() if alibi else None
    out64 = reference.attention(*(view(t) for t in leaves64), causal, s64, scale)
    out64.backward(f64(dout))

    leaves_t = [requires_grad_copy(t) for t in leaves]
    out_t = torch_attention(*(view(t) for t in leaves_t), causal, slopes, scale)
    out_t.backward(dout)

    case = f"B{b} H{h} Sq{sq} Skv{skv} D{d} {dtype} causal={causal} alibi={alibi}"
    assert out.dtype == dtype and out.shape == q.shape, case
    assert_close(out, out64, out_t, f"{case} out")
    for name, t, t64, tt in zip("qkv", leaves, leaves64, leaves_t, strict=True):
        assert t.grad.dtype == dtype
        assert_close(t.grad, t64.grad, tt.grad, f"{case} d{name}")


# Pruned combinations (not the full product): every S in {1, 17, 100, 257} and D in
# {16, 64, 80}, causal and full, with and without ALiBi, Sq < Skv (KV-cache shapes) and
# Sq > Skv, fp32 and fp16; tails on both sides of every block.
CASES = [
    # b, h, sq, skv, d, dtype, causal, alibi
    (1, 2, 17, 17, 16, torch.float32, True, False),
    (2, 2, 100, 100, 64, torch.float32, True, True),
    (1, 2, 100, 100, 80, torch.float32, False, True),
    (1, 1, 257, 257, 64, torch.float32, True, False),
    (1, 2, 1, 100, 64, torch.float32, True, True),
    (1, 2, 17, 257, 80, torch.float32, True, True),
    (1, 2, 17, 257, 16, torch.float32, False, False),
    (1, 2, 257, 100, 16, torch.float32, False, True),
    (1, 2, 100, 17, 64, torch.float32, True, False),
    (1, 2, 1, 17, 64, torch.float32, False, True),
    (2, 2, 100, 100, 64, torch.float16, True, False),
    (1, 2, 257, 257, 80, torch.float16, True, True),
    (1, 2, 1, 257, 16, torch.float16, True, False),
    (1, 2, 17, 100, 64, torch.float16, False, True),
    (1, 2, 257, 17, 80, torch.float16, False, False),
]


@pytest.mark.parametrize("b,h,sq,skv,d,dtype,causal,alibi", CASES)
def test_attention(b, h, sq, skv, d, dtype, causal, alibi):
    check_attention(b, h, sq, skv, d, dtype, causal, alibi)


def test_attention_scale():
    check_attention(1, 2, 65, 65, 32, torch.float32, True, True, scale=0.3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_attention_non_contiguous(dtype):
    """(B, H, S, D) views of (B, S, H, D) tensors are read in place through their strides."""
    check_attention(2, 3, 100, 100, 64, dtype, True, True, layout="bshd")


def test_attention_copied_layout():
    """A last dim that is not unit-stride (here D-major) is copied, with the same result."""
    q, k, v = (randn(1, 2, 64, s, dtype=torch.float32).transpose(-1, -2) for s in (33, 40, 40))
    assert q.stride(-1) != 1
    out = ops.attention(q, k, v, causal=True)
    ref = ops.attention(q.contiguous(), k.contiguous(), v.contiguous(), causal=True)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)


@pytest.mark.parametrize("alibi", [False, True])
def test_attention_kv_cache_decode(alibi):
    """Decoding one query at a time against the growing KV cache reproduces the rows of the
    full causal attention."""
    b, h, s, d = 1, 2, 37, 32
    q, k, v = (randn(b, h, s, d) for _ in range(3))
    slopes = ops.alibi_slopes(h) if alibi else None
    full = ops.attention(q, k, v, causal=True, alibi_slopes=slopes)
    for t in (0, 1, 16, 36):
        step = ops.attention(q[:, :, t : t + 1], k[:, :, : t + 1], v[:, :, : t + 1], causal=True,
                             alibi_slopes=slopes)
        torch.testing.assert_close(step, full[:, :, t : t + 1], rtol=1e-5, atol=1e-6)


def test_attention_autocast():
    """Under autocast fp32 inputs run in the autocast dtype (like SDPA); grads come back fp32."""
    dtype = torch.float16
    q, k, v = make_qkv(1, 2, 33, 33, 32, torch.float32)
    with torch.autocast(DEVICE_TYPE, dtype=dtype):
        out = ops.attention(q, k, v)
    assert out.dtype == dtype
    expected = ops.attention(q.detach().to(dtype), k.detach().to(dtype), v.detach().to(dtype))
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    out.float().sum().backward()
    assert q.grad.dtype == k.grad.dtype == v.grad.dtype == torch.float32


def _reference_slopes(n):
    """The ALiBi reference implementation (Press et al., get_slopes)."""
    def power_of_2(n):
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + _reference_slopes(2 * closest)[0::2][: n - closest]


@pytest.mark.parametrize("n", [1, 2, 8, 12, 16, 20, 40])
def test_alibi_slopes(n):
    s = ops.alibi_slopes(n)
    assert s.dtype == torch.float32 and s.shape == (n,) and s.device.type == DEVICE.type
    torch.testing.assert_close(s.cpu(), torch.tensor(_reference_slopes(n)), rtol=1e-6, atol=0)


def test_attention_bad_input():
    q, k, v = (randn(1, 2, 8, 16) for _ in range(3))
    with pytest.raises(ValueError, match="q must have 4 dimensions"):
        ops.attention(q[0], k, v)
    with pytest.raises(TypeError, match="k must be a torch.Tensor"):
        ops.attention(q, k.tolist(), v)
    with pytest.raises(ValueError, match="batch and heads"):
        ops.attention(q, randn(2, 2, 8, 16), randn(2, 2, 8, 16))
    with pytest.raises(ValueError, match="batch and heads"):
        ops.attention(q, randn(1, 3, 8, 16), randn(1, 3, 8, 16))
    with pytest.raises(ValueError, match="k and v must have the same shape"):
        ops.attention(q, k, randn(1, 2, 9, 16))
    with pytest.raises(ValueError, match="same head dim"):
        ops.attention(q, randn(1, 2, 8, 32), randn(1, 2, 8, 32))
    for d in (12, 264):
        with pytest.raises(ValueError, match="head dim"):
            ops.attention(randn(1, 2, 8, d), randn(1, 2, 8, d), randn(1, 2, 8, d))
    with pytest.raises(TypeError, match="k has dtype"):
        ops.attention(q, k.half(), v)
    with pytest.raises(TypeError, match="q must have dtype"):
        ops.attention(q.double(), k.double(), v.double())
    with pytest.raises(TypeError, match="causal must be a bool"):
        ops.attention(q, k, v, causal=1)
    with pytest.raises(ValueError, match="scale"):
        ops.attention(q, k, v, scale=-1.0)
    with pytest.raises(TypeError, match="scale"):
        ops.attention(q, k, v, scale="0.1")
    with pytest.raises(ValueError, match="alibi_slopes must have shape"):
        ops.attention(q, k, v, alibi_slopes=ops.alibi_slopes(3))
    with pytest.raises(ValueError, match="alibi_slopes must have 1 dimensions"):
        ops.attention(q, k, v, alibi_slopes=ops.alibi_slopes(2)[None])
    with pytest.raises(TypeError, match="alibi_slopes must have dtype"):
        ops.attention(q, k, v, alibi_slopes=ops.alibi_slopes(2).double())
    with pytest.raises(ValueError, match="alibi_slopes must be on"):
        ops.attention(q, k, v, alibi_slopes=torch.ones(2, device="meta"))
    with pytest.raises(ValueError, match="n_heads"):
        ops.alibi_slopes(0)
    with pytest.raises(TypeError, match="n_heads"):
        ops.alibi_slopes(2.0)


# GPU tier: real sizes, bf16/fp16 (and fp32 at a moderate size), causal and ALiBi.
GPU_CASES = [
    # b, h, sq, skv, d, dtype, causal, alibi
    (1, 2, 8192, 8192, 128, torch.bfloat16, True, False),
    (1, 2, 8192, 8192, 64, torch.bfloat16, True, True),
    (2, 4, 2048, 2048, 128, torch.bfloat16, False, True),
    (2, 3, 1000, 1000, 80, torch.bfloat16, True, True),
    (1, 2, 1024, 1024, 256, torch.bfloat16, True, False),
    (1, 2, 8192, 8192, 128, torch.float16, True, True),
    (2, 4, 2048, 2048, 64, torch.float16, False, False),
    (1, 2, 1000, 1000, 256, torch.float16, False, True),
    (2, 3, 777, 1500, 80, torch.float16, True, False),
    (1, 2, 1024, 1024, 64, torch.float32, True, True),
    (1, 2, 777, 1500, 128, torch.float32, False, False),
    (1, 4, 1, 5000, 128, torch.bfloat16, True, True),
    (1, 4, 17, 3001, 64, torch.bfloat16, True, False),
    # folded ALiBi at BLOCK_D 64, more lengths
    (2, 3, 1000, 1000, 64, torch.float16, True, True),
    (1, 4, 300, 1024, 48, torch.bfloat16, True, True),
    (1, 3, 1500, 1500, 64, torch.bfloat16, True, True),
]


@gpu
@requires_gpu
@pytest.mark.parametrize("b,h,sq,skv,d,dtype,causal,alibi", GPU_CASES)
def test_attention_gpu(b, h, sq, skv, d, dtype, causal, alibi):
    check_attention(b, h, sq, skv, d, dtype, causal, alibi)


@gpu
@requires_gpu
def test_attention_gpu_non_contiguous():
    check_attention(2, 8, 2048, 2048, 128, torch.bfloat16, True, True, layout="bshd")


# The Gluon kernels against the Triton ones: tails, Sq < Skv and Sq > Skv, Sq = 1, full and
# causal, folded ALiBi (steep slopes at H = 3), keys past 2048 (where GLUON_FWD switches
# tiling), enough tiles at D128 that the persistent forward's programs take several each.
GLUON_CASES = [
    # b, h, sq, skv, causal, alibi
    (2, 3, 100, 100, True, True), (1, 2, 333, 333, False, False), (2, 2, 65, 1000, True, True),
    (1, 4, 1, 500, True, False), (2, 2, 200, 130, True, False), (1, 2, 1, 1, True, True),
    (1, 3, 300, 2500, True, True), (1, 2, 2100, 2100, True, False),
    (2, 2, 1100, 1100, False, False), (1, 2, 1, 1500, True, False), (4, 16, 600, 600, True, True),
    (3, 16, 700, 650, True, False), (3, 16, 700, 650, True, True),
]


def gluon_case(b, h, sq, skv, d, dtype, alibi):
    """q (B, H, Sq, D), k, v (B, H, Skv, D) on the GPU and the ALiBi slopes (None without):
    the standard ones, or with H = 3 steep ones (the bias dwarfs the scores)."""
    q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype)
    k, v = (torch.randn(b, h, skv, d, device="cuda", dtype=dtype) for _ in range(2))
    slopes = ops.alibi_slopes(h) if alibi else None
    if alibi and h == 3:
        slopes = torch.tensor([4.0, 1.0, 2.0**-10], device="cuda")
    return q, k, v, slopes


@gpu
@requires_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_fwd_gluon_vs_triton_gpu(d, dtype, monkeypatch):
    """On sm_90 the 16-bit forward at D 64/128 is the Gluon kernel (checked against float64
    by test_attention_gpu): the Triton kernel it replaces there, still the forward of other
    GPUs, gives the same output and LSE on GLUON_CASES."""
    from tritonformer.kernels import attention as ka

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90 only")
    for b, h, sq, skv, causal, alibi in GLUON_CASES:
        q, k, v, slopes = gluon_case(b, h, sq, skv, d, dtype, alibi)
        got, got_lse = ka.attention_fwd(q, k, v, slopes, causal, d**-0.5, False)
        monkeypatch.setattr(ka, "GLUON_FWD", None)
        want, want_lse = ka.attention_fwd(q, k, v, slopes, causal, d**-0.5, False)
        monkeypatch.undo()
        case = f"B{b} H{h} Sq{sq} Skv{skv} causal={causal} alibi={alibi}"
        assert not got.isnan().any(), case
        torch.testing.assert_close(got, want, atol=2e-2 if dtype == torch.bfloat16 else 2e-3,
                                   rtol=0, msg=case)
        torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-5, msg=case)


@gpu
@requires_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_bwd_gluon_vs_triton_gpu(d, dtype, monkeypatch):
    """On sm_90 the 16-bit backward at D 64/128 is the Gluon kernel, exact ALiBi excepted
    (checked against float64 by test_attention_gpu and test_attention_packed_gpu): the
    Triton kernels it replaces there give the same gradients on GLUON_CASES, at several
    tilings of GLUON_BWD's kind."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon backward runs on sm_90 only")
    tilings = [ka.GLUON_BWD[d], (64, 64, 1, 1), (64, 128, 2, 2)]
    for b, h, sq, skv, causal, alibi in GLUON_CASES:
        q, k, v, slopes = gluon_case(b, h, sq, skv, d, dtype, alibi)
        do = torch.randn_like(q)
        scale = d**-0.5
        out, lse = ka.attention_fwd(q, k, v, slopes, causal, scale, False)
        monkeypatch.setattr(ka, "GLUON_BWD", None)
        want = ka.attention_bwd(do, q, k, v, out, lse, slopes, causal, scale, False)
        for tiling in tilings:
            monkeypatch.setattr(ka, "GLUON_BWD", {d: tiling})
            got = ka.attention_bwd(do, q, k, v, out, lse, slopes, causal, scale, False)
            case = f"B{b} H{h} Sq{sq} Skv{skv} causal={causal} alibi={alibi} tiling={tiling}"
            for name, g, w in zip("qkv", got, want, strict=True):
                assert not g.isnan().any(), f"{case} d{name}"
                assert rel_err(g, w) <= roundoff(dtype), f"{case} d{name}: {rel_err(g, w):.2e}"
        monkeypatch.undo()


def test_launch_key_tells_descriptors_apart():
    """runtime.launch keeps one compiled kernel per specialisation; the Gluon forward's
    arguments are TMA descriptors, which Triton compiles per element type and box."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from tritonformer.runtime import _specialization

    def desc(dtype, rows):
        t = torch.randn(2, 3, 100, 64).to(dtype)
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [1, 1, rows, 64])

    assert _specialization(desc(torch.bfloat16, 64)) == _specialization(desc(torch.bfloat16, 64))
    assert _specialization(desc(torch.bfloat16, 64)) != _specialization(desc(torch.float16, 64))
    assert _specialization(desc(torch.bfloat16, 64)) != _specialization(desc(torch.bfloat16, 128))


@gpu
@requires_gpu
def test_attention_fwd_gluon_launch_cache_gpu():
    """The Gluon forward launches its compiled kernel directly after the first call: fp16 and
    bf16 calls of one shape, interleaved, each get their own binary (against the Triton
    forward)."""
    from tritonformer.kernels import attention as ka

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90 only")
    for d in (64, 128):
        for dtype in (torch.bfloat16, torch.float16, torch.bfloat16):
            q, k, v = (torch.randn(2, 4, 300, d, device="cuda", dtype=dtype) for _ in range(3))
            got, got_lse = ka.attention_fwd(q, k, v, None, True, d**-0.5, False)
            saved, ka.GLUON_FWD = ka.GLUON_FWD, None
            try:
                want, want_lse = ka.attention_fwd(q, k, v, None, True, d**-0.5, False)
            finally:
                ka.GLUON_FWD = saved
            torch.testing.assert_close(got, want, atol=2e-2 if dtype == torch.bfloat16 else 2e-3,
                                       rtol=0, msg=f"D{d} {dtype}")
            torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-5)


def test_deterministic_dq():
    """dQ by fp32 reduce-adds (order varies) unless torch.use_deterministic_algorithms asks
    for a fixed order, then by its own kernel."""
    from tritonformer.kernels.attention import config_for

    assert config_for(64, torch.float16, True)[1].dq_atomic
    torch.use_deterministic_algorithms(True)
    try:
        assert not config_for(64, torch.float16, True)[1].dq_atomic
    finally:
        torch.use_deterministic_algorithms(False)


@gpu
@requires_gpu
def test_attention_deterministic_gpu():
    """Under torch.use_deterministic_algorithms the gradients are bitwise repeatable."""
    q, k, v = (torch.randn(2, 8, 1024, 64, device="cuda", dtype=torch.bfloat16,
                           requires_grad=True) for _ in range(3))  # fmt: skip
    do = torch.randn_like(q)
    torch.use_deterministic_algorithms(True)
    try:
        grads = [torch.autograd.grad(ops.attention(q, k, v), (q, k, v), do)
                 for _ in range(2)]  # fmt: skip
    finally:
        torch.use_deterministic_algorithms(False)
    for a, b in zip(*grads, strict=True):
        assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# attention_packed: q, k, v packed in a qkv projection's (B, S, 3, H, D) output
# ---------------------------------------------------------------------------------------------


def unpack(qkv):
    """The (B, H, S, D) q, k, v views of qkv (B, S, 3, H, D)."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


def dq_exact(d, dtype, causal, slopes):
    """Whether dQ comes out bitwise the same from two runs: not when a kernel sums it by TMA
    reduce-adds (compiled: the Triton dK/dV kernel with ``dq_atomic``, or the Gluon backward),
    whose order varies."""
    gluon = ka.gluon_bwd_tiling(d, ka._alibi_mode(slopes, causal, dtype), dtype,
                                torch.device(DEVICE)) is not None
    return INTERPRET or not (ka.config_for(d, dtype, causal)[1].dq_atomic or gluon)


@contextlib.contextmanager
def deterministic_algorithms(on: bool):
    """torch.use_deterministic_algorithms(on) inside, off after (wrap only our ops in it:
    PyTorch's own SDPA may refuse to run backward on CUDA under it)."""
    torch.use_deterministic_algorithms(on)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(False)


def check_attention_packed(b, s, h, d, dtype, causal, alibi, deterministic=False):
    """attention_packed against the float64 reference (output and each of dq, dk, dv in the
    packed gradient), and against attention on qkv's unbound views: the same kernels on the
    same data, so bitwise equal, but for a dQ summed in a varying order (to its roundoff).
    ``deterministic``: both run under torch.use_deterministic_algorithms."""
    qkv = randn(b, s, 3, h, d, dtype=dtype, requires_grad=True)
    qkv_u = requires_grad_copy(qkv)
    slopes = ops.alibi_slopes(h) if alibi else None
    dout = randn(b, s, h, d, dtype=dtype)
    with deterministic_algorithms(deterministic):
        out = ops.attention_packed(qkv, causal=causal, alibi_slopes=slopes)
        out.backward(dout)
        out_u = ops.attention(*unpack(qkv_u), causal=causal, alibi_slopes=slopes).transpose(1, 2)
        out_u.backward(dout)
        exact = dq_exact(d, dtype, causal, slopes)

    qkv64 = f64(qkv)
    out64 = reference.attention_packed(qkv64, causal, slopes.double().cpu() if alibi else None)
    out64.backward(f64(dout))

    qkv_t = requires_grad_copy(qkv)
    out_t = torch_attention(*unpack(qkv_t), causal, slopes, None).transpose(1, 2)
    out_t.backward(dout)

    case = f"B{b} S{s} H{h} D{d} {dtype} causal={causal} alibi={alibi}"
    assert out.shape == (b, s, h, d) and out.dtype == dtype and out.is_contiguous(), case
    assert qkv.grad.shape == qkv.shape and qkv.grad.dtype == dtype, case
    assert_close(out, out64, out_t, f"{case} out")
    # S = 1: one key per query, so dq = dk = 0 exactly; ours are rounding noise (do.v - do.o
    # with o = v), measured absolutely (the reference's norm is 0) against 64 roundoffs.
    for i, name in enumerate("qkv"):
        min_tol = 64 * roundoff(dtype) if s == 1 and name != "v" else 0.0
        assert_close(qkv.grad[:, :, i], qkv64.grad[:, :, i], qkv_t.grad[:, :, i],
                     f"{case} d{name}", min_tol=min_tol)
    assert torch.equal(out, out_u), f"{case}: packed and unpacked outputs differ"
    for i, name in enumerate("qkv"):
        g, g_u = qkv.grad[:, :, i], qkv_u.grad[:, :, i]
        if name != "q" or exact:
            assert torch.equal(g, g_u), f"{case}: packed and unpacked d{name} differ"
        else:
            assert rel_err(g, g_u) <= roundoff(dtype), f"{case}: packed vs unpacked dq"


# fp16 at D <= 64 sums dQ by reduce-adds (then the conversion kernel writes it into the packed
# gradient); fp32 and D 80 run the dQ kernel (a descriptor store); see ka.CONFIGS.
PACKED_CASES = [
    # b, s, h, d, dtype, causal, alibi
    (1, 1, 2, 16, torch.float32, True, False),
    (2, 37, 3, 16, torch.float32, True, True),
    (1, 37, 2, 80, torch.float32, False, True),
    (2, 37, 3, 64, torch.float16, True, True),
    (1, 1, 2, 48, torch.float16, True, True),
    (1, 37, 2, 16, torch.float16, False, True),
    (1, 65, 2, 80, torch.float16, True, False),
]


@pytest.mark.parametrize("b,s,h,d,dtype,causal,alibi", PACKED_CASES)
def test_attention_packed(b, s, h, d, dtype, causal, alibi):
    check_attention_packed(b, s, h, d, dtype, causal, alibi)


def test_attention_packed_deterministic():
    """Under torch.use_deterministic_algorithms the 16-bit dQ at D 64 comes from the dQ kernel
    instead of the reduce-adds."""
    check_attention_packed(2, 37, 3, 64, torch.float16, True, True, deterministic=True)


class _AtenOps(TorchDispatchMode):
    """Records the names of the aten ops that run under it."""

    def __init__(self) -> None:
        super().__init__()
        self.names: set[str] = set()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.add(str(func.overloadpacket))
        return func(*args, **(kwargs or {}))


def test_attention_packed_gradient_is_one_tensor():
    """The gradient of a qkv projection's output comes back as one contiguous (B, S, 3, H, D)
    tensor written by the kernels, with no stacking copy in the backward (attention on the
    unbound views pays one: the check can see it)."""
    b, s, h, d = 2, 37, 2, 16
    x = randn(b, s, 3 * h * d, requires_grad=True)
    seen = []
    for fn in (ops.attention_packed, lambda t: ops.attention(*unpack(t)).transpose(1, 2)):
        qkv = x.view(b, s, 3, h, d)
        qkv.register_hook(lambda g: seen.append(g))
        out = fn(qkv)
        with _AtenOps() as recorded:
            out.backward(randn(*out.shape))
        seen.append(recorded.names)
    (grad, packed_ops), (_, unpacked_ops) = seen[:2], seen[2:]
    assert grad.shape == (b, s, 3, h, d) and grad.is_contiguous()
    assert not packed_ops & {"aten.stack", "aten.cat"}, sorted(packed_ops)
    assert "aten.stack" in unpacked_ops, sorted(unpacked_ops)


def test_attention_packed_layouts():
    """qkv with padded rows (a slice of a wider projection) is read in place, a D-major one
    is copied first: the same output and gradient as from a contiguous qkv."""
    b, s, h, d = 1, 37, 2, 16
    base = randn(b, s, 3, h, d)
    dout = randn(b, s, h, d)
    wide = torch.cat([base.view(b, s, -1), randn(b, s, 8)], -1).requires_grad_()
    d_major = base.transpose(-1, -2).contiguous().requires_grad_()
    leaves = [base.clone().requires_grad_(), wide, d_major]
    views = [leaves[0], wide[..., : 3 * h * d].view(b, s, 3, h, d), d_major.transpose(-1, -2)]
    assert views[1].stride(1) == 3 * h * d + 8 and views[2].stride(-1) != 1
    outs = []
    for qkv in views:
        outs.append(ops.attention_packed(qkv, alibi_slopes=ops.alibi_slopes(h)))
        outs[-1].backward(dout)
    for out in outs[1:]:
        assert torch.equal(out, outs[0])
    want = leaves[0].grad
    assert torch.equal(wide.grad[..., : 3 * h * d].view(want.shape), want)
    assert torch.equal(wide.grad[..., 3 * h * d :], torch.zeros(b, s, 8, device=DEVICE))
    assert torch.equal(d_major.grad.transpose(-1, -2), want)


def test_attention_packed_autocast():
    """Under autocast an fp32 qkv runs in the autocast dtype; its gradient comes back fp32."""
    qkv = randn(1, 33, 3, 2, 32, requires_grad=True)
    with torch.autocast(DEVICE_TYPE, dtype=torch.float16):
        out = ops.attention_packed(qkv)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, ops.attention_packed(qkv.detach().half()), rtol=0, atol=0)
    out.float().sum().backward()
    assert qkv.grad.dtype == torch.float32 and qkv.grad.shape == qkv.shape


def test_attention_packed_bad_input():
    qkv = randn(1, 8, 3, 2, 16)
    with pytest.raises(TypeError, match="qkv must be a torch.Tensor"):
        ops.attention_packed(qkv.tolist())
    with pytest.raises(ValueError, match="qkv must have 5 dimensions"):
        ops.attention_packed(qkv.view(1, 8, 96))
    for shape in ((1, 8, 2, 2, 16), (1, 8, 6, 1, 16), (1, 3, 8, 2, 16)):
        with pytest.raises(ValueError, match=r"qkv must have shape \(B, S, 3, H, D\)"):
            ops.attention_packed(randn(*shape))
    for d in (12, 264):
        with pytest.raises(ValueError, match=r"head dim \(qkv.shape\[-1\]\)"):
            ops.attention_packed(randn(1, 8, 3, 2, d))
    with pytest.raises(TypeError, match="qkv must have dtype"):
        ops.attention_packed(qkv.double())
    with pytest.raises(TypeError, match="causal must be a bool"):
        ops.attention_packed(qkv, causal=1)
    with pytest.raises(ValueError, match="scale"):
        ops.attention_packed(qkv, scale=0.0)
    with pytest.raises(ValueError, match=r"alibi_slopes must have shape \(H,\) = \(2,\)"):
        ops.attention_packed(qkv, alibi_slopes=ops.alibi_slopes(3))
    with pytest.raises(TypeError, match="alibi_slopes must have dtype"):
        ops.attention_packed(qkv, alibi_slopes=ops.alibi_slopes(2).half())


def check_bwd_into_views(b, h, s, d, dtype, deterministic, alibi=True) -> bool:
    """attention_bwd writing into the caller's (dq, dk, dv): (B, H, S, D) views of rows padded
    past D, heads interleaved. They get the gradients it allocates itself, and nothing else
    of their buffer is written. Returns whether dQ took the reduce-adds path."""
    q, k, v, do = (randn(b, h, s, d, dtype=dtype) for _ in range(4))
    slopes, scale = ops.alibi_slopes(h) if alibi else None, d**-0.5
    buf = torch.full((3, b, s, h, d + 8), 7.0, dtype=dtype, device=DEVICE)
    grads = tuple(t[..., :d].transpose(1, 2) for t in buf)
    with deterministic_algorithms(deterministic):
        atomic = ka.config_for(d, dtype, True)[1].dq_atomic or ka.gluon_bwd_tiling(
            d, ka._alibi_mode(slopes, True, dtype), dtype, q.device) is not None
        out, lse = ka.attention_fwd(q, k, v, slopes, True, scale, False)
        want = ka.attention_bwd(do, q, k, v, out, lse, slopes, True, scale, False)
        got = ka.attention_bwd(do, q, k, v, out, lse, slopes, True, scale, False, grads=grads)
    assert all(g is t for g, t in zip(got, grads, strict=True))
    assert torch.all(buf[..., d:] == 7.0), "wrote past D"
    for name, g, w in zip("qkv", got, want, strict=True):
        if name != "q" or not atomic or INTERPRET:
            assert torch.equal(g, w), f"d{name}"
        else:
            assert rel_err(g, w) <= roundoff(dtype), f"d{name}: {rel_err(g, w):.2e}"
    return atomic


@pytest.mark.parametrize("deterministic", [False, True])
def test_attention_bwd_into_strided_views(deterministic):
    """Both dQ paths: reduce-adds then the conversion kernel (fp16, D <= 64), and the dQ
    kernel (under torch.use_deterministic_algorithms)."""
    assert check_bwd_into_views(2, 3, 37, 48, torch.float16, deterministic) != deterministic


# GPU tier: GPT-2's attention (H 12, S 1024) at D 64 (16-bit dQ by reduce-adds) and D 128
# (the dQ kernel), every dtype; odd lengths and the full mask.
PACKED_GPU_CASES = [
    (2, 1024, 12, d, dtype, True, alibi)
    for d in (64, 128) for dtype in ALL_DTYPES for alibi in (False, True)
] + [
    (2, 1000, 5, 64, torch.bfloat16, False, True),
    (1, 777, 4, 128, torch.float16, False, False),
]  # fmt: skip


@gpu
@requires_gpu
@pytest.mark.parametrize("b,s,h,d,dtype,causal,alibi", PACKED_GPU_CASES)
def test_attention_packed_gpu(b, s, h, d, dtype, causal, alibi):
    check_attention_packed(b, s, h, d, dtype, causal, alibi)


@gpu
@requires_gpu
@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("alibi", [False, True])
def test_attention_bwd_into_strided_views_gpu(d, deterministic, alibi):
    check_bwd_into_views(2, 12, 1024, d, torch.bfloat16, deterministic, alibi)
