"""Activation functions: Triton device functions and the elementwise kernels built on them.

The device functions (``activation``, ``activation_grad``) are shared: the GEMM epilogues
(``kernels/matmul.py``) call them on their fp32 accumulators, and the elementwise kernels
below apply them to whole tensors. All math is in fp32.

Activation names (a ``tl.constexpr`` string): "none", "relu", "gelu" (exact, erf) and
"gelu_tanh" (GPT-2's tanh approximation, computed as x * sigmoid(2u) since
libdevice's tanh does not run in the interpreter).
"""

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, empty, empty_like, launch

# Elements per program: large under the interpreter, which pays per program, not per element.
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 8

# tl.constexpr: compiled kernels (unlike the interpreter) reject plain-float globals.
SQRT_1_2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi)
SQRT_2_PI = tl.constexpr(0.7978845608028654)  # sqrt(2 / pi)
GELU_TANH_C = tl.constexpr(0.044715)


@triton.jit
def activation(x, ACTIVATION: tl.constexpr):
    """Apply ACTIVATION to the fp32 tensor ``x``."""
    if ACTIVATION == "relu":
        return tl.maximum(x, 0.0)
    elif ACTIVATION == "gelu":
        return 0.5 * x * (1.0 + tl.erf(x * SQRT_1_2))
    elif ACTIVATION == "gelu_tanh":
        # 0.5 (1 + tanh(u)) = sigmoid(2u): no cancellation where tanh(u) nears -1.
        return x * tl.sigmoid(2.0 * SQRT_2_PI * (x + GELU_TANH_C * x * x * x))
    else:
        return x


@triton.jit
def activation_grad(x, dy, ACTIVATION: tl.constexpr):
    """dy * activation'(x) for fp32 tensors ``x`` (the activation's input) and ``dy``."""
    if ACTIVATION == "relu":
        return tl.where(x > 0.0, dy, 0.0)
    elif ACTIVATION == "gelu":
        cdf = 0.5 * (1.0 + tl.erf(x * SQRT_1_2))
        pdf = tl.exp(-0.5 * x * x) * INV_SQRT_2PI
        return dy * (cdf + x * pdf)
    elif ACTIVATION == "gelu_tanh":
        # d/dx [x s(z)] = s(z) + x s(z) s(-z) dz/dx with z = 2u. Both sigmoids from one exp
        # and one division, without cancellation: with e = exp(-|z|) and r = 1 / (1 + e),
        # s(|z|) = r and s(-|z|) = e r.
        z = 2.0 * SQRT_2_PI * (x + GELU_TANH_C * x * x * x)
        e = tl.exp(-tl.abs(z))
        r = 1.0 / (1.0 + e)
        s_pos = tl.where(z >= 0.0, r, e * r)  # s(z)
        s_neg = tl.where(z >= 0.0, e * r, r)  # s(-z)
        dz = 2.0 * SQRT_2_PI * (1.0 + 3.0 * GELU_TANH_C * x * x)
        return dy * (s_pos + x * s_pos * s_neg * dz)
    else:
        return dy


@triton.jit
def activation_fwd_kernel(
    x_ptr,  # input, contiguous, n elements
    y_ptr,  # output, contiguous, n elements, any float dtype
    n,  # number of elements
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """y = activation(x), one BLOCK of elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    tl.store(y_ptr + offs, activation(x, ACTIVATION).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def activation_bwd_kernel(
    x_ptr,  # the forward's input, contiguous, n elements
    dy_ptr,  # gradient of the output, contiguous, n elements
    dx_ptr,  # gradient of the input (output), contiguous, n elements
    n,  # number of elements
    ACTIVATION: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """dx = dy * activation'(x), one BLOCK of elements per program."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask).to(tl.float32)
    dy = tl.load(dy_ptr + offs, mask=mask).to(tl.float32)
    dx = activation_grad(x, dy, ACTIVATION)
    tl.store(dx_ptr + offs, dx.to(dx_ptr.dtype.element_ty), mask=mask)


def activation_into(x: torch.Tensor, y: torch.Tensor, name: str) -> None:
    """y = activation(x): launch ``activation_fwd_kernel`` on contiguous x and y of the same
    number of elements (y of any float dtype)."""
    n = x.numel()
    launch(activation_fwd_kernel, triton.cdiv(n, BLOCK), (x, y, n),
           dict(ACTIVATION=name, BLOCK=BLOCK), num_warps=NUM_WARPS)


def activation_fwd(x: torch.Tensor, name: str, out_dtype: torch.dtype) -> torch.Tensor:
    """Launch ``activation_fwd_kernel`` on a contiguous tensor; returns y shaped like x."""
    y = empty(x.shape, out_dtype, x.device)
    activation_into(x, y, name)
    return y


def activation_bwd(x: torch.Tensor, dy: torch.Tensor, name: str) -> torch.Tensor:
    """Launch ``activation_bwd_kernel`` on contiguous tensors; returns dx like x."""
    dx = empty_like(x)
    n = x.numel()
    activation_bwd_kernel[(triton.cdiv(n, BLOCK),)](
        x, dy, dx, n, ACTIVATION=name, BLOCK=BLOCK, num_warps=NUM_WARPS
    )
    return dx
