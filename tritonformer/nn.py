"""``nn.Module``s over ``tritonformer.ops``, with torch-compatible parameters and state_dicts.

Modules only hold parameters and call the functional API.
"""

from __future__ import annotations

import torch

from . import ops


class GELU(torch.nn.Module):
    """Counterpart of ``torch.nn.GELU``; approximate is "none" (erf) or "tanh"."""

    def __init__(self, approximate: str = "none") -> None:
        super().__init__()
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.gelu(x, self.approximate)

    def extra_repr(self) -> str:
        return f"approximate={self.approximate!r}"


class ReLU(torch.nn.Module):
    """Counterpart of ``torch.nn.ReLU``."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.relu(x)
