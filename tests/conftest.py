import os

# Threads. Every tensor in this suite is tiny, so a second torch thread buys nothing, and on a
# loaded machine OpenMP threads that spin while waiting for each other made runs several times
# slower (two 200-step parity runs under a load of 4 on 2 cores: 14 s of CPU with OMP_NUM_THREADS=1,
# 32 s with 2). Numba's parallel kernels keep their threads (how they split the work is under
# test) but wait passively, which OpenMP reads once, when torch loads it.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import torch  # noqa: E402

torch.set_num_threads(1)

# Without a GPU the Triton kernels run in Triton's interpreter on CPU tensors; this must be
# decided before triton is first imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
