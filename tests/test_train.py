"""The training CLI end to end on the CPU: runs, eval, checkpoints, resume, DDP, crashes, errors."""

import json
import os
import shutil
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch

from helpers import ON_GPU, gpu, requires_gpu
from tritonformer import checkpoint as ckpt
from tritonformer.cli import main
from tritonformer.train import read_metrics

# A tiny model and run: a few interpreter steps each.
SMALL = [
    "--n-layer",
    "1",
    "--d-model",
    "32",
    "--n-head",
    "2",
    "--block-size",
    "16",
    "--batch-size",
    "2",
    "--eval-iters",
    "1",
    "--no-progress",
    "--sample-tokens",
    "0",
]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "corpus.txt"
    rng = np.random.default_rng(0)
    words = ["def", "return", "self", "import", "class", "for", "in", "if", "else", "x", "y"]
    path.write_text(" ".join(rng.choice(words, 3000)))
    return str(path)


def run_cli(*args: str) -> int:
    return main([str(a) for a in args])


def losses(out_dir):
    return {r["step"]: r["loss"] for r in read_metrics(os.path.join(out_dir, "metrics.jsonl"))}


def test_train_eval_checkpoint_and_resume_equals_uninterrupted(tmp_path, corpus, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    run6 = ["train", "--data", corpus, "--steps", 6, "--eval-interval", 3, "--ckpt-interval", 3]
    assert run_cli(*run6, "--out-dir", a, "--sample-tokens", 8, *SMALL[:-2]) == 0
    rows = read_metrics(str(a / "metrics.jsonl"))
    assert [r["step"] for r in rows] == [1, 2, 3, 4, 5, 6]
    assert [r["step"] for r in rows if "val_loss" in r] == [3, 6]
    assert all(np.isfinite(r["loss"]) for r in rows)
    names = [os.path.basename(p) for p in ckpt.list_checkpoints(str(a / "checkpoints"))]
    assert names == ["step-00000003", "step-00000006"]
    assert "--- sample ---" in capsys.readouterr().out

    # Interrupted after step 3: the same run resumed from its step-3 checkpoint.
    shutil.copytree(a, b)
    shutil.rmtree(b / "checkpoints" / "step-00000006")
    assert run_cli(*run6, "--out-dir", b, "--resume", *SMALL) == 0
    la, lb = losses(a), losses(b)
    if ON_GPU:  # atomics in some GPU kernels: equal up to summation order
        assert la.keys() == lb.keys()
        assert all(abs(la[s] - lb[s]) <= 1e-3 * abs(la[s]) for s in la), (la, lb)
    else:  # bit-for-bit: same data, RNG, optimizer state
        assert lb == la


def test_generate_from_run(tmp_path, corpus, capsys):
    out = tmp_path / "run"
    assert run_cli("train", "--data", corpus, "--out-dir", out, "--steps", 1, *SMALL) == 0
    capsys.readouterr()
    assert run_cli("generate", "--run", out, "--prompt", "def", "--max-new-tokens", 5) == 0
    assert capsys.readouterr().out.startswith("def")


def test_prepare_then_train_on_token_file_and_plot(tmp_path, corpus):
    binf = str(tmp_path / "c.bin")
    assert run_cli("prepare", "--data", corpus, "--out", binf) == 0
    meta = json.load(open(binf + ".json"))
    assert meta["dtype"] == "uint16" and meta["tokens"] == os.path.getsize(corpus)
    out = tmp_path / "tok"
    assert (
        run_cli(
            "train", "--data", binf, "--out-dir", out, "--steps", 2, "--log-format", "csv", *SMALL
        )
        == 0
    )
    png = str(tmp_path / "loss.png")
    assert run_cli("plot", str(out), "--out", png) == 0
    assert open(png, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


def one_line_error(capsys, *args) -> str:
    assert run_cli(*args) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    return err


def test_bad_input_gives_one_line_errors(tmp_path, corpus, capsys):
    out = str(tmp_path / "o")
    base = ["train", "--out-dir", out, "--steps", "1", *SMALL]
    assert "does not exist" in one_line_error(capsys, *base, "--data", str(tmp_path / "none.txt"))
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    assert "empty" in one_line_error(capsys, *base, "--data", str(empty))
    short = tmp_path / "short.txt"
    short.write_text("tiny")
    assert "fewer than one block" in one_line_error(capsys, *base, "--data", str(short))
    odd = tmp_path / "odd.bin"
    odd.write_bytes(b"\x01\x02\x03")
    assert "whole number" in one_line_error(capsys, *base, "--data", str(odd))
    wide = tmp_path / "wide.bin"
    np.arange(100, dtype=np.uint32).tofile(wide)
    (tmp_path / "wide.bin.json").write_text(json.dumps({"dtype": "uint32"}))
    assert "holds uint32" in one_line_error(
        capsys, *base, "--data", str(wide), "--data-dtype", "uint16"
    )
    narrow = tmp_path / "narrow.bin"
    np.arange(100, dtype=np.uint16).tofile(narrow)  # read as uint32: ids far above the vocab
    assert "wrong dtype" in one_line_error(
        capsys, *base, "--data", str(narrow), "--data-dtype", "uint32"
    )
    big = tmp_path / "big.bin"
    np.full(100, 1000, dtype=np.uint16).tofile(big)
    assert "vocab_size" in one_line_error(capsys, *base, "--data", str(big))
    assert "smaller than the tokenizer" in one_line_error(
        capsys, *base, "--data", corpus, "--vocab-size", "100"
    )
    blocker = tmp_path / "file"
    blocker.write_text("x")
    one_line_error(
        capsys, "train", "--out-dir", str(blocker / "sub"), "--data", corpus, "--steps", "1", *SMALL
    )
    assert "no checkpoint" in one_line_error(capsys, *base, "--data", corpus, "--resume")
    assert run_cli(*base, "--data", corpus) == 0
    assert "another model" in one_line_error(
        capsys,
        "train",
        "--out-dir",
        out,
        "--steps",
        "2",
        *SMALL,
        "--d-model",
        "64",
        "--data",
        corpus,
        "--resume",
    )
    assert "unknown tokenizer" in one_line_error(
        capsys, *base, "--data", corpus, "--tokenizer", "nope"
    )


KILL_IN_SAVE = textwrap.dedent(
    """
    import os, signal, sys
    from tritonformer import checkpoint
    from tritonformer.cli import main
    real_save_model = checkpoint.save_model
    calls = []
    def dying_save_model(model, path):
        calls.append(path)
        real_save_model(model, path)
        if len(calls) == 2:  # the second save: killed with its model file half-way written
            with open(path, "r+b") as f:
                f.truncate(os.path.getsize(path) // 2)
            os.kill(os.getpid(), signal.SIGKILL)
    checkpoint.save_model = dying_save_model
    sys.exit(main(sys.argv[1:]))
    """
)


def test_kill_during_save_leaves_previous_checkpoint_loadable(tmp_path, corpus):
    out = tmp_path / "run"
    args = [
        "train",
        "--data",
        corpus,
        "--out-dir",
        str(out),
        "--steps",
        "4",
        "--ckpt-interval",
        "2",
        *SMALL,
    ]
    proc = subprocess.run(
        [sys.executable, "-c", KILL_IN_SAVE, *args], capture_output=True, text=True
    )
    assert proc.returncode == -9, proc.stderr
    root = str(out / "checkpoints")
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == ["step-00000002"]
    assert any(".tmp-" in n for n in os.listdir(root))  # the killed save's debris
    assert run_cli(*args, "--resume") == 0  # resumes from step 2, cleans the debris
    assert [os.path.basename(p) for p in ckpt.list_checkpoints(root)] == [
        "step-00000002",
        "step-00000004",
    ]
    assert not any(".tmp-" in n for n in os.listdir(root))


@pytest.mark.skipif(
    ON_GPU and torch.cuda.device_count() < 2, reason="two processes need two GPUs (or no GPU)"
)
def test_two_process_ddp_equals_one_process(tmp_path, corpus):
    common = ["train", "--data", corpus, "--steps", "3", "--eval-interval", "3", *SMALL]
    one = tmp_path / "one"
    bs = SMALL.index("--batch-size") + 1
    single = common[:]
    single[len(common) - len(SMALL) + bs] = "4"  # one process, global batch 4
    assert run_cli(*single, "--out-dir", one) == 0
    two = tmp_path / "two"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            "29533",
            "-m",
            "tritonformer.cli",
            *common,
            "--out-dir",
            str(two),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    l1, l2 = losses(one), losses(two)
    assert l1.keys() == l2.keys() == {1, 2, 3}
    for s in l1:
        assert abs(l1[s] - l2[s]) <= 1e-5 * abs(l1[s]), (s, l1[s], l2[s])


def test_gradient_accumulation_matches_the_larger_batch(tmp_path, corpus):
    bs = SMALL.index("--batch-size") + 1
    big = SMALL[:bs] + ["4"] + SMALL[bs + 1 :]
    common = ["train", "--data", corpus, "--steps", "3", "--eval-interval", "3"]
    assert run_cli(*common, *big, "--out-dir", tmp_path / "big") == 0
    assert run_cli(*common, *SMALL, "--grad-accum", "2", "--out-dir", tmp_path / "acc") == 0
    lb, la = losses(tmp_path / "big"), losses(tmp_path / "acc")
    assert lb.keys() == la.keys() == {1, 2, 3}
    for s in lb:
        assert abs(lb[s] - la[s]) <= 1e-5 * abs(lb[s]), (s, lb[s], la[s])


def test_backward_runs_on_the_calling_thread(tmp_path, corpus, monkeypatch):
    # the trainer turns off autograd's device-thread hand-off for its backward passes
    seen = []
    backward = torch.autograd.backward

    def spy(*args, **kwargs):
        seen.append(torch._C._is_multithreading_enabled())
        return backward(*args, **kwargs)

    monkeypatch.setattr(torch.autograd, "backward", spy)
    args = ["train", "--data", corpus, "--steps", "2", "--eval-interval", "2", *SMALL]
    assert run_cli(*args, "--grad-accum", "2", "--out-dir", tmp_path / "run") == 0
    assert seen == [False] * 4
    assert torch._C._is_multithreading_enabled()  # restored afterwards


def test_tokenizer_json_and_missing_tiktoken(tmp_path, corpus, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    trainer = tokenizers.trainers.BpeTrainer(vocab_size=60, special_tokens=["[UNK]"])
    tok.train([corpus], trainer)
    path = str(tmp_path / "tokenizer.json")
    tok.save(path)
    out = tmp_path / "run"
    assert (
        run_cli(
            "train", "--data", corpus, "--tokenizer", path, "--out-dir", out, "--steps", "1", *SMALL
        )
        == 0
    )
    conf = ckpt.read_config(ckpt.list_checkpoints(str(out / "checkpoints"))[-1])
    assert conf["model"]["vocab_size"] == tok.get_vocab_size()
    try:
        import tiktoken

        tiktoken.get_encoding("gpt2")
    except Exception:  # not installed or no cached encoding: a clear one-line error
        err = one_line_error(
            capsys,
            "train",
            "--data",
            corpus,
            "--tokenizer",
            "gpt2",
            "--out-dir",
            str(tmp_path / "t"),
            "--steps",
            "1",
            *SMALL,
        )
        assert "tiktoken" in err


def test_cuda_graphs_train_like_eager(tmp_path, corpus, capsys):
    """--cuda-graphs replays the step's forward/backward: the same losses as launching them."""
    common = ["train", "--data", corpus, "--steps", "3", "--eval-interval", "3", *SMALL]
    if not ON_GPU:
        err = one_line_error(capsys, *common, "--cuda-graphs", "--out-dir", tmp_path / "g")
        assert "cuda_graphs needs one process on a CUDA device" in err
        return
    # one micro-step: the replays write the gradients; two: they add into them
    for accum in ("1", "2"):
        args = [*common, "--grad-accum", accum]
        assert run_cli(*args, "--out-dir", tmp_path / f"eager{accum}") == 0
        assert run_cli(*args, "--cuda-graphs", "--out-dir", tmp_path / f"graphs{accum}") == 0
        le, lg = losses(tmp_path / f"eager{accum}"), losses(tmp_path / f"graphs{accum}")
        assert le.keys() == lg.keys() == {1, 2, 3}
        for s in le:
            assert abs(le[s] - lg[s]) <= 1e-2 * abs(le[s]), (accum, s, le[s], lg[s])


@gpu
@requires_gpu
def test_graphed_step_gradients_gpu():
    """A replay's gradients are eager's: written (accumulate=False; twice gives the same, and
    they come back after zero_grad(set_to_none=True)) or added (accumulate=True: two replays
    give twice)."""
    from tritonformer.model import Transformer, TransformerConfig
    from tritonformer.train import GraphedStep

    torch.manual_seed(0)
    model = Transformer(TransformerConfig.preset("tiny")).cuda()
    idx = torch.randint(0, model.config.vocab_size, (2, 32), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        model(idx, idx)[1].backward()
    eager = [p.grad.clone() for p in model.parameters()]

    def check(factor, what):
        for (name, p), g in zip(model.named_parameters(), eager, strict=True):
            torch.testing.assert_close(p.grad, factor * g, rtol=2e-2, atol=1e-4,
                                       msg=lambda m, name=name: f"{what} {name}: {m}")

    for accumulate in (False, True):
        model.zero_grad(set_to_none=True)
        step = GraphedStep(model, 2, 32, torch.bfloat16, accumulate=accumulate)
        step(idx, idx)
        check(1.0, f"accumulate={accumulate}, one replay")
        step(idx, idx)
        check(2.0 if accumulate else 1.0, f"accumulate={accumulate}, two replays")
        if not accumulate:
            model.zero_grad(set_to_none=True)
            step(idx, idx)
            check(1.0, "after set_to_none")


def test_graphed_step_refuses_what_a_graph_cannot_replay():
    from tritonformer.model import Transformer, TransformerConfig
    from tritonformer.train import GraphedStep

    with pytest.raises(ValueError, match="dropout=0"):
        GraphedStep(Transformer(TransformerConfig.preset("tiny", dropout=0.1)), 2, 8, None)
    if not ON_GPU:
        with pytest.raises(ValueError, match="CUDA device"):
            GraphedStep(Transformer(TransformerConfig.preset("tiny")), 2, 8, None)
