"""Training checkpoints that survive crashes.

A checkpoint is a directory ``<out>/checkpoints/step-00000100/`` holding
``model.safetensors`` (weights), ``optimizer.pt`` and ``state.pt`` (tensors, numbers and
strings only: loaded with ``torch.load(weights_only=True)``, never unrestricted pickle) and
``config.json``. It is written into a temporary directory, every file fsynced, then renamed
into place and the parent directory fsynced: a process killed mid-save leaves at most a
stale ``*.tmp`` directory, never a half-written checkpoint, and the previous one stays
loadable. The last ``keep`` checkpoints are kept.
"""

from __future__ import annotations

import json
import os
import re
import shutil

import torch
from safetensors.torch import load_model, save_model

_NAME = re.compile(r"^step-(\d{8})$")


class CheckpointMismatch(ValueError):
    """A checkpoint that does not fit the run resuming from it."""


def _fsync(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def list_checkpoints(root: str) -> list[str]:
    """Complete checkpoint directories under ``root``, oldest first."""
    if not os.path.isdir(root):
        return []
    names = sorted(n for n in os.listdir(root) if _NAME.match(n))
    return [os.path.join(root, n) for n in names]


def save(
    root: str,
    step: int,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    state: dict,
    config: dict,
    keep: int = 2,
) -> str:
    """Write checkpoint ``step`` atomically under ``root``; returns its directory."""
    os.makedirs(root, exist_ok=True)
    final = os.path.join(root, f"step-{step:08d}")
    tmp = f"{final}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_model(model, os.path.join(tmp, "model.safetensors"))
    torch.save(optimizer.state_dict(), os.path.join(tmp, "optimizer.pt"))
    torch.save(state, os.path.join(tmp, "state.pt"))
    with open(os.path.join(tmp, "config.json"), "w") as f:
        json.dump(config, f, indent=2, sort_keys=True)
    for name in os.listdir(tmp):
        _fsync(os.path.join(tmp, name))
    _fsync(tmp)
    if os.path.isdir(final):  # re-saving the same step (e.g. after a resume)
        shutil.rmtree(final)
    os.rename(tmp, final)
    _fsync(root)
    for old in list_checkpoints(root)[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def remove_stale(root: str) -> None:
    """Delete temporary directories left by saves that were killed."""
    if os.path.isdir(root):
        for n in os.listdir(root):
            if ".tmp-" in n:
                shutil.rmtree(os.path.join(root, n), ignore_errors=True)


def read_config(path: str) -> dict:
    with open(os.path.join(path, "config.json")) as f:
        return json.load(f)


def load(
    path: str,
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer | None,
    expected_model_config: dict | None = None,
) -> dict:
    """Restore model (and optimizer) from checkpoint directory ``path``; return its state.

    Raises CheckpointMismatch when the checkpoint's model config differs from
    ``expected_model_config``.
    """
    config = read_config(path)
    if expected_model_config is not None and config.get("model") != expected_model_config:
        diff = {
            k: (config.get("model", {}).get(k), v)
            for k, v in expected_model_config.items()
            if config.get("model", {}).get(k) != v
        }
        raise CheckpointMismatch(
            f"checkpoint {path} is for another model (checkpoint vs this run: {diff})"
        )
    load_model(model, os.path.join(path, "model.safetensors"), strict=True)
    if optimizer is not None:
        optimizer.load_state_dict(
            torch.load(os.path.join(path, "optimizer.pt"), map_location="cpu", weights_only=True)
        )
    return torch.load(os.path.join(path, "state.pt"), map_location="cpu", weights_only=True)
