"""Tritonformer: a GPT-2-style transformer whose every compute kernel is written in Triton.

Layers, bottom to top: ``kernels`` (Triton code) -> ``ops`` (autograd + functional API, the
counterpart of ``torch.nn.functional``) -> ``nn`` (modules, the counterpart of ``torch.nn``)
-> the model. ``reference`` is the plain-PyTorch twin of every op.
"""

from . import (  # noqa: E402
    nn,
    ops,
    reference,
    runtime,  # noqa: F401  (first: picks compiled kernels or the interpreter)
)
from .model import Transformer, TransformerConfig  # noqa: E402

__all__ = ["Transformer", "TransformerConfig", "nn", "ops", "reference", "runtime"]
__version__ = "0.1.0"
