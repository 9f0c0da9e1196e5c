import importlib
import itertools

import pytest
import torch

from helpers import (
    ALL_DTYPES,
    DEVICE,
    DTYPES,
    ON_GPU,
    assert_close,
    f64,
    gpu,
    randn,
    requires_gpu,
    requires_grad_copy,
)
from tritonformer import nn, ops, reference
from tritonformer.kernels import matmul as km

ACTS = [None, "relu", "gelu", "gelu_tanh"]


def dtype_id(dtype: torch.dtype) -> str:
    return {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}[dtype]


def ref64(t: torch.Tensor) -> torch.Tensor:
    """float64 leaf copy for the reference: on the GPU for the GPU tier (fast), else CPU."""
    return t.detach().double().requires_grad_(t.requires_grad) if ON_GPU else f64(t)


def leaf(shape, dtype, transpose=False, step=1, requires_grad=True, scale=1.0):
    """A leaf tensor and the (possibly transposed / strided) view of it the op is fed.

    transpose: the leaf is stored with its last two dims swapped (the view is its .mT);
    step: the leaf is stored with ``step`` times as many last-dim columns (view takes every
    step-th one).
    """
    store = list(shape)
    if transpose:
        store[-2], store[-1] = store[-1], store[-2]
    store[-1] *= step
    t = randn(*store, dtype=dtype, requires_grad=requires_grad, scale=scale)
    return t, lambda u: (u[..., ::step].mT if transpose else u[..., ::step])


def check(fn, ref_fn, leaves, views, dtype, names, out_dtype=None, autocast=None, scale=1.0):
    """Run fn on views of the leaves, backward with random dY; compare output and all grads."""
    ctx = (torch.autocast(DEVICE.type, dtype=autocast) if autocast
           else torch.autocast(DEVICE.type, enabled=False))
    with ctx:
        y = fn(*[v(t) for t, v in zip(leaves, views, strict=True)])
    assert y.dtype == (out_dtype or dtype)
    dy = randn(*y.shape, dtype=y.dtype, scale=scale)
    y.backward(dy)

    l64 = [ref64(t) for t in leaves]
    y64 = ref_fn(*[v(t) for t, v in zip(l64, views, strict=True)])
    y64.backward(dy.double().to(y64.device))

    lb = [requires_grad_copy(t) for t in leaves]
    with ctx:
        yb = ref_fn(*[v(t) for t, v in zip(lb, views, strict=True)])
    yb.backward(dy)

    assert_close(y, y64, yb, f"{names[0]} out")
    for t, t64, tb, name in zip(leaves, l64, lb, names[1:], strict=True):
        if t.requires_grad:
            assert t.grad.dtype == t.dtype
            assert_close(t.grad, t64.grad, tb.grad, f"{names[0]} d{name}")
        else:
            assert t.grad is None


def check_matmul(a_shape, b_shape, dtype, ta=False, tb=False, sa=1, sb=1, need=(True, True)):
    a, va = leaf(a_shape, dtype, ta, sa, need[0])
    b, vb = leaf(b_shape, dtype, tb, sb, need[1])
    check(ops.matmul, reference.matmul, [a, b], [va, vb], dtype, ["matmul", "a", "b"])


def check_linear(x_shape, out_features, dtype, bias=True, act=None, need=(True, True, True),
                 tx=False, autocast=None):
    in_features = x_shape[-1]
    x, vx = leaf(x_shape, dtype, tx, requires_grad=need[0])
    w, vw = leaf((out_features, in_features), dtype, requires_grad=need[1],
                 scale=in_features**-0.5)
    leaves, views, names = [x, w], [vx, vw], ["linear", "x", "weight"]
    if bias:
        b, vbias = leaf((out_features,), dtype, requires_grad=need[2])
        leaves, views, names = leaves + [b], views + [vbias], names + ["bias"]

    def fn(*t):
        return ops.linear(*t, activation=act)

    def ref_fn(*t):
        return reference.linear(t[0], t[1], t[2] if bias else None, act)

    check(fn, ref_fn, leaves, views, dtype, names, out_dtype=autocast, autocast=autocast)


# ------------------------------------------------------------------------------------------
# CPU tier (also run on the GPU with bf16 added)
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("mkn", [(1, 7, 65), (65, 1000, 7), (1000, 65, 1), (7, 65, 1000)])
def test_matmul_2d(mkn, dtype):
    m, k, n = mkn
    check_matmul((m, k), (k, n), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("ta,tb,sa,sb", [(True, False, 1, 1), (False, True, 1, 1),
                                         (True, True, 1, 1), (False, False, 2, 3)])
def test_matmul_transposed_strided(dtype, ta, tb, sa, sb):
    check_matmul((65, 33), (33, 7), dtype, ta=ta, tb=tb, sa=sa, sb=sb)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("a_shape,b_shape,ta", [
    ((2, 3, 65, 7), (7, 33), False),  # rows flatten: one 2-D GEMM, dB over all rows
    ((2, 3, 65, 7), (7, 33), True),  # rows don't flatten: batched, dB reduced in-kernel
    ((3, 65, 7), (1, 7, 33), False),  # b's batch dims all 1
    ((3, 65, 7), (3, 7, 33), False),  # batched
    ((2, 1, 65, 7), (3, 7, 33), True),  # broadcast both ways, reduced in the gradients
    ((2, 3, 7, 65), (2, 1, 65, 7), False),
])
def test_matmul_batched(a_shape, b_shape, ta, dtype):
    check_matmul(a_shape, b_shape, dtype, ta=ta)


def test_matmul_needs_input_grad():
    check_matmul((2, 65, 7), (7, 33), torch.float32, need=(False, True))
    check_matmul((2, 65, 7), (2, 7, 33), torch.float32, need=(True, False))


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("bias", [True, False])
def test_linear(act, bias, dtype):
    check_linear((2, 33, 65), 7, dtype, bias=bias, act=act)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_linear_shapes(dtype):
    check_linear((1000, 7), 65, dtype, act="gelu_tanh")
    check_linear((65,), 1000, dtype, act="relu")  # a single row
    check_linear((7, 1000), 1, dtype, act="gelu", tx=True)  # transposed x


@pytest.mark.parametrize("need", [(True, False, True), (True, False, False), (False, True, True),
                                  (False, False, True)])
def test_linear_needs_input_grad(need):
    check_linear((3, 65), 33, torch.float32, act="gelu_tanh", need=need)


def test_linear_frozen_costs_no_gemm(monkeypatch):
    calls = []
    real = km.gemm
    ops_matmul = importlib.import_module("tritonformer.ops.matmul")  # ops.matmul is the function
    monkeypatch.setattr(ops_matmul, "gemm", lambda *a, **k: calls.append(k) or real(*a, **k))
    x = randn(5, 16, requires_grad=True)
    w = randn(8, 16)  # frozen weight, no bias: only the forward and dX GEMMs run
    ops.linear(x, w).sum().backward()
    assert len(calls) == 2
    calls.clear()
    x = randn(5, 16)  # x without grad: forward and dW GEMMs
    w.requires_grad_(True)
    ops.linear(x, w).sum().backward()
    assert len(calls) == 2
    calls.clear()  # with an activation, dZ comes from the elementwise kernel: still 2 GEMMs
    ops.linear(x, w, randn(8, requires_grad=True), "gelu").sum().backward()
    assert len(calls) == 2


def test_autocast():
    # under torch.autocast, linear/matmul run in the autocast dtype; fp32 grads come back
    check_linear((3, 33, 65), 17, torch.float32, act="gelu_tanh", autocast=torch.float16)
    a, va = leaf((2, 65, 33), torch.float32)
    b, vb = leaf((33, 7), torch.float32, transpose=True)
    check(ops.matmul, reference.matmul, [a, b], [va, vb], torch.float32, ["matmul", "a", "b"],
          out_dtype=torch.float16, autocast=torch.float16)


@pytest.mark.parametrize("use_tma", [False, True])
@pytest.mark.parametrize("ta,tb", [(False, False), (True, True), (True, False)])
def test_gemm_kernels_epilogue_split(use_tma, ta, tb):
    """Both kernels directly (the TMA one runs in the interpreter too): the bias + activation
    epilogue that also stores Z, and forced split-K with its fp32 workspace reduction."""
    if use_tma and ON_GPU and torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the TMA kernel needs sm_90")
    m, k, n = 72, 136, 40
    h = torch.float16
    a = randn(k, m, dtype=h).t() if ta else randn(m, k, dtype=h)
    b = randn(n, k, dtype=h).t() if tb else randn(k, n, dtype=h)
    bias = randn(n, dtype=h)
    z = a.double() @ b.double() + bias.double()
    r = km.gemm(a, b, torch.float32, bias=bias, activation_name="gelu_tanh", save_z=True,
                use_tma=use_tma)
    tol = dict(rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(r.c.double(), reference.gelu_tanh(z), **tol)
    torch.testing.assert_close(r.z.double(), z, **tol)
    cfg = km.GemmConfig(32, 32, 32, 1, 4, split_k=3)
    for out_dtype in (torch.float32, torch.float16):
        r = km.gemm(a, b, out_dtype, config=cfg, use_tma=use_tma)
        assert r.c.dtype == out_dtype and r.z is None
        tol = dict(rtol=2e-3, atol=2e-2) if out_dtype == torch.float16 else tol
        torch.testing.assert_close(r.c.double(), a.double() @ b.double(), **tol)
    for split in (1, 3):  # C += A @ B into a given fp32 output, through the epilogue or reduce
        c0 = randn(m, n)
        cfg = km.GemmConfig(32, 32, 32, 1, 4, split_k=split)
        r = km.gemm(a, b, torch.float32, out=c0.clone(), accumulate=True, config=cfg,
                    use_tma=use_tma)
        torch.testing.assert_close(r.c.double(), c0.double() + a.double() @ b.double(),
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("m,n", [(1, 7), (600, 40), (300, 520)])
@pytest.mark.parametrize("transposed", [False, True])
@pytest.mark.parametrize("act", ["gelu_tanh", "gelu", "relu"])
def test_dz_and_dbias(m, n, transposed, act):
    """The linear backward's elementwise pass: dZ = dY * act'(Z) and the column sums of dZ,
    over several row ranges (whose fp32 partial sums a second launch adds) and column
    blocks; without an activation, dbias = the column sums of dY."""
    h = torch.float16
    dy = randn(n, m, dtype=h).t() if transposed else randn(m, n, dtype=h)
    z = randn(m, n, dtype=h)
    f = getattr(reference, act)

    def dz_of(zt, dyt):  # dY * act'(Z) by autograd through the reference
        return torch.autograd.functional.vjp(f, zt, dyt)[1]

    want, base = dz_of(z.double(), dy.double()), dz_of(z.float(), dy.float())
    dz, db = km.dz_and_dbias(dy, z, act, True, torch.float32)
    assert_close(dz, want, base.half(), "dZ")
    assert_close(db, want.sum(0), base.sum(0), "dbias")
    dz, db = km.dz_and_dbias(dy, z, act, True, None)
    assert db is None
    assert_close(dz, want, base.half(), "dZ without dbias")
    dz, db = km.dz_and_dbias(dy, None, None, False, h)
    assert dz is None and db.dtype == h
    assert_close(db, dy.double().sum(0), dy.sum(0), "dbias without activation")
    with pytest.raises(ValueError, match="needs z"):
        km.dz_and_dbias(dy, None, act, True, None)


def test_linear_matmul_through_tma_kernel(monkeypatch):
    """ops.linear / ops.matmul with the TMA kernel selected, as on sm_90 (here interpreted)."""
    monkeypatch.setattr(km, "is_hopper", lambda device: True)
    assert km.tma_eligible(randn(65, 40, dtype=torch.float16), randn(40, 24, dtype=torch.float16),
                           torch.float16)
    check_linear((65, 40), 24, torch.float16, act="gelu")
    check_matmul((3, 65, 40), (40, 24), torch.float16, tb=True)


def test_gluon_tiling_choice():
    """The Gluon kernel's schedule per shape (132 SMs): one wave of narrower tiles for the
    weight gradients that 128 x 256 tiles under-fill, whole tiles plus split rows of tiles
    where the tiles overflow one wave, even K splits for the smallest, and 128 x 256 tiles
    whole once they fill the SMs twice (as two 128-column accumulators, with a fourth stage,
    below three times)."""
    t128, t192, t256, deep = (km.GluonTiling(2, 128, 0, 5, 1.0),
                              km.GluonTiling(3, 128, 0, 4, 1.03),
                              km.GluonTiling(2, 256, 0, 3, 1.0),
                              km.GluonTiling(2, 128, 128, 4, 1.0))
    expect = {
        (2304, 768): (t128, 108, 1, False),  # 108 tiles of 128 x 128
        (3072, 768): (t128, 132, 11, False),  # 132 whole, the last 12 (2 rows) split 11 ways
        (768, 3072): (t128, 132, 11, True),  # the same, the last 12 being 2 columns
        (3072, 1024): (t192, 128, 1, False),  # 128 tiles of 192 x 128
        (2048, 2048): (t256, 128, 1, False),  # 128 tiles of 128 x 256
        (768, 768): (t128, 0, 3, False),  # 36 tiles, K split 3 ways
        (1024, 1024): (t128, 0, 2, False),
    }
    for (m, n), want in expect.items():
        assert km.gluon_tiling(m, n, 16384, 132) == km.GluonSchedule(*want), (m, n)
    for t in (*km.GLUON_TILINGS, km.GLUON_DEEP):
        assert t.smem(2) <= km.GLUON_SMEM  # every tiling fits a 16-bit C
    # forward and dX (K 3072): 384 tiles (2.9 waves), 512 tiles; weight gradients (K 16384):
    # 384 tiles, the LM head's 1179 tiles; all whole
    for (m, n, k), t in {(16384, 768, 3072): deep, (16384, 1024, 3072): t256,
                         (6144, 2048, 16384): t256, (50304, 768, 16384): t256}.items():
        tiles = m // 128 * -(-n // 256)
        assert km.gluon_tiling(m, n, k, 132) == km.GluonSchedule(t, tiles, 1), (m, n, k)
    # for a bias or an activation, whole tiles only
    for (m, n), want in expect.items():
        schedule = km.gluon_tiling(m, n, 16384, 132, whole=True)
        if want[1] == -(-m // (64 * want[0].consumers)) * -(-n // want[0].block_n):
            assert schedule == km.GluonSchedule(*want), (m, n)
        else:
            assert schedule.sk_splits == 1 and schedule.dp_tiles > 0, (m, n)


def test_split_k_choice():
    assert km.split_k_for(tiles=2000, k_steps=12, sms=132) == 1
    assert km.split_k_for(tiles=18, k_steps=256, sms=132) > 4  # d x d weight gradient
    assert km.split_k_for(tiles=18, k_steps=4, sms=132) == 1  # too little K to split


def test_linear_module_matches_torch():
    torch.manual_seed(0)
    ref = torch.nn.Linear(65, 33, device=DEVICE)
    torch.manual_seed(0)
    ours = nn.Linear(65, 33, device=DEVICE)
    assert ours.state_dict().keys() == ref.state_dict().keys()
    for key in ref.state_dict():
        assert torch.equal(ours.state_dict()[key], ref.state_dict()[key])
    ref.load_state_dict(nn.Linear(65, 33, device=DEVICE).state_dict())
    ours.load_state_dict(ref.state_dict())
    x = randn(4, 65)
    torch.testing.assert_close(ours(x), ref(x))
    no_bias = nn.Linear(65, 33, bias=False, activation="relu", device=DEVICE, dtype=torch.float16)
    assert no_bias.bias is None and no_bias.weight.dtype == torch.float16
    assert list(no_bias.state_dict()) == list(torch.nn.Linear(65, 33, bias=False).state_dict())
    torch.testing.assert_close(no_bias(x.half()), torch.relu(x.half() @ no_bias.weight.t()),
                               rtol=1e-3, atol=1e-3)


def test_matmul_linear_bad_input():
    a, b = randn(5, 7), randn(7, 3)
    with pytest.raises(ValueError, match="a's last dimension"):
        ops.matmul(a, randn(6, 3))
    with pytest.raises(ValueError, match="do not broadcast"):
        ops.matmul(randn(2, 5, 7), randn(3, 7, 3))
    with pytest.raises(TypeError, match="b has dtype"):
        ops.matmul(a, b.half())
    with pytest.raises(ValueError, match="b must be on"):
        ops.matmul(a, torch.empty(7, 3, device="meta"))
    with pytest.raises(ValueError, match="a must have at least 2"):
        ops.matmul(randn(7), b)
    with pytest.raises(TypeError, match="a must have dtype"):
        ops.matmul(a.long(), b)
    w = randn(3, 7)
    with pytest.raises(ValueError, match="activation"):
        ops.linear(a, w, activation="swish")
    with pytest.raises(ValueError, match="in_features"):
        ops.linear(randn(5, 6), w)
    with pytest.raises(ValueError, match="weight must have 2"):
        ops.linear(a, randn(3, 7, 1))
    with pytest.raises(ValueError, match="bias must have"):
        ops.linear(a, w, randn(4))
    with pytest.raises(TypeError, match="weight has dtype"):
        ops.linear(a, w.half())
    with pytest.raises(ValueError, match="activation"):
        nn.Linear(7, 3, activation="tanh")(a)


# ------------------------------------------------------------------------------------------
# GPU tier: real sizes, every dtype, both kernels
# ------------------------------------------------------------------------------------------


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
@pytest.mark.parametrize("tokens,d_in,d_out,act", [(16384, 768, 2304, None),
                                                   (4096, 768, 3072, "gelu_tanh"),
                                                   (4096, 3072, 768, None)])
def test_linear_gpu(tokens, d_in, d_out, act, dtype):
    check_linear((tokens, d_in), d_out, dtype, act=act)


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_weight_gradient_shape_gpu(dtype):
    # the dW GEMM of a 3072 -> 768 projection over 16384 tokens: (768 x 16384) @ (16384 x 3072)
    check_matmul((768, 16384), (16384, 3072), dtype, ta=True)


@gpu
@requires_gpu
def test_split_k_gpu():
    """Weight-gradient shapes through split-K, as chosen on this GPU (TMA reduce-adds on sm_90,
    a workspace under torch.use_deterministic_algorithms): against float64, every output
    dtype, accumulating into an fp32 C, and bitwise repeatable when deterministic."""
    for d_in, d_out in ((768, 768), (1000, 520)):
        dy, x = randn(16384, d_out, dtype=torch.bfloat16), randn(16384, d_in, dtype=torch.bfloat16)
        ref = dy.double().t() @ x.double()
        for det in (False, True):
            torch.use_deterministic_algorithms(det)
            try:
                r1 = km.gemm(dy.t(), x, torch.bfloat16).c
                r32 = km.gemm(dy.t(), x, torch.float32).c
                c0 = randn(d_out, d_in)
                acc = km.gemm(dy.t(), x, torch.float32, out=c0.clone(), accumulate=True).c
                again = km.gemm(dy.t(), x, torch.bfloat16).c
            finally:
                torch.use_deterministic_algorithms(False)
            name = f"dW {d_out}x{d_in} deterministic={det}"
            base32 = torch.mm(dy.t(), x, out_dtype=torch.float32)  # cuBLAS, fp32 out
            assert_close(r1, ref, dy.t() @ x, name)
            assert_close(r32, ref, base32, name + " fp32")
            assert_close(acc, c0.double() + ref, c0 + base32, name + " acc")
            if det:
                assert torch.equal(r1, again)


def _tiling_id(t: km.GluonTiling) -> str:
    return f"{64 * t.consumers}x{t.block_n}+{t.tail_n}s{t.num_stages}"


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
@pytest.mark.parametrize("t", [*km.GLUON_TILINGS, km.GLUON_DEEP], ids=_tiling_id)
def test_gluon_kernel_gpu(dtype, t, monkeypatch):
    """Every Gluon tiling (one test each: their many compilations spread over pytest-xdist's
    workers) with every kind of schedule (whole tiles; every tile's K split; whole tiles, then
    the last row or column of tiles split) on odd shapes, each operand given directly or
    through its transposed storage, against float64 and cuBLAS."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon GEMM needs sm_90")
    shapes = ((1000, 520, 776), (136, 40, 4000), (8, 8, 64), (2304, 768, 16384))
    for (m, n, k), ta, tb in itertools.product(shapes, (True, False), (False, True)):
        a = randn(k, m, dtype=dtype).t() if ta else randn(m, k, dtype=dtype)
        b = randn(n, k, dtype=dtype).t() if tb else randn(k, n, dtype=dtype)
        ref = a.double() @ b.double()
        n_cols = -(-n // (t.block_n + t.tail_n))
        tiles = -(-m // (64 * t.consumers)) * n_cols
        n_rows = tiles // n_cols
        # whole tiles; every tile split; whole tiles, then the last row (or column) of
        # tiles split (C staged within the workspace's buffers)
        for dp, split, cols, mixed in ((tiles, 1, False, False), (0, 3, False, False),
                                       (tiles - n_cols, 3, False, True),
                                       (tiles - n_rows, 3, True, True)):
            staged = 2 if dp == tiles else 4
            if t.smem(staged) > km.GLUON_SMEM or (mixed and dp == 0):
                continue
            schedule = km.GluonSchedule(t, dp, split, cols)
            monkeypatch.setattr(km, "gluon_tiling", lambda *_, s=schedule, **__: s)
            km._PLANS.clear()
            c = km.gemm(a, b, dtype).c
            assert next(iter(km._PLANS.values())).kernel is km.gemm_gluon_kernel
            name = f"{m}x{n}x{k} ta={ta} tb={tb} {schedule}"
            assert_close(c, ref, a @ b, name)
            if mixed:
                continue
            # a bias: in the Gluon epilogue on whole tiles; split tiles take the Triton
            # kernel
            bias = randn(n, dtype=dtype)
            c = km.gemm(a, b, dtype, bias=bias).c
            kernel = list(km._PLANS.values())[-1].kernel
            assert kernel is (km.gemm_gluon_kernel if dp == tiles else km.gemm_tma_kernel)
            assert_close(c, ref + bias.double(), torch.addmm(bias, a, b), name + " bias")
            if dp == tiles and tb and not ta:  # bias and GELU in the epilogue, Z
                # stored too (a linear forward's layout; each variant compiles anew)
                c, d = km.gemm(a, b, dtype, bias=bias, activation_name="gelu_tanh",
                               save_z=True)
                assert list(km._PLANS.values())[-1].kernel is km.gemm_gluon_kernel
                z, zb = ref + bias.double(), torch.addmm(bias, a, b)
                assert_close(c, reference.gelu_tanh(z), reference.gelu_tanh(zb),
                             name + " gelu")
                assert_close(d, z, zb, name + " z")
    km._PLANS.clear()


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=dtype_id)
def test_gluon_activations_gpu(dtype, monkeypatch):
    """A linear forward's bias and activation on the Gluon kernel's whole tiles, Z returned or
    not: in its epilogue (GLUON_EPILOGUE_ACTIVATIONS) or by the separate pass over Z (exact
    GELU), against float64 and torch's linear-then-activation."""
    if torch.cuda.get_device_capability()[0] != 9:
        pytest.skip("the Gluon GEMM needs sm_90")
    t = km.GLUON_TILINGS[0]
    for m, n, k in ((1000, 520, 776), (8192, 4096, 1024)):
        tiles = -(-m // (64 * t.consumers)) * -(-n // (t.block_n + t.tail_n))
        schedule = km.GluonSchedule(t, tiles, 1, False)
        monkeypatch.setattr(km, "gluon_tiling", lambda *_, s=schedule, **__: s)
        x, w, bias = randn(m, k, dtype=dtype), randn(n, k, dtype=dtype), randn(n, dtype=dtype)
        z64, z = x.double() @ w.double().t() + bias.double(), torch.addmm(bias, x, w.t())
        for act, save_z in itertools.product(("relu", "gelu", "gelu_tanh"), (True, False)):
            km._PLANS.clear()
            c, d = km.gemm(x, w.t(), dtype, bias=bias, activation_name=act, save_z=save_z)
            plan = next(iter(km._PLANS.values()))
            assert plan.kernel is km.gemm_gluon_kernel
            fused = act in km.GLUON_EPILOGUE_ACTIVATIONS
            assert plan.activation_pass == (None if fused else act)
            name = f"{m}x{n}x{k} {act} save_z={save_z} fused={fused}"
            assert_close(c, reference.activation(z64, act), reference.activation(z, act), name)
            if save_z:
                assert_close(d, z64, z, name + " z")
            else:
                assert d is None
    km._PLANS.clear()


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_direct_launch_gpu(dtype):
    """After its first call, runtime.launch starts a compiled kernel through the C launch
    function itself (``runtime._direct_launch``): host TMA descriptors expanded (the Gluon and
    Triton TMA GEMMs), plain pointers (the split-K reduction, the portable kernel). Fresh
    operands and fresh (poisoned) outputs every call, against float64."""
    from tritonformer import runtime

    shapes = ((704, 304, 9000), (3000, 768, 1000), (1001, 65, 333))  # split, whole, portable
    for (m, n, k), out_dtype, rep in itertools.product(shapes, (dtype, torch.float32), range(3)):
        a, b = randn(k, m, dtype=dtype).t(), randn(k, n, dtype=dtype)
        base = torch.mm(a, b, out_dtype=out_dtype) if out_dtype != dtype else a @ b
        assert_close(km.gemm(a, b, out_dtype).c, a.double() @ b.double(), base,
                     f"{m}x{n}x{k} -> {out_dtype} call {rep}")
    import triton

    gemms = (km.gemm_gluon_kernel, km.gemm_tma_kernel, km.gemm_kernel, km.reduce_splits_kernel)
    launched = [entry for key, entry in runtime._compiled_kernels.items()
                if key[0] in map(id, gemms)]
    assert launched
    if triton.__version__.startswith("3.6"):  # the launcher _direct_launch follows
        assert all(entry[3] is not None for entry in launched)


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_bound_launch_gpu(dtype):
    """Calls on the same addresses repeat the launches bound by the first one (runtime.bind,
    km._BOUND): new contents at those addresses are read and the (poisoned) output is written
    in full, every call; with a Triton launch hook installed, calls go through Triton again."""
    from triton import knobs

    shapes = ((704, 304, 9000), (3000, 768, 1000), (1001, 65, 333))  # split, whole, portable
    for (m, n, k), out_dtype in itertools.product(shapes, (dtype, torch.float32)):
        a = torch.empty(k, m, dtype=dtype, device="cuda").t()
        b = torch.empty(k, n, dtype=dtype, device="cuda")
        c = torch.empty(m, n, dtype=out_dtype, device="cuda")
        hook_calls = []
        for rep in range(4):
            a.copy_(randn(m, k, dtype=dtype))
            b.copy_(randn(k, n, dtype=dtype))
            c.fill_(float("nan"))
            hooked = rep == 3
            if hooked:
                knobs.runtime.launch_enter_hook.add(hook_calls.append)
            try:
                km.gemm(a, b, out_dtype, out=c)
            finally:
                knobs.runtime.launch_enter_hook.remove(hook_calls.append)
            base = torch.mm(a, b, out_dtype=out_dtype) if out_dtype != dtype else a @ b
            assert_close(c, a.double() @ b.double(), base,
                         f"{m}x{n}x{k} -> {out_dtype} call {rep} hooked={hooked}")
        addresses = (a.data_ptr(), b.data_ptr(), c.data_ptr())
        assert any(key[1:4] == addresses for key in km._BOUND), f"{m}x{n}x{k} not bound"
        assert hook_calls, f"{m}x{n}x{k}: the hooked call did not go through Triton"


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_layouts_gpu(dtype):
    check_matmul((4096, 1000), (1000, 1032), dtype, ta=True, tb=True)  # TMA, both transposed
    check_matmul((4096, 1001), (1001, 1000), dtype, sa=2)  # strided, unaligned: portable
    check_matmul((4, 12, 1024, 64), (4, 12, 64, 1024), dtype, tb=True)  # attention-like
    check_matmul((8, 1024, 768), (768, 2304), dtype, ta=True)  # rows don't flatten


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", ALL_DTYPES, ids=dtype_id)
def test_both_kernels_gpu(dtype):
    a, b = randn(4096, 2048, dtype=dtype), randn(1024, 2048, dtype=dtype).t()
    hopper = torch.cuda.get_device_capability()[0] == 9
    tma = km.tma_eligible(a, b, dtype)  # fp32 takes TMA only with TF32 allowed
    assert tma == (hopper and (dtype != torch.float32 or torch.backends.cuda.matmul.allow_tf32))
    ref = a.double() @ b.double()
    base = a @ b
    for use_tma in [False] + [True] * tma:
        for act, bias in [(None, None), ("gelu_tanh", randn(1024, dtype=dtype))]:
            c, d = km.gemm(a, b, dtype, bias=bias, activation_name=act,
                           save_z=act is not None, use_tma=use_tma)
            if act is None:
                assert_close(c, ref, base, f"gemm tma={use_tma}")
            else:
                z = ref + bias.double()
                assert_close(c, reference.gelu_tanh(z), reference.gelu_tanh(base + bias),
                             f"gemm+gelu tma={use_tma}")
                assert_close(d, z, base + bias, f"gemm z tma={use_tma}")


@gpu
@requires_gpu
def test_fp32_tf32_switch_gpu(monkeypatch):
    a, b = randn(2048, 4096), randn(4096, 1024)
    ref = a.double() @ b.double()
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", False)
    ieee = ops.matmul(a, b)
    assert_close(ieee, ref, a @ b, "fp32 ieee")
    assert torch.dist(ieee.double(), ref) / ref.norm() < 1e-5
    monkeypatch.setattr(torch.backends.cuda.matmul, "allow_tf32", True)
    tf32 = ops.matmul(a, b)
    assert_close(tf32, ref, a @ b, "fp32 tf32")
    assert torch.dist(tf32.double(), ref) / ref.norm() > 1e-5  # TF32 products were used
