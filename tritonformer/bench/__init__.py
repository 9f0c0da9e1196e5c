"""Benchmarks: one module per op family (each with ``run() -> list[Result]``), one harness.

Run ``python -m tritonformer.bench [op ...]`` (or ``tritonformer bench kernels``) on a GPU.
"""

#: op family -> module whose ``run()`` benchmarks it against PyTorch eager and torch.compile.
KERNEL_BENCHMARKS = {
    "activations": "tritonformer.bench.activations",
    "attention": "tritonformer.bench.attention",
    "matmul": "tritonformer.bench.matmul",
    "layer_norm": "tritonformer.bench.layer_norm",
    "softmax": "tritonformer.bench.softmax",
    "cross_entropy": "tritonformer.bench.cross_entropy",
    "linear_cross_entropy": "tritonformer.bench.linear_cross_entropy",
}
