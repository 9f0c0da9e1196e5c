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

NAMES = ["relu", "gelu", "gelu_tanh"]


def check_activation(shape, dtype, name, transpose=False):
    x = randn(*shape, dtype=dtype, scale=3.0, requires_grad=True)
    xin = x.transpose(0, -1) if transpose else x
    y = ops.activation(xin, name)
    dy = randn(*y.shape, dtype=dtype)
    y.backward(dy)

    x64 = f64(x)
    y64 = reference.activation(x64.transpose(0, -1) if transpose else x64, name)
    y64.backward(f64(dy))

    xb = requires_grad_copy(x)
    yb = reference.activation(xb.transpose(0, -1) if transpose else xb, name)
    yb.backward(dy)

    assert y.dtype == dtype
    assert_close(y, y64, yb, f"{name} y")
    assert_close(x.grad, x64.grad, xb.grad, f"{name} dx")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("shape", [(1,), (7, 65), (3, 1000)])
def test_activation(shape, dtype, name):
    check_activation(shape, dtype, name)


@pytest.mark.parametrize("name", NAMES)
def test_activation_extreme_inputs(name):
    """Far tails and the sign change of the derivatives' sigmoids: finite, and as accurate
    as elsewhere (fp32, values up to 1e4 in magnitude)."""
    x = torch.tensor([-1e4, -300.0, -40.0, -9.0, -1e-3, 0.0, 1e-3, 9.0, 40.0, 300.0, 1e4],
                     device=DEVICE, requires_grad=True)
    dy = randn(x.shape[0])
    ops.activation(x, name).backward(dy)
    x64 = f64(x)
    reference.activation(x64, name).backward(f64(dy))
    xb = requires_grad_copy(x)
    reference.activation(xb, name).backward(dy)
    assert torch.isfinite(x.grad).all()
    assert_close(x.grad, x64.grad, xb.grad, f"{name} dx at extremes")


@pytest.mark.parametrize("name", NAMES)
def test_activation_non_contiguous(name):
    check_activation((33, 17), torch.float32, name, transpose=True)


def test_gelu_modules_match_torch():
    x = randn(5, 9)
    torch.testing.assert_close(nn.GELU()(x), torch.nn.GELU()(x))
    torch.testing.assert_close(nn.GELU("tanh")(x), torch.nn.GELU("tanh")(x))
    torch.testing.assert_close(nn.ReLU()(x), torch.nn.ReLU()(x))


def test_activation_bad_input():
    with pytest.raises(ValueError, match="activation"):
        ops.activation(randn(3), "swish")
    with pytest.raises(TypeError, match="x must have dtype"):
        ops.relu(torch.ones(3, dtype=torch.int32, device=randn(1).device))
    with pytest.raises(ValueError, match="approximate"):
        ops.gelu(randn(3), approximate="fast")


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES)
@pytest.mark.parametrize("name", NAMES)
def test_activation_gpu(dtype, name):
    check_activation((16384, 4096), dtype, name)
