"""Dropout: autograd Function and functional API (seeded, mask recomputed in the backward)."""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.dropout import dropout as dropout_kernel
from ..runtime import DEVICE_TYPE, check_tensor


class DropoutFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, x: torch.Tensor, p: float, seed: int) -> torch.Tensor:
        ctx.p, ctx.seed = p, seed
        return dropout_kernel(x.contiguous(), p, seed)

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dy: torch.Tensor):
        return dropout_kernel(dy.contiguous(), ctx.p, ctx.seed), None, None


def dropout(
    x: torch.Tensor, p: float = 0.5, training: bool = True, seed: int | None = None
) -> torch.Tensor:
    """Dropout, the counterpart of ``torch.nn.functional.dropout``.

    Args:
        x: any shape, fp32/fp16/bf16; the result has x's shape and dtype.
        p: probability of zeroing an element, 0 <= p <= 1; kept elements are scaled by 1/(1-p).
        training: if False (or p == 0) x is returned unchanged.
        seed: the Philox seed of the mask; by default drawn from torch's CPU generator, so
            ``torch.manual_seed`` makes runs repeatable. The mask is a function of (seed,
            element index) and is regenerated in the backward, never stored.
    """
    if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
        raise ValueError(f"dropout probability p must be a number in [0, 1], got {p!r}")
    check_tensor(x, "x", allow_empty=True)
    if not training or p == 0.0 or x.numel() == 0:
        return x
    if p == 1.0:
        return x * 0.0
    if seed is None:
        seed = int(torch.randint(0, 2**31 - 1, (1,)).item())
    return DropoutFunction.apply(x, float(p), seed)
