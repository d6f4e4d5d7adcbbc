"""Every Triton kernel compiles for a CUDA GPU (sm_90), checked on a machine without one.

The other kernel tests run under Triton's interpreter, which executes a kernel as Python and so
accepts code the compiler rejects (it let a jit function read a plain module global, which fails
to compile for CUDA). tests/cuda_compile.py compiles each kernel's variants through Triton's
compiler and ptxas, in a process without TRITON_INTERPRET (one per CPU), and fails a variant
whose loop keeps an MMA operand in one shared-memory buffer under asynchronous MMAs (a race the
interpreter, which runs a program's threads in order, cannot show: cuda_compile.async_mma_hazard),
a warp-specialized config Triton left unspecialized, and a combination of inputs with no config
within the shared memory a program may have (cuda_compile.SHARED_MEMORY).
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).with_name("cuda_compile.py")


def _nvidia_backend() -> bool:
    try:
        from triton.backends.nvidia.compiler import CUDABackend  # noqa: F401
    except Exception:
        return False
    return True


@pytest.mark.slow
@pytest.mark.skipif(not _nvidia_backend(), reason="this Triton build has no NVIDIA backend")
def test_every_kernel_compiles_for_hopper(tmp_path):
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path)  # compiled here, not taken from an earlier run's cache
    result = subprocess.run([sys.executable, str(SCRIPT), "--arch", "90"], env=env,
                            capture_output=True, text=True, timeout=1800)
    report = [line for line in result.stdout.splitlines() if line.startswith(("FAILED", "0/"))
              or "compiled for" in line]
    assert result.returncode == 0, "\n".join(report) or result.stderr[-3000:]
    assert "compiled for sm_90" in result.stdout, result.stdout[-2000:]
