import pytest
import torch

from helpers import (
    ALL_DTYPES,
    DEVICE,
    DTYPES,
    assert_close,
    f64,
    gpu,
    randn,
    requires_gpu,
    requires_grad_copy,
)
from tritonformer import ops, reference, runtime
from tritonformer.ops.linear_cross_entropy import CHUNK, _parts

REDUCTIONS = ["mean", "sum", "none"]
GiB = 1 << 30


@pytest.fixture
def small_chunks(monkeypatch):
    """Chunks of 48 rows (16-row multiples), so that the small CPU shapes run several
    chunks, with a ragged last one."""
    monkeypatch.setitem(CHUNK, "rows_multiple", 16)

    def plan(logits_row_bytes: int, d: int) -> None:
        monkeypatch.setitem(CHUNK, "logits_bytes", 48 * logits_row_bytes)

    return plan


def make_target(lead, v, ignore_index=-100, ignored=slice(1, None, 4), dtype=torch.int64):
    """Random classes in [0, v), the flattened rows ``ignored`` set to ignore_index."""
    target = torch.randint(0, v, lead, device=DEVICE)
    target.view(-1)[ignored] = ignore_index
    return target.to(dtype)


def check_linear_cross_entropy(lead, v, d, dtype, reduction="mean", label_smoothing=0.0, *,
                               ignore_index=-100, ignored=slice(1, None, 4),
                               target_dtype=torch.int64, x_view=None, w_dtype=None,
                               autocast=None):
    """Loss and gradients of x and weight against float64 and torch at the same dtype.

    x is a leaf of shape lead + (d,) (``x_view`` makes the op's input from it); the weight
    (v, d) has ``w_dtype`` (default dtype). Under ``autocast`` (a dtype), the op and torch's
    baseline run inside torch.autocast. The loss gradient is random (not ones).
    """
    x_view = x_view or (lambda t: t)
    x = randn(*lead, d, dtype=dtype, requires_grad=True)
    w = randn(v, d, dtype=w_dtype or dtype, scale=d**-0.5 * 3, requires_grad=True)
    target = make_target(x_view(x).shape[:-1], v, ignore_index, ignored, target_dtype)
    kwargs = dict(ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    enabled = autocast is not None
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=enabled):
        loss = ops.linear_cross_entropy(x_view(x), w, target, **kwargs)
    dloss = torch.rand(loss.shape, device=DEVICE) + 0.5
    loss.backward(dloss)

    x64, w64 = f64(x), f64(w)
    loss64 = reference.linear_cross_entropy(x_view(x64), w64, target.long().cpu(), **kwargs)
    loss64.backward(f64(dloss))
    xb, wb = requires_grad_copy(x), requires_grad_copy(w)
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=enabled):
        lossb = reference.linear_cross_entropy(x_view(xb), wb, target.long(), **kwargs)
    lossb.backward(dloss)

    assert loss.dtype == torch.float32
    assert x.grad.dtype == x.dtype and w.grad.dtype == w.dtype
    name = f"linear_cross_entropy {reduction}"
    # A 1-row problem has a handful of values, and PyTorch's own error on them is one sample:
    # fp32 gets at least the standard's ~1e-6 relative (the GPU's exp/log are approximate).
    floor = 1e-6 if dtype == torch.float32 else 0.0
    assert_close(loss, loss64, lossb, f"{name} loss", min_tol=floor)
    assert_close(x.grad, x64.grad, xb.grad, f"{name} dx", min_tol=floor)
    assert_close(w.grad, w64.grad, wb.grad, f"{name} dweight", min_tol=floor)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("n, v, d, label_smoothing",
                         [(1, 37, 16, 0.0), (7, 300, 48, 0.1), (130, 300, 16, 0.1)])
def test_linear_cross_entropy(n, v, d, label_smoothing, reduction, dtype, small_chunks):
    # 130 rows: several chunks (48, 48, 34 rows in fp32) whose weight gradients accumulate;
    # V = 37, and V = 300 in fp16, have logits rows that are not a multiple of 16 bytes (the
    # weight is zero-padded).
    small_chunks(v * torch.finfo(dtype).bits // 8, d)
    check_linear_cross_entropy((n,), v, d, dtype, reduction, label_smoothing)


@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_cross_entropy_strided_3d_x(reduction, small_chunks):
    # x (5, 13, 16) read through a transpose: its leading dims do not merge (one copy).
    small_chunks(300 * 4, 16)
    check_linear_cross_entropy((13, 5), 300, 16, torch.float32, reduction, 0.1,
                               x_view=lambda t: t.transpose(0, 1))


def test_linear_cross_entropy_1d_x():
    check_linear_cross_entropy((), 37, 16, torch.float32, "none", ignored=slice(0))


@pytest.mark.parametrize("ignore_index", [5, 5000])
def test_linear_cross_entropy_ignore_index(ignore_index, small_chunks):
    # 5 is also a valid class, 5000 lies outside [0, V): rows equal to it are still ignored.
    small_chunks(300 * 4, 16)
    check_linear_cross_entropy((65,), 300, 16, torch.float32, "mean", 0.1,
                               ignore_index=ignore_index, target_dtype=torch.int32)


def test_linear_cross_entropy_all_ignored():
    # The sum is 0; the mean over no rows is NaN, as in torch; every gradient is 0.
    check_linear_cross_entropy((7,), 37, 16, torch.float32, "sum", 0.1, ignored=slice(None))
    x, w = randn(7, 16, requires_grad=True), randn(37, 16, requires_grad=True)
    loss = ops.linear_cross_entropy(x, w, make_target((7,), 37, ignored=slice(None)))
    loss.backward()
    assert loss.isnan()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))


def test_linear_cross_entropy_autocast_fp32_master_weight(small_chunks):
    # fp32 x and weight under fp16 autocast: the GEMMs run in fp16, the loss is fp32 and
    # each gradient comes back fp32 (the weight's accumulated in fp32 over the chunks).
    small_chunks(300 * 2, 16)
    check_linear_cross_entropy((130,), 300, 16, torch.float32, "mean", 0.1,
                               autocast=torch.float16)


@pytest.mark.parametrize("frozen", ["x", "weight"])
def test_linear_cross_entropy_one_input_needs_grad(frozen):
    x = randn(9, 16, requires_grad=frozen != "x")
    w = randn(37, 16, requires_grad=frozen != "weight")
    target = make_target((9,), 37)
    ops.linear_cross_entropy(x, w, target, reduction="sum").backward()
    xr, wr = requires_grad_copy(x), requires_grad_copy(w)
    reference.linear_cross_entropy(xr, wr, target, reduction="sum").backward()
    for ours, ref, name in [(x, xr, "dx"), (w, wr, "dweight")]:
        if not ours.requires_grad:
            assert ours.grad is None
        else:
            torch.testing.assert_close(ours.grad, ref.grad, msg=name)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_without_grad_same_loss(reduction):
    x, w = randn(9, 16, requires_grad=True), randn(37, 16, requires_grad=True)
    target = make_target((9,), 37)
    with torch.no_grad():
        plain = ops.linear_cross_entropy(x, w, target, reduction=reduction)
    loss = ops.linear_cross_entropy(x, w, target, reduction=reduction)
    assert loss.requires_grad and not plain.requires_grad
    assert torch.equal(plain, loss.detach())


def test_linear_cross_entropy_backward_twice_raises():
    x, w = randn(9, 16, requires_grad=True), randn(37, 16, requires_grad=True)
    loss = ops.linear_cross_entropy(x, w, make_target((9,), 37))
    loss.backward(retain_graph=True)
    with pytest.raises(RuntimeError, match="backward ran twice"):
        loss.backward()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_bad_target_is_nan_without_value_checks(reduction):
    x, w = randn(9, 16, requires_grad=True), randn(37, 16, requires_grad=True)
    target = make_target((9,), 37)
    target[4] = 37
    with pytest.raises(ValueError, match=r"target values must be in \[0, 37\).*37"):
        ops.linear_cross_entropy(x, w, target, reduction=reduction)
    for bad in (37, -1, 12345):
        target[4] = bad
        with runtime.no_value_checks():
            loss = ops.linear_cross_entropy(x, w, target, reduction=reduction)
        loss.backward(torch.ones_like(loss))
        if reduction == "none":
            assert loss[4].isnan() and torch.isfinite(loss[torch.arange(9) != 4]).all()
        else:
            assert loss.isnan()
        assert x.grad[4].isnan().all() and torch.isfinite(x.grad[torch.arange(9) != 4]).all()
        assert w.grad.isnan().any()
        x.grad = w.grad = None


def test_linear_cross_entropy_bad_input():
    x, w, target = randn(7, 16), randn(37, 16), make_target((7,), 37)
    lce = ops.linear_cross_entropy
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        lce([[1.0]], w, target)
    with pytest.raises(TypeError, match="x must have dtype"):
        lce(torch.ones(7, 16, dtype=torch.int64, device=DEVICE), w, target)
    with pytest.raises(ValueError, match="x must have at least 1"):
        lce(randn(1).reshape(()), w, target[0])
    with pytest.raises(ValueError, match="x must not be empty"):
        lce(randn(0, 16), w, make_target((0,), 37))
    with pytest.raises(TypeError, match="weight must be a torch.Tensor"):
        lce(x, None, target)
    with pytest.raises(ValueError, match="weight must have 2 dimensions"):
        lce(x, randn(16), target)
    with pytest.raises(ValueError, match=r"weight must have shape \(V, 16\)"):
        lce(x, randn(37, 15), target)
    with pytest.raises(ValueError, match="weight must not be empty"):
        lce(x, randn(0, 16), target)
    with pytest.raises(TypeError, match="weight has dtype torch.float16 but x has"):
        lce(x, w.half(), target)
    with pytest.raises(ValueError, match="weight must be on"):
        lce(x, w.to("meta"), target)
    with pytest.raises(ValueError, match="target must have the shape of x"):
        lce(x, w, target[:6])
    with pytest.raises(TypeError, match="target must hold class indices"):
        lce(x, w, target.float())
    with pytest.raises(TypeError, match="target must have dtype"):
        lce(x, w, target.to(torch.int16))
    with pytest.raises(ValueError, match="target must be on"):
        lce(x, w, target.to("meta"))
    with pytest.raises(ValueError, match="reduction"):
        lce(x, w, target, reduction="avg")
    with pytest.raises(ValueError, match="label_smoothing must be in"):
        lce(x, w, target, label_smoothing=1.5)
    with pytest.raises(TypeError, match="ignore_index"):
        lce(x, w, target, ignore_index=1.5)


def test_linear_cross_entropy_chunk_plan():
    # The default plan for 16384 x 768 x 50304 in bf16: 4 chunks of 4096 rows, each chunk's
    # logits within 400 MiB.
    rows = _parts(16384, CHUNK["logits_bytes"] // (50304 * 2), CHUNK["rows_multiple"])
    assert rows == [(0, 4096), (4096, 8192), (8192, 12288), (12288, 16384)]
    assert 4096 * 50304 * 2 <= CHUNK["logits_bytes"] == 400 * 2**20


# ---------------------------------------------------------------------------------------------
# GPU tier
# ---------------------------------------------------------------------------------------------


def check_gpu(n, v, d, dtype, autocast=None, label_smoothing=0.1):
    """Full size against float64 computed on the GPU (the helpers' f64 copies to the CPU)."""
    x = randn(n, d, dtype=dtype, requires_grad=True)
    w = randn(v, d, dtype=dtype, scale=0.05, requires_grad=True)
    target = make_target((n,), v)
    enabled = autocast is not None
    ls = dict(label_smoothing=label_smoothing)
    with torch.autocast("cuda", dtype=autocast, enabled=enabled):
        loss = ops.linear_cross_entropy(x, w, target, **ls)
    dloss = torch.rand((), device=DEVICE) + 0.5
    loss.backward(dloss)
    x64 = x.detach().double().requires_grad_()
    w64 = w.detach().double().requires_grad_()
    loss64 = reference.linear_cross_entropy(x64, w64, target, **ls)
    loss64.backward(dloss.double())
    xb, wb = requires_grad_copy(x), requires_grad_copy(w)
    with torch.autocast("cuda", dtype=autocast, enabled=enabled):
        lossb = reference.linear_cross_entropy(xb, wb, target, **ls)
    lossb.backward(dloss)
    assert x.grad.dtype == dtype and w.grad.dtype == dtype
    assert_close(loss, loss64, lossb, "linear_cross_entropy loss")
    assert_close(x.grad, x64.grad, xb.grad, "linear_cross_entropy dx")
    assert_close(w.grad, w64.grad, wb.grad, "linear_cross_entropy dweight")


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_linear_cross_entropy_gpu(dtype):
    check_gpu(16384, 50304, 768, dtype)


@gpu
@requires_gpu
def test_linear_cross_entropy_gpu_autocast_fp32_weight():
    check_gpu(16384, 50304, 768, torch.float32, autocast=torch.bfloat16)


@gpu
@requires_gpu
def test_linear_cross_entropy_gpu_large_vocab():
    # Llama-3-sized head: 8 chunks of 1024 rows; GPT-2's unpadded V = 50257 (padded copy).
    check_gpu(8192, 128256, 2048, torch.bfloat16)
    check_gpu(4096, 50257, 768, torch.bfloat16)


@gpu
@requires_gpu
@pytest.mark.parametrize("case", ["bf16", "autocast-fp32-weight"])
def test_linear_cross_entropy_gpu_extra_memory(case):
    # Forward + backward hold at most 0.5 GiB beyond the inputs and their gradients.
    n, v, d = 16384, 50304, 768
    dtype = torch.bfloat16 if case == "bf16" else torch.float32
    x = randn(n, d, dtype=dtype, requires_grad=True)
    w = randn(v, d, dtype=dtype, scale=0.05, requires_grad=True)
    target = make_target((n,), v)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    with torch.autocast("cuda", dtype=torch.bfloat16, enabled=case != "bf16"):
        loss = ops.linear_cross_entropy(x, w, target)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - x.grad.nbytes - w.grad.nbytes
    assert extra <= 0.5 * GiB, f"{extra / 2**20:.1f} MiB beyond the inputs and gradients"


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_lm_head_loss_grad_gluon_gpu(dtype):
    """The Gluon loss pass (sm_90) against float64 and the Triton kernel it stands in for:
    rows of n_cols classes in padded rows of Vp (one row; a ragged last chunk; GPT-2's V),
    ignored rows, a bad target (NaN row), label smoothing, one gradient or one per row; the
    padding columns come back 0; rows of one program per SM and of two."""
    from tritonformer.kernels import cross_entropy as kc
    from tritonformer.kernels import cross_entropy_gluon as kg

    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon loss pass needs sm_90")
    cases = (((1, 64, 37), 0.0, False), ((300, 4160, 4100), 0.1, True),
             ((777, 50304, 50257), 0.0, False), ((520, 50304, 50304), 0.1, False),
             ((200, 61440, 61000), 0.0, True))  # one program per SM (a longer row)
    for (n, vp, v), eps, per_row in cases:
        logits = randn(n, vp, dtype=dtype, scale=3.0)
        logits[1::4] *= 40  # ignored rows (1, 5, ...) with logits past exp's fp32 range
        logits[:, v:] = 0
        target = make_target((n,), v)
        if n > 1:
            target[5] = v  # out of range: NaN loss and gradient row
        grad = torch.rand(n if per_row else (), device=DEVICE) + 0.5
        assert kg.eligible(logits, v)
        ours = logits.clone()
        lse, loss = kg.lm_head_loss_grad_gluon(ours, v, target, grad, -100, eps)
        base = logits.clone()
        lse_b, loss_b = kc.cross_entropy_fwd_bwd(base[:, :v], target, grad, -100, eps,
                                                  base[:, :v])
        x = logits[:, :v].double()
        t = target.clamp(0, v - 1)
        active, bad = target != -100, target == v
        lse64 = torch.logsumexp(x, 1)
        loss64 = (lse64 - (1 - eps) * x.gather(1, t[:, None])[:, 0] - eps / v * x.sum(1))
        d64 = torch.softmax(x, 1) - eps / v
        d64[torch.arange(n), t] -= 1 - eps
        d64 *= (grad if per_row else grad.expand(n)).double()[:, None]
        ok = active & ~bad
        name = f"{n}x{vp} ({v} classes) eps={eps} per_row={per_row} {dtype}"
        assert_close(lse[ok], lse64[ok], lse_b[ok], name + " lse")
        assert_close(loss[ok], loss64[ok], loss_b[ok], name + " loss")
        assert_close(ours[ok, :v], d64[ok], base[ok, :v], name + " dlogits")
        assert (loss[~active] == 0).all() and (ours[~active] == 0).all()
        assert (lse[~active] == float("-inf")).all()
        assert loss[bad].isnan().all() and ours[bad, :v].isnan().all()
        assert (ours[:, v:] == 0).all()
