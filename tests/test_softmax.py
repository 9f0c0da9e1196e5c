from contextlib import nullcontext

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
from tritonformer import nn, ops, reference
from tritonformer.kernels.softmax import CONFIG

# Longer than the single-block limit: the chunked two-pass path (2500 under the interpreter).
LONG = 2 * CONFIG["max_single_n"] + 452


def check_softmax(shape, dtype, dim=-1, view=None, autocast=None, scale=3.0):
    """ops.softmax(view(x), dim) and its gradient against float64 and torch at x's dtype.

    ``view`` makes the input from the leaf x (e.g. a non-contiguous view). Under ``autocast``
    (an autocast dtype) the output must be fp32 and the baseline is what torch's autocast
    does, softmax of x.float().
    """
    view = view or (lambda t: t)
    x = randn(*shape, dtype=dtype, scale=scale, requires_grad=True)
    amp = torch.autocast(DEVICE.type, dtype=autocast) if autocast else nullcontext()
    with amp:
        y = ops.softmax(view(x), dim)
    dy = randn(*y.shape, dtype=y.dtype)
    y.backward(dy)

    x64 = f64(x)
    y64 = reference.softmax(view(x64), dim)
    y64.backward(f64(dy))

    xb = requires_grad_copy(x)
    yb = reference.softmax(view(xb).float() if autocast else view(xb), dim)
    yb.backward(dy)

    assert y.dtype == (torch.float32 if autocast else dtype)
    assert x.grad.dtype == dtype
    assert_close(y, y64, yb, "softmax y")
    assert_close(x.grad, x64.grad, xb.grad, "softmax dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (1, 7), (3, 65), (4, 1000), (3, LONG)])
def test_softmax(shape, dtype):
    check_softmax(shape, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("dim", [0, 1, -3])
def test_softmax_dim_3d(dim, dtype):
    check_softmax((9, 33, 17), dtype, dim=dim)


@pytest.mark.parametrize(
    "view",
    [lambda t: t.transpose(0, 1), lambda t: t[::2, 3:68], lambda t: t.expand(5, -1, -1)[1:4, 2]],
    ids=["transposed", "row-strided", "expanded"],
)
def test_softmax_non_contiguous(view):
    check_softmax((20, 70), torch.float32, view=view)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(4, 1000), (3, LONG)])
def test_softmax_autocast_gives_fp32(shape, dtype):
    check_softmax(shape, dtype, autocast=torch.float16 if dtype == torch.float32 else dtype)


@pytest.mark.filterwarnings("ignore:divide by zero", "ignore:invalid value")  # the NaN rows
def test_softmax_infinities_match_torch():
    x = torch.tensor([[float("-inf")] * 3, [0.0, float("-inf"), 1.0], [5.0, 5.0, 5.0]],
                     device=DEVICE)
    torch.testing.assert_close(ops.softmax(x), torch.softmax(x, -1), equal_nan=True)
    long = torch.full((2, LONG), float("-inf"), device=DEVICE)
    long[1, -500], long[1, -400] = 0.0, 1.0  # finite values only in the last chunk
    torch.testing.assert_close(ops.softmax(long), torch.softmax(long, -1), equal_nan=True)


def test_softmax_module_matches_torch():
    x = randn(5, 9, 4)
    for dim in (0, 1, -1):
        torch.testing.assert_close(nn.Softmax(dim)(x), torch.nn.Softmax(dim)(x))


def test_softmax_bad_input():
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.softmax(torch.ones(3, dtype=torch.int32, device=DEVICE))
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        ops.softmax([1.0, 2.0])
    with pytest.raises(ValueError, match="x must have at least 1"):
        ops.softmax(randn(1).reshape(()))
    with pytest.raises(ValueError, match="x must not be empty"):
        ops.softmax(randn(0, 4))
    with pytest.raises(ValueError, match="dim must be in"):
        ops.softmax(randn(3, 4), dim=2)
    with pytest.raises(TypeError, match="dim must be an int"):
        ops.softmax(randn(3, 4), dim=1.0)
    with pytest.raises(ValueError, match="x must be on"):
        ops.softmax(torch.ones(3, device="meta"))


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_softmax_gpu(dtype):
    check_softmax((16384, 4096), dtype)


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_softmax_gpu_long_rows(dtype):
    assert 100000 > CONFIG["max_single_n"]  # the chunked path
    check_softmax((256, 100000), dtype)


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
def test_softmax_gpu_launch_cache_follows_specialization(dtype):
    # runtime.launch reuses one compiled kernel per specialisation: rows that do not start
    # 16-byte aligned, between aligned ones of the same shape, must get their own binary.
    check_softmax((64, 1000), dtype)
    check_softmax((65, 1000), dtype, view=lambda t: t.reshape(-1)[1:64001].view(64, 1000))
    check_softmax((64, 1000), dtype)
