"""spnn_fast: SPNN sequential recommendation with fused kernels.

Fused Triton kernels on a GPU, a C++ batch encoder on the CPU, pure-PyTorch fallbacks everywhere
else; ``spnn_fast.backends.status()`` says what runs here.
"""

from spnn_fast import backends, functional, nn  # noqa: I001  (after the ops they register)
from spnn_fast import ops  # noqa: F401  (every op registered: exported programs find them)
from spnn_fast.backends import _warn_missing_once
from spnn_fast.encode import IGNORE_INDEX, SequenceBatch, encode_batch
from spnn_fast.log import InteractionLog

__version__ = "0.1.0"

__all__ = [
    "IGNORE_INDEX",
    "InteractionLog",
    "SequenceBatch",
    "__version__",
    "backends",
    "encode_batch",
    "functional",
    "nn",
]

_warn_missing_once()
