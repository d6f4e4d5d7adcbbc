import os

import torch

# The triton backend's kernels run on the CPU interpreter in tests when there is no GPU. Triton
# reads this when a kernel is defined, so it must be set before luffy_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
