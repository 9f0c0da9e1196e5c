"""Tritonformer: a GPT-2-style transformer whose every compute kernel is written in Triton.

Layers, bottom to top: ``kernels`` (Triton code) -> ``ops`` (autograd + functional API, the
counterpart of ``torch.nn.functional``) -> ``nn`` (modules, the counterpart of ``torch.nn``)
-> the model. ``reference`` is the plain-PyTorch twin of every op.
"""

# runtime first: it turns on Triton's interpreter (no CUDA device) before triton.language and
# any kernel are defined; the isort split keeps import sorting from moving it.
from . import runtime

# isort: split
from . import library, nn, ops, reference  # library: the kernels as custom ops (torch.compile)
from .model import Transformer, TransformerConfig

__all__ = ["Transformer", "TransformerConfig", "library", "nn", "ops", "reference", "runtime"]
__version__ = "0.1.0"
