import pytest
import torch

from helpers import DTYPES, randn
from tritonformer import nn, ops


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_dropout_mask_scale_and_gradient(dtype, p):
    x = randn(67, 301, dtype=dtype, requires_grad=True)
    y = ops.dropout(x, p, seed=1234)
    kept = y != 0
    frac = 1.0 - kept.double().mean().item()
    n = x.numel()
    assert abs(frac - p) < 5 * (p * (1 - p) / n) ** 0.5, f"dropped {frac:.4f}, expected {p}"
    torch.testing.assert_close(y[kept], (x[kept].float() / (1 - p)).to(dtype))
    dy = randn(*x.shape, dtype=dtype)
    y.backward(dy)
    expected = torch.where(kept, dy.float() / (1 - p), 0.0).to(dtype)
    torch.testing.assert_close(x.grad, expected)


def test_dropout_seeds():
    x = randn(1000)
    a, b = ops.dropout(x, 0.5, seed=7), ops.dropout(x, 0.5, seed=7)
    assert torch.equal(a, b)
    assert not torch.equal(a, ops.dropout(x, 0.5, seed=8))
    torch.manual_seed(3)
    c = ops.dropout(x, 0.5)
    torch.manual_seed(3)
    assert torch.equal(c, ops.dropout(x, 0.5))


def test_dropout_identity_cases():
    x = randn(5, 7)
    assert ops.dropout(x, 0.0) is x
    assert ops.dropout(x, 0.9, training=False) is x
    assert torch.equal(ops.dropout(x, 1.0), torch.zeros_like(x))
    m = nn.Dropout(0.5).eval()
    assert m(x) is x


def test_dropout_bad_input():
    with pytest.raises(ValueError, match="p must"):
        ops.dropout(randn(3), 1.5)
    with pytest.raises(ValueError, match="p must"):
        nn.Dropout(-0.1)
