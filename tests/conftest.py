import os
import sys
from pathlib import Path

import pytest
import torch

# The repository root, for `benchmarks` (plain `pytest`, unlike `python -m pytest`, leaves it out).
ROOT = str(Path(__file__).resolve().parent.parent)
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# The triton backend's kernels run on the CPU interpreter in tests when there is no GPU. Triton
# reads this when a kernel is defined, so it must be set before luffy_fast.kernels is imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A tiny random Qwen2 and the math tokenizer, saved as a transformers model directory, once
    per test module (a module may define its own)."""
    from math_helpers import tiny_model_dir

    return tiny_model_dir(tmp_path_factory.mktemp("model"))
