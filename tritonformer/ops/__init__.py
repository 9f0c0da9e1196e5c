"""The functional API: Triton counterparts of ``torch.nn.functional``, differentiable.

Every op checks its arguments (TypeError/ValueError naming the argument), follows torch's
autocast policy for its torch counterpart, and runs in the input's dtype otherwise.
"""

from .activations import activation, gelu, relu

__all__ = ["activation", "gelu", "relu"]
