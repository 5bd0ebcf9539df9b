"""fused_xent: one-pass Triton softmax cross-entropy with a pure-PyTorch reference beside it.

Importing this package does not import Triton; the kernels load on first use.
"""

from .functional import cross_entropy
from .modules import CrossEntropyLoss

__all__ = ["cross_entropy", "CrossEntropyLoss", "__version__"]
__version__ = "0.1.0"
