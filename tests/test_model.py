import json
import math
import os

import pytest
import torch

from helpers import DEVICE, gpu, rel_err, requires_gpu
from tritonformer import Transformer, TransformerConfig
from tritonformer.hf import CheckpointError
from tritonformer.model import PRESETS

transformers = pytest.importorskip("transformers")

TINY = dict(vocab_size=101, block_size=32, n_layer=2, n_head=4, d_model=32)


def twin_models(**cfg):
    """The same weights in a Triton-backend and a torch-backend model."""
    config = TransformerConfig(**{**TINY, **cfg})
    torch.manual_seed(1)
    tri = Transformer(config, backend="triton").to(DEVICE)
    ref = Transformer(config, backend="torch").to(DEVICE)
    ref.load_state_dict(tri.state_dict())
    return tri, ref


def tokens(B, T, vocab=TINY["vocab_size"]):
    return torch.randint(0, vocab, (B, T), device=DEVICE)


def assert_rel(a, b, tol, name):
    err = rel_err(a, b)
    assert err <= tol, f"{name}: relative error {err:.2e} > {tol:.0e}"


@pytest.mark.parametrize(
    "cfg",
    [
        dict(),  # GPT-2: learned positions, tied, gelu_tanh, biases
        dict(position="alibi", activation="relu", tie_embeddings=False, bias=False),
        dict(activation="gelu", d_ff=80),
    ],
    ids=["gpt2", "alibi-relu-untied-nobias", "gelu-dff80"],
)
def test_triton_backend_matches_torch_backend(cfg):
    tri, ref = twin_models(**cfg)
    idx, tgt = tokens(2, 19), tokens(2, 19)
    tgt[0, :3] = -100  # ignored positions
    (lt, _), (lr, _) = tri(idx), ref(idx)
    _, loss_t = tri(idx, tgt)
    _, loss_r = ref(idx, tgt)
    assert lt.shape == (2, 19, TINY["vocab_size"])
    assert_rel(lt, lr, 1e-4, "logits")
    assert_rel(loss_t, loss_r, 1e-4, "loss")
    loss_t.backward()
    loss_r.backward()
    pr = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        assert p.grad is not None, f"{name} has no gradient"
        assert_rel(p.grad, pr[name].grad, 1e-4, f"grad {name}")


def test_gradient_checkpointing_same_gradients():
    tri, _ = twin_models()
    idx, tgt = tokens(2, 11), tokens(2, 11)
    tri(idx, tgt)[1].backward()
    grads = {n: p.grad.clone() for n, p in tri.named_parameters()}
    tri.zero_grad(set_to_none=True)
    tri.gradient_checkpointing = True
    tri(idx, tgt)[1].backward()
    for n, p in tri.named_parameters():
        assert_rel(p.grad, grads[n], 1e-6, n)


def test_cached_greedy_generation_matches_no_cache_loop():
    for position in ("learned", "alibi"):
        tri, _ = twin_models(position=position)
        tri.eval()
        prompt = tokens(2, 5)
        out = tri.generate(prompt, 4, temperature=0.0)
        seq = prompt
        with torch.no_grad():
            for _ in range(4):
                nxt = tri(seq)[0][:, -1].argmax(-1)
                seq = torch.cat([seq, nxt[:, None]], 1)
        assert torch.equal(out, seq), position


def test_generation_sampling_options_and_eos():
    tri, _ = twin_models()
    prompt = tokens(3, 4)
    g = torch.Generator(device=DEVICE).manual_seed(0)
    out = tri.generate(prompt, 3, temperature=0.8, top_k=5, top_p=0.9, generator=g)
    assert out.shape == (3, 7) and torch.equal(out[:, :4], prompt)
    assert int(out.min()) >= 0 and int(out.max()) < TINY["vocab_size"]
    greedy = tri.generate(prompt, 3, temperature=0.0)
    eos = int(greedy[0, 5])  # the first sequence's second new token
    stopped = tri.generate(prompt, 3, temperature=0.0, eos_token_id=eos)
    row = stopped[0, 4:]
    first = int((row == eos).nonzero()[0])
    assert (row[first:] == eos).all()


def test_model_bad_input():
    tri, _ = twin_models()
    with pytest.raises(ValueError, match="block_size"):
        tri(tokens(1, 33))
    with pytest.raises(ValueError, match="token ids"):
        tri(torch.full((1, 4), TINY["vocab_size"], device=DEVICE))
    with pytest.raises(ValueError, match="token ids"):
        tri(torch.full((1, 4), -1, device=DEVICE))
    with pytest.raises(TypeError, match="idx must be an int64"):
        tri(torch.zeros(1, 4, device=DEVICE))
    with pytest.raises(ValueError, match="block_size"):
        tri.generate(tokens(1, 30), 5)
    with pytest.raises(ValueError, match="attention_dropout"):
        TransformerConfig(attention_dropout=0.1)
    with pytest.raises(ValueError, match="divisible"):
        TransformerConfig(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="backend"):
        Transformer(TransformerConfig(**TINY), backend="jax")
    with pytest.raises(ValueError, match="unknown preset"):
        TransformerConfig.preset("gpt5")


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_presets_build(name):
    cfg = TransformerConfig.preset(name)
    with torch.device("meta"):
        model = Transformer(cfg)
    expected = {"gpt2": 124e6, "gpt2-medium": 355e6, "410m": 405e6, "840m": 834e6, "1.4b": 1.41e9}
    if name in expected:  # all parameters, position embeddings included
        n = model.num_params(non_embedding=False)
        assert abs(n - expected[name]) / expected[name] < 0.02, f"{name}: {n / 1e6:.0f}M"
    assert cfg.padded_vocab_size % 64 == 0 and cfg.padded_vocab_size >= cfg.vocab_size


# ---- Hugging Face GPT-2 ------------------------------------------------------------------


def hf_gpt2(tmp_path, safe=True, **kw):
    conf = transformers.GPT2Config(
        vocab_size=101, n_positions=32, n_embd=32, n_layer=2, n_head=4, **kw
    )
    torch.manual_seed(2)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    path = tmp_path / "hf"
    hf.save_pretrained(path, safe_serialization=safe)
    return hf.to(DEVICE), str(path)


@pytest.mark.parametrize("safe", [True, False], ids=["safetensors", "bin"])
def test_from_pretrained_matches_hf_logits(tmp_path, safe):
    hf, path = hf_gpt2(tmp_path, safe=safe, activation_function="gelu_new")
    model = Transformer.from_pretrained(path).to(DEVICE).eval()
    idx = tokens(2, 13)
    with torch.no_grad():
        assert_rel(model(idx)[0], hf(idx).logits, 1e-4, "logits vs HF")


def test_save_pretrained_round_trips_into_hf(tmp_path):
    _, path = hf_gpt2(tmp_path)
    model = Transformer.from_pretrained(path).to(DEVICE).eval()
    with torch.no_grad():  # make it differ from the original
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    out = str(tmp_path / "ours")
    model.save_pretrained(out)
    hf2 = transformers.GPT2LMHeadModel.from_pretrained(out).to(DEVICE).eval()
    idx = tokens(2, 9)
    with torch.no_grad():
        assert_rel(hf2(idx).logits, model(idx)[0], 1e-4, "HF logits of saved model")
    again = Transformer.from_pretrained(out).to(DEVICE)
    V = model.config.vocab_size  # rows past V pad the vocabulary and are not saved
    for (n, a), b in zip(model.state_dict().items(), again.state_dict().values(), strict=True):
        assert torch.equal(a[:V], b[:V]), n


def test_greedy_generate_matches_hf(tmp_path):
    hf, path = hf_gpt2(tmp_path)
    model = Transformer.from_pretrained(path).to(DEVICE)
    prompt = tokens(2, 6)
    ours = model.generate(prompt, 10, temperature=0.0)
    theirs = hf.generate(
        prompt,
        max_new_tokens=10,
        do_sample=False,
        min_new_tokens=10,
        pad_token_id=0,
        attention_mask=torch.ones_like(prompt),
    )
    assert torch.equal(ours, theirs)


def test_from_pretrained_bad_checkpoints(tmp_path):
    with pytest.raises(CheckpointError, match="not a directory"):
        Transformer.from_pretrained(str(tmp_path / "nope"))
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        Transformer.from_pretrained(str(empty))
    _, path = hf_gpt2(tmp_path)
    cfg = json.load(open(os.path.join(path, "config.json")))
    json.dump({**cfg, "model_type": "llama"}, open(os.path.join(path, "config.json"), "w"))
    with pytest.raises(CheckpointError, match="model_type"):
        Transformer.from_pretrained(path)
    json.dump(cfg, open(os.path.join(path, "config.json"), "w"))
    os.remove(os.path.join(path, "model.safetensors"))
    with pytest.raises(CheckpointError, match="neither model.safetensors"):
        Transformer.from_pretrained(path)
    with pytest.raises(ValueError, match="GPT-2-compatible"):
        Transformer(TransformerConfig(**TINY, position="alibi")).save_pretrained(
            str(tmp_path / "x")
        )


# ---- GPU tier ----------------------------------------------------------------------------


@gpu
@requires_gpu
def test_gpt2_bf16_autocast_parity_gpu():
    cfg = TransformerConfig.preset("gpt2")
    torch.manual_seed(0)
    with torch.device("cuda"):
        tri = Transformer(cfg)
        ref = Transformer(cfg, backend="torch")
    ref.load_state_dict(tri.state_dict())
    idx = torch.randint(0, cfg.vocab_size, (4, 1024), device="cuda")
    tgt = torch.randint(0, cfg.vocab_size, (4, 1024), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        with torch.no_grad():
            (lt, _), (lr, _) = tri(idx), ref(idx)
        _, loss_t = tri(idx, tgt)
        _, loss_r = ref(idx, tgt)
    assert_rel(lt.float(), lr.float(), 2e-2, "logits")
    assert abs(loss_t.item() - loss_r.item()) < 1e-2 * loss_r.item()
    loss_t.backward()
    loss_r.backward()
    pr = dict(ref.named_parameters())
    for name, p in tri.named_parameters():
        assert_rel(p.grad, pr[name].grad, 5e-2, f"grad {name}")


@gpu
@requires_gpu
def test_gpt2_124m_hf_parity_bf16_gpu(tmp_path):
    conf = transformers.GPT2Config()  # GPT-2 124M, random init
    torch.manual_seed(3)
    hf = transformers.GPT2LMHeadModel(conf).eval()
    hf.save_pretrained(tmp_path / "hf")
    hf = hf.cuda()
    model = Transformer.from_pretrained(str(tmp_path / "hf")).cuda().eval()
    idx = torch.randint(0, conf.vocab_size, (2, 512), device="cuda")
    with torch.no_grad(), torch.autocast("cuda", dtype=torch.bfloat16):
        ours = model(idx)[0].float()
        theirs = hf(idx).logits.float()
    with torch.no_grad():
        exact = hf(idx).logits.double()  # fp32 HF as the reference
    err, base = rel_err(ours, exact), rel_err(theirs, exact)
    assert err <= 2 * base + 1e-2, f"bf16 logits: ours {err:.2e}, HF's own {base:.2e}"


@gpu
@requires_gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_training_step_gpu(name, dtype):
    cfg = TransformerConfig.preset(name)
    torch.manual_seed(0)
    with torch.device("cuda"):
        model = Transformer(cfg)
    opt = model.configure_optimizers(0.1, 3e-4)
    scaler = torch.amp.GradScaler("cuda", enabled=dtype == torch.float16)
    B, T = 2, min(cfg.block_size, 1024)
    idx = torch.randint(0, cfg.vocab_size, (B, T), device="cuda")
    before = {n: p.detach().clone() for n, p in list(model.named_parameters())[:4]}
    with torch.autocast("cuda", dtype=dtype):
        _, loss = model(idx, idx)
    assert math.isfinite(loss.item()) and abs(loss.item() - math.log(cfg.vocab_size)) < 1.0
    scaler.scale(loss).backward()
    scaler.step(opt)
    scaler.update()
    for n, p in list(model.named_parameters())[:4]:
        assert not torch.equal(p, before[n]), f"{n} did not change"
    del model, opt
    torch.cuda.empty_cache()
