"""Loss curves of one or more training runs, drawn to a PNG (matplotlib)."""

from __future__ import annotations

import os

from .train import read_metrics


def _metrics_path(run: str) -> str:
    if os.path.isfile(run):
        return run
    for name in ("metrics.jsonl", "metrics.csv"):
        if os.path.isfile(os.path.join(run, name)):
            return os.path.join(run, name)
    raise FileNotFoundError(f"no metrics.jsonl or metrics.csv in {run!r}")


def plot_runs(runs: list[str], out: str, labels: list[str] | None = None) -> None:
    """Train loss (lines) and val loss (markers) against step, one colour per run."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if labels and len(labels) != len(runs):
        raise ValueError(f"--labels needs one label per run ({len(runs)}), got {len(labels)}")
    fig, ax = plt.subplots(figsize=(8, 5))
    for i, run in enumerate(runs):
        rows = read_metrics(_metrics_path(run))
        if not rows:
            raise ValueError(f"{run!r} has no metrics rows yet")
        label = labels[i] if labels else os.path.basename(os.path.normpath(run))
        (line,) = ax.plot(
            [r["step"] for r in rows], [r["loss"] for r in rows], lw=1, label=f"{label} train"
        )
        val = [r for r in rows if r.get("val_loss") is not None]
        if val:
            ax.plot(
                [r["step"] for r in val],
                [r["val_loss"] for r in val],
                "o--",
                color=line.get_color(),
                ms=4,
                label=f"{label} val",
            )
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    fig.savefig(out, dpi=120)
    plt.close(fig)
