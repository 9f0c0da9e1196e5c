"""Plain-PyTorch twin of every Tritonformer op: the spec of what each kernel computes.

Tests call these on float64 copies of the inputs to get the reference, benchmarks use them
as the PyTorch baseline, and the model's ``backend="torch"`` is built on them, so the Triton
and PyTorch models cannot drift apart. Each function takes the same arguments as its
counterpart in ``tritonformer.ops``; none of them checks its arguments.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

ACTIVATIONS = (None, "relu", "gelu", "gelu_tanh")


def gelu(x: torch.Tensor) -> torch.Tensor:
    """Exact GELU: x * Phi(x) = 0.5 x (1 + erf(x / sqrt 2))."""
    return F.gelu(x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GPT-2's GELU: 0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))."""
    return F.gelu(x, approximate="tanh")


def relu(x: torch.Tensor) -> torch.Tensor:
    return F.relu(x)


def activation(x: torch.Tensor, name: str | None) -> torch.Tensor:
    """Apply the activation called ``name`` (one of ACTIVATIONS; None is the identity)."""
    return _ACTIVATION_FNS[name](x)


_ACTIVATION_FNS = {None: lambda x: x, "relu": relu, "gelu": gelu, "gelu_tanh": gelu_tanh}


def layer_norm(
    x: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dimension: (x - mean) / sqrt(var + eps) * weight + bias, cast to
    ``out_dtype`` when given."""
    y = F.layer_norm(x, x.shape[-1:], weight, bias, eps)
    return y if out_dtype is None else y.to(out_dtype)


def add_layer_norm(
    x: torch.Tensor,
    residual: torch.Tensor,
    weight: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    eps: float = 1e-5,
    *,
    out_dtype: torch.dtype | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-LN residual step: returns (s, layer_norm(s)) with s = x + residual."""
    s = x + residual
    return s, layer_norm(s, weight, bias, eps, out_dtype=out_dtype)


def softmax(x: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Softmax along ``dim``, in the input's dtype."""
    return torch.softmax(x, dim=dim)


def cross_entropy(
    logits: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """Cross-entropy of logits (..., V) against class indices (...), computed in fp32 or wider."""
    v = logits.shape[-1]
    logits = logits.reshape(-1, v)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()
    return F.cross_entropy(
        logits,
        target.reshape(-1),
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=label_smoothing,
    ).reshape(target.shape if reduction == "none" else ())


def matmul(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a @ b with torch.matmul's broadcasting over leading dims."""
    return torch.matmul(a, b)


def linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """activation(x @ weight.T + bias), weight in torch's (out_features, in_features) layout."""
    return _ACTIVATION_FNS[activation](F.linear(x, weight, bias))


def dropout(x: torch.Tensor, p: float = 0.5, training: bool = True) -> torch.Tensor:
    return F.dropout(x, p, training)


def alibi_bias(
    slopes: torch.Tensor, sq: int, skv: int, device: torch.device | None = None
) -> torch.Tensor:
    """ALiBi bias of shape (H, Sq, Skv): -slope * |i + Skv - Sq - j| for query i and key j.

    Queries are aligned to the end of the keys (query i sits at position Skv - Sq + i), the
    convention of FlashAttention and of KV-cache decoding.
    """
    i = torch.arange(sq, device=device or slopes.device)[:, None] + (skv - sq)
    j = torch.arange(skv, device=device or slopes.device)[None, :]
    return -slopes[:, None, None] * (i - j).abs()


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """softmax(q k^T * scale + alibi + mask) v for q (B, H, Sq, D), k and v (B, H, Skv, D).

    Computed through ``F.scaled_dot_product_attention`` (so the torch backend uses SDPA), with
    an explicit float mask for ALiBi and for the bottom-right causal mask when Sq != Skv.

    The causal mask is aligned bottom-right: query i sees keys j <= Skv - Sq + i. A query row
    that sees no key (possible only when Sq > Skv) outputs zeros.
    """
    sq, skv = q.shape[-2], k.shape[-2]
    if alibi_slopes is None and (not causal or sq == skv):
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, scale=scale)
    mask = torch.zeros(sq, skv, dtype=q.dtype, device=q.device)
    if alibi_slopes is not None:
        mask = alibi_bias(alibi_slopes, sq, skv, q.device).to(q.dtype)
    if causal:
        i = torch.arange(sq, device=q.device)[:, None] + (skv - sq)
        j = torch.arange(skv, device=q.device)[None, :]
        mask = mask.masked_fill(j > i, float("-inf"))
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    # Rows that see no key (causal with Sq > Skv) come out NaN from SDPA; the spec says zeros.
    return out.nan_to_num(0.0) if causal and sq > skv else out


def attention_packed(
    qkv: torch.Tensor,
    causal: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    scale: float | None = None,
) -> torch.Tensor:
    """``attention`` of the q, k, v packed along dim 2 of qkv (B, S, 3, H, D) (a qkv
    projection's output): returns (B, S, H, D)."""
    q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
    return attention(q, k, v, causal, alibi_slopes, scale).transpose(1, 2)


def linear_cross_entropy(
    h: torch.Tensor,
    weight: torch.Tensor,
    target: torch.Tensor,
    ignore_index: int = -100,
    reduction: str = "mean",
    label_smoothing: float = 0.0,
) -> torch.Tensor:
    """cross_entropy(h @ weight.T, target): the LM head and its loss, h (..., d), weight (V, d)."""
    return cross_entropy(F.linear(h, weight), target, ignore_index, reduction, label_smoothing)
