"""The functional API: Triton counterparts of ``torch.nn.functional``, differentiable.

Every op checks its arguments (TypeError/ValueError naming the argument), follows torch's
autocast policy for its torch counterpart, and runs in the input's dtype otherwise.
"""

from .activations import activation, gelu, relu
from .attention import alibi_slopes, attention, attention_packed
from .cross_entropy import cross_entropy
from .dropout import dropout
from .layer_norm import add_layer_norm, layer_norm
from .linear_cross_entropy import linear_cross_entropy
from .matmul import linear, matmul
from .softmax import softmax

__all__ = [
    "alibi_slopes", "attention", "attention_packed",
    "activation", "add_layer_norm", "cross_entropy", "dropout", "gelu", "layer_norm", "relu",
    "softmax",
    "linear", "linear_cross_entropy", "matmul",
]
