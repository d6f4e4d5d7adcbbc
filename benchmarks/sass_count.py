"""Machine instructions per logit in the hot loop of the kernels that stream kept logits, on a
machine without a GPU: each kernel compiled for sm_90 (Triton's compiler and ptxas, as
tests/cuda_compile.py does) with 16-bit logits and every optional input present, disassembled
with the cuobjdump Triton ships, and the instructions between a loop's head and its backward
branch counted per entry a thread handles in one iteration.

    python -m benchmarks.sass_count [--kernel NAME]   # TRITON_INTERPRET must be unset

It uses the installed Triton's compiler, ptxas and cuobjdump. The device has Triton 3.6; to count
what it runs: `pip install --target DIR triton==3.6.0` and `PYTHONPATH=DIR` (Triton 3.9's code
differs by an instruction or two per logit).

A static count: both sides of a branch inside the loop are counted (the report lists each
branch's share), and issue is not time. It says where a pass bound by instruction issue spends
its instructions, and compares two kernels for the same work.
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import cuda_compile  # noqa: E402  (reports a Hopper GPU while the kernels import)
import torch  # noqa: E402
import triton  # noqa: E402

STREAMING = ("_forward_kernel", "_lean_forward_kernel", "_row_forward_kernel",
             "_grad_logits_in_place_kernel", "_lean_grad_logits_kernel")
_INSTRUCTION = re.compile(r"\s+/\*([0-9a-f]{4,6})\*/\s+(.*?)\s*;")


def sass(compiled) -> list[tuple[int, str]]:
    """(address, instruction) of a compiled kernel's cubin."""
    cuobjdump = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    with tempfile.NamedTemporaryFile(suffix=".cubin") as cubin:
        cubin.write(compiled.asm["cubin"])
        cubin.flush()
        text = subprocess.run([str(cuobjdump), "-sass", cubin.name], capture_output=True,
                              text=True, check=True).stdout
    return [(int(m.group(1), 16), m.group(2)) for m in map(_INSTRUCTION.match, text.splitlines())
            if m]


def opcode(instruction: str) -> str:
    words = instruction.split()
    return (words[1] if words[0].startswith("@") else words[0]).split(".")[0]


def loops(code: list[tuple[int, str]]) -> list[tuple[int, int]]:
    """(head, branch) address pairs of the backward branches."""
    found = []
    for address, instruction in code:
        if opcode(instruction) == "BRA":
            target = re.search(r"0x([0-9a-f]+)", instruction.split("BRA", 1)[1])
            if target and int(target.group(1), 16) < address:
                found.append((int(target.group(1), 16), address))
    return found


def branches(code, head: int, end: int) -> list[tuple[int, int]]:
    """Forward conditional branches inside a loop: (branch address, target)."""
    out = []
    for address, instruction in code:
        if head <= address <= end and opcode(instruction) == "BRA" and instruction.startswith("@"):
            target = int(re.search(r"0x([0-9a-f]+)", instruction.split("BRA", 1)[1]).group(1), 16)
            if target > address:
                out.append((address, target))
    return out


def report(name: str, config, code) -> None:
    per_thread = config.kwargs["BLOCK_T"] * config.kwargs["BLOCK_V"] / (32 * config.num_warps)
    print(f"{name} {config.kwargs} warps {config.num_warps}: {per_thread:g} entries per thread")
    for head, end in loops(code):
        body = [instruction for address, instruction in code if head <= address <= end]
        counts = collections.Counter(map(opcode, body))
        print(f"  loop {head:#x}-{end:#x}: {len(body)} instructions, "
              f"{len(body) / per_thread:.1f} per entry: "
              + ", ".join(f"{op} {n}" for op, n in counts.most_common(10)))
        for address, target in branches(code, head, end):
            inside = sum(1 for a, _ in code if address < a < target)
            print(f"    branch at {address:#x} skips {inside} ({inside / per_thread:.1f} per entry)")


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernel", default=None, help="only the kernels whose name contains this")
    args = parser.parse_args(argv)
    compiled = []
    real_compile = triton.compile

    def keep(*positional, **named):
        compiled.append(real_compile(*positional, **named))
        return compiled[-1]

    cuda_compile.triton.compile = keep
    target = cuda_compile.GPUTarget("cuda", 90, 32)
    for kernel in cuda_compile.discover_kernels():
        for case in cuda_compile.cases(kernel):
            label, jit, heuristics, config, fixed, present, dtype, aligned, logits, _ = case
            if (jit.__name__ not in STREAMING or (args.kernel and args.kernel not in jit.__name__)
                    or not aligned or logits != torch.bfloat16):
                continue
            cuda_compile.compile_one(jit, heuristics, config, fixed, present, dtype, target,
                                     aligned, logits)
            report(jit.__name__, config, sass(compiled[-1]))


if __name__ == "__main__":
    main()
