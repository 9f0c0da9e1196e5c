"""The kernels' launch functions as torch custom ops, so that torch.compile can trace the model.

A launch function (``kernels/<op>.py``) does host-side work dynamo cannot trace: it picks a
config from the shapes, allocates outputs, builds TMA tensor descriptors from data pointers
and launches ``kernel[grid](...)``. Each one that the autograd Functions in ``ops/`` call is
registered here as an opaque ``torch.library.custom_op`` named ``tritonformer::<launcher>``
whose fake (meta) implementation gives the output shapes, dtypes and (contiguous) strides,
and ``torch.compiler.substitute_in_graph`` makes dynamo trace a call of the custom op
wherever it meets a call of the launch function. Eager calls are untouched: the ops call
the launch functions directly and pay no dispatcher overhead; only a compiled graph goes
through the custom ops, which call the same launch functions.

``torch.library.triton_op``/``wrap_triton`` would let inductor see the kernels themselves,
but they need launchers whose host code it can trace, and ours build TMA descriptors from
data pointers, read the device's SM count, pick split-K from a cost model and chain several
launches; as opaque custom ops they keep exactly the eager behaviour.

Schemas cannot return None nor an input: an output a launcher leaves out (None) comes out of
its custom op as an empty placeholder, mapped back to None by the traced twin from the same
arguments that decided it; a launcher that writes into a caller's ``out`` tensor becomes an
op that mutates ``out`` (its traced twin allocates ``out`` when the caller gave none). Every
op is tagged ``needs_exact_strides``: inductor hands the launchers tensors with exactly the
strides seen in eager (they read views in place: stride-0 batch dims, transposed weights).

If a launcher's signature changes so that its registration here no longer fits, importing
this module warns and leaves that launcher out (eager use is unaffected; a compiled graph
breaks there) instead of failing: ``tests/test_compile.py`` checks that none is left out.
``tritonformer/__init__.py`` imports this module.
"""

import logging
from collections.abc import Callable, Sequence

import torch
from torch import Tensor

from .kernels import (
    activations,
    attention,
    cross_entropy,
    dropout,
    layer_norm,
    linear_cross_entropy,
    matmul,
    softmax,
)
from .runtime import empty

log = logging.getLogger("tritonformer")

#: Launch functions registered as custom ops, by name.
COMPILABLE: dict[str, Callable] = {}

_TAGS = (torch.Tag.needs_exact_strides,)


def _op(name: str) -> torch._ops.OpOverload:
    return getattr(torch.ops.tritonformer, name).default


def _register(
    launcher: Callable,
    impl: Callable,
    fake: Callable,
    traced: Callable,
    mutates_args: Sequence[str] = (),
) -> None:
    """Register ``impl`` (the launcher itself, or an adapter with a None-free schema) as the
    custom op ``tritonformer::<launcher name>`` with the meta function ``fake``, and make
    dynamo trace ``traced`` (which calls the op) in place of ``launcher``."""
    name = launcher.__name__
    try:
        op = torch.library.custom_op(
            f"tritonformer::{name}", impl, mutates_args=tuple(mutates_args), tags=_TAGS
        )
        op.register_fake(fake)
        torch.compiler.substitute_in_graph(launcher)(traced)
    except (TypeError, ValueError) as e:  # a launcher changed since this file was written
        log.warning(
            "tritonformer.library: %s is not compilable (%s); torch.compile will break "
            "the graph at it until library.py follows its signature",
            name,
            e,
        )
        return
    COMPILABLE[name] = launcher


def _like(t: Tensor, shape: Sequence[int], dtype: torch.dtype | None = None) -> Tensor:
    """A contiguous tensor of ``shape`` on t's device (t's dtype by default)."""
    return t.new_empty(shape, dtype=dtype or t.dtype)


def _none(t: Tensor) -> Tensor:
    """The placeholder for an output not asked for (custom ops cannot return None)."""
    return t.new_empty((0,))


def _present(t: Tensor, wanted: bool) -> Tensor | None:
    return t if wanted else None


# ---------------------------------------------------------------------------------------------
# Launchers whose signatures are custom-op schemas as they are: the op is the launcher (or an
# adapter with its arguments), and the traced twin passes the arguments through.
# ---------------------------------------------------------------------------------------------


def _same_schema(launcher: Callable, fake: Callable, impl: Callable | None = None) -> None:
    """Register ``impl`` (default: the launcher) under the launcher's own arguments."""
    op_name = launcher.__name__

    def traced(*args, **kwargs):
        return _op(op_name)(*args, **kwargs)

    _register(launcher, impl or launcher, fake, traced)


_same_schema(activations.activation_fwd, lambda x, name, out_dtype: _like(x, x.shape, out_dtype))
_same_schema(activations.activation_bwd, lambda x, dy, name: _like(x, x.shape))
_same_schema(dropout.dropout, lambda x, p, seed: _like(x, x.shape))
_same_schema(softmax.softmax_fwd, lambda x, out_dtype: _like(x, x.shape, out_dtype))
_same_schema(softmax.softmax_bwd, lambda y, dy, dx_dtype: _like(y, y.shape, dx_dtype))
_same_schema(
    cross_entropy.cross_entropy_fwd,
    lambda logits, target, ignore_index, label_smoothing: (
        _like(logits, logits.shape[:1], torch.float32),
        _like(logits, logits.shape[:1], torch.float32),
    ),
)


def _aligned(t: Tensor) -> Tensor:
    """``t``, or a contiguous copy when its data pointer is not 16-byte aligned (TMA needs it;
    ``ops/attention.py`` checks it in eager, but cannot while dynamo traces)."""
    return t if t.data_ptr() % 16 == 0 else t.clone(memory_format=torch.contiguous_format)


def _attention_fwd(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    slopes: Tensor | None,
    causal: bool,
    scale: float,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor]:
    q, k, v = (_aligned(t) for t in (q, k, v))
    return attention.attention_fwd(q, k, v, slopes, causal, scale, allow_tf32)


def _attention_bwd(
    do: Tensor,
    q: Tensor,
    k: Tensor,
    v: Tensor,
    out: Tensor,
    lse: Tensor,
    slopes: Tensor | None,
    causal: bool,
    scale: float,
    allow_tf32: bool,
) -> tuple[Tensor, Tensor, Tensor]:
    do, q, k, v = (_aligned(t) for t in (do, q, k, v))
    return attention.attention_bwd(do, q, k, v, out, lse, slopes, causal, scale, allow_tf32)


_same_schema(
    attention.attention_fwd,
    lambda q, k, v, slopes, causal, scale, allow_tf32: (
        attention.heads_interleaved(q.shape, q.dtype, q.device),
        _like(q, q.shape[:3], torch.float32),
    ),
    impl=_attention_fwd,
)


# attention_bwd's grads= (three views written in place, aliasing one buffer) has no schema
# here: the packed attention's backward is its own op, attention_bwd_packed, below.
def _attention_bwd_traced(do, q, k, v, out, lse, slopes, causal, scale, allow_tf32, grads=None):
    if grads is not None:
        raise ValueError(
            "attention_bwd's grads= (in-place gradients) cannot be used under torch.compile: "
            "use attention_bwd_packed"
        )
    return _op("attention_bwd")(do, q, k, v, out, lse, slopes, causal, scale, allow_tf32)


_register(
    attention.attention_bwd,
    _attention_bwd,
    lambda do, q, k, v, out, lse, slopes, causal, scale, allow_tf32: (
        _like(q, q.shape),
        attention.heads_interleaved(k.shape, q.dtype, q.device),
        attention.heads_interleaved(v.shape, q.dtype, q.device),
    ),
    _attention_bwd_traced,
)


def _attention_bwd_packed(
    do: Tensor,
    qkv: Tensor,
    out: Tensor,
    lse: Tensor,
    slopes: Tensor | None,
    causal: bool,
    scale: float,
    allow_tf32: bool,
) -> Tensor:
    do, qkv = _aligned(do), _aligned(qkv)
    return attention.attention_bwd_packed(do, qkv, out, lse, slopes, causal, scale, allow_tf32)


_same_schema(
    attention.attention_bwd_packed,
    lambda do, qkv, out, lse, slopes, causal, scale, allow_tf32: _like(qkv, qkv.shape),
    impl=_attention_bwd_packed,
)


# ---------------------------------------------------------------------------------------------
# Launchers with optional outputs, an ``out`` argument, or a torch.Size / config argument: an
# adapter op with a schema, and a traced twin with the launcher's own signature.
# ---------------------------------------------------------------------------------------------


def _layer_norm_fwd(
    x: Tensor,
    residual: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    out_dtype: torch.dtype,
    sum_dtype: torch.dtype | None,
    shape: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    y, s, mean, rstd = layer_norm.layer_norm_fwd(
        x, residual, weight, bias, eps, out_dtype, sum_dtype, torch.Size(shape)
    )
    return y, _none(x) if s is None else s, mean, rstd


def _layer_norm_fwd_fake(x, residual, weight, bias, eps, out_dtype, sum_dtype, shape):
    rows = (x.shape[0],)
    s = _none(x) if residual is None else _like(x, shape, sum_dtype)
    return (
        _like(x, shape, out_dtype),
        s,
        _like(x, rows, torch.float32),
        _like(x, rows, torch.float32),
    )


def _layer_norm_fwd_traced(x, residual, weight, bias, eps, out_dtype, sum_dtype, shape):
    y, s, mean, rstd = _op("layer_norm_fwd")(
        x, residual, weight, bias, eps, out_dtype, sum_dtype, list(shape)
    )
    return y, _present(s, residual is not None), mean, rstd


_register(layer_norm.layer_norm_fwd, _layer_norm_fwd, _layer_norm_fwd_fake,
          _layer_norm_fwd_traced)  # fmt: skip


def _layer_norm_bwd(
    x: Tensor,
    weight: Tensor | None,
    dy: Tensor,
    ds: Tensor | None,
    mean: Tensor,
    rstd: Tensor,
    dx_dtype: torch.dtype | None,
    dr_dtype: torch.dtype | None,
    dw_dtype: torch.dtype | None,
    db_dtype: torch.dtype | None,
    shape: list[int],
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    grads = layer_norm.layer_norm_bwd(
        x, weight, dy, ds, mean, rstd, dx_dtype, dr_dtype, dw_dtype, db_dtype, torch.Size(shape)
    )
    return tuple(_none(x) if g is None else g for g in grads)


def _layer_norm_bwd_fake(
    x, weight, dy, ds, mean, rstd, dx_dtype, dr_dtype, dw_dtype, db_dtype, shape
):
    n = (x.shape[1],)
    return tuple(
        _none(x) if dtype is None else _like(x, size, dtype)
        for dtype, size in ((dx_dtype, shape), (dr_dtype, shape), (dw_dtype, n), (db_dtype, n))
    )


def _layer_norm_bwd_traced(
    x, weight, dy, ds, mean, rstd, dx_dtype, dr_dtype, dw_dtype, db_dtype, shape
):
    grads = _op("layer_norm_bwd")(
        x, weight, dy, ds, mean, rstd, dx_dtype, dr_dtype, dw_dtype, db_dtype, list(shape)
    )
    dtypes = (dx_dtype, dr_dtype, dw_dtype, db_dtype)
    return tuple(_present(g, d is not None) for g, d in zip(grads, dtypes, strict=True))


_register(layer_norm.layer_norm_bwd, _layer_norm_bwd, _layer_norm_bwd_fake,
          _layer_norm_bwd_traced)  # fmt: skip


def _cross_entropy_bwd(
    logits: Tensor,
    target: Tensor,
    lse: Tensor,
    grad: Tensor,
    ignore_index: int,
    label_smoothing: float,
    out: Tensor,
) -> None:
    cross_entropy.cross_entropy_bwd(logits, target, lse, grad, ignore_index, label_smoothing,
                                    out=out)  # fmt: skip


def _cross_entropy_bwd_traced(logits, target, lse, grad, ignore_index, label_smoothing, out=None):
    if out is None:
        out = empty(logits.shape, logits.dtype, logits.device)
    _op("cross_entropy_bwd")(logits, target, lse, grad, ignore_index, label_smoothing, out)
    return out


_register(cross_entropy.cross_entropy_bwd, _cross_entropy_bwd, lambda *args: None,
          _cross_entropy_bwd_traced, mutates_args=("out",))  # fmt: skip


def _lm_head_loss_grad(
    logits: Tensor, n_cols: int, target: Tensor, grad: Tensor, ignore_index: int,
    label_smoothing: float,
) -> tuple[Tensor, Tensor]:
    return linear_cross_entropy.lm_head_loss_grad(logits, n_cols, target, grad, ignore_index,
                                                  label_smoothing)  # fmt: skip


def _lm_head_loss_grad_traced(logits, n_cols, target, grad, ignore_index, label_smoothing):
    return _op("lm_head_loss_grad")(logits, n_cols, target, grad, ignore_index, label_smoothing)


_register(
    linear_cross_entropy.lm_head_loss_grad,
    _lm_head_loss_grad,
    lambda logits, *args: (_like(logits, logits.shape[:1], torch.float32),
                           _like(logits, logits.shape[:1], torch.float32)),
    _lm_head_loss_grad_traced,
    mutates_args=("logits",),
)


def _scale_cast(a: Tensor, scale: Tensor | None, out: Tensor) -> None:
    linear_cross_entropy.scale_cast(a, scale, out)


def _scale_cast_traced(a, scale=None, out=None, out_dtype=None):
    if out is None:
        out = empty(a.shape, out_dtype or a.dtype, a.device)
    _op("scale_cast")(a, scale, out)
    return out


_register(linear_cross_entropy.scale_cast, _scale_cast, lambda *args: None, _scale_cast_traced,
          mutates_args=("out",))  # fmt: skip


def _gemm(
    a: Tensor,
    b: Tensor,
    out_dtype: torch.dtype,
    bias: Tensor | None,
    activation_name: str | None,
    save_z: bool,
    use_tma: bool | None,
) -> tuple[Tensor, Tensor]:
    c, d = matmul.gemm(a, b, out_dtype, bias=bias, activation_name=activation_name,
                       save_z=save_z, use_tma=use_tma)  # fmt: skip
    return c, _none(a) if d is None else d


def _gemm_fake(a, b, out_dtype, bias, activation_name, save_z, use_tma):
    shape = (*a.shape[:2], a.shape[-2], b.shape[-1]) if a.dim() == 5 else (a.shape[0], b.shape[1])
    return _like(a, shape, out_dtype), _like(a, shape, out_dtype) if save_z else _none(a)


@torch.library.custom_op("tritonformer::gemm_out", mutates_args=("out",), tags=_TAGS)
def _gemm_out(a: Tensor, b: Tensor, out_dtype: torch.dtype, out: Tensor, accumulate: bool,
              use_tma: bool | None) -> None:
    """gemm writing (or, with accumulate, adding) a plain product into a caller's ``out``."""
    matmul.gemm(a, b, out_dtype, out=out, accumulate=accumulate, use_tma=use_tma)


_gemm_out.register_fake(lambda *args: None)


def _gemm_traced(a, b, out_dtype, *, bias=None, activation_name=None, save_z=False,
                 out=None, accumulate=False, config=None, use_tma=None):  # fmt: skip
    if config is not None:
        raise ValueError("gemm's config (a tuning override) cannot be used under torch.compile")
    if out is not None:
        if bias is not None or activation_name is not None or save_z:
            raise ValueError("gemm's out= takes plain products only under torch.compile")
        _op("gemm_out")(a, b, out_dtype, out, accumulate, use_tma)
        return matmul.GemmResult(out, None)
    c, d = _op("gemm")(a, b, out_dtype, bias, activation_name, save_z, use_tma)
    return matmul.GemmResult(c, _present(d, save_z))


_register(matmul.gemm, _gemm, _gemm_fake, _gemm_traced)


def _dz_and_dbias(
    dy: Tensor, z: Tensor | None, activation_name: str | None, dz: bool,
    dbias_dtype: torch.dtype | None,
) -> tuple[Tensor, Tensor]:
    dz_out, db = matmul.dz_and_dbias(dy, z, activation_name, dz, dbias_dtype)
    return _none(dy) if dz_out is None else dz_out, _none(dy) if db is None else db


def _dz_and_dbias_fake(dy, z, activation_name, dz, dbias_dtype):
    return (
        _like(dy, dy.shape) if dz else _none(dy),
        _none(dy) if dbias_dtype is None else _like(dy, dy.shape[1:], dbias_dtype),
    )


def _dz_and_dbias_traced(dy, z, activation_name, dz, dbias_dtype):
    dz_out, db = _op("dz_and_dbias")(dy, z, activation_name, dz, dbias_dtype)
    return _present(dz_out, dz), _present(db, dbias_dtype is not None)


_register(matmul.dz_and_dbias, _dz_and_dbias, _dz_and_dbias_fake, _dz_and_dbias_traced)
