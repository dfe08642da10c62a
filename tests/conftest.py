import os

import torch

# Without a GPU, Triton kernels run in the interpreter. It must be on before any kernel is
# decorated, so it is set here, before spnn_fast (which imports kernels lazily) is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
