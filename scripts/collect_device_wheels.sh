#!/usr/bin/env bash
# Collect, into a git-ignored folder, the wheels the GPU machine lacks for training (it has
# Python 3.12, torch 2.11, triton 3.6, transformers 5.17, accelerate, sympy, numpy, psutil,
# py-cpuinfo, msgpack, ninja, einops, tqdm and packaging, and no network):
#
#   - DeepSpeed, built here as a wheel with its ops off (DS_BUILD_OPS=0: pure Python; no op is
#     compiled, so none is checked against the device's torch);
#   - DeepSpeed's missing dependencies: hjson, pydantic with pydantic-core (built for CPython
#     3.12 on x86-64 manylinux), annotated-types, typing-inspection, typing-extensions (pydantic
#     needs a recent one; a newer one is harmless to the rest);
#   - math-verify with its parsers: latex2sympy2_extended, antlr4-python3-runtime (sympy is
#     already there: torch depends on it);
#   - liger-kernel (the peer baseline of benchmarks/gpu_trainer_check.sh);
#   - luffy-fast itself, built from this working tree (tracked and untracked files that git does
#     not ignore, copied to a temporary folder first so no build/ folder is reused).
#
# Versions are those of this checkout's .venv, so the device runs what the tests here ran.
#
#   bash scripts/collect_device_wheels.sh            # -> .device-wheels/ (about 5 MiB)
#   DEVICE_WHEELS=DIR PYTHON=python3 bash scripts/collect_device_wheels.sh
#
# On the device (benchmarks/gpu_trainer_check.sh does this):
#   python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .device-wheels/*.whl
#   export PYTHONPATH=/tmp/site
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${PYTHON:-$ROOT/.venv/bin/python}
DEST=${DEVICE_WHEELS:-$ROOT/.device-wheels}
# The device's interpreter and platform (README of the device tool: pip matches N exactly).
TARGET=(--python-version 3.12 --implementation cp --abi cp312 --abi abi3 --abi none
        --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64
        --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64
        --platform manylinux1_x86_64 --platform any)
# What the device lacks (its image: /work/.library/device/KINDS.md), by distribution name.
DOWNLOAD=(hjson pydantic pydantic-core annotated-types typing-inspection typing-extensions
          math-verify latex2sympy2_extended antlr4-python3-runtime liger-kernel)

[[ -x $PY ]] || { echo "collect_device_wheels: no Python at $PY (run make first, or set PYTHON)" >&2; exit 2; }
# pip, without the warnings about this machine's local index folders
pip() { "$PY" -m pip "$@" 2> >(grep -v "is ignored: it is neither a file nor a directory" >&2); }
version() { "$PY" -c 'import importlib.metadata as m, sys; print(m.version(sys.argv[1]))' "$1"; }

rm -rf "$DEST"
mkdir -p "$DEST"
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

# 1. DeepSpeed from its source distribution, against this venv's torch (its setup imports torch).
ds=$(version deepspeed)
echo "deepspeed $ds: building a wheel with DS_BUILD_OPS=0"
DS_BUILD_OPS=0 pip wheel -q --no-cache-dir --no-binary deepspeed --no-deps \
  --no-build-isolation -w "$DEST" "deepspeed==$ds"

# 2. Binary (or pure-Python) wheels for CPython 3.12 on x86-64 Linux.
for name in "${DOWNLOAD[@]}"; do
  pin="$name==$(version "$name")"
  echo "downloading $pin"
  pip download -q --no-deps --only-binary=:all: "${TARGET[@]}" -d "$DEST" "$pin"
done

# 3. luffy-fast from the working tree as it is now (the refactor's uncommitted files included).
git ls-files -z --cached --others --exclude-standard \
  | while IFS= read -r -d '' file; do [[ -f $file ]] && printf '%s\0' "$file"; done \
  | tar --null -T - -cf - | tar -xf - -C "$WORK"
echo "luffy-fast: building a wheel from the working tree"
pip wheel -q --no-deps --no-build-isolation --no-index -w "$DEST" "$WORK" >/dev/null

# Checks: one wheel per distribution, all installable together for the device's Python, and
# what DeepSpeed's metadata requires is either carried or in the device's image.
"$PY" - "$DEST" <<'EOF'
import collections, re, sys, zipfile
from pathlib import Path

from packaging.requirements import Requirement

DEVICE = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
          "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
          "implementation_name": "cpython", "platform_python_implementation": "CPython"}
dest = Path(sys.argv[1])
wheels = sorted(dest.glob("*.whl"))
names = collections.Counter(re.sub(r"[-_.]+", "-", w.name.split("-")[0]).lower() for w in wheels)
twice = [n for n, c in names.items() if c > 1]
if twice:
    sys.exit(f"collect_device_wheels: more than one wheel of {twice}")
on_device = {"torch", "triton", "numpy", "packaging", "psutil", "py-cpuinfo", "msgpack", "ninja",
             "einops", "tqdm", "sympy", "transformers", "tokenizers", "pyyaml", "safetensors",
             "huggingface-hub", "accelerate"}
missing = []
for wheel in wheels:
    with zipfile.ZipFile(wheel) as archive:
        meta = next(n for n in archive.namelist() if n.endswith(".dist-info/METADATA"))
        for line in archive.read(meta).decode().splitlines():
            if not line.startswith("Requires-Dist:"):
                continue
            need = Requirement(line.split(":", 1)[1].strip())
            if need.marker is not None and not need.marker.evaluate(DEVICE | {"extra": ""}):
                continue
            need = re.sub(r"[-_.]+", "-", need.name).lower()
            if need not in names and need not in on_device:
                missing.append(f"{wheel.name} needs {need}")
if missing:
    sys.exit("collect_device_wheels: not carried and not on the device:\n  " + "\n  ".join(missing))
EOF
pip install -q --no-index --no-deps --no-compile --only-binary=:all: "${TARGET[@]}" \
  --target "$WORK/site" "$DEST"/*.whl

# 4. Where a CPython 3.12 is at hand (PYTHON312, python3.12 on PATH or a pyenv 3.12), import the
#    carried packages that need no torch with it, as the device will: a compiled wheel of the
#    wrong ABI, or a parser its grader cannot load, fails here rather than on a lease.
py312=${PYTHON312:-}
for candidate in python3.12 "$HOME"/.pyenv/versions/3.12*/bin/python3.12; do
  [[ -n $py312 ]] && break
  "$candidate" -c 'import sys; assert sys.version_info[:2] == (3, 12)' 2>/dev/null && py312=$candidate
done
if [[ -n $py312 ]] && ! "$py312" -m pip install -q --no-deps --target "$WORK/extra" \
    "sympy==$(version sympy)" "mpmath==$(version mpmath)" \
    2> >(grep -v -e "Running pip as" -e "is ignored: it is neither" >&2); then  # on the device
  echo "no pip for $py312: the carried wheels were not imported"
elif [[ -n $py312 ]]; then
  PYTHONPATH="$WORK/site:$WORK/extra" "$py312" -c '
import hjson, pydantic, pydantic_core
from math_verify import parse, verify
assert verify(parse("$\\frac{1}{2}$"), parse("\\boxed{0.5}")), "math-verify graded 1/2 != 0.5"
print("imported with CPython 3.12: hjson, pydantic", pydantic.VERSION, "(pydantic-core",
      pydantic_core.__version__ + "), math-verify; 1/2 = 0.5 graded correct")'
else
  echo "no CPython 3.12 here (set PYTHON312): the carried wheels were not imported"
fi

ls -l "$DEST"
du -sh "$DEST" | awk '{print "total: " $1 " (the run tool carries at most 64 MiB with the tree)"}'
