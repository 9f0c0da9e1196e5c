"""The fused LM head + cross-entropy's launchers beyond its GEMMs (``ops/linear_cross_entropy.py``,
whose GEMMs run on ``kernels/matmul.py``):

- ``lm_head_loss_grad``: a chunk's loss and dlogits over its logits, dispatched to the Gluon
  pass on sm_90 (``kernels/cross_entropy_gluon.py``) or the Triton kernel
  (``kernels/cross_entropy.py``);
- ``scale_cast``: one elementwise pass over gradient-sized tensors, scaling the stored
  gradients by the incoming loss gradient (written in the gradient's dtype):

    out = a * scale        scale optional (a cast); fp32 math; out may alias a
"""

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, cdiv, empty, launch
from . import cross_entropy_gluon
from .cross_entropy import cross_entropy_fwd_bwd

# Elements per program: large under the interpreter, which pays per program, not per element.
BLOCK = 1 << 16 if INTERPRET else 4096
NUM_WARPS = 4


@triton.jit
def scale_cast_kernel(
    a_ptr,  # input, [n] contiguous, any float dtype
    scale_ptr,  # one fp32 value (HAS_SCALE), else None
    out_ptr,  # output, [n] contiguous, any float dtype; may be a_ptr (in place)
    n,  # number of elements
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,  # elements per program
):
    """out = a * scale over one BLOCK of elements, in fp32."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    y = tl.load(a_ptr + offs, mask=mask).to(tl.float32)
    if HAS_SCALE:
        y *= tl.load(scale_ptr)
    tl.store(out_ptr + offs, y.to(out_ptr.dtype.element_ty), mask=mask)


def scale_cast(
    a: torch.Tensor,
    scale: torch.Tensor | None = None,
    out: torch.Tensor | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """a * scale (or a alone), elementwise in fp32, written to ``out`` and returned.

    a, out: contiguous, same shape, any float dtypes; ``out`` may be a (in place) and
    defaults to a new tensor of ``out_dtype`` (default a's). scale: a 0-d fp32 tensor or
    None (then this is a cast).
    """
    if out is None:
        out = empty(a.shape, out_dtype or a.dtype, a.device)
    n = a.numel()
    launch(scale_cast_kernel, cdiv(n, BLOCK), (a, scale, out, n),
           dict(HAS_SCALE=scale is not None, BLOCK=BLOCK), num_warps=NUM_WARPS)
    return out


def lm_head_loss_grad(
    logits: torch.Tensor,
    n_cols: int,
    target: torch.Tensor,
    grad: torch.Tensor,
    ignore_index: int,
    label_smoothing: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-row (lse, loss), fp32 [N], of one chunk's logits (N, Vp) contiguous, the classes
    its first n_cols columns, with dlogits written over those columns (the Gluon pass on
    sm_90 for 16-bit rows it can hold, which also zeroes the columns past n_cols; else the
    Triton kernel, which leaves them). target: [N] contiguous int64/int32; grad: fp32, [N] or
    0-d, already scaled by the reduction."""
    if cross_entropy_gluon.eligible(logits, n_cols):
        return cross_entropy_gluon.lm_head_loss_grad_gluon(logits, n_cols, target, grad,
                                                           ignore_index, label_smoothing)
    classes = logits[:, :n_cols]
    return cross_entropy_fwd_bwd(classes, target, grad, ignore_index, label_smoothing, classes)
