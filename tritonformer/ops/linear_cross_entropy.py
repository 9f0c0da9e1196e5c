"""Fused LM head + cross-entropy: ``cross_entropy(x @ weight.T, target)`` without ever
holding the (tokens x vocabulary) logits.

The rows of x go through in chunks (``CHUNK``: a chunk's logits stay within
``logits_bytes``). For each chunk of rows c:

    logits_c = x_c @ W^T                       kernels.matmul.gemm, in the compute dtype
    lse_c, loss_c = CE forward                 kernels.cross_entropy, fp32 per row, and
    dlogits_c = CE backward, over logits_c     in place (no second buffer), one kernel
                                               (kernels.linear_cross_entropy picks it)
    dX_c = dlogits_c @ W                       gemm (split-K when the tiles are few)
    dW += dlogits_c^T @ x_c                    gemm accumulating into an fp32 (V, d) buffer
                                               in its epilogue (no partial, no extra pass)

With reduction "mean" or "sum" every row's loss gradient is known in the forward (1/count or
1, count = the non-ignored rows, counted on the device), so the forward computes both
gradients and the backward only scales them, in place, by the incoming scalar gradient.
With "none" the per-row gradients are known only in the backward, which recomputes the
logits chunk by chunk (the saved per-row logsumexp spares the loss pass): correct, one more
GEMM per chunk than "mean"/"sum". Without gradients (no_grad, frozen inputs) the forward
runs only the logits GEMM and the loss kernel per chunk.

Memory beyond the inputs and gradients: one chunk's logits (<= ``logits_bytes``), the fp32
weight-gradient accumulator (V x d; for an fp32 weight it becomes the gradient itself), the
GEMMs' split-K workspace, per-row fp32 lse and
loss, and the compute-dtype copies of x and weight that autocast or an unaligned V needs.
"""

from __future__ import annotations

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.cross_entropy import cross_entropy_bwd, cross_entropy_fwd
from ..kernels.linear_cross_entropy import lm_head_loss_grad, scale_cast
from ..kernels.matmul import gemm
from ..runtime import (
    DEVICE_TYPE,
    autocast_dtype,
    cdiv,
    check_same_device,
    check_same_dtype,
    check_tensor,
    empty,
)
from .cross_entropy import check_loss_args

# Chunking, one table. logits_bytes: most bytes of one chunk's logits; rows_multiple: chunk
# rows are a multiple of it (the GEMMs' tile height: no ragged tiles inside the sequence);
# with the defaults, 16384 x 768 x 50304 in bf16 runs 4 chunks of 4096 rows (393 MiB of
# logits) next to the 147 MiB fp32 weight-gradient accumulator: 0.46 GiB beyond the inputs
# and gradients, fwd+bwd 7.8-8.0 ms on the H100 against 8.5-8.9 ms for the 7 chunks of 2432
# rows of a 256 MiB budget (fewer, taller GEMMs; docs/perf/matmul.md v12).
# The tests shrink the table to run many chunks on small shapes.
CHUNK = {"logits_bytes": 400 << 20, "rows_multiple": 128}
# Bytes a logits row (and the weight's rows, zero-padded) is padded to: TMA reads lines of
# 128 bytes, and rows that start inside a line cost the head's GEMMs extra reads (H100,
# 16384 x 768 with GPT-2's V = 50257 in bf16, fwd+bwd: padded to 50264, 9.93 ms of which 6.89
# ms GEMMs; padded to 50304, 8.89 ms of which 6.07 ms GEMMs; docs/perf/matmul.md v10).
LOGITS_ROW_ALIGN = 128


def _parts(total: int, most: int, multiple: int) -> list[tuple[int, int]]:
    """[start, end) ranges covering range(total) in the fewest near-equal parts of at most
    ``most`` items (rounded down to a multiple of ``multiple``, at least one multiple), every
    part but the last a multiple of ``multiple`` long."""
    most = max(multiple, most // multiple * multiple)
    size = cdiv(cdiv(total, cdiv(total, most)), multiple) * multiple
    return [(s, min(s + size, total)) for s in range(0, total, size)]


def _lm_head_pass(
    xc: torch.Tensor,
    wc: torch.Tensor,
    t: torch.Tensor,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    *,
    lse: torch.Tensor | None = None,
    grad: torch.Tensor | None = None,
    dx: torch.Tensor | None = None,
    dw: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """One pass over the rows in chunks: losses and/or gradients, never all the logits.

    Args:
        xc: (N, d) in the compute dtype.
        wc: (Vp, d) in the compute dtype, Vp >= n_classes; rows past n_classes are zero
            (padding that makes a logits row a multiple of LOGITS_ROW_ALIGN bytes).
        t: (N,) contiguous int64/int32 targets.
        lse: (N,) fp32 logsumexp per row from an earlier pass; when given, the loss kernel
            is skipped and None is returned.
        grad: the loss gradient per row for the backward kernel, fp32, 0-d (all rows) or
            (N,); None: no gradients.
        dx: (N, d) contiguous, written with dL/dx (with ``grad``), or None.
        dw: (n_classes, d) contiguous fp32, written with dL/dW (with ``grad``), or None.

    Returns:
        (lse, loss), each (N,) fp32, unless ``lse`` was given.
    """
    n, d = xc.shape
    rows = _parts(n, CHUNK["logits_bytes"] // (wc.shape[0] * xc.element_size()),
                  CHUNK["rows_multiple"])
    lses, losses = [], []
    for i, (r0, r1) in enumerate(rows):
        lse_c, loss_c = _chunk(
            xc[r0:r1], wc, t[r0:r1], n_classes, ignore_index, label_smoothing,
            None if lse is None else lse[r0:r1],
            None if grad is None else grad if grad.dim() == 0 else grad[r0:r1],
            None if dx is None else dx[r0:r1], dw, i == 0,
        )
        lses.append(lse_c)
        losses.append(loss_c)
    return None if lse is not None else (torch.cat(lses), torch.cat(losses))


def _chunk(
    x_c: torch.Tensor,
    wc: torch.Tensor,
    t_c: torch.Tensor,
    n_classes: int,
    ignore_index: int,
    label_smoothing: float,
    lse_c: torch.Tensor | None,
    g: torch.Tensor | None,
    dx_c: torch.Tensor | None,
    dw: torch.Tensor | None,
    first: bool,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """One chunk of rows of ``_lm_head_pass`` (its arguments, sliced to the chunk; ``first``:
    dw is written, not added to). Returns the chunk's (lse, loss), loss None when lse_c is
    given. Its logits are freed on return, before the next chunk's are allocated."""
    logits = gemm(x_c, wc.t(), x_c.dtype).c  # (rows, Vp)
    lv = logits[:, :n_classes]
    loss_c = None
    if g is None:
        return cross_entropy_fwd(lv, t_c, ignore_index, label_smoothing)
    if lse_c is None:  # loss and dlogits (in place) in one pass
        lse_c, loss_c = lm_head_loss_grad(logits, n_classes, t_c, g, ignore_index,
                                          label_smoothing)
    else:
        cross_entropy_bwd(lv, t_c, lse_c, g, ignore_index, label_smoothing, out=lv)
    if dx_c is not None:  # padding columns hold 0 logits and meet 0 weight rows
        gemm(logits, wc, dx_c.dtype, out=dx_c)
    if dw is not None:
        gemm(lv.t(), x_c, torch.float32, out=dw, accumulate=not first)
    return lse_c, loss_c


def _operands(
    x: torch.Tensor, weight: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(x as (N, d), weight as (Vp, d)) in the compute dtype (autocast's, else x's), the
    weight zero-padded to a logits row of a multiple of LOGITS_ROW_ALIGN bytes when V's row
    is not (a copy only then, or when autocast casts)."""
    dt = autocast_dtype() or x.dtype
    xc = x.reshape(-1, x.shape[-1]).to(dt)
    v, d = weight.shape
    align = LOGITS_ROW_ALIGN // xc.element_size()
    if v % align == 0:
        return xc, weight.to(dt)
    wc = empty((cdiv(v, align) * align, d), dt, weight.device)
    wc[v:].zero_()
    wc[:v].copy_(weight)
    return xc, wc


def _count(t: torch.Tensor, ignore_index: int) -> torch.Tensor:
    """The mean's divisor: the non-ignored rows, counted on the device (no sync), fp32 0-d."""
    return (t != ignore_index).sum().to(torch.float32)


def _reduce(loss: torch.Tensor, t: torch.Tensor, shape: torch.Size, ignore_index: int,
            reduction: str) -> torch.Tensor:
    """The fp32 loss from per-row losses (N,); the mean over no rows is 0 / 0 = NaN."""
    if reduction == "none":
        return loss.view(shape)
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / _count(t, ignore_index)


class LinearCrossEntropyFunction(torch.autograd.Function):
    """"mean"/"sum": the forward computes the gradients (ctx.grads) and the backward scales
    them in place. "none": saves x, weight and the per-row lse; the backward recomputes."""

    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(
        ctx,
        x: torch.Tensor,
        weight: torch.Tensor,
        target: torch.Tensor,
        ignore_index: int,
        reduction: str,
        label_smoothing: float,
    ) -> torch.Tensor:
        xc, wc = _operands(x, weight)
        t = target.reshape(-1).contiguous()
        v, d = weight.shape
        need_x, need_w = ctx.needs_input_grad[:2]
        ctx.options = (ignore_index, reduction, label_smoothing)
        ctx.x_shape, ctx.w_dtype = x.shape, weight.dtype
        if reduction == "none":
            lse, loss = _lm_head_pass(xc, wc, t, v, ignore_index, label_smoothing)
            ctx.save_for_backward(x, weight, t, lse)
            return loss.view(target.shape)
        if reduction == "mean":  # 1/0 = inf when all rows are ignored; they get gradient 0
            grad = 1.0 / _count(t, ignore_index)
        else:
            grad = torch.ones((), dtype=torch.float32, device=x.device)
        dx = empty((t.shape[0], d), x.dtype, x.device) if need_x else None
        dw = empty((v, d), torch.float32, x.device) if need_w else None
        _, loss = _lm_head_pass(xc, wc, t, v, ignore_index, label_smoothing, grad=grad,
                                dx=dx, dw=dw)
        ctx.grads = (dx, dw)
        return _reduce(loss, t, target.shape, ignore_index, reduction)

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dloss: torch.Tensor):
        ignore_index, reduction, label_smoothing = ctx.options
        g = dloss.to(torch.float32).contiguous()
        if reduction == "none":
            x, weight, t, lse = ctx.saved_tensors
            need_x, need_w = ctx.needs_input_grad[:2]
            xc, wc = _operands(x, weight)
            dx = empty(xc.shape, x.dtype, x.device) if need_x else None
            dw = empty(weight.shape, torch.float32, x.device) if need_w else None
            _lm_head_pass(xc, wc, t, weight.shape[0], ignore_index, label_smoothing, lse=lse,
                          grad=g.reshape(-1), dx=dx, dw=dw)
            scale = None
        else:
            if ctx.grads is None:
                raise RuntimeError(
                    "linear_cross_entropy's backward ran twice (retain_graph): with reduction "
                    "'mean' or 'sum' its gradients are computed in the forward and scaled in "
                    "place by the first backward; run the forward again for another one"
                )
            (dx, dw), ctx.grads = ctx.grads, None
            scale = g
        if dx is not None:
            dx = (dx if scale is None else scale_cast(dx, scale, out=dx)).view(ctx.x_shape)
        if dw is not None and (scale is not None or dw.dtype != ctx.w_dtype):
            in_place = ctx.w_dtype == torch.float32
            dw = scale_cast(dw, scale, out=dw if in_place else None, out_dtype=ctx.w_dtype)
        return dx, dw, None, None, None, None


def linear_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """``cross_entropy(x @ weight.T, target)``, the LM head and its loss in one op, without
    materialising the (tokens x vocabulary) logits (see the module docstring).

    Args:
        x: (..., d), at least 1-D, non-empty, fp32/fp16/bf16, any strides (the hidden states).
        weight: (V, d) in torch's Linear layout (the LM head, or the tied embedding), same
            dtype as x outside autocast, same device. Any V; when a row of V logits is not a
            multiple of 16 bytes, a zero-padded copy of the weight is made per call (TMA).
        target: (...), x's shape without its last dimension, int64 or int32: a class in
            [0, V) or ``ignore_index``. While ``runtime.value_checks_enabled()``, checked: a
            reduction over target, read on the host once the op's kernels are queued (the
            host waits for the device, which is not left idle), raising ValueError; without
            the check an out-of-range value gives a NaN loss and NaN gradients, never a
            silent answer.
        ignore_index: target value whose rows contribute neither loss nor gradient.
        reduction: "mean" (over non-ignored rows; NaN if all are ignored, like torch), "sum"
            or "none" (the backward then recomputes the logits: slower, see above).
        label_smoothing: eps in [0, 1], as in torch.

    Returns:
        fp32 loss, 0-d for "mean"/"sum", target's shape for "none". x @ weight.T runs in
        the autocast dtype under torch.autocast (as linear does), else in the inputs'
        dtype, with fp32 accumulation; the loss is fp32 (as autocast's cross_entropy).
        Gradients come back in x's and weight's own dtypes (an fp32 master weight gets an
        fp32 gradient, accumulated in fp32 over the chunks).
    """
    check_tensor(x, "x", min_ndim=1)
    check_tensor(weight, "weight", ndim=2)
    check_same_device(x=x, weight=weight)
    if autocast_dtype() is None:
        check_same_dtype(x=x, weight=weight)
    if weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight must have shape (V, {x.shape[-1]}) (x's last dimension), "
            f"got {tuple(weight.shape)}"
        )
    finish_check = check_loss_args(target, "x", x, weight.shape[0], ignore_index, reduction,
                                   label_smoothing)
    options = (int(ignore_index), reduction, float(label_smoothing))
    if torch.is_grad_enabled() and (x.requires_grad or weight.requires_grad):
        loss = LinearCrossEntropyFunction.apply(x, weight, target, *options)
    else:
        xc, wc = _operands(x, weight)
        t = target.reshape(-1).contiguous()
        _, loss = _lm_head_pass(xc, wc, t, weight.shape[0], options[0], options[2])
        loss = _reduce(loss, t, target.shape, options[0], reduction)
    finish_check()
    return loss
