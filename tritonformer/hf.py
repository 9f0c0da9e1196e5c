"""Hugging Face GPT-2 checkpoints: read and write ``config.json`` + weights, as plain data.

A checkpoint is data, not code: weights are read from ``model.safetensors`` first, and a
``pytorch_model.bin`` only through ``torch.load(..., weights_only=True)``, so an untrusted
file cannot run anything. This module converts between Hugging Face's GPT-2 naming (Conv1D
weights stored (in, out)) and the model's (torch's (out, in) layout); it knows nothing of
the model class.
"""

from __future__ import annotations

import json
import os
import re

import torch

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS_FROM_HF = {
    "gelu_new": "gelu_tanh",
    "gelu_pytorch_tanh": "gelu_tanh",
    "gelu": "gelu",
    "relu": "relu",
}
ACTIVATIONS_TO_HF = {"gelu_tanh": "gelu_new", "gelu": "gelu", "relu": "relu"}
_BUFFERS = re.compile(r"\.attn\.(bias|masked_bias)$")


class CheckpointError(ValueError):
    """A checkpoint directory that is missing files or does not hold a GPT-2 model."""


def config_from_hf(hf: dict) -> dict:
    """TransformerConfig keyword arguments from a Hugging Face GPT-2 ``config.json`` dict."""
    if hf.get("model_type") != "gpt2":
        raise CheckpointError(
            f"config.json has model_type {hf.get('model_type')!r}; only 'gpt2' checkpoints load"
        )
    act = hf.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS_FROM_HF:
        raise CheckpointError(f"unsupported activation_function {act!r} in config.json")
    if hf.get("scale_attn_by_inverse_layer_idx") or not hf.get("scale_attn_weights", True):
        raise CheckpointError("only GPT-2's default attention scaling (1/sqrt(head_dim)) loads")
    if hf.get("add_cross_attention"):
        raise CheckpointError("cross-attention GPT-2 checkpoints are not supported")
    return dict(
        vocab_size=hf.get("vocab_size", 50257),
        block_size=hf.get("n_positions", 1024),
        n_layer=hf.get("n_layer", 12),
        n_head=hf.get("n_head", 12),
        d_model=hf.get("n_embd", 768),
        d_ff=hf.get("n_inner") or 4 * hf.get("n_embd", 768),
        activation=ACTIVATIONS_FROM_HF[act],
        layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf.get("tie_word_embeddings", True),
    )


def config_to_hf(cfg) -> dict:
    """A Hugging Face GPT-2 ``config.json`` dict for a TransformerConfig ``cfg``."""
    if cfg.position != "learned" or not cfg.bias:
        raise ValueError(
            "only GPT-2-compatible models can be saved in Hugging Face format "
            f"(position='learned', bias=True); this one has position={cfg.position!r}, "
            f"bias={cfg.bias}"
        )
    return {
        "model_type": "gpt2",
        "architectures": ["GPT2LMHeadModel"],
        "vocab_size": cfg.vocab_size,
        "n_positions": cfg.block_size,
        "n_ctx": cfg.block_size,
        "n_embd": cfg.d_model,
        "n_layer": cfg.n_layer,
        "n_head": cfg.n_head,
        "n_inner": cfg.d_ff,
        "activation_function": ACTIVATIONS_TO_HF[cfg.activation],
        "resid_pdrop": cfg.dropout,
        "embd_pdrop": cfg.dropout,
        "attn_pdrop": 0.0,
        "layer_norm_epsilon": cfg.layer_norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings,
        "initializer_range": 0.02,
        "scale_attn_weights": True,
        "bos_token_id": 50256,
        "eos_token_id": 50256,
    }


def read_config(path: str) -> dict:
    """The config.json dict of a local Hugging Face checkpoint directory."""
    if not os.path.isdir(path):
        raise CheckpointError(f"checkpoint path {path!r} is not a directory")
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isfile(cfg_path):
        raise CheckpointError(f"{path!r} has no config.json")
    with open(cfg_path) as f:
        try:
            hf_config = json.load(f)
        except json.JSONDecodeError as e:
            raise CheckpointError(f"{cfg_path} is not valid JSON: {e}") from None
    return hf_config


def read_weights(path: str) -> dict[str, torch.Tensor]:
    """The raw weights of a checkpoint directory: model.safetensors, else pytorch_model.bin."""
    st = os.path.join(path, "model.safetensors")
    binf = os.path.join(path, "pytorch_model.bin")
    if os.path.isfile(st):
        from safetensors.torch import load_file

        weights = load_file(st)
    elif os.path.isfile(binf):
        try:
            weights = torch.load(binf, map_location="cpu", weights_only=True)
        except Exception as e:  # an unpickler refusal or a corrupt file
            raise CheckpointError(f"{binf} could not be loaded as plain tensors: {e}") from None
    else:
        raise CheckpointError(f"{path!r} has neither model.safetensors nor pytorch_model.bin")
    return weights


def state_dict_from_hf(weights: dict[str, torch.Tensor], cfg, expected: dict) -> dict:
    """The model's state_dict from Hugging Face GPT-2 weights.

    ``expected`` is the model's own state_dict (names and shapes to fill). Conv1D weights are
    transposed, the vocabulary is zero-padded to cfg.padded_vocab_size, and a missing
    lm_head.weight is taken from the tied token embedding.
    """
    src = {}
    for name, t in weights.items():
        if _BUFFERS.search(name):
            continue
        name = name if name.startswith(("transformer.", "lm_head.")) else "transformer." + name
        if name.endswith(CONV1D):
            t = t.t()
        src[name] = t
    if "lm_head.weight" not in src and "transformer.wte.weight" in src:
        src["lm_head.weight"] = src["transformer.wte.weight"]
    out, missing = {}, []
    for name, ref in expected.items():
        if name not in src:
            missing.append(name)
            continue
        t = src[name]
        if name in ("transformer.wte.weight", "lm_head.weight") and t.shape[0] == cfg.vocab_size:
            t = torch.cat([t, t.new_zeros(ref.shape[0] - t.shape[0], *t.shape[1:])])
        if t.shape != ref.shape:
            raise CheckpointError(
                f"weight {name} has shape {tuple(t.shape)}, expected {tuple(ref.shape)}"
            )
        out[name] = t.to(ref.dtype)
    if missing:
        raise CheckpointError(
            f"checkpoint is missing weights: {missing[:5]}{' ...' if len(missing) > 5 else ''}"
        )
    unexpected = sorted(set(src) - set(expected))
    if unexpected:
        raise CheckpointError(f"checkpoint has weights this GPT-2 model lacks: {unexpected[:5]}")
    return out


def state_dict_to_hf(state: dict[str, torch.Tensor], cfg) -> dict[str, torch.Tensor]:
    """Hugging Face GPT2LMHeadModel weights from the model's state_dict (contiguous, CPU)."""
    out = {}
    for name, t in state.items():
        if name == "lm_head.weight" and cfg.tie_embeddings:
            continue  # tied to transformer.wte.weight, as Hugging Face saves it
        t = t.detach()
        if name in ("transformer.wte.weight", "lm_head.weight"):
            t = t[: cfg.vocab_size]
        if name.endswith(CONV1D):
            t = t.t()
        out[name] = t.contiguous().cpu().clone()
    return out


def write_checkpoint(path: str, hf_config: dict, weights: dict[str, torch.Tensor]) -> None:
    """Write config.json and model.safetensors into directory ``path`` (created if needed)."""
    from safetensors.torch import save_file

    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(hf_config, f, indent=2)
    save_file(weights, os.path.join(path, "model.safetensors"), metadata={"format": "pt"})
