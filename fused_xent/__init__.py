"""fused_xent: one-pass Triton softmax cross-entropy with a pure-PyTorch reference beside it.

Importing this package does not import Triton; the kernels load on first use.
"""

from .functional import TokenStats, cross_entropy, linear_cross_entropy
from .logprobs import linear_token_logprobs, token_logprobs
from .modules import CrossEntropyLoss, LinearCrossEntropyLoss

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "token_logprobs",
    "linear_token_logprobs",
    "TokenStats",
    "__version__",
]
__version__ = "0.1.0"
