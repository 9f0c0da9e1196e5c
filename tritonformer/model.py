"""The GPT-2-style Transformer: config, attention, MLP, block, model, checkpoints, generation.

The module tree is the same for both backends; only the ops differ. ``backend="triton"``
runs every op on ``tritonformer.ops`` (the Triton kernels); ``backend="torch"`` runs the
same model on ``tritonformer.reference`` (F.linear, F.layer_norm, SDPA, F.cross_entropy), so
the two cannot drift apart. Parameter names follow Hugging Face's GPT-2 (``transformer.h.0
.attn.c_attn.weight``...), with torch's (out_features, in_features) layout for linear weights.
"""

from __future__ import annotations

import dataclasses
import math
from types import ModuleType

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.utils.checkpoint import checkpoint

from . import hf, ops, reference, runtime
from .ops.attention import alibi_slopes

BACKENDS: dict[str, ModuleType] = {"triton": ops, "torch": reference}
VOCAB_MULTIPLE = 64


@dataclasses.dataclass
class TransformerConfig:
    """Shape and options of a GPT-2-style pre-LN Transformer. Defaults: GPT-2 124M."""

    vocab_size: int = 50257  # true vocabulary; embeddings are padded to a multiple of 64
    block_size: int = 1024  # context length (the limit for learned positions)
    n_layer: int = 12
    n_head: int = 12
    d_model: int = 768
    d_ff: int | None = None  # MLP width; None means 4 * d_model
    activation: str = "gelu_tanh"  # "gelu_tanh" (GPT-2), "gelu" (exact) or "relu"
    bias: bool = True  # biases in linear layers and LayerNorms
    position: str = "learned"  # "learned" position embeddings or "alibi"
    tie_embeddings: bool = True  # LM head shares the token embedding
    dropout: float = 0.0  # on embeddings and residual branches
    attention_dropout: float = 0.0  # not supported: must be 0
    layer_norm_eps: float = 1e-5

    def __post_init__(self) -> None:
        if self.d_ff is None:
            self.d_ff = 4 * self.d_model
        for name in ("vocab_size", "block_size", "n_layer", "n_head", "d_model", "d_ff"):
            value = getattr(self, name)
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"TransformerConfig.{name} must be a positive int, got {value!r}")
        if self.d_model % self.n_head:
            raise ValueError(
                f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head})"
            )
        if self.activation not in ("gelu_tanh", "gelu", "relu"):
            raise ValueError(
                f"activation must be 'gelu_tanh', 'gelu' or 'relu', got {self.activation!r}"
            )
        if self.position not in ("learned", "alibi"):
            raise ValueError(f"position must be 'learned' or 'alibi', got {self.position!r}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout!r}")
        if self.attention_dropout != 0.0:
            raise ValueError(
                "attention_dropout is not supported (the flash-attention kernel has no dropout); "
                "use dropout, which applies to embeddings and residual branches"
            )

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_head

    @property
    def padded_vocab_size(self) -> int:
        return runtime.cdiv(self.vocab_size, VOCAB_MULTIPLE) * VOCAB_MULTIPLE

    def flops_per_token(self, seq_len: int | None = None) -> float:
        """Training FLOPs per token, PaLM's convention: 6 N_matmul + 12 L d T."""
        T = seq_len or self.block_size
        n_matmul = self.n_layer * (4 * self.d_model**2 + 2 * self.d_model * self.d_ff)
        n_matmul += self.d_model * self.vocab_size
        return 6 * n_matmul + 12 * self.n_layer * self.d_model * T

    @classmethod
    def preset(cls, name: str, **overrides) -> TransformerConfig:
        """A named preset (see PRESETS), with any field overridden by keyword."""
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose from {sorted(PRESETS)}")
        return cls(**{**PRESETS[name], **overrides})


#: Named model sizes. "tiny" is for CPU runs under the interpreter. "gpt2" and "gpt2-medium"
#: are GPT-2's 124M and 350M. "410m", "840m" and "1.4b" are Pythia-like shapes (layers, width,
#: heads, untied input/output embeddings, 50304-token vocabulary, 2048 context) on this
#: model's GPT-2 structure (learned positions, sequential pre-LN blocks, exact GELU); 840m is
#: Pythia's 24 layers at width 1536 with 12 heads of 128.
_PYTHIA = dict(vocab_size=50304, block_size=2048, n_layer=24, activation="gelu",
               tie_embeddings=False)
PRESETS: dict[str, dict] = {
    "tiny": dict(vocab_size=256, block_size=64, n_layer=2, n_head=2, d_model=64),
    "gpt2": dict(),
    "gpt2-medium": dict(n_layer=24, n_head=16, d_model=1024),
    "410m": dict(_PYTHIA, n_head=16, d_model=1024),
    "840m": dict(_PYTHIA, n_head=12, d_model=1536),
    "1.4b": dict(_PYTHIA, n_head=16, d_model=2048),
}


def _layer_norm(d: int, cfg: TransformerConfig) -> nn.LayerNorm:
    return nn.LayerNorm(d, eps=cfg.layer_norm_eps, bias=cfg.bias)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops_: ModuleType) -> None:
        super().__init__()
        self.cfg, self.ops = cfg, ops_
        self.c_attn = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_model, cfg.d_model, bias=cfg.bias)

    def forward(
        self, h: torch.Tensor, slopes: torch.Tensor | None, cache: KVCache | None = None
    ) -> torch.Tensor:
        """h (B, T, d_model) -> (B, T, d_model); with a cache, T new tokens after its contents."""
        B, T, C = h.shape
        H, D = self.cfg.n_head, self.cfg.head_dim
        qkv = self.ops.linear(h, self.c_attn.weight, self.c_attn.bias).view(B, T, 3, H, D)
        if cache is None:
            # the backward writes dq, dk, dv straight into one (B, T, 3, H, D) gradient
            y = self.ops.attention_packed(qkv, causal=True, alibi_slopes=slopes)
        else:
            q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))  # (B, H, T, D) views
            k, v = cache.append(k, v)
            y = self.ops.attention(q, k, v, causal=True, alibi_slopes=slopes).transpose(1, 2)
        y = y.reshape(B, T, C)  # a view of the Triton ops' (B, T, H, D) output
        return self.ops.linear(y, self.c_proj.weight, self.c_proj.bias)


class MLP(nn.Module):
    def __init__(self, cfg: TransformerConfig, ops_: ModuleType) -> None:
        super().__init__()
        self.cfg, self.ops = cfg, ops_
        self.c_fc = nn.Linear(cfg.d_model, cfg.d_ff, bias=cfg.bias)
        self.c_proj = nn.Linear(cfg.d_ff, cfg.d_model, bias=cfg.bias)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        a = self.ops.linear(h, self.c_fc.weight, self.c_fc.bias, activation=self.cfg.activation)
        return self.ops.linear(a, self.c_proj.weight, self.c_proj.bias)


class Block(nn.Module):
    """Pre-LN block: x += attn(ln_1(x)); x += mlp(ln_2(x)).

    It takes the residual stream x and h = ln_1(x), and returns the new stream and the next
    LayerNorm of it (``next_ln``: the next block's ln_1 or the final ln_f), so each residual
    add is fused with the LayerNorm that follows it. Under autocast every LayerNorm output is
    written in the autocast dtype (torch's layer_norm returns fp32 there, which the linear
    layer that reads it would cast): no cast pass, and its gradient comes back in that dtype.
    """

    def __init__(self, cfg: TransformerConfig, ops_: ModuleType) -> None:
        super().__init__()
        self.cfg, self.ops = cfg, ops_
        self.ln_1 = _layer_norm(cfg.d_model, cfg)
        self.attn = CausalSelfAttention(cfg, ops_)
        self.ln_2 = _layer_norm(cfg.d_model, cfg)
        self.mlp = MLP(cfg, ops_)

    def _add_norm(self, x: torch.Tensor, r: torch.Tensor, ln: nn.LayerNorm):
        r = self.ops.dropout(r, self.cfg.dropout, self.training)
        return self.ops.add_layer_norm(x, r, ln.weight, ln.bias, ln.eps,
                                       out_dtype=runtime.autocast_dtype())

    def forward(self, x, h, next_ln: nn.LayerNorm, slopes=None, cache: KVCache | None = None):
        x, h = self._add_norm(x, self.attn(h, slopes, cache), self.ln_2)
        return self._add_norm(x, self.mlp(h), next_ln)


class KVCache:
    """Keys and values of one layer for incremental decoding, (B, H, capacity, D) buffers."""

    def __init__(self, B: int, H: int, capacity: int, D: int, dtype, device) -> None:
        self.k = torch.empty(B, H, capacity, D, dtype=dtype, device=device)
        self.v = torch.empty_like(self.k)
        self.length = 0

    def append(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v (B, H, T, D) after the cached ones; return views of all keys and values."""
        end = self.length + k.shape[2]
        self.k[:, :, self.length : end] = k
        self.v[:, :, self.length : end] = v
        self.length = end
        return self.k[:, :, :end], self.v[:, :, :end]


class Transformer(nn.Module):
    """A GPT-2-style language model.

    ``model(idx)`` takes token ids idx (B, T) int64 and returns ``(logits, None)``: logits
    (B, T, vocab_size) in the compute dtype. ``model(idx, targets)`` returns ``(None, loss)``:
    the mean cross-entropy against targets (B, T) (entries equal to -100 ignored), computed
    by ``ops.linear_cross_entropy`` without materialising the logits (call
    ``model.logits(model.hidden_states(idx))`` when you need both).
    Parameters are fp32 unless you convert them; use torch.autocast for bf16/fp16 compute.
    """

    def __init__(self, config: TransformerConfig, backend: str = "triton") -> None:
        super().__init__()
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {sorted(BACKENDS)}, got {backend!r}")
        self.config, self.backend = config, backend
        self.ops = BACKENDS[backend]
        cfg = config
        self.transformer = nn.ModuleDict(
            dict(
                wte=nn.Embedding(cfg.padded_vocab_size, cfg.d_model),
                h=nn.ModuleList([Block(cfg, self.ops) for _ in range(cfg.n_layer)]),
                ln_f=_layer_norm(cfg.d_model, cfg),
            )
        )
        if cfg.position == "learned":
            self.transformer["wpe"] = nn.Embedding(cfg.block_size, cfg.d_model)
        else:
            # on the device the parameters are being created on (a torch.device context)
            here = torch.empty(()).device
            self.register_buffer("alibi", alibi_slopes(cfg.n_head).to(here), persistent=False)
        self.lm_head = nn.Linear(cfg.d_model, cfg.padded_vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.transformer.wte.weight
        self.gradient_checkpointing = False
        self.apply(self._init_weights)
        for name, p in self.named_parameters():  # GPT-2: scaled init of residual projections
            if name.endswith("c_proj.weight"):
                nn.init.normal_(p, 0.0, 0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, (nn.Linear, nn.Embedding)):
            nn.init.normal_(m.weight, 0.0, 0.02)
        if isinstance(m, nn.Linear) and m.bias is not None:
            nn.init.zeros_(m.bias)

    def num_params(self, non_embedding: bool = True) -> int:
        """Parameter count; without position embeddings (and the untied head counts) by default."""
        n = sum(p.numel() for p in self.parameters())
        if non_embedding and "wpe" in self.transformer:
            n -= self.transformer.wpe.weight.numel()
        return n

    def _check_idx(self, idx: torch.Tensor, offset: int = 0) -> None:
        if not isinstance(idx, torch.Tensor) or idx.dtype not in (torch.int64, torch.int32):
            got = idx.dtype if isinstance(idx, torch.Tensor) else type(idx).__name__
            raise TypeError(f"idx must be an int64 (or int32) tensor of token ids, got {got}")
        if idx.dim() != 2 or idx.shape[1] == 0:
            raise ValueError(
                f"idx must have shape (batch, time) with time >= 1, got {tuple(idx.shape)}"
            )
        cfg = self.config
        if cfg.position == "learned" and offset + idx.shape[1] > cfg.block_size:
            raise ValueError(
                f"sequence length {offset + idx.shape[1]} exceeds block_size {cfg.block_size} "
                "(learned positions); crop the input or use position='alibi'"
            )
        if not runtime.value_checks_enabled():  # no device sync (trainer, compile, graphs)
            return
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= cfg.vocab_size:
            raise ValueError(f"token ids must be in [0, {cfg.vocab_size}), got min {lo}, max {hi}")

    def _embed(self, idx: torch.Tensor, offset: int = 0) -> torch.Tensor:
        x = self.transformer.wte(idx)
        if "wpe" in self.transformer:
            pos = torch.arange(offset, offset + idx.shape[1], device=idx.device)
            x = x + self.transformer.wpe(pos)
        return self.ops.dropout(x, self.config.dropout, self.training)

    def _slopes(self) -> torch.Tensor | None:
        return self.alibi if self.config.position == "alibi" else None

    def hidden_states(self, idx: torch.Tensor, caches: list[KVCache] | None = None) -> torch.Tensor:
        """The final LayerNorm's output (B, T, d_model) for token ids idx (B, T)."""
        offset = caches[0].length if caches else 0
        self._check_idx(idx, offset)
        blocks = self.transformer.h
        x = self._embed(idx, offset)
        ln = blocks[0].ln_1
        h = self.ops.layer_norm(x, ln.weight, ln.bias, ln.eps, out_dtype=runtime.autocast_dtype())
        for i, block in enumerate(blocks):
            next_ln = blocks[i + 1].ln_1 if i + 1 < len(blocks) else self.transformer.ln_f
            cache = caches[i] if caches else None
            if self.gradient_checkpointing and self.training:
                x, h = checkpoint(block, x, h, next_ln, self._slopes(), use_reentrant=False)
            else:
                x, h = block(x, h, next_ln, self._slopes(), cache)
        return h

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """LM-head logits (..., vocab_size) of hidden states h (..., d_model)."""
        return self.ops.linear(h, self.lm_head.weight)[..., : self.config.vocab_size]

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits, None) without targets; (None, loss) with them. With targets the Triton
        backend runs the LM head and the loss as one op (``linear_cross_entropy``) that never
        materialises the logits; the torch backend computes the logits, then the loss."""
        h = self.hidden_states(idx)
        if targets is None:
            return self.logits(h), None
        if targets.shape != idx.shape:
            raise ValueError(
                f"targets must have idx's shape {tuple(idx.shape)}, got {tuple(targets.shape)}"
            )
        if self.backend == "torch":
            # plain PyTorch, as a PyTorch GPT does it: logits from the padded LM head (a
            # 16-byte-aligned GEMM; slicing the weight to an odd vocabulary instead made
            # cuBLAS ~20 ms slower per GPT-2 step on the H200), then the loss
            return None, self.ops.cross_entropy(self.logits(h), targets)
        head = self.lm_head.weight[: self.config.vocab_size]
        return None, self.ops.linear_cross_entropy(h, head, targets)

    # ---- checkpoints ----------------------------------------------------------------------

    @classmethod
    def from_pretrained(cls, path: str, backend: str = "triton", **overrides) -> Transformer:
        """Load a local Hugging Face GPT-2 checkpoint directory (config.json + weights).

        Weights come from model.safetensors, or pytorch_model.bin read with
        ``weights_only=True``. Config fields can be overridden by keyword (e.g.
        ``dropout=0.1``; the checkpoint's dropout rates are not carried over). Raises
        ``hf.CheckpointError`` (a ValueError) for a missing file or a non-GPT-2 checkpoint.
        """
        config = TransformerConfig(**{**hf.config_from_hf(hf.read_config(path)), **overrides})
        weights = hf.read_weights(path)
        model = cls(config, backend=backend)
        model.load_state_dict(hf.state_dict_from_hf(weights, config, model.state_dict()))
        return model

    def save_pretrained(self, path: str) -> None:
        """Write config.json and model.safetensors, loadable by
        ``transformers.GPT2LMHeadModel.from_pretrained(path)`` and by ``from_pretrained``."""
        hf_config = hf.config_to_hf(self.config)
        hf.write_checkpoint(path, hf_config, hf.state_dict_to_hf(self.state_dict(), self.config))

    # ---- optimisation --------------------------------------------------------------------

    def configure_optimizers(
        self,
        weight_decay: float,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.95),
        fused: bool | None = None,
    ) -> torch.optim.AdamW:
        """AdamW with weight decay on matrices (2-D and up) only, not on biases and norms."""
        params = {n: p for n, p in self.named_parameters() if p.requires_grad}
        decay = [p for p in params.values() if p.dim() >= 2]
        no_decay = [p for p in params.values() if p.dim() < 2]
        groups = [
            {"params": decay, "weight_decay": weight_decay},
            {"params": no_decay, "weight_decay": 0.0},
        ]
        if fused is None:
            fused = all(p.is_cuda for p in params.values())
        return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=fused)

    # ---- generation ----------------------------------------------------------------------

    @torch.no_grad()
    def generate(
        self,
        idx: torch.Tensor,
        max_new_tokens: int,
        temperature: float = 1.0,
        top_k: int | None = None,
        top_p: float | None = None,
        eos_token_id: int | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Continue idx (B, T) by up to max_new_tokens tokens, with a KV cache.

        temperature 0 is greedy (argmax); otherwise sampling from softmax(logits/temperature),
        restricted to the top_k tokens and/or the smallest set with probability >= top_p.
        A sequence that emits eos_token_id is padded with it; generation stops early when all
        have. Returns (B, T + n) int64, n <= max_new_tokens.
        """
        if max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {max_new_tokens}")
        if temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {temperature}")
        if top_k is not None and top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        if top_p is not None and not 0.0 < top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {top_p}")
        self._check_idx(idx)
        cfg = self.config
        total = idx.shape[1] + max_new_tokens
        if cfg.position == "learned" and total > cfg.block_size:
            raise ValueError(
                f"prompt length {idx.shape[1]} + max_new_tokens {max_new_tokens} exceeds "
                f"block_size {cfg.block_size} (learned positions)"
            )
        was_training = self.training
        self.eval()
        dtype = (
            torch.get_autocast_dtype(idx.device.type)
            if torch.is_autocast_enabled(idx.device.type)
            else self.lm_head.weight.dtype
        )
        caches = [
            KVCache(idx.shape[0], cfg.n_head, total, cfg.head_dim, dtype, idx.device)
            for _ in range(cfg.n_layer)
        ]
        out = idx
        done = torch.zeros(idx.shape[0], dtype=torch.bool, device=idx.device)
        step_input = idx
        for _ in range(max_new_tokens):
            h = self.hidden_states(step_input, caches)
            logits = self.logits(h[:, -1]).float()
            nxt = _sample(logits, temperature, top_k, top_p, generator)
            if eos_token_id is not None:
                nxt = torch.where(done, torch.full_like(nxt, eos_token_id), nxt)
                done |= nxt == eos_token_id
            out = torch.cat([out, nxt[:, None]], dim=1)
            step_input = nxt[:, None]
            if eos_token_id is not None and bool(done.all()):
                break
        self.train(was_training)
        return out


def _sample(
    logits: torch.Tensor,
    temperature: float,
    top_k: int | None,
    top_p: float | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Next token ids (B,) from logits (B, V)."""
    if temperature == 0.0:
        return logits.argmax(dim=-1)
    logits = logits / temperature
    if top_k is not None and top_k < logits.shape[-1]:
        kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
        cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # keep the first past top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        logits = torch.full_like(logits, float("-inf")).scatter(-1, order, sorted_logits)
    probs = F.softmax(logits, dim=-1)
    return torch.multinomial(probs, 1, generator=generator)[:, 0]
