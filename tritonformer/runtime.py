"""Where the kernels run, and the argument checks every op shares.

On a machine without a CUDA device, importing tritonformer switches Triton to its
interpreter (``TRITON_INTERPRET=1``) before any kernel is defined: the same ``@triton.jit``
code then runs on CPU tensors, slowly but exactly. This module must be imported before any
module under ``tritonformer.kernels``; ``tritonformer/__init__.py`` does so.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
from collections.abc import Callable, Iterable, Iterator

import torch

log = logging.getLogger("tritonformer")


def _decide_interpret() -> bool:
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        return True
    if torch.cuda.is_available():
        return False
    os.environ["TRITON_INTERPRET"] = "1"
    log.warning(
        "tritonformer: no CUDA device found; the Triton kernels run in Triton's interpreter "
        "on CPU tensors (correct but slow)."
    )
    return True


#: True when the kernels run in Triton's interpreter (tensors live on the CPU).
INTERPRET: bool = _decide_interpret()
#: The device type the kernels take tensors on: "cpu" under the interpreter, else "cuda".
DEVICE_TYPE: str = "cpu" if INTERPRET else "cuda"

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def default_device() -> torch.device:
    """The device tensors should live on for the kernels: the current CUDA device, or the CPU."""
    return torch.device(DEVICE_TYPE)


@functools.cache
def _capability(index: int) -> tuple[int, int]:
    return torch.cuda.get_device_capability(index)


def is_hopper(device: torch.device) -> bool:
    """True for a compiled (not interpreted) run on an sm_90 device."""
    if INTERPRET or device.type != "cuda":
        return False
    return (
        _capability(device.index if device.index is not None else torch.cuda.current_device())[0]
        == 9
    )


@functools.cache
def num_sms(device_index: int) -> int:
    """Number of streaming multiprocessors of a CUDA device (1 under the interpreter)."""
    if INTERPRET:
        return 1
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def cdiv(a: int, b: int) -> int:
    """ceil(a / b) for launch grids: plain Python, since ``triton.cdiv`` is a constexpr-function
    wrapper costing microseconds per call on the host, which adds up on every launch."""
    return -(-a // b)


def device_index(t: torch.Tensor) -> int:
    return t.device.index if t.device.index is not None else 0


def autocast_dtype() -> torch.dtype | None:
    """The autocast dtype in effect for the kernels' device type, or None when autocast is off."""
    if torch.is_autocast_enabled(DEVICE_TYPE):
        return torch.get_autocast_dtype(DEVICE_TYPE)
    return None


# torch.backends.cuda.matmul.allow_tf32's getter (0.1 us against ~2 us for the attribute)
_allow_tf32 = getattr(torch._C, "_get_cublas_allow_tf32", None) or (
    lambda: torch.backends.cuda.matmul.allow_tf32)


def fp32_uses_tf32() -> bool:
    """Whether an fp32 matmul may use TF32, following ``torch.backends.cuda.matmul.allow_tf32``."""
    return (not INTERPRET) and _allow_tf32()


# Output poisoning: the tests turn it on so that an element a kernel forgets to write reads
# as NaN instead of whatever the allocator left there.
_poison_outputs = False


def set_poison_outputs(enabled: bool) -> None:
    """Make ``empty``/``empty_like`` fill new float tensors with NaN (for tests)."""
    global _poison_outputs
    _poison_outputs = enabled


def empty(shape, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``torch.empty`` for kernel outputs; NaN-filled while poisoning is on."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if _poison_outputs and t.is_floating_point():
        t.fill_(float("nan"))
    return t


def empty_like(t: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A contiguous output shaped like ``t`` (see ``empty``)."""
    return empty(t.shape, dtype or t.dtype, t.device)


# Value checks: a few ops validate tensor *values* (token ids, class targets) with a reduction
# read back to the host (``DeviceFlag``). That read waits for the device to reach the check,
# so the CPU cannot run ahead of the GPU by more than the op; it cannot be captured in a CUDA
# graph and breaks a torch.compile graph, so callers whose data is already validated (the
# trainer checks its corpus once) turn it off. With the checks off, the kernels still flag a
# bad value on the device (the loss comes out NaN), never a silent answer.
_value_checks = True


def value_checks_enabled() -> bool:
    """Whether ops may sync with the device to validate tensor values (see ``no_value_checks``).

    False inside ``no_value_checks()``, while torch.compile traces, and during CUDA graph
    capture."""
    if not _value_checks or torch.compiler.is_compiling():
        return False
    return INTERPRET or not torch.cuda.is_current_stream_capturing()


@contextlib.contextmanager
def no_value_checks() -> Iterator[None]:
    """Within this block, ops skip host-side checks of tensor values (no device syncs)."""
    global _value_checks
    previous, _value_checks = _value_checks, False
    try:
        yield
    finally:
        _value_checks = previous


class DeviceFlag:
    """A 0-d bool tensor's value on its way to the host: copied to pinned host memory without
    waiting when made, read by ``read()``, which waits for that copy only (an event), not for
    the kernels queued after it. An op starts its value check this way before it queues its
    kernels and reads it after, so the device does not idle while the host checks (a plain
    ``bool(t)`` there would wait with nothing queued: the fused LM head's benchmark on the
    H100 went from 7.94 to 7.47 ms, in another call, docs/perf/matmul.md v13)."""

    def __init__(self, value: torch.Tensor):
        self._event = None
        if value.device.type != "cuda":
            self._host = value
            return
        self._host = torch.empty((), dtype=torch.bool, pin_memory=True)
        self._host.copy_(value, non_blocking=True)
        self._event = torch.cuda.Event()
        self._event.record()

    def read(self) -> bool:
        if self._event is not None:
            self._event.synchronize()
        return bool(self._host)


# ---------------------------------------------------------------------------------------------
# Argument checks. Each raises TypeError (wrong type/dtype) or ValueError (wrong shape, device,
# value) with a message naming the argument, what it was and what is allowed.
# ---------------------------------------------------------------------------------------------


def check_tensor(
    t: object,
    name: str,
    *,
    ndim: int | tuple[int, ...] | None = None,
    min_ndim: int | None = None,
    dtypes: tuple[torch.dtype, ...] | None = FLOAT_DTYPES,
    allow_empty: bool = False,
) -> torch.Tensor:
    """Check that ``t`` is a tensor the kernels can take and return it.

    Checks the type, the device (the kernels' device type), the number of dimensions, the
    dtype (one of ``dtypes``; None allows any) and, unless ``allow_empty``, that it has
    elements.
    """
    # (on every op's call: the common path keeps to the cheapest tensor attributes)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not (t.is_cpu if INTERPRET else t.is_cuda):
        where = "CPU (kernels run in Triton's interpreter)" if INTERPRET else "CUDA"
        raise ValueError(f"{name} must be on a {where} device, got a tensor on {t.device}")
    if ndim is not None and (t.dim() != ndim if isinstance(ndim, int) else t.dim() not in ndim):
        want = " or ".join(str(a) for a in ((ndim,) if isinstance(ndim, int) else ndim))
        raise ValueError(f"{name} must have {want} dimensions, got shape {tuple(t.shape)}")
    if min_ndim is not None and t.dim() < min_ndim:
        raise ValueError(
            f"{name} must have at least {min_ndim} dimension(s), got shape {tuple(t.shape)}"
        )
    if dtypes is not None and t.dtype not in dtypes:
        names = ", ".join(str(d).replace("torch.", "") for d in dtypes)
        raise TypeError(f"{name} must have dtype in ({names}), got {t.dtype}")
    if not allow_empty and t.numel() == 0:
        raise ValueError(f"{name} must not be empty, got shape {tuple(t.shape)}")
    return t


def _mismatch(tensors: dict[str, torch.Tensor | None], attr: str) -> tuple | None:
    """(name, value, first name, first value) of the first non-None tensor whose ``attr``
    differs from the first one's, or None when they all agree."""
    first = None
    for name, t in tensors.items():
        if t is None:
            continue
        value = getattr(t, attr)
        if first is None:
            first = name, value
        elif value != first[1]:
            return name, value, *first
    return None


def check_same_device(**tensors: torch.Tensor | None) -> None:
    """Check that all the given (non-None) tensors are on one device."""
    bad = _mismatch(tensors, "device")
    if bad is not None:
        name, device, first, first_device = bad
        raise ValueError(f"{name} is on {device} but {first} is on {first_device}; "
                         "all tensors must be on one device")


def check_same_dtype(**tensors: torch.Tensor | None) -> None:
    """Check that all the given (non-None) tensors share one dtype."""
    bad = _mismatch(tensors, "dtype")
    if bad is not None:
        name, dtype, first, first_dtype = bad
        raise TypeError(f"{name} has dtype {dtype} but {first} has {first_dtype}; "
                        "they must match (use torch.autocast to mix precisions)")


def check_choice(value: object, name: str, allowed: Iterable[object]) -> None:
    allowed = tuple(allowed)
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


# ---------------------------------------------------------------------------------------------
# Kernel launches. Triton 3.6's ``kernel[grid](...)`` binds and specialises every argument,
# formats a cache-key string and reads its knobs on every call: ~18 us of host time per launch
# on the H200 machine, against ~6 us to launch the compiled kernel it returns (measured
# 2026-11-26), which is most of a memory-bound op's budget at small sizes. That compiled
# kernel's own launcher is Python around a C function: on the H100 machine 7.3 us against
# ~3 us for the C call, 18.6 us against 5.0 us with four host TMA descriptors (the Gluon
# GEMM), so ``launch`` calls the C function itself where it finds it (``_direct_launch``).
# ``bind`` goes one step further for callers that can key a launch's arguments cheaply (the
# GEMM, by its plan and the tensors' addresses): the arguments are built and expanded once.
# ---------------------------------------------------------------------------------------------
_compiled_kernels: dict[tuple, tuple] = {}  # (id(kernel), device, key) -> (compiled kernel,
# stream getter, hooks, direct launch or None)
# the current CUDA device's index: torch's private binding where it has one (0.2 us against
# ~1.5 us for torch.cuda.current_device, which checks its lazy initialisation first)
_current_device = getattr(torch._C, "_cuda_getDevice", None) or torch.cuda.current_device


def _specialization(a: object) -> object:
    """What Triton specialises a compiled kernel on for one runtime argument: a tensor's dtype
    and 16-byte alignment; a host-side TMA descriptor's element type and box (its layout
    follows from them); an int's being 1, its divisibility by 16 and its width; else the
    argument's type (a float is fp32, None a constexpr)."""
    if isinstance(a, torch.Tensor):
        return a.dtype, a.data_ptr() % 16 == 0
    if isinstance(getattr(a, "base", None), torch.Tensor):  # a TensorDescriptor
        return type(a), a.base.dtype, tuple(a.block_shape)
    if type(a) is int:
        return a == 1, a % 16 == 0, -(2**31) <= a < 2**31
    return type(a)


class _Direct:
    """Launches one compiled kernel as Triton's CUDA launcher (``compiled.run``) does, but
    without its per-call Python: ``c_launch``, the C launch function, with the launcher's
    ``fixed`` arguments; the host TMA descriptors among the kernel's arguments (``descs``:
    (argument index, Triton's metadata of it), ascending) encoded by ``encode``, Triton's own
    ``make_tensordesc_arg``."""

    def __init__(self, c_launch: Callable, fixed: tuple, descs: tuple = (),
                 encode: Callable | None = None) -> None:
        self.c_launch, self.fixed, self.descs, self.encode = c_launch, fixed, descs, encode
        # encoded descriptors by (argument, address, shape, strides, padding): a training step
        # launches the same GEMMs on the same (reallocated) addresses, and encoding one costs
        # ~2.5 us of host time against ~0.5 us for the lookup. The rest of what the encoding
        # reads (dtype, block, swizzle) is fixed per compiled kernel, in the metadata.
        self.encoded: dict[tuple, list] = {}

    def expand(self, args: tuple) -> tuple | list:
        """The kernel's arguments as the C function takes them: each host TMA descriptor
        replaced by its encoding (the CUtensorMap, then its shape and strides)."""
        if not self.descs:
            return args
        expanded = list(args)
        for i, meta in reversed(self.descs):
            d = args[i]
            key = (i, d.base.data_ptr(), *d.shape, *d.strides, d.padding)
            arg = self.encoded.get(key)
            if arg is None:
                if len(self.encoded) > 4096:  # many shapes or addresses: stay bounded
                    self.encoded.clear()
                arg = self.encoded[key] = self.encode(d, meta)
            expanded[i : i + 1] = arg
        return expanded

    def __call__(self, gx: int, gy: int, gz: int, stream: int, *args) -> None:
        self.c_launch(gx, gy, gz, stream, *self.fixed, *self.expand(args))


def _direct_launch(compiled) -> _Direct | None:
    """The direct launcher of ``compiled`` (see ``_Direct``), or None where Triton's launcher
    is not the one this follows (Triton 3.6's ``CudaLauncher``) or needs scratch memory
    allocated per launch: then ``compiled.run``."""
    run = compiled.run
    try:
        fn, coop, pdl = run.launch, run.launch_cooperative_grid, run.launch_pdl
        if run.global_scratch_size or run.profile_scratch_size:
            return None
    except AttributeError:
        return None
    fixed = (compiled.function, coop, pdl, None, None, compiled.packed_metadata, None, None,
             None)
    code = getattr(fn, "__code__", None)
    if code is None:  # the C function itself: no tensor descriptors
        return _Direct(fn, fixed)
    # Triton's wrapper that expands each tensor descriptor argument (driver.py,
    # wrap_handle_tensordesc): its C function, which arguments are descriptors and their metadata
    cells = dict(zip(code.co_freevars, (c.cell_contents for c in fn.__closure__ or ()),
                     strict=True))
    try:
        from triton.backends.nvidia.driver import make_tensordesc_arg

        c_launch, indices = cells["launcher"], sorted(cells["tensordesc_indices"])
        metas = cells["tensordesc_meta"]
    except (ImportError, KeyError):
        return None
    return _Direct(c_launch, fixed, tuple(zip(indices, metas, strict=True)), make_tensordesc_arg)


def _check_constexprs(kernel, args: tuple, constexprs: dict) -> None:
    """The constexprs must be the kernel's last parameters, in order (``launch`` passes them
    positionally after args when it calls a compiled kernel itself)."""
    if list(kernel.arg_names[len(args) :]) != list(constexprs):
        raise ValueError(f"{kernel.__name__}: constexprs must be its last parameters")


def launch(kernel, grid: int | tuple[int, ...], args: tuple, constexprs: dict, *,
           key: object = None, **options) -> None:
    """``kernel[grid](*args, **constexprs, **options)``, dispatched through Triton once per
    specialisation.

    ``grid`` is a program count or a tuple of up to three. ``args`` are the kernel's runtime
    arguments in order and ``constexprs`` its ``tl.constexpr`` parameters, which must be the
    last ones of its signature, in order. The first call with a given key goes through Triton
    and keeps the compiled kernel it returns; later ones launch that kernel directly. The key
    is the device plus ``key`` when the caller gives one (a hashable that fixes every
    argument's specialisation, the constexprs and the options, e.g. a cached launch plan),
    else the constexprs, the options and each argument's specialisation (see
    ``_specialization``). Under the interpreter, or while Triton launch hooks are installed
    (profilers), every call goes through Triton.
    """
    grid = (grid,) if isinstance(grid, int) else grid
    if INTERPRET:
        _check_constexprs(kernel, args, constexprs)
        kernel[grid](*args, **constexprs, **options)
        return
    device = _current_device()
    if key is None:
        key = (tuple(constexprs.values()), tuple(options.items()),
               tuple(map(_specialization, args)))  # fmt: skip
    key = (id(kernel), device, key)  # (hashing a JITFunction formats its cache key: ~1 us)
    entry = _compiled_kernels.get(key)
    if entry is None or entry[2].calls:
        compiled = kernel[grid](*args, **constexprs, **options)
        _check_constexprs(kernel, args, constexprs)
        from triton import knobs
        from triton.runtime import driver

        hooks = knobs.runtime.launch_enter_hook
        if len(_compiled_kernels) > 8192:  # many shapes (variable lengths): stay bounded
            _compiled_kernels.clear()
        _compiled_kernels[key] = (compiled, driver.active.get_current_stream, hooks,
                                  _direct_launch(compiled))
        return
    compiled, current_stream, _, direct = entry
    if direct is not None:
        direct(*grid, *(1,) * (3 - len(grid)), current_stream(device), *args,
               *constexprs.values())
        return
    compiled.run(
        *grid, *(1,) * (3 - len(grid)), current_stream(device), compiled.function,
        compiled.packed_metadata, None, None, None, *args, *constexprs.values(),
    )  # fmt: skip


def bind(kernel, grid: int | tuple[int, ...], args: tuple, constexprs: dict, *, key: object,
         **options) -> Callable[[], bool] | None:
    """``launch(kernel, grid, args, constexprs, key=key, **options)``, and a function that
    repeats that launch: the same compiled kernel, grid and argument values (tensors by the
    addresses they have now, host TMA descriptors as encoded now), on the stream current at
    the time of its call. It returns False without launching where ``launch`` would not
    launch directly (another current device, Triton launch hooks installed): the caller then
    launches through ``launch``. None (after launching) under the interpreter and where the
    compiled kernel has no direct launcher.

    What the caller saves is building the arguments: it keeps the function under whatever
    fixes them (e.g. a launch plan and the tensors' addresses), which must also fix ``key``.
    """
    launch(kernel, grid, args, constexprs, key=key, **options)
    if INTERPRET:
        return None
    device = _current_device()
    _, current_stream, hooks, direct = _compiled_kernels[(id(kernel), device, key)]
    if direct is None:
        return None
    grid = (grid,) if isinstance(grid, int) else grid
    grid = (*grid, *(1,) * (3 - len(grid)))
    values = [a.data_ptr() if isinstance(a, torch.Tensor) else a
              for a in direct.expand((*args, *constexprs.values()))]
    c_launch, fixed = direct.c_launch, direct.fixed

    def again() -> bool:
        if hooks.calls or _current_device() != device:
            return False
        c_launch(*grid, current_stream(device), *fixed, *values)
        return True

    return again
