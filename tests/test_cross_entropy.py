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
from tritonformer import nn, ops, reference, runtime
from tritonformer.kernels.cross_entropy import CONFIG

REDUCTIONS = ["mean", "sum", "none"]
# More than one vocabulary block: the kernels' loop runs (3000 under the interpreter).
MULTI_BLOCK_V = CONFIG["block_v"] + 952
# Whole vocabulary blocks only: no tail block (the kernels mask columns only in a tail).
WHOLE_BLOCKS_V = 2 * CONFIG["block_v"]


def make_target(lead, v, ignore_index=-100, ignored=slice(1, None, 4), dtype=torch.int64):
    """Random classes in [0, v) with the rows ``ignored`` (of the flattened target) set to
    ignore_index."""
    target = torch.randint(0, v, lead, device=DEVICE)
    target.view(-1)[ignored] = ignore_index
    return target.to(dtype)


def check_cross_entropy(lead, v, dtype, reduction="mean", label_smoothing=0.0, *,
                        ignore_index=-100, ignored=slice(1, None, 4), target_dtype=torch.int64,
                        view=None):
    """Loss and dlogits of ops.cross_entropy against float64 and torch at logits' dtype.

    The leaf holds logits of shape lead + (v,); ``view`` makes the op's input from it (e.g.
    non-contiguous rows, fewer classes). The loss gradient is random (not ones).
    """
    view = view or (lambda t: t)
    leaf = randn(*lead, v, dtype=dtype, scale=2.0, requires_grad=True)
    *lead_in, v_in = view(leaf).shape
    target = make_target(lead_in, v_in, ignore_index, ignored, target_dtype)
    kwargs = dict(ignore_index=ignore_index, reduction=reduction,
                  label_smoothing=label_smoothing)
    loss = ops.cross_entropy(view(leaf), target, **kwargs)
    dloss = torch.rand(loss.shape, device=DEVICE) + 0.5
    loss.backward(dloss)

    leaf64 = f64(leaf)
    loss64 = reference.cross_entropy(view(leaf64), target.long().cpu(), **kwargs)
    loss64.backward(f64(dloss))

    leafb = requires_grad_copy(leaf)
    lossb = reference.cross_entropy(view(leafb), target.long(), **kwargs)
    lossb.backward(dloss)

    assert loss.dtype == torch.float32 and leaf.grad.dtype == dtype
    assert_close(loss, loss64, lossb, f"cross_entropy {reduction} loss")
    assert_close(leaf.grad, leaf64.grad, leafb.grad, f"cross_entropy {reduction} dlogits")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("v", [5, 1000, MULTI_BLOCK_V, WHOLE_BLOCKS_V])
@pytest.mark.parametrize("n", [1, 7, 65])
def test_cross_entropy(n, v, reduction, label_smoothing, dtype):
    check_cross_entropy((n,), v, dtype, reduction, label_smoothing)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_3d_logits(reduction, label_smoothing):
    check_cross_entropy((3, 11), MULTI_BLOCK_V, torch.float32, reduction, label_smoothing)


@pytest.mark.parametrize(
    "view",
    [
        lambda t: t[..., 3:-5],  # (13, 9, V): rows 1008 apart, no copy
        lambda t: t[::2, 4, 3:-5],  # (7, V): rows 2 * 9 * 1008 apart, no copy
        lambda t: t.transpose(0, 1)[..., 3:-5],  # (9, 13, V): leading dims do not merge
        lambda t: t[2, 3, 3:-5],  # (V,) with a 0-d target
    ],
    ids=["row-strided", "every-other-row", "leading-dims-unmergeable", "1d-logits"],
)
def test_cross_entropy_non_contiguous(view):
    check_cross_entropy((13, 9), 1008, torch.float32, "none", 0.1, view=view)
    check_cross_entropy((13, 9), 1008, torch.float32, "mean", 0.0, view=view)


@pytest.mark.parametrize("ignore_index", [-100, 3, 5000])
def test_cross_entropy_ignore_index(ignore_index):
    # 3 is also a valid class, 5000 lies outside [0, V): rows equal to it are still ignored.
    check_cross_entropy((65,), 1000, torch.float32, "mean", 0.1, ignore_index=ignore_index)
    check_cross_entropy((65,), 1000, torch.float32, "none", 0.0, ignore_index=ignore_index)


@pytest.mark.parametrize("label_smoothing", [0.0, 0.1, 1.0])
def test_cross_entropy_all_ignored(label_smoothing):
    # The sum is 0; the mean over no rows is NaN, as in torch; every gradient is 0.
    check_cross_entropy((7,), 1000, torch.float32, "sum", label_smoothing, ignored=slice(None))
    logits = randn(7, 1000, requires_grad=True)
    target = make_target((7,), 1000, ignored=slice(None))
    loss = ops.cross_entropy(logits, target, label_smoothing=label_smoothing)
    loss.backward()
    logits_t = requires_grad_copy(logits)
    loss_t = torch.nn.functional.cross_entropy(logits_t, target, label_smoothing=label_smoothing)
    loss_t.backward()
    assert loss.isnan() and loss_t.isnan()
    assert torch.equal(logits.grad, torch.zeros_like(logits)) and torch.equal(
        logits_t.grad, torch.zeros_like(logits))


def test_cross_entropy_autocast_gives_fp32_loss():
    # Same kernels under autocast: fp32 loss, gradient in logits' dtype.
    logits = randn(7, 1000, dtype=torch.float16, requires_grad=True)
    target = make_target((7,), 1000)
    with torch.autocast(DEVICE.type, dtype=torch.float16):
        loss = ops.cross_entropy(logits, target, label_smoothing=0.1)
    loss.backward()
    assert loss.dtype == torch.float32 and logits.grad.dtype == torch.float16
    assert torch.equal(loss, ops.cross_entropy(logits, target, label_smoothing=0.1))


def test_cross_entropy_int32_target():
    check_cross_entropy((65,), MULTI_BLOCK_V, torch.float32, "mean", 0.1,
                        target_dtype=torch.int32)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_saves_no_logits_sized_buffer(reduction):
    # The backward keeps the caller's logits (row-strided here: not copied) and per-row data.
    leaf = randn(65, MULTI_BLOCK_V + 8, requires_grad=True)
    logits = leaf[:, 3:-5]
    loss = ops.cross_entropy(logits, make_target((65,), MULTI_BLOCK_V), reduction=reduction)
    saved = [t for t in loss.grad_fn.saved_tensors if t is not None]
    assert any(t.data_ptr() == logits.data_ptr() and t.shape == logits.shape for t in saved)
    assert sum(t.numel() for t in saved) <= logits.numel() + 2 * 65 + 1  # targets, lse, count


def check_cross_entropy_sampled(n, v, dtype, label_smoothing=0.1, n_sample=64, chunk=1024):
    """A full-size run checked without a float64 copy of all the logits or their gradient.

    The op runs on all n rows ("none" and "mean", the latter with its backward). Checked
    against float64: the per-row losses of a sample of rows (always the first and last three,
    where the int64 row offsets matter); the mean, against float64 row losses computed on
    chunks of ``chunk`` rows without autograd; and the gradient of the sampled rows, against
    float64 autograd on those rows only. Torch's own results at logits' dtype are built the
    same way (fp32 math on the rows, as autocast would run F.cross_entropy).
    """
    leaf = (torch.randn(n, v, device=DEVICE, dtype=dtype) * 2.0).requires_grad_()
    target = make_target((n,), v)
    ls = dict(label_smoothing=label_smoothing)
    with torch.no_grad():
        loss_rows = ops.cross_entropy(leaf, target, reduction="none", **ls)
    loss = ops.cross_entropy(leaf, target, **ls)
    dloss = torch.rand((), device=DEVICE) + 0.5
    loss.backward(dloss)

    def row_losses(logits, wide):  # per-row fp64 or fp32 losses, chunk by chunk
        out = [reference.cross_entropy(logits[i:i + chunk].to(wide), target[i:i + chunk],
                                       reduction="none", **ls) for i in range(0, n, chunk)]
        return torch.cat(out)

    count = (target != -100).sum()
    with torch.no_grad():
        rows64, rows32 = row_losses(leaf, torch.float64), row_losses(leaf, torch.float32)
    assert_close(loss, rows64.sum() / count, rows32.sum() / count, "cross_entropy mean loss")

    pick = torch.randperm(n, device=DEVICE)[:n_sample]
    edges = torch.tensor([0, 1, 2, n - 3, n - 2, n - 1], device=DEVICE)
    rows = torch.unique(torch.cat([pick, edges]))
    assert_close(loss_rows[rows], rows64[rows], rows32[rows], "cross_entropy sampled row losses")

    scale = dloss / count  # d(mean)/d(row loss), for every non-ignored row
    sample64 = f64(leaf[rows], requires_grad=True)
    reference.cross_entropy(sample64, target[rows].cpu(), reduction="none", **ls).backward(
        scale.double().cpu().expand(len(rows)))
    sampleb = leaf[rows].detach().requires_grad_()
    reference.cross_entropy(sampleb, target[rows], reduction="none", **ls).backward(
        scale.expand(len(rows)))
    assert_close(leaf.grad[rows], sample64.grad, sampleb.grad, "cross_entropy sampled dlogits")


def test_cross_entropy_sampled_check():
    # The GPU tier's sampled check, run small here so that its own logic is tested.
    check_cross_entropy_sampled(65, MULTI_BLOCK_V, torch.float32, chunk=16, n_sample=8)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("label_smoothing", [0.0, 0.1])
@pytest.mark.parametrize("per_row_grad", [False, True])
@pytest.mark.parametrize("v", [MULTI_BLOCK_V, WHOLE_BLOCKS_V])
def test_cross_entropy_fwd_bwd_kernel(dtype, label_smoothing, per_row_grad, v):
    """The fused kernel (the LM head's loss and dlogits in one pass, written in place) gives
    the separate forward and backward kernels' results: odd rows over several vocabulary
    blocks (with and without a tail block), ignored rows, one out-of-range target (NaN loss
    and gradient row)."""
    from tritonformer.kernels import cross_entropy as kce

    n = 7
    logits = randn(n, v, dtype=dtype, scale=2.0)
    target = make_target((n,), v)
    target[2] = v  # out of range
    grad = torch.rand(n if per_row_grad else (), device=DEVICE) + 0.5
    lse, loss = kce.cross_entropy_fwd(logits, target, -100, label_smoothing)
    dlogits = kce.cross_entropy_bwd(logits, target, lse, grad, -100, label_smoothing)
    fused = logits.clone()
    lse2, loss2 = kce.cross_entropy_fwd_bwd(fused, target, grad, -100, label_smoothing, fused)
    active = target != -100
    torch.testing.assert_close(lse2[active], lse[active], rtol=0, atol=0)
    torch.testing.assert_close(loss2, loss, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(fused, dlogits, rtol=0, atol=0, equal_nan=True)
    assert loss2[2].isnan() and fused[2].isnan().all() and not fused[3:].isnan().any()


def test_cross_entropy_module_matches_torch():
    logits = randn(9, 30)
    for kwargs in [{}, dict(ignore_index=2, reduction="sum", label_smoothing=0.2),
                   dict(reduction="none")]:
        target = make_target((9,), 30, ignore_index=kwargs.get("ignore_index", -100))
        torch.testing.assert_close(nn.CrossEntropyLoss(**kwargs)(logits, target),
                                   torch.nn.CrossEntropyLoss(**kwargs)(logits, target))


def test_cross_entropy_target_out_of_range():
    logits = randn(7, 10)
    for bad in (10, -1, 12345):
        target = make_target((7,), 10)
        target[3] = bad
        with pytest.raises(ValueError, match=rf"target values must be in \[0, 10\).*{bad}"):
            ops.cross_entropy(logits, target)
    # A target equal to a custom ignore_index is fine even when outside [0, V).
    target = torch.randint(0, 10, (7,), device=DEVICE)
    target[3] = -1
    assert torch.isfinite(ops.cross_entropy(logits, target, ignore_index=-1))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_bad_target_is_nan_without_value_checks(reduction):
    # No host check (no sync): the kernels flag the row with a NaN loss and NaN gradient.
    logits = randn(7, 10, requires_grad=True)
    target = make_target((7,), 10)
    for bad in (10, -1, 12345):
        target[3] = bad
        with runtime.no_value_checks():
            loss = ops.cross_entropy(logits, target, reduction=reduction, label_smoothing=0.1)
        loss.backward(torch.ones_like(loss))
        others = torch.arange(7) != 3
        if reduction == "none":
            assert loss[3].isnan() and torch.isfinite(loss[others]).all()
        else:
            assert loss.isnan()
        assert logits.grad[3].isnan().all() and torch.isfinite(logits.grad[others]).all()
        logits.grad = None


def test_cross_entropy_bad_input():
    logits, target = randn(7, 10), make_target((7,), 10)
    with pytest.raises(ValueError, match="logits must have at least 1"):
        ops.cross_entropy(randn(1).reshape(()), target[0])
    with pytest.raises(TypeError, match="logits must be a torch.Tensor"):
        ops.cross_entropy([[1.0]], target)
    with pytest.raises(TypeError, match="logits must have dtype"):
        ops.cross_entropy(torch.ones(7, 10, dtype=torch.int64, device=DEVICE), target)
    with pytest.raises(ValueError, match="target must have the shape of logits"):
        ops.cross_entropy(logits, target[:6])
    with pytest.raises(ValueError, match="target must have the shape of logits"):
        ops.cross_entropy(logits, target[:, None])
    with pytest.raises(TypeError, match="target must hold class indices"):
        ops.cross_entropy(logits, target.float())
    with pytest.raises(TypeError, match="target must have dtype"):
        ops.cross_entropy(logits, target.to(torch.int16))
    with pytest.raises(TypeError, match="target must be a torch.Tensor"):
        ops.cross_entropy(logits, [0] * 7)
    with pytest.raises(ValueError, match="reduction"):
        ops.cross_entropy(logits, target, reduction="avg")
    for eps in (-0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="label_smoothing must be in"):
            ops.cross_entropy(logits, target, label_smoothing=eps)
    with pytest.raises(TypeError, match="label_smoothing"):
        ops.cross_entropy(logits, target, label_smoothing="0.1")
    with pytest.raises(TypeError, match="ignore_index"):
        ops.cross_entropy(logits, target, ignore_index=1.5)
    with pytest.raises(ValueError, match="logits must not be empty"):
        ops.cross_entropy(randn(0, 10), make_target((0,), 10))
    with pytest.raises(ValueError, match="logits must not be empty"):
        ops.cross_entropy(randn(7, 0), target)
    with pytest.raises(ValueError, match="target must be on"):
        ops.cross_entropy(logits, target.to("meta"))


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("n, v", [(16384, 50304), (8192, 128256)])
def test_cross_entropy_gpu(n, v, dtype):
    check_cross_entropy_sampled(n, v, dtype)


@gpu
@requires_gpu
def test_cross_entropy_gpu_extra_memory():
    # Forward + backward allocate the gradient and O(N) more, far below the 0.3 GiB budget.
    n, v = 16384, 50304
    logits = torch.randn(n, v, device=DEVICE, dtype=torch.bfloat16, requires_grad=True)
    target = make_target((n,), v)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    ops.cross_entropy(logits, target, label_smoothing=0.1).backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - before - logits.grad.nbytes
    assert extra < 64 * 2**20, f"{extra / 2**20:.1f} MiB beyond the gradient"


@gpu
@requires_gpu
def test_cross_entropy_gpu_over_2_31_elements():
    n, v = 16800, 128256  # 2.15e9 logits (4.3 GB in bf16): offsets need int64
    assert n * v > 2**31
    check_cross_entropy_sampled(n, v, torch.bfloat16)
