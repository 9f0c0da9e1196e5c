"""The benchmark harness's bookkeeping (CPU): the results CSV and the backward-thread switch."""

import csv

import torch

from tritonformer.bench.harness import Result, append_csv, backward_thread, environment
from tritonformer.bench.model import markdown


def _row(case: str) -> Result:
    return Result("op", case, "bfloat16", "tritonformer", 1.5, 1.4, 1.6, 100.0, "GB/s", 0.0)


def test_backward_thread_is_recorded_and_switchable():
    assert environment()["backward"] == "autograd-device-thread"
    backward_thread(calling=True)
    try:
        assert not torch._C._is_multithreading_enabled()
        assert environment()["backward"] == "calling-thread"
    finally:
        backward_thread(calling=False)
    assert torch._C._is_multithreading_enabled()


def test_append_csv_appends_and_upgrades_an_older_header(tmp_path):
    path = tmp_path / "results.csv"
    old_fields = ["gpu", "date", "op", "case", "ms"]  # an older file, fewer columns
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=old_fields)
        w.writeheader()
        w.writerow({"gpu": "H200", "date": "2026-11-25", "op": "op", "case": "old", "ms": 2.0})
    append_csv([_row("a")], str(path))
    append_csv([_row("b")], str(path))
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["case"] for r in rows] == ["old", "a", "b"]
    assert rows[0]["gpu"] == "H200" and rows[0]["ms"] == "2.0" and rows[0]["backward"] == ""
    assert rows[1]["backward"] == "autograd-device-thread" and float(rows[2]["ms"]) == 1.5


def test_model_table_without_a_baseline():
    # --providers may leave torch.compile (or eager) out: its ratio column says so
    runs = (("torch", 57.0, 245.0), ("tritonformer", 42.0, 336.0))
    rows = [dict(config="gpt2 T=1024 B=16", provider=p, ms=ms, tflops=t, tokens_per_s=1e5,
                 peak_gib=6.0) for p, ms, t in runs]
    row = "| gpt2 T=1024 B=16 | tritonformer | 42.00 | 336.0 | 100,000 | 6.00 | 1.37x | - |"
    assert row in markdown(rows)
