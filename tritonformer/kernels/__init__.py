"""Triton kernels (``@triton.jit``) and the launch functions that run them on checked tensors.

One file per op family. Nothing here validates user input or knows about autograd: that is
``tritonformer.ops``.
"""
