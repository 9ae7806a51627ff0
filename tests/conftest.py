import os

import torch

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be
# decided before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
