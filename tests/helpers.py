"""Shared test tools: the device, dtypes, random data and the error standard.

The standard (flash-attention's rule): an op's error against a float64 reference is at most
twice PyTorch's own error at the same dtype, plus one unit roundoff of that dtype.
"""

from __future__ import annotations

import pytest
import torch

from tritonformer.runtime import default_device

DEVICE = default_device()
ON_GPU = DEVICE.type == "cuda"
# bf16 runs on the GPU only: Triton 3.6's interpreter returns garbage for bf16 tl.dot.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if ON_GPU else [])
ALL_DTYPES = [torch.float32, torch.float16, torch.bfloat16]

# The GPU tier: real sizes, all dtypes. Skipped (and reported as skipped) without a GPU.
gpu = pytest.mark.gpu
requires_gpu = pytest.mark.skipif(not ON_GPU, reason="GPU tier needs a CUDA device")


def roundoff(dtype: torch.dtype) -> float:
    return torch.finfo(dtype).eps


def randn(*shape: int, dtype=torch.float32, scale: float = 1.0, requires_grad=False, gen=None):
    """Fresh normal data on the test device (never zeros)."""
    t = torch.randn(*shape, dtype=torch.float32, device=DEVICE, generator=gen) * scale
    return t.to(dtype).requires_grad_(requires_grad)


def f64(t: torch.Tensor, requires_grad: bool | None = None) -> torch.Tensor:
    """A float64 CPU leaf copy of ``t`` for the reference (keeps requires_grad by default)."""
    rg = t.requires_grad if requires_grad is None else requires_grad
    return t.detach().double().cpu().requires_grad_(rg)


def requires_grad_copy(t: torch.Tensor) -> torch.Tensor:
    """A leaf copy of ``t`` at its own dtype and device, for PyTorch's baseline."""
    return t.detach().clone().requires_grad_(t.requires_grad)


def rel_err(actual: torch.Tensor, ref: torch.Tensor) -> float:
    a = actual.detach().double().cpu()
    r = ref.detach().double().cpu()
    denom = r.norm().item()
    return (a - r).norm().item() / (denom if denom > 0 else 1.0)


def assert_close(actual, ref, baseline, name: str, factor: float = 2.0,
                 min_tol: float = 0.0) -> None:
    """Check ``actual`` against the float64 ``ref``: error <= factor * baseline's + roundoff
    (or ``min_tol``, when larger).

    ``baseline`` is PyTorch's own result at actual's dtype (the same computation through
    torch). NaN or inf in ``actual`` fails unless ``ref`` has it in the same place.
    ``min_tol`` is for outputs of one or a few values, where PyTorch's own error is a single
    sample that can happen to be near zero.
    """
    assert actual.shape == ref.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(ref.shape)}"
    a = actual.detach().double().cpu()
    r = ref.detach().double().cpu()
    bad = ~torch.isfinite(a)
    ref_bad = ~torch.isfinite(r)
    assert torch.equal(bad, ref_bad), f"{name}: {int(bad.sum())} non-finite values (NaN=unwritten?)"
    if ref_bad.any():
        assert torch.equal(a[ref_bad], r[ref_bad]), f"{name}: non-finite values differ"
        a, r = a[~ref_bad], r[~ref_bad]
        baseline = baseline.detach().double().cpu()[~ref_bad]
    err = rel_err(a, r)
    base = rel_err(baseline, r)
    tol = max(factor * base + roundoff(actual.dtype), min_tol)
    assert err <= tol, (
        f"{name}: relative error {err:.3e} > {tol:.3e} "
        f"(PyTorch's own at {actual.dtype}: {base:.3e})"
    )
