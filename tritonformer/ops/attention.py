"""Flash attention (causal or full, ALiBi, KV-cache shapes): autograd Functions, functional API.

``attention`` takes q, k, v; ``attention_packed`` takes them packed in the (B, S, 3, H, D)
output of a qkv projection and gives its gradient back as one tensor of that shape.
"""

from __future__ import annotations

import math
import numbers

import torch
from torch.amp import custom_bwd, custom_fwd

from ..kernels.attention import attention_bwd, attention_bwd_packed, attention_fwd
from ..runtime import (
    DEVICE_TYPE,
    autocast_dtype,
    check_same_device,
    check_same_dtype,
    check_tensor,
    default_device,
    fp32_uses_tf32,
)

#: Head dims the kernels take: multiples of 8 from 8 to 256 (tiles pad D to a power of two;
#: a row of a multiple of 8 elements is a multiple of 16 bytes, as tensor descriptors need).
MIN_HEAD_DIM, MAX_HEAD_DIM, HEAD_DIM_MULTIPLE = 8, 256, 8


def _descriptor_ready(t: torch.Tensor) -> torch.Tensor:
    """``t`` if the kernels' tensor descriptors can read it in place, else a contiguous copy.

    In place needs a unit last stride, a 16-byte-aligned data pointer and 16-byte multiples
    for the strides of the other dims that have more than one element.
    """
    es = t.element_size()
    ok = t.stride(-1) == 1 and (torch.compiler.is_compiling() or t.data_ptr() % 16 == 0) and all(
        n == 1 or (s * es) % 16 == 0 for n, s in zip(t.shape[:-1], t.stride()[:-1], strict=True)
    )
    return t if ok else t.clone(memory_format=torch.contiguous_format)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, q, k, v, slopes, causal: bool, scale: float) -> torch.Tensor:
        q, k, v = (_descriptor_ready(t) for t in (q, k, v))
        allow_tf32 = fp32_uses_tf32()
        out, lse = attention_fwd(q, k, v, slopes, causal, scale, allow_tf32)
        ctx.save_for_backward(q, k, v, out, lse, slopes)
        ctx.causal, ctx.scale, ctx.allow_tf32 = causal, scale, allow_tf32
        return out

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dout: torch.Tensor):
        q, k, v, out, lse, slopes = ctx.saved_tensors
        dq, dk, dv = attention_bwd(_descriptor_ready(dout), q, k, v, out, lse, slopes,
                                   ctx.causal, ctx.scale, ctx.allow_tf32)
        return dq, dk, dv, None, None, None


class AttentionPackedFunction(torch.autograd.Function):
    @staticmethod
    @custom_fwd(device_type=DEVICE_TYPE)
    def forward(ctx, qkv, slopes, causal: bool, scale: float) -> torch.Tensor:
        qkv = _descriptor_ready(qkv)  # then so are its q, k, v views
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        allow_tf32 = fp32_uses_tf32()
        out, lse = attention_fwd(q, k, v, slopes, causal, scale, allow_tf32)
        ctx.save_for_backward(qkv, out, lse, slopes)
        ctx.causal, ctx.scale, ctx.allow_tf32 = causal, scale, allow_tf32
        return out.transpose(1, 2)

    @staticmethod
    @custom_bwd(device_type=DEVICE_TYPE)
    def backward(ctx, dout: torch.Tensor):
        qkv, out, lse, slopes = ctx.saved_tensors
        dqkv = attention_bwd_packed(_descriptor_ready(dout.transpose(1, 2)), qkv, out, lse,
                                    slopes, ctx.causal, ctx.scale, ctx.allow_tf32)
        return dqkv, None, None, None


def _check_options(
    x: torch.Tensor,
    name: str,
    n_heads: int,
    causal: bool,
    alibi_slopes: torch.Tensor | None,
    scale: float | None,
) -> tuple[torch.Tensor | None, float]:
    """The checks ``attention`` and ``attention_packed`` share: the head dim (x's last dim,
    x called ``name`` in errors), causal, scale and the slopes of the n_heads heads. Returns
    (slopes ready for the kernels or None, scale as a float)."""
    d = x.shape[-1]
    if d % HEAD_DIM_MULTIPLE or not MIN_HEAD_DIM <= d <= MAX_HEAD_DIM:
        raise ValueError(
            f"head dim ({name}.shape[-1]) must be a multiple of {HEAD_DIM_MULTIPLE} in "
            f"[{MIN_HEAD_DIM}, {MAX_HEAD_DIM}], got {d}"
        )
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")
    if scale is None:
        scale = 1.0 / math.sqrt(d)
    elif isinstance(scale, bool) or not isinstance(scale, numbers.Real):
        raise TypeError(f"scale must be a real number or None, got {type(scale).__name__}")
    elif not (math.isfinite(scale) and scale > 0):
        raise ValueError(f"scale must be finite and positive, got {scale}")
    if alibi_slopes is not None:
        check_tensor(alibi_slopes, "alibi_slopes", ndim=1, dtypes=(torch.float32,))
        check_same_device(**{name: x, "alibi_slopes": alibi_slopes})
        if alibi_slopes.shape[0] != n_heads:
            raise ValueError(
                f"alibi_slopes must have shape (H,) = ({n_heads},), "
                f"got {tuple(alibi_slopes.shape)}"
            )
        alibi_slopes = alibi_slopes.detach().contiguous()
    return alibi_slopes, float(scale)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + ALiBi + causal mask) v, the counterpart of
    ``F.scaled_dot_product_attention`` (flash attention: nothing of size Sq x Skv is stored).

    Args:
        q: (B, H, Sq, D) queries; k, v: (B, H, Skv, D). fp32, fp16 or bf16, one dtype for the
            three (under torch.autocast all three are cast to the autocast dtype, as SDPA does).
            Any strides: a tensor whose last stride is not 1, or whose other strides or data
            pointer are not 16-byte aligned, is copied first. D: a multiple of 8 from 8 to 256
            (16, 32, 64, 80, 96, 128, 256 ...). Sq and Skv: any lengths >= 1, Sq != Skv allowed.
        causal: mask aligned bottom-right: query i sees keys j <= Skv - Sq + i (so Sq = 1
            against a KV cache of Skv keys sees them all). A query row that sees no key (only
            possible when Sq > Skv) outputs zeros.
        alibi_slopes: None or fp32 (H,) per-head slopes on q's device (see ``alibi_slopes``);
            adds -slope_h * |i + Skv - Sq - j| to the scores, computed in the kernel, at any
            length. The slopes get no gradient.
        scale: positive softmax scale; default 1 / sqrt(D).

    Returns:
        (B, H, Sq, D) in the inputs' (or autocast) dtype, laid out as (B, Sq, H, D) in memory
        (as torch's flash SDPA returns it: ``out.transpose(1, 2).reshape(B, Sq, H * D)`` is
        a view). Differentiable in q, k and v (gradients in their dtypes). fp32 runs IEEE
        fp32 dots unless ``torch.backends.cuda.matmul.allow_tf32``.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(t, name, ndim=4)
    check_same_device(q=q, k=k, v=v)
    cast = autocast_dtype()
    if cast is not None:
        q, k, v = q.to(cast), k.to(cast), v.to(cast)
    check_same_dtype(q=q, k=k, v=v)
    if k.shape != v.shape:
        raise ValueError(
            f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}"
        )
    if q.shape[:2] != k.shape[:2]:
        raise ValueError(
            f"q and k must have the same batch and heads (B, H), got {tuple(q.shape[:2])} and "
            f"{tuple(k.shape[:2])}"
        )
    if k.shape[3] != q.shape[3]:
        raise ValueError(f"q and k must have the same head dim, got {q.shape[3]} and {k.shape[3]}")
    slopes, scale = _check_options(q, "q", q.shape[1], causal, alibi_slopes, scale)
    return AttentionFunction.apply(q, k, v, slopes, causal, scale)


def attention_packed(
    qkv: torch.Tensor,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """Self-attention over queries, keys and values packed in one tensor, as a qkv
    projection's output holds them: ``attention(q, k, v, ...).transpose(1, 2)`` for
    ``q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))``, with a gradient that comes
    back as one tensor of qkv's shape (the three written straight into it, no stacking copy).

    Args:
        qkv: (B, S, 3, H, D): q, k, v along dim 2, e.g. ``linear(x, w_qkv).view(B, S, 3, H, D)``
            for w_qkv (3 * H * D, d_model). fp32, fp16 or bf16 (under torch.autocast cast to
            the autocast dtype). Any strides: one whose last stride is not 1, or whose other
            strides or data pointer are not 16-byte aligned, is copied first. D: a multiple
            of 8 from 8 to 256. S: any length >= 1.
        causal, alibi_slopes, scale: as for ``attention`` (Sq = Skv = S).

    Returns:
        (B, S, H, D) contiguous (``.reshape(B, S, H * D)`` is a view), in qkv's (or the
        autocast) dtype. Differentiable in qkv: its gradient is a contiguous (B, S, 3, H, D)
        tensor in qkv's dtype.
    """
    check_tensor(qkv, "qkv", ndim=5)
    if qkv.shape[2] != 3:
        raise ValueError(
            f"qkv must have shape (B, S, 3, H, D) (q, k, v along dim 2), got {tuple(qkv.shape)}"
        )
    cast = autocast_dtype()
    if cast is not None:
        qkv = qkv.to(cast)
    slopes, scale = _check_options(qkv, "qkv", qkv.shape[3], causal, alibi_slopes, scale)
    return AttentionPackedFunction.apply(qkv, slopes, causal, scale)


def alibi_slopes(n_heads: int) -> torch.Tensor:
    """The standard ALiBi slopes (Press et al.) for ``n_heads`` heads: fp32 (n_heads,) on the
    default device.

    For a power of two n: 2^(-8 i / n), i = 1..n. Otherwise, as in the ALiBi reference code:
    the slopes of the closest smaller power of two, then every other slope of the next power
    of two until there are n.
    """
    if isinstance(n_heads, bool) or not isinstance(n_heads, numbers.Integral):
        raise TypeError(f"n_heads must be an int, got {type(n_heads).__name__}")
    if n_heads < 1:
        raise ValueError(f"n_heads must be >= 1, got {n_heads}")

    def power_of_2(n: int) -> list[float]:
        return [2.0 ** (-8.0 * i / n) for i in range(1, n + 1)]

    closest = 1 << (int(n_heads).bit_length() - 1)
    slopes = power_of_2(closest) + power_of_2(2 * closest)[0::2][: n_heads - closest]
    return torch.tensor(slopes, dtype=torch.float32, device=default_device())
