"""fused_xent: one-pass Triton softmax cross-entropy with a pure-PyTorch reference beside it.

Importing this package does not import Triton; the kernels load on first use. ``fused_xent.hf``
(the Hugging Face transformers integration) loads on first access, and imports transformers only
when a model is patched.
"""

import importlib

from .distillation import distillation_loss, linear_distillation_loss
from .functional import TokenStats, cross_entropy, linear_cross_entropy
from .logprobs import linear_token_logprobs, token_logprobs
from .modules import (
    CrossEntropyLoss,
    DistillationLoss,
    LinearCrossEntropyLoss,
    LinearDistillationLoss,
)

__all__ = [
    "cross_entropy",
    "CrossEntropyLoss",
    "linear_cross_entropy",
    "LinearCrossEntropyLoss",
    "token_logprobs",
    "linear_token_logprobs",
    "TokenStats",
    "distillation_loss",
    "linear_distillation_loss",
    "DistillationLoss",
    "LinearDistillationLoss",
    "__version__",
]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name == "hf":
        return importlib.import_module(".hf", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
