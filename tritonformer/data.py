"""Corpora, tokenizers, token files and the batch loader.

- Corpora: the default embedded corpus is the Python standard library's own source files
  (found through ``sysconfig``, no download), in sorted path order; or any text file or
  directory of text files; or a pre-tokenised token file.
- Tokenizers: "byte" (UTF-8 bytes, vocab 256, the default), "gpt2" (GPT-2 BPE through
  tiktoken, when its encoding is available offline), or a path to a Hugging Face
  ``tokenizer.json``.
- Token files: raw little-endian uint16 or uint32 token ids (nanoGPT's ``.bin`` format), with
  an optional ``<file>.json`` sidecar {"dtype", "vocab_size", "tokenizer"} that
  ``tritonformer prepare`` writes.
- Loader: random (B, T+1) windows of a token array drawn with a seeded ``torch.Generator``
  whose state is the data position (saved in checkpoints). All ranks draw the same global
  batch and each takes its own slice, so N processes see exactly what one process with the
  N-times larger batch sees.
"""

from __future__ import annotations

import json
import os
import sysconfig

import numpy as np
import torch


class DataError(ValueError):
    """Unusable data: missing, empty, too short, or of the wrong dtype."""


# ---- tokenizers ----------------------------------------------------------------------------


class ByteTokenizer:
    """UTF-8 bytes as tokens: vocab 256, no unknowns, nothing to download."""

    name = "byte"
    vocab_size = 256
    eos_token_id: int | None = None

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(int(i) for i in ids).decode("utf-8", errors="replace")


class TiktokenTokenizer:
    """GPT-2 BPE through tiktoken; needs the encoding in tiktoken's local cache."""

    name = "gpt2"

    def __init__(self) -> None:
        try:
            import tiktoken

            self.enc = tiktoken.get_encoding("gpt2")
        except Exception as e:  # not installed, or no cached encoding and no network
            raise DataError(
                "the 'gpt2' tokenizer needs tiktoken with its GPT-2 encoding available offline "
                f"({type(e).__name__}: {e}); use --tokenizer byte or a tokenizer.json path"
            ) from None
        self.vocab_size = self.enc.n_vocab
        self.eos_token_id = self.enc.eot_token

    def encode(self, text: str) -> list[int]:
        return self.enc.encode_ordinary(text)

    def decode(self, ids: list[int]) -> str:
        return self.enc.decode([int(i) for i in ids])


class HFTokenizer:
    """A Hugging Face ``tokenizer.json`` (through the ``tokenizers`` library)."""

    def __init__(self, path: str) -> None:
        try:
            from tokenizers import Tokenizer
        except ImportError:
            raise DataError("a tokenizer.json needs the 'tokenizers' package") from None
        try:
            self.tok = Tokenizer.from_file(path)
        except Exception as e:
            raise DataError(f"could not load tokenizer {path!r}: {e}") from None
        self.name = os.path.abspath(path)
        self.vocab_size = self.tok.get_vocab_size()
        self.eos_token_id = None

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text).ids

    def decode(self, ids: list[int]) -> str:
        return self.tok.decode([int(i) for i in ids])


def get_tokenizer(spec: str):
    """ "byte", "gpt2", or a path to a tokenizer.json."""
    if spec == "byte":
        return ByteTokenizer()
    if spec == "gpt2":
        return TiktokenTokenizer()
    if os.path.isfile(spec):
        return HFTokenizer(spec)
    raise DataError(f"unknown tokenizer {spec!r}: use 'byte', 'gpt2' or a tokenizer.json path")


# ---- corpora -------------------------------------------------------------------------------

STDLIB = "stdlib"


def stdlib_files() -> list[str]:
    """The standard library's .py files (site-packages excluded), sorted by relative path."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
    return sorted(files, key=lambda p: os.path.relpath(p, root))


def text_files(path: str) -> list[str]:
    """The text files of a corpus: the stdlib, one file, or a directory's files (sorted)."""
    if path == STDLIB:
        return stdlib_files()
    if os.path.isfile(path):
        return [path]
    if os.path.isdir(path):
        out = []
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
            out += [os.path.join(dirpath, f) for f in sorted(filenames) if not f.startswith(".")]
        if not out:
            raise DataError(f"data directory {path!r} has no files")
        return out
    raise DataError(f"data path {path!r} does not exist")


def read_text(files: list[str]) -> str:
    parts = []
    for f in files:
        with open(f, "rb") as fh:
            parts.append(fh.read().decode("utf-8", errors="replace"))
    return "\n".join(parts)


def tokenize_files(files: list[str], tokenizer, dtype=None) -> np.ndarray:
    """Token ids of the files' concatenated text, as uint16 (vocab <= 65536) or uint32."""
    text = read_text(files)
    if not text:
        raise DataError(f"the data ({len(files)} file(s)) is empty")
    dtype = dtype or (np.uint16 if tokenizer.vocab_size <= 65536 else np.uint32)
    if isinstance(tokenizer, ByteTokenizer):
        return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(dtype)
    return np.asarray(tokenizer.encode(text), dtype=dtype)


# ---- token files ---------------------------------------------------------------------------


def write_tokens(path: str, tokens: np.ndarray, vocab_size: int, tokenizer: str) -> None:
    """Write raw token ids plus a ``.json`` sidecar describing them (atomically)."""
    tmp = path + ".tmp"
    tokens.tofile(tmp)
    os.replace(tmp, path)
    meta = {
        "dtype": np.dtype(tokens.dtype).name,
        "vocab_size": vocab_size,
        "tokenizer": tokenizer,
        "tokens": int(tokens.size),
    }
    with open(path + ".json", "w") as f:
        json.dump(meta, f)


def read_tokens(path: str, dtype: str | None = None, vocab_size: int | None = None) -> np.ndarray:
    """Memory-map a token file; dtype from the sidecar, else ``dtype``, else uint16.

    Raises DataError for an empty file, a size that is not a whole number of tokens, a dtype
    that contradicts the sidecar, or token ids >= vocab_size (the sign of a wrong dtype).
    """
    if not os.path.isfile(path):
        raise DataError(f"token file {path!r} does not exist")
    meta = {}
    if os.path.isfile(path + ".json"):
        with open(path + ".json") as f:
            meta = json.load(f)
    if dtype and meta.get("dtype") and dtype != meta["dtype"]:
        raise DataError(f"{path} holds {meta['dtype']} tokens (per its .json), not {dtype}")
    dt = np.dtype(dtype or meta.get("dtype", "uint16"))
    if dt not in (np.uint16, np.uint32):
        raise DataError(f"token dtype must be uint16 or uint32, got {dt}")
    size = os.path.getsize(path)
    if size == 0:
        raise DataError(f"token file {path!r} is empty")
    if size % dt.itemsize:
        raise DataError(f"{path} is {size} bytes, not a whole number of {dt} tokens")
    data = np.memmap(path, dtype=dt, mode="r")
    if vocab_size is not None:
        hi = int(data.max())
        if hi >= vocab_size:
            raise DataError(
                f"{path} has token id {hi} >= vocab_size {vocab_size}: wrong dtype "
                f"({dt}) or a vocab size smaller than the tokenizer's"
            )
    return data


def load_corpus(
    path: str,
    tokenizer,
    vocab_size: int,
    token_dtype: str | None = None,
    val_fraction: float = 0.05,
) -> tuple[np.ndarray, np.ndarray]:
    """(train, val) token arrays: a token file (.bin) as is, or text tokenised now.

    Token ids must be < vocab_size. The split is the last ``val_fraction`` of the tokens.
    """
    if path != STDLIB and path.endswith(".bin"):
        tokens = read_tokens(path, token_dtype, vocab_size)
    else:
        tokens = tokenize_files(text_files(path), tokenizer)
    n_val = max(1, int(len(tokens) * val_fraction))
    return tokens[:-n_val], tokens[-n_val:]


# ---- loader --------------------------------------------------------------------------------


class BatchLoader:
    """Random (batch, block+1) windows of ``tokens``, this rank's slice of a global batch.

    The global batch of ``batch_size * world_size`` windows is drawn from one seeded
    generator on every rank; rank r takes windows [r*batch_size, (r+1)*batch_size).
    ``state()`` / ``set_state()`` give the data position for checkpoints.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        block_size: int,
        seed: int,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        if len(tokens) < block_size + 1:
            raise DataError(
                f"the data has {len(tokens)} tokens, fewer than one block of {block_size + 1}; "
                "use more data or a smaller block size"
            )
        self.tokens, self.B, self.T = tokens, batch_size, block_size
        self.rank, self.world = rank, world_size
        self.gen = torch.Generator().manual_seed(seed)

    def next(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        starts = torch.randint(
            0, len(self.tokens) - self.T, (self.B * self.world,), generator=self.gen
        )
        mine = starts[self.rank * self.B : (self.rank + 1) * self.B].tolist()
        rows = np.stack([np.asarray(self.tokens[s : s + self.T + 1], dtype=np.int64) for s in mine])
        xy = torch.from_numpy(rows)
        if device.type == "cuda":
            xy = xy.pin_memory().to(device, non_blocking=True)
        return xy[:, :-1], xy[:, 1:]

    def state(self) -> torch.Tensor:
        return self.gen.get_state()

    def set_state(self, state: torch.Tensor) -> None:
        self.gen.set_state(state)
