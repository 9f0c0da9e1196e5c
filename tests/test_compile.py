"""torch.compile of the Triton ops and model (``tritonformer/library.py``).

Every test compiles with ``fullgraph=True``, so a graph break fails it, and checks the
compiled forward and backward against eager Triton. The kernels are the same in both (the
compiled graph runs them as the custom ops ``tritonformer::<launcher>``), so the results
agree to within a unit roundoff of the output's dtype; a recording backend also checks that
the custom ops, not a fallback, ran. CPU tier: aot_eager (the kernels in the interpreter,
the glue in eager PyTorch) and one inductor compile of a one-layer model. GPU tier: the
GPT-2 124M model under bf16 autocast with the default inductor backend.
"""

from __future__ import annotations

import ast
import contextlib
import inspect
import pathlib
import sys

import pytest
import torch
from functorch.compile import make_boxed_func
from torch._dynamo.backends.common import aot_autograd

from helpers import DEVICE, gpu, randn, rel_err, requires_gpu, roundoff
from tritonformer import Transformer, TransformerConfig, library, ops

OPS_DIR = pathlib.Path(inspect.getfile(ops)).parent


@pytest.fixture(autouse=True)
def _fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def recording_backend(seen: set[str]):
    """aot_eager that adds the name of every op in the forward and backward graphs to
    ``seen`` (a mutating custom op appears wrapped in auto_functionalized)."""

    def compiler(gm: torch.fx.GraphModule, example_inputs):
        for n in gm.graph.nodes:
            if n.op == "call_function":
                functionalized = "auto_functionalized" in str(n.target)
                seen.add(str(n.args[0] if functionalized else n.target))
        return make_boxed_func(gm.forward)

    return aot_autograd(fw_compiler=compiler, bw_compiler=compiler)


def custom_ops(seen: set[str]) -> set[str]:
    return {s.split(".")[1] for s in seen if s.startswith("tritonformer.")}


def assert_same(compiled: torch.Tensor, eager: torch.Tensor, name: str) -> None:
    """Compiled and eager agree within a unit roundoff of the dtype, NaN-free."""
    assert compiled.shape == eager.shape and compiled.dtype == eager.dtype, name
    assert torch.isfinite(compiled).all(), f"{name}: non-finite values (unwritten?)"
    err = rel_err(compiled, eager)
    assert err <= roundoff(compiled.dtype), f"{name}: compiled vs eager rel. error {err:.2e}"


def run_fwd_bwd(fn, args, backend, autocast: torch.dtype | None = None):
    """fn(*args) (under autocast to ``autocast`` if given) and the gradients of every arg
    that requires one, from leaf copies of args; the backward seeds each output with fixed
    random data. Autocast is entered outside the compiled function, as a training loop does
    (entered inside it, torch 2.13's dynamo fails on our backwards' stride checks: "Global
    autocast state changed while dynamo tracing")."""
    leaves = [
        a.detach().clone().requires_grad_(a.requires_grad) if isinstance(a, torch.Tensor) else a
        for a in args
    ]
    f = fn if backend is None else torch.compile(fn, backend=backend, fullgraph=True)
    ctx = torch.autocast(DEVICE.type, dtype=autocast) if autocast else contextlib.nullcontext()
    with ctx:
        out = f(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    cot = [torch.randn(o.shape, device=DEVICE, generator=gen).to(o.dtype) for o in outs]
    torch.autograd.backward(outs, cot)
    grads = [a.grad for a in leaves if isinstance(a, torch.Tensor) and a.requires_grad]
    return outs, grads


def check_compiled(fn, args, expect_ops: set[str], autocast: torch.dtype | None = None) -> None:
    seen: set[str] = set()
    outs, grads = run_fwd_bwd(fn, args, recording_backend(seen), autocast)
    ref_outs, ref_grads = run_fwd_bwd(fn, args, None, autocast)
    for i, (o, r) in enumerate(zip(outs, ref_outs, strict=True)):
        assert_same(o, r, f"output {i}")
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        assert g is not None, f"gradient {i} missing"
        assert_same(g, r, f"gradient {i}")
    assert expect_ops <= custom_ops(seen), f"ran {custom_ops(seen)}, expected {expect_ops}"


def _targets(lead: tuple[int, ...], v: int) -> torch.Tensor:
    t = torch.randint(0, v, lead, device=DEVICE)
    t.view(-1)[::3] = -100
    return t


# (id, function, args factory, custom ops its forward and backward must run)
OP_CASES = [
    ("gelu_tanh", lambda x: ops.gelu(x, "tanh"), lambda: [randn(7, 65, requires_grad=True)],
     {"activation_fwd", "activation_bwd"}),
    ("relu_fp16", ops.relu, lambda: [randn(3, 5, 33, dtype=torch.float16, requires_grad=True)],
     {"activation_fwd", "activation_bwd"}),
    ("dropout", lambda x: ops.dropout(x, 0.25, seed=3),
     lambda: [randn(7, 65, requires_grad=True)], {"dropout"}),
    ("softmax_dim0", lambda x: ops.softmax(x.t(), 0),
     lambda: [randn(65, 7, requires_grad=True)], {"softmax_fwd", "softmax_bwd"}),
    ("layer_norm", lambda x, w, b: ops.layer_norm(x, w, b),
     lambda: [randn(2, 5, 65, requires_grad=True), randn(65, requires_grad=True),
              randn(65, requires_grad=True)],
     {"layer_norm_fwd", "layer_norm_bwd"}),
    ("add_layer_norm_mixed", lambda x, r, w: ops.add_layer_norm(x, r, w, None),
     lambda: [randn(3, 65, dtype=torch.float16, requires_grad=True),
              randn(3, 65, requires_grad=True), randn(65, requires_grad=True)],
     {"layer_norm_fwd", "layer_norm_bwd"}),
    ("cross_entropy_mean_smooth", lambda x, t: ops.cross_entropy(x, t, label_smoothing=0.1),
     lambda: [randn(2, 7, 65, requires_grad=True), _targets((2, 7), 65)],
     {"cross_entropy_fwd", "cross_entropy_bwd"}),
    ("cross_entropy_none", lambda x, t: ops.cross_entropy(x, t, reduction="none"),
     lambda: [randn(7, 65, requires_grad=True), _targets((7,), 65)],
     {"cross_entropy_fwd", "cross_entropy_bwd"}),
    ("linear_gelu_bias", lambda x, w, b: ops.linear(x, w, b, "gelu"),
     lambda: [randn(3, 5, 33, requires_grad=True), randn(17, 33, requires_grad=True),
              randn(17, requires_grad=True)],
     {"gemm", "dz_and_dbias"}),
    ("linear_frozen_x", lambda x, w: ops.linear(x, w, None, "relu"),
     lambda: [randn(7, 33), randn(17, 33, requires_grad=True)], {"gemm", "dz_and_dbias"}),
    ("matmul_flat", ops.matmul,
     lambda: [randn(2, 3, 5, 33, requires_grad=True), randn(33, 17, requires_grad=True)],
     {"gemm"}),
    ("matmul_broadcast", ops.matmul,
     lambda: [randn(2, 3, 5, 33, requires_grad=True), randn(3, 33, 17, requires_grad=True)],
     {"gemm"}),
    ("attention_alibi_kv", lambda q, k, v: ops.attention(
        q.transpose(1, 2), k, v, causal=True, alibi_slopes=ops.alibi_slopes(2)),
     lambda: [randn(1, 5, 2, 16, requires_grad=True), randn(1, 2, 9, 16, requires_grad=True),
              randn(1, 2, 9, 16, requires_grad=True)],
     {"attention_fwd", "attention_bwd"}),
    ("attention_packed_alibi_padded_rows", lambda x: ops.attention_packed(
        x[..., :96].view(2, 9, 3, 2, 16), causal=True, alibi_slopes=ops.alibi_slopes(2)),
     lambda: [randn(2, 9, 104, requires_grad=True)], {"attention_fwd", "attention_bwd_packed"}),
    ("linear_cross_entropy_mean", lambda x, w, t: ops.linear_cross_entropy(x, w, t),
     lambda: [randn(2, 9, 32, requires_grad=True), randn(70, 32, requires_grad=True),
              _targets((2, 9), 70)],
     {"gemm", "gemm_out", "lm_head_loss_grad", "scale_cast"}),
    ("linear_cross_entropy_none",
     lambda x, w, t: ops.linear_cross_entropy(x, w, t, reduction="none"),
     lambda: [randn(9, 32, requires_grad=True), randn(70, 32, requires_grad=True),
              _targets((9,), 70)],
     {"gemm", "gemm_out", "cross_entropy_fwd", "cross_entropy_bwd"}),
]  # fmt: skip


@pytest.mark.parametrize("fn, make_args, expect", [c[1:] for c in OP_CASES],
                         ids=[c[0] for c in OP_CASES])  # fmt: skip
def test_op_compiles_without_graph_breaks(fn, make_args, expect):
    check_compiled(fn, make_args(), expect)


def test_ops_under_autocast():
    def f(x, w, b, lw, t):
        h = ops.layer_norm(ops.linear(x, w, b, "gelu_tanh"), lw)
        return ops.cross_entropy(ops.linear(h, w.t()), t)

    args = [
        randn(2, 7, 24, requires_grad=True),
        randn(40, 24, requires_grad=True),
        randn(40, requires_grad=True),
        randn(40, requires_grad=True),
        _targets((2, 7), 24),
    ]
    check_compiled(f, args, {"gemm", "layer_norm_fwd", "cross_entropy_bwd"}, torch.float16)


def test_every_launcher_the_ops_call_is_compilable():
    """Each function an ops/ file imports from kernels/ is registered (library.COMPILABLE)."""
    imported = set()
    for path in OPS_DIR.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("kernels"):
                module = sys.modules[f"tritonformer.{node.module}"]
                imported |= {
                    (node.module, a.name) for a in node.names
                    if inspect.isfunction(getattr(module, a.name))
                }  # fmt: skip
    assert imported, "found no kernel imports in tritonformer/ops"
    missing = {f"{m}.{n}" for m, n in imported if n not in library.COMPILABLE}
    assert not missing, f"launchers without a custom op in library.py: {sorted(missing)}"


def _opcheck_cases():
    r = lambda *s: randn(*s)  # noqa: E731
    t = lambda n, v: torch.randint(0, v, (n,), device=DEVICE)  # noqa: E731
    wide = r(3, 33, 17)
    return {
        "activation_fwd": (r(7, 65), "gelu_tanh", torch.float16),
        "activation_bwd": (r(7, 65), r(7, 65), "gelu"),
        "dropout": (r(7, 65), 0.3, 11),
        "softmax_fwd": (r(65, 7).t(), torch.float32),
        "softmax_bwd": (torch.softmax(r(7, 65), -1), r(7, 65), torch.float16),
        "cross_entropy_fwd": (r(7, 65), t(7, 65), -100, 0.1),
        "cross_entropy_bwd": (r(7, 65), t(7, 65), r(7), r(7), -100, 0.1, r(7, 65)),
        "lm_head_loss_grad": (r(7, 64), 61, t(7, 61), r(7), -100, 0.1),
        "scale_cast": (r(9), torch.tensor(2.0, device=DEVICE), r(9)),
        "attention_fwd": (r(1, 2, 9, 16), r(1, 2, 11, 16), r(1, 2, 11, 16), None, True, 0.25,
                          False),
        "attention_bwd": (r(1, 2, 9, 16), r(1, 2, 9, 16), r(1, 2, 11, 16), r(1, 2, 11, 16),
                          r(1, 2, 9, 16), r(1, 2, 9), None, True, 0.25, False),
        "attention_bwd_packed": (r(2, 2, 9, 16), r(2, 9, 3, 2, 16), r(2, 2, 9, 16), r(2, 2, 9),
                                 torch.ones(2, device=DEVICE) / 4, False, 0.25, False),
        "layer_norm_fwd": (r(6, 65), r(6, 65), r(65), None, 1e-5, torch.float16,
                           torch.float32, [2, 3, 65]),
        "layer_norm_bwd": (r(6, 65), r(65), r(6, 65), None, r(6), r(6).abs() + 1,
                           torch.float32, None, torch.float32, torch.float16, [2, 3, 65]),
        "gemm": (r(7, 33), r(17, 33).t(), torch.float32, r(17), "gelu", True, None),
        "gemm_batched": (r(2, 1, 33, 5).transpose(-1, -2).expand(2, 3, 5, 33)[:, None],
                         wide.expand(2, 3, 33, 17)[:, None], torch.float16, None, None, False,
                         None),
        "dz_and_dbias": (r(7, 17), r(7, 17), "gelu_tanh", True, torch.float32),
    }  # fmt: skip


@pytest.mark.parametrize("name", sorted(_opcheck_cases()))
def test_custom_op_fake_matches_real(name):
    """torch.library.opcheck: schema (mutations declared), fake shapes/dtypes/strides equal
    to the real outputs', and the op traced by AOT dispatch."""
    args = _opcheck_cases()[name]
    op = getattr(torch.ops.tritonformer, name.removesuffix("_batched")).default
    torch.library.opcheck(op, args)


def test_compiled_dropout_draws_a_new_mask_each_call():
    f = torch.compile(lambda x: ops.dropout(x, 0.5), backend="aot_eager", fullgraph=True)
    x = randn(4096)
    a, b = f(x), f(x)
    assert not torch.equal(a == 0, b == 0)
    for y in (a, b):
        assert torch.equal(y[y != 0], 2 * x[y != 0])


def _tiny_model(**overrides) -> Transformer:
    torch.manual_seed(0)
    return Transformer(TransformerConfig.preset("tiny", **overrides)).to(DEVICE)


def _loss_and_grads(model, f, idx, tgt, autocast: torch.dtype | None = None):
    """The model's loss and parameter gradients through f (the model or its compiled form),
    the forward under autocast to ``autocast`` if given; with targets the model returns no
    logits (its loss is linear_cross_entropy's)."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(DEVICE.type, dtype=autocast, enabled=autocast is not None):
        _, loss = f(idx, tgt)
    loss.backward()
    return loss, {n: p.grad for n, p in model.named_parameters()}


def _check_model(model, compiled, idx, tgt):
    loss, grads = _loss_and_grads(model, compiled, idx, tgt)
    ref_loss, ref_grads = _loss_and_grads(model, model, idx, tgt)
    assert_same(loss, ref_loss, "loss")
    for n, g in grads.items():
        assert_same(g, ref_grads[n], f"grad {n}")


def test_tiny_model_aot_eager_fullgraph():
    model = _tiny_model()
    seen: set[str] = set()
    compiled = torch.compile(model, backend=recording_backend(seen), fullgraph=True)
    idx = torch.randint(0, 256, (2, 17), device=DEVICE)
    _check_model(model, compiled, idx, torch.randint(0, 256, (2, 17), device=DEVICE))
    expect = {
        "gemm",
        "dz_and_dbias",
        "attention_fwd",
        "attention_bwd_packed",
        "layer_norm_fwd",
        "layer_norm_bwd",
        "lm_head_loss_grad",  # the model's loss: the fused LM head, "mean"
        "scale_cast",
    }
    assert expect <= custom_ops(seen), custom_ops(seen)


def test_tiny_model_logits_dynamic_length():
    """The logits path (no targets) with a symbolic sequence length: one graph for two
    lengths. (With targets, linear_cross_entropy's host-side chunk loop specializes the
    number of tokens: one graph per length.)"""
    model = _tiny_model(n_layer=1)
    compiled = torch.compile(lambda i: model(i)[0], backend="aot_eager", fullgraph=True)
    for T in (17, 11):
        idx = torch.randint(0, 256, (2, T), device=DEVICE)
        torch._dynamo.mark_dynamic(idx, 1)
        runs = []
        for f in (compiled, lambda i: model(i)[0]):
            model.zero_grad(set_to_none=True)
            with torch._dynamo.config.patch(error_on_recompile=T != 17):
                logits = f(idx)
            gen = torch.Generator(device=DEVICE).manual_seed(T)
            logits.backward(torch.randn(logits.shape, device=DEVICE, generator=gen))
            runs.append((logits, {n: p.grad for n, p in model.named_parameters()}))
        (logits, grads), (ref_logits, ref_grads) = runs
        assert_same(logits, ref_logits, f"logits T={T}")
        for n, g in grads.items():
            assert_same(g, ref_grads[n], f"grad {n} T={T}")


def test_one_layer_model_inductor():
    model = _tiny_model(n_layer=1)
    compiled = torch.compile(model, fullgraph=True)  # the default backend: inductor
    idx = torch.randint(0, 256, (2, 13), device=DEVICE)
    _check_model(model, compiled, idx, idx)


@gpu
@requires_gpu
def test_gpt2_bf16_inductor_matches_eager_gpu():
    """GPT-2's sizes (d_model 768, V 50257, T 1024) under inductor against eager, in bf16,
    with 2 of its 12 layers: compiling all 12 ran past 6 minutes on the device's CPU."""
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(TransformerConfig.preset("gpt2", n_layer=2))
    compiled = torch.compile(model, fullgraph=True)
    idx = torch.randint(0, model.config.vocab_size, (4, 1024), device="cuda")
    tgt = torch.randint(0, model.config.vocab_size, (4, 1024), device="cuda")
    tol = 2 * roundoff(torch.bfloat16)
    loss, grads = _loss_and_grads(model, compiled, idx, tgt, torch.bfloat16)
    ref_loss, ref_grads = _loss_and_grads(model, model, idx, tgt, torch.bfloat16)
    assert rel_err(loss, ref_loss) <= tol, f"loss {loss.item()} vs eager {ref_loss.item()}"
    for n, g in grads.items():
        assert torch.isfinite(g).all(), n
        assert rel_err(g, ref_grads[n]) <= tol, f"grad {n}: {rel_err(g, ref_grads[n]):.2e}"
