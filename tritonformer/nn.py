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


class Linear(torch.nn.Module):
    """Counterpart of ``torch.nn.Linear``, plus an activation fused into the GEMM's epilogue.

    Same parameters (``weight`` (out_features, in_features), ``bias`` (out_features,) or
    absent), same initialisation and state_dict keys as torch's, so the two interchange.
    ``activation`` is None, "relu", "gelu" or "gelu_tanh" (checked by ``ops.linear``).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        activation: str | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        factory = {"device": device, "dtype": dtype}
        self.weight = torch.nn.Parameter(torch.empty((out_features, in_features), **factory))
        if bias:
            self.bias = torch.nn.Parameter(torch.empty(out_features, **factory))
        else:
            self.register_parameter("bias", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torch.nn.Linear's initialisation (Kaiming-uniform weight, uniform bias)."""
        torch.nn.Linear.reset_parameters(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.linear(x, self.weight, self.bias, self.activation)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, "
            f"bias={self.bias is not None}, activation={self.activation!r}"
        )


class Softmax(torch.nn.Module):
    """Counterpart of ``torch.nn.Softmax``; ``dim`` must be given as an int (default -1,
    where torch's legacy default of None guesses a dimension)."""

    def __init__(self, dim: int = -1) -> None:
        super().__init__()
        self.dim = dim

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.softmax(x, self.dim)

    def extra_repr(self) -> str:
        return f"dim={self.dim}"


class CrossEntropyLoss(torch.nn.Module):
    """Counterpart of ``torch.nn.CrossEntropyLoss`` for class-index targets, without class
    weights; the arguments are keyword-only (torch's first positional argument is weight)."""

    def __init__(
        self, *, ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0
    ) -> None:
        super().__init__()
        self.ignore_index = ignore_index
        self.reduction = reduction
        self.label_smoothing = label_smoothing

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return ops.cross_entropy(
            logits, target, self.ignore_index, self.reduction, self.label_smoothing
        )

    def extra_repr(self) -> str:
        return (
            f"ignore_index={self.ignore_index}, reduction={self.reduction!r}, "
            f"label_smoothing={self.label_smoothing}"
        )


class Dropout(torch.nn.Module):
    """Counterpart of ``torch.nn.Dropout``: active in training mode only."""

    def __init__(self, p: float = 0.5) -> None:
        super().__init__()
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"dropout probability p must be in [0, 1], got {p!r}")
        self.p = p

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.dropout(x, self.p, self.training)

    def extra_repr(self) -> str:
        return f"p={self.p}"


class LayerNorm(torch.nn.Module):
    """Counterpart of ``torch.nn.LayerNorm`` over the last dimension only.

    Same parameters (``weight`` ones, ``bias`` zeros, each of shape (N,); absent when
    ``elementwise_affine=False`` or ``bias=False``) so state_dicts interchange with torch's.
    ``normalized_shape`` is an int N or a 1-element sequence (N,).
    """

    def __init__(
        self,
        normalized_shape: int | tuple[int] | list[int] | torch.Size,
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
    ) -> None:
        super().__init__()
        if isinstance(normalized_shape, int):
            shape = (normalized_shape,)
        else:
            shape = tuple(normalized_shape) if hasattr(normalized_shape, "__len__") else ()
        if len(shape) != 1 or not isinstance(shape[0], int) or shape[0] < 1:
            raise ValueError(
                "normalized_shape must be a positive int or a 1-element sequence (LayerNorm "
                f"normalises over the last dimension only), got {normalized_shape!r}"
            )
        self.normalized_shape = shape
        self.eps = eps
        self.elementwise_affine = elementwise_affine
        factory = {"device": device, "dtype": dtype}
        if elementwise_affine:
            self.weight = torch.nn.Parameter(torch.ones(shape, **factory))
        else:
            self.register_parameter("weight", None)
        if elementwise_affine and bias:
            self.bias = torch.nn.Parameter(torch.zeros(shape, **factory))
        else:
            self.register_parameter("bias", None)

    def reset_parameters(self) -> None:
        if self.weight is not None:
            torch.nn.init.ones_(self.weight)
        if self.bias is not None:
            torch.nn.init.zeros_(self.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.layer_norm(x, self.weight, self.bias, self.eps)

    def extra_repr(self) -> str:
        return (
            f"{self.normalized_shape}, eps={self.eps}, "
            f"elementwise_affine={self.elementwise_affine}"
        )
