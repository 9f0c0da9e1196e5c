"""The streaming pass of the fused LM head + cross-entropy (``ops/linear_cross_entropy.py``).

That op runs its GEMMs on ``kernels/matmul.py`` and its loss on ``kernels/cross_entropy.py``;
what is left is one elementwise pass over gradient-sized tensors: scaling the stored
gradients by the incoming loss gradient (written in the gradient's dtype):

    out = a * scale        scale optional (a cast); fp32 math; out may alias a
"""

import torch
import triton
import triton.language as tl

from ..runtime import INTERPRET, cdiv, empty, launch

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
