"""Activations (ReLU, GELU exact and tanh): autograd Function and functional API."""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.activations import activation_bwd, activation_fwd
from ..reference import ACTIVATIONS
from ..runtime import DEVICE_TYPE, check_choice, check_tensor


class ActivationFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, x: torch.Tensor, name: str) -> torch.Tensor:
        x = x.contiguous()
        ctx.save_for_backward(x)
        ctx.name = name
        return activation_fwd(x, name, x.dtype)

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dy: torch.Tensor):
        (x,) = ctx.saved_tensors
        return activation_bwd(x, dy.contiguous(), ctx.name), None


def activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """Apply the activation ``name`` elementwise.

    Args:
        x: any shape, fp32/fp16/bf16; computed in fp32 and returned in x's dtype (torch's
            autocast leaves activations in their input's dtype, and so does this).
        name: one of None (identity), "relu", "gelu" (exact, erf), "gelu_tanh".
    """
    check_choice(name, "activation", ACTIVATIONS)
    check_tensor(x, "x", allow_empty=True)
    if name is None:
        return x
    if x.numel() == 0:
        return x.clone()
    return ActivationFunction.apply(x, name)


def relu(x: torch.Tensor) -> torch.Tensor:
    """ReLU, the counterpart of ``torch.nn.functional.relu``."""
    return activation(x, "relu")


def gelu(x: torch.Tensor, approximate: str = "none") -> torch.Tensor:
    """GELU, the counterpart of ``torch.nn.functional.gelu``; approximate is "none" or "tanh"."""
    check_choice(approximate, "approximate", ("none", "tanh"))
    return activation(x, "gelu" if approximate == "none" else "gelu_tanh")
