"""Plot and tabulate kernel benchmark results.

``python -m tritonformer.bench.plot benchmarks/results.csv --out benchmarks/plots`` draws one
bar chart per op (the metric of each case, one bar per provider) from each op's latest run
on one GPU in the CSV, and prints a markdown table of each case with Tritonformer's ratio to the
other providers (time ratio: > 1 means Tritonformer is faster).
"""

from __future__ import annotations

import argparse
import csv
import os
import sys
from collections import defaultdict


def load(path: str, gpu: str | None = None) -> list[dict]:
    """Rows of ``gpu`` (default: the last GPU in the file): for each op, those of its latest
    run (by date), so ops benchmarked in different calls all appear. Every row keeps its
    own date; the device copy's latest run is kept as the bandwidth reference."""
    with open(path) as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ValueError(f"{path} has no rows")
    gpu = gpu or rows[-1]["gpu"]
    rows = [r for r in rows if r["gpu"] == gpu]
    latest: dict[str, str] = {}
    for r in rows:
        latest[r["op"]] = max(latest.get(r["op"], ""), r["date"])
    return [r for r in rows if r["date"] == latest[r["op"]]]


def markdown(rows: list[dict]) -> str:
    """One line per (op, case, dtype): Tritonformer's metric and speed ratio to each baseline."""
    by = defaultdict(dict)
    for r in rows:
        by[(r["op"], r["case"], r["dtype"])][r["provider"]] = r
    others = sorted({r["provider"] for r in rows} - {"tritonformer"})
    head = ["op", "case", "tritonformer"] + [f"vs {o}" for o in others]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for (op, case, _), provs in by.items():
        ours = provs.get("tritonformer")
        if ours is None:
            continue
        cells = [op, case, f"{float(ours['metric']):.0f} {ours['unit']}"]
        for o in others:
            base = provs.get(o)
            cells.append(f"{float(base['ms']) / float(ours['ms']):.2f}x" if base else "")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], out_dir: str) -> list[str]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    os.makedirs(out_dir, exist_ok=True)
    paths = []
    for op in dict.fromkeys(r["op"] for r in rows):
        sub = [r for r in rows if r["op"] == op]
        cases = list(dict.fromkeys(r["case"] for r in sub))
        provs = list(dict.fromkeys(r["provider"] for r in sub))
        fig, ax = plt.subplots(figsize=(max(6, 1.2 * len(cases)), 4))
        w = 0.8 / len(provs)
        for i, p in enumerate(provs):
            vals = [
                next(
                    (float(r["metric"]) for r in sub if r["case"] == c and r["provider"] == p), 0.0
                )
                for c in cases
            ]
            ax.bar([x + i * w for x in range(len(cases))], vals, w, label=p)
        ax.set_xticks(
            [x + 0.4 - w / 2 for x in range(len(cases))], cases, rotation=30, ha="right", fontsize=7
        )
        ax.set_ylabel(sub[0]["unit"])
        ax.set_title(
            f"{op} ({sub[0]['gpu']}, torch {sub[0]['torch']}, triton {sub[0]['triton']})",
            fontsize=9,
        )
        ax.legend(fontsize=7)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tritonformer.bench.plot", description=__doc__)
    p.add_argument("csv")
    p.add_argument("--gpu", help="GPU name to select (default: the last one in the file)")
    p.add_argument("--out", default="benchmarks/plots", help="directory for the PNGs")
    a = p.parse_args(argv)
    rows = load(a.csv, a.gpu)
    for path in plot(rows, a.out):
        print("wrote", path)
    print(markdown(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
