import math

import pytest
import torch
import torch.nn.functional as F

from helpers import (
    DEVICE,
    assert_close,
    f64,
    gpu,
    randn,
    requires_gpu,
    requires_grad_copy,
)
from tritonformer import ops, reference
from tritonformer.runtime import DEVICE_TYPE


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


@gpu
@requires_gpu
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_fwd_gluon_vs_triton_gpu(d, dtype, monkeypatch):
    """On sm_90 the 16-bit forward at D 64/128 is the Gluon kernel (checked against float64
    by test_attention_gpu): the Triton kernel it replaces there, still the forward of other
    GPUs, gives the same output and LSE (tails, Sq < Skv, Sq = 1, full and causal, folded
    ALiBi with the standard slopes and with steep ones, keys past 2048 where GLUON_FWD
    switches tiling, enough tiles at D128 that the persistent kernel's programs take several
    each)."""
    from tritonformer.kernels import attention as ka

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon forward runs on sm_90 only")
    for b, h, sq, skv, causal, alibi in [(2, 3, 100, 100, True, True), (1, 2, 333, 333, False,
                                         False), (2, 2, 65, 1000, True, True),
                                         (1, 4, 1, 500, True, False),
                                         (2, 2, 200, 130, True, False),
                                         (1, 3, 300, 2500, True, True),
                                         (1, 2, 2100, 2100, True, False),
                                         (2, 2, 1100, 1100, False, False),
                                         (1, 2, 1, 1500, True, False),
                                         (4, 16, 600, 600, True, True),
                                         (3, 16, 700, 650, True, False)]:  # fmt: skip
        q = torch.randn(b, h, sq, d, device="cuda", dtype=dtype)
        k, v = (torch.randn(b, h, skv, d, device="cuda", dtype=dtype) for _ in range(2))
        slopes = ops.alibi_slopes(h) if alibi else None
        if alibi and h == 3:  # steep: the bias dwarfs the scores
            slopes = torch.tensor([4.0, 1.0, 2.0**-10], device="cuda")
        got, got_lse = ka.attention_fwd(q, k, v, slopes, causal, d**-0.5, False)
        monkeypatch.setattr(ka, "GLUON_FWD", None)
        want, want_lse = ka.attention_fwd(q, k, v, slopes, causal, d**-0.5, False)
        monkeypatch.undo()
        case = f"B{b} H{h} Sq{sq} Skv{skv} causal={causal} alibi={alibi}"
        assert not got.isnan().any(), case
        torch.testing.assert_close(got, want, atol=2e-2 if dtype == torch.bfloat16 else 2e-3,
                                   rtol=0, msg=case)
        torch.testing.assert_close(got_lse, want_lse, atol=1e-4, rtol=1e-5, msg=case)


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
