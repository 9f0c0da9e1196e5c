"""Cross-entropy loss with class-index targets: autograd Function and functional API."""

from __future__ import annotations

import numbers
from collections.abc import Callable

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.cross_entropy import cross_entropy_bwd, cross_entropy_fwd
from ..runtime import (
    DEVICE_TYPE,
    DeviceFlag,
    check_choice,
    check_same_device,
    check_tensor,
    value_checks_enabled,
)
from .softmax import as_rows

REDUCTIONS = ("mean", "sum", "none")


class CrossEntropyFunction(torch.autograd.Function):
    """Saves the logits (the caller's tensor, no copy), the targets, the fp32 logsumexp per
    row and, for "mean", the count of non-ignored rows; never a gradient-sized buffer."""

    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(
        ctx,
        logits: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> torch.Tensor:
        t = target.reshape(-1).contiguous()
        lse, loss = cross_entropy_fwd(as_rows(logits), t, ignore_index, label_smoothing)
        count = None
        if reduction == "none":
            out = loss.view(target.shape)
        elif reduction == "sum":
            out = loss.sum()
        else:  # mean over non-ignored rows; 0 / 0 = NaN when all are ignored, as in torch
            count = (t != ignore_index).sum().to(torch.float32)
            out = loss.sum() / count
        ctx.save_for_backward(logits, t, lse, count)
        ctx.ignore_index, ctx.reduction, ctx.label_smoothing = (
            ignore_index, reduction, label_smoothing)
        return out

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dloss: torch.Tensor):
        logits, t, lse, count = ctx.saved_tensors
        dloss = dloss.float()
        if ctx.reduction == "none":
            grad = dloss.reshape(-1)
        elif ctx.reduction == "sum":
            grad = dloss.reshape(())
        else:
            grad = (dloss / count).reshape(())
        dlogits = cross_entropy_bwd(
            as_rows(logits), t, lse, grad, ctx.ignore_index, ctx.label_smoothing
        )
        return dlogits.view(logits.shape), None, None, None, None


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits against class indices, the counterpart of
    ``torch.nn.functional.cross_entropy`` (without class weights or probability targets).

    Args:
        logits: (..., V), at least 1-D, non-empty, fp32/fp16/bf16. The class dimension V must
            be last; rows may have any stride (no copy when the leading dimensions merge into
            one stride and the last is unit-stride; otherwise one copy, in the forward and
            again in the backward). Any V works (the kernels loop over vocabulary blocks).
        target: (...), logits' shape without its last dimension, int64 or int32: a class in
            [0, V) or ``ignore_index``. While ``runtime.value_checks_enabled()``, checked: a
            reduction over target, read on the host once the loss kernel is queued (a wait
            for the device per call): an out-of-range value raises ValueError. Without the
            check, such a row's loss (so the mean or sum) and its gradient row come out NaN.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: "mean" (over non-ignored rows; NaN if all are ignored, like torch), "sum"
            or "none".
        label_smoothing: eps in [0, 1]; the target distribution is (1 - eps) onehot + eps / V,
            and ignored rows stay at 0, exactly as torch defines it.

    Returns:
        fp32 loss: 0-d for "mean"/"sum", target's shape for "none". It is fp32 for every
        logits dtype, as under torch's autocast policy (computed in fp32 in the kernels; the
        logits are never cast in memory). The gradient comes back in logits' dtype.
    """
    check_tensor(logits, "logits", min_ndim=1)
    finish_check = check_loss_args(target, "logits", logits, logits.shape[-1], ignore_index,
                                   reduction, label_smoothing)
    loss = CrossEntropyFunction.apply(
        logits, target, int(ignore_index), reduction, float(label_smoothing)
    )
    finish_check()
    return loss


def _no_value_check() -> None:
    """``check_loss_args``'s value check while value checks are off: nothing to wait for."""


def check_loss_args(
    target: object,
    rows_name: str,
    rows: torch.Tensor,
    n_classes: int,
    ignore_index: object,
    reduction: object,
    label_smoothing: object,
) -> Callable[[], None]:
    """The checks of a class-index loss's arguments (shared by ``cross_entropy`` and
    ``linear_cross_entropy``): ``target`` against ``rows`` (the already checked tensor named
    ``rows_name`` whose leading dimensions target must have), then the options, then, while
    ``runtime.value_checks_enabled()``, the target values against [0, n_classes): started on
    the device here and finished by the function returned, which the caller runs once its
    kernels are queued (it raises the ValueError; the device keeps working meanwhile)."""
    if not isinstance(target, torch.Tensor):
        raise TypeError(f"target must be a torch.Tensor, got {type(target).__name__}")
    if target.is_floating_point():
        raise TypeError(
            f"target must hold class indices (int64 or int32), got {target.dtype}; "
            "class-probability targets are not supported"
        )
    check_tensor(target, "target", dtypes=(torch.int64, torch.int32), allow_empty=True)
    check_same_device(**{rows_name: rows, "target": target})
    if target.shape != rows.shape[:-1]:
        raise ValueError(
            f"target must have the shape of {rows_name} without its last dimension, "
            f"{tuple(rows.shape[:-1])}, got {tuple(target.shape)}"
        )
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, numbers.Integral):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    check_choice(reduction, "reduction", REDUCTIONS)
    if isinstance(label_smoothing, bool) or not isinstance(label_smoothing, numbers.Real):
        raise TypeError(
            f"label_smoothing must be a float, got {type(label_smoothing).__name__}"
        )
    if not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not value_checks_enabled():
        return _no_value_check  # the kernels flag a bad target with a NaN loss
    bad = ((target < 0) | (target >= n_classes)) & (target != ignore_index)
    any_bad = DeviceFlag(bad.any())

    def finish() -> None:
        if any_bad.read():
            raise ValueError(
                f"target values must be in [0, {n_classes}) (the number of classes) or equal "
                f"ignore_index={ignore_index}; found {int(target[bad].reshape(-1)[0])}"
            )

    return finish
