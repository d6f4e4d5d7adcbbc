"""Compile every Triton kernel of luffy_fast.kernels for a CUDA target, on a machine without a GPU.

The tests run the kernels under Triton's interpreter, which executes them as Python: it accepts
code that the compiler rejects (a jit function reading a plain module global, a type the
language lacks), so such a kernel would first fail on a GPU. This script compiles each kernel
to a cubin for sm_90 (Hopper, the project's GPUs) through Triton's own compiler and ptxas, no
driver needed. Arguments are inferred from parameter names (`*_ptr` a pointer of the dtype the
call sites pass, the rest scalars), and the kernel's heuristics and autotune configs (the GPU's:
CUDA is reported present while the kernels are imported) supply its constexprs.

Per kernel: every combination of its optional inputs (absent ones are None, as the call sites
pass them) in bf16 and fp32 with the first config that applies, and then every config (each
combination of inputs that changes which configs apply); the kernels that read kept logits also
with 16-bit logits (luffy_fast.gemm.half_logits). A launch on a GPU compiles a variant
per alignment: pointers 16-byte aligned and integers divisible by 16 get `tt.divisibility`
(vectorized loads); the combinations compile without those marks, the configs with them.

    python tests/cuda_compile.py [--arch 90] [--kernel NAME] [--jobs N]   # TRITON_INTERPRET unset

The variants compile in one process per CPU (`--jobs`; compilation is single-threaded).

A compiled variant also fails when its loop keeps an MMA operand in a single shared-memory buffer
under asynchronous MMAs (`async_mma_hazard`), or when its config asks for warp specialization and
Triton left the loop unspecialized (`unspecialized`). A config may need more shared memory than
an SM gives a program (the autotuner skips it at launch), but every combination of inputs must
have one that fits (`SHARED_MEMORY`): the first config that applies, or else the next ones. Prints
one line per failure and exits non-zero when any kernel fails (tests/test_cuda_compile.py).
"""

from __future__ import annotations

import argparse
import itertools
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import NamedTuple, Optional

import torch

if os.environ.get("TRITON_INTERPRET") == "1":
    sys.exit("cuda_compile.py: unset TRITON_INTERPRET (the interpreter has no compiler to check)")
# The kernels pick their GPU tile configs when CUDA is there (Hopper's when the capability is 9):
# report a Hopper GPU while they are imported, so that those configs are the ones compiled.
ARCH = int(sys.argv[sys.argv.index("--arch") + 1]) if "--arch" in sys.argv else 90
torch.cuda.is_available = lambda: True
torch.cuda.get_device_capability = lambda *args, **kwargs: divmod(ARCH, 10)
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402
from triton.runtime.autotuner import Autotuner, Heuristics  # noqa: E402
from triton.runtime.jit import JITFunction  # noqa: E402

import luffy_fast.kernels  # noqa: E402
from luffy_fast.kernels import backward_filtered  # noqa: E402

# Optional inputs that come and go together at the call sites (None when absent).
GROUPS = {
    "bias": ("bias_ptr",),
    "logits": ("logits_ptr", "logit_rows_ptr", "dz_rows_ptr"),  # the filter's dL/dz over them
    "entropy": ("entropy_weight_ptr", "row_max_ptr", "expected_shift_ptr", "sum_all_ptr",
                "sum_pz_ptr", "entropy_ptr"),
    "old": ("old_ptr",),
    "rows": ("rows_ptr",),  # the fused forward's; None: the hidden rows in order (TMA-capable)
    "grad_weight": ("grad_weight_ptr",),
    "grad_bias": ("grad_bias_ptr",),
}
# Inputs that are optional elsewhere but always passed to these kernels.
REQUIRED = {"_grad_logits_in_place_kernel": {"logits_ptr"}, "_row_forward_kernel": {"logits_ptr"},
            "_lean_forward_kernel": {"logits_ptr"}, "_lean_grad_logits_kernel": {"logits_ptr"}}
# Shared memory a program may have, by architecture (opt-in maximum, bytes): 227 KiB on Hopper
# and Blackwell, 163 KiB on A100, 99 KiB on the sm_86/89 cards.
SHARED_MEMORY = {90: 232448, 100: 232448, 80: 166912, 86: 101376, 89: 101376}
# The one kernel that takes its hidden rows in order without a rows_ptr.
ROWS_OPTIONAL = {"_fused_forward_kernel"}


def required(kernel: str) -> set:
    return REQUIRED.get(kernel, set()) | (set() if kernel in ROWS_OPTIONAL else {"rows_ptr"})


# Keyword arguments of a kernel's config prune besides its named arguments, so that every config
# it may ever take is compiled: the fused forward's TMA forms beside its cp.async ones.
PRUNE_KWARGS = {"_fused_forward_kernel": {"TMA_ALLOWED": 1}}
# Pointer dtypes by name; "input" is the op's input dtype (bf16 or fp32); the rest are fp32.
POINTERS = {
    "input": ("hidden_ptr", "weight_ptr", "bias_ptr", "grad_logits_ptr", "grad_hidden_ptr",
              "grad_weight_ptr"),
    torch.int64: ("rows_ptr", "targets_ptr", "logit_rows_ptr", "dz_rows_ptr"),
    torch.int32: ("kept_v_ptr", "num_kept_v_ptr", "kept_t_ptr", "num_kept_t_ptr", "tile_kept_ptr",
                  "kept_bits_ptr"),
    torch.int8: ("keep_ptr",),
    torch.uint8: ("off_policy_ptr", "clipped_ptr", "active_ptr"),
}
FLOAT_SCALARS = {"inv_temperature", "threshold", "gamma", "low", "high", "dual_clip",
                 "max_log_ratio"}
TYPE_NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.int64: "i64",
              torch.int32: "i32", torch.int8: "i8", torch.uint8: "u8"}
# Constexprs the call sites pass themselves (not from heuristics or configs), each a list of
# value sets to compile.
CALL_CONSTEXPRS = {
    "_merge_splits_kernel": [{"BLOCK": 256}],
    "_fused_forward_kernel": [{"HALF_LOGITS": False}, {"HALF_LOGITS": True}],
    # all on, all off, LuffyLossConfig's defaults, and LuffyLossConfig.luffy()'s
    "_token_terms_kernel": [{"SHAPING": a, "CLIP_ON": b, "CLIP_OFF": c, "HAS_DUAL": d, "BLOCK": 1024}
                            for a, b, c, d in ((True,) * 4, (False,) * 4,
                                               (True, True, False, False),
                                               (True, False, False, False))],
    # the gradient filter's kernels: their launch in backward_filtered.filter_tiles
    "_filtered_grad_logits_kernel": ("filter_tiles", "logits"),
    "_sparse_grad_hidden_kernel": ("filter_tiles", "hidden"),
    "_sparse_grad_weight_kernel": ("filter_tiles", "weight"),
}


def discover_kernels() -> list:
    """Every `*_kernel` Triton function in the modules of luffy_fast.kernels (the jit helpers
    they call are compiled inside them)."""
    import importlib
    import pkgutil

    found = []
    for info in pkgutil.iter_modules(luffy_fast.kernels.__path__):
        module = importlib.import_module(f"luffy_fast.kernels.{info.name}")
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, (JITFunction, Autotuner, Heuristics)):
                found.append(value)
    return found


def unwrap(kernel):
    """The JITFunction under a kernel's decorators, its heuristics and its autotune configs."""
    heuristics, tuner = {}, None
    while not isinstance(kernel, JITFunction):
        if isinstance(kernel, Heuristics):
            heuristics.update(kernel.values)
        elif isinstance(kernel, Autotuner):
            tuner = kernel
        kernel = kernel.fn
    return kernel, heuristics, tuner


# Names that mean something else in one kernel: the epilogue's `weight_ptr` is the normalizer's
# fp32 per-token weights, not the LM head.
OVERRIDES = {"_token_terms_kernel": {"weight_ptr": torch.float32}}


def pointer_dtype(kernel: str, name: str, dtype: torch.dtype,
                  logits_dtype: torch.dtype = torch.float32) -> torch.dtype:
    if name == "logits_ptr":
        return logits_dtype
    if name in OVERRIDES.get(kernel, {}):
        return OVERRIDES[kernel][name]
    for kind, names in POINTERS.items():
        if name in names:
            return dtype if kind == "input" else kind
    return torch.float32


def call_constexprs(jit: JITFunction, heuristics: dict, dtype: torch.dtype) -> list[dict]:
    spec = CALL_CONSTEXPRS.get(jit.__name__, [{}])
    if isinstance(spec, tuple):
        tiles = backward_filtered.filter_tiles(dtype)[spec[1]]
        values = {k: v for k, v in tiles.items() if k in jit.arg_names}
        if "DOT_PRECISION" in jit.arg_names and "DOT_PRECISION" not in heuristics:
            values["DOT_PRECISION"] = "ieee" if dtype == torch.float32 else "tf32"
        options = {"num_warps": tiles["num_warps"], "num_stages": tiles["num_stages"]}
        return [{**values, "__options__": options}]
    return spec


def compile_one(jit, heuristics, config, fixed: dict, present: set, dtype, target,
                aligned: bool = False, logits_dtype: torch.dtype = torch.float32) -> None:
    args = {}
    for name in jit.arg_names:
        if name.endswith("_ptr"):
            optional = (any(name in names for names in GROUPS.values())
                        and name not in required(jit.__name__))
            args[name] = torch.empty(1, dtype=pointer_dtype(jit.__name__, name, dtype,
                                                            logits_dtype)) if (
                not optional or name in present) else None
        elif name in FLOAT_SCALARS:
            args[name] = 0.5
        else:
            args[name] = 16 if aligned else 3  # sizes, strides, buckets
    constexprs = {key: value for key, value in fixed.items() if key != "__options__"}
    options = dict(fixed.get("__options__", {}))
    if config is not None:
        constexprs.update(config.kwargs)
        options.update(num_warps=config.num_warps, num_stages=config.num_stages)
    for name, rule in heuristics.items():
        constexprs[name] = rule({**args, **constexprs})
    signature, attrs = {}, {}
    for index, name in enumerate(jit.arg_names):
        value = args[name]
        if name in constexprs or index in jit.constexprs:
            signature[name] = "constexpr"
            constexprs.setdefault(name, value)
        elif value is None:
            signature[name], constexprs[name] = "constexpr", None
        elif isinstance(value, torch.Tensor):
            signature[name] = "*" + TYPE_NAMES[value.dtype]
        else:
            signature[name] = "fp32" if isinstance(value, float) else "i32"
        if aligned and signature[name] != "constexpr" and signature[name] != "fp32":
            attrs[(index,)] = [["tt.divisibility", 16]]
    return triton.compile(ASTSource(fn=jit, signature=signature, constexprs=constexprs,
                                    attrs=attrs), target=target, options=options)


# A float tile in a single shared-memory buffer of a loop whose asynchronous MMAs (Hopper's wgmma)
# are waited for one or more iterations late.
_SINGLE_BUFFER = re.compile(r"local_alloc : \(\) -> !ttg\.memdesc<1x[0-9x]+x(?:bf16|f16|f32)\b")
_LATE_WAIT = re.compile(r"pendings = [1-9]")


def async_mma_hazard(compiled) -> Optional[str]:
    """Why a compiled kernel may overwrite an MMA operand that an MMA still reads, or None.

    Triton double-buffers a loop's MMA operand tiles in shared memory, but a tile that something
    besides an MMA also reads (a sum of it in registers, say) may get one buffer: the next
    iteration's copy then lands on it while the last MMA, still running asynchronously, reads it
    (seen in the gradient filter's kernels with Triton 3.6). The interpreter cannot show it."""
    ir = compiled.asm.get("ttgir", "")
    single = _SINGLE_BUFFER.search(ir)
    if single and _LATE_WAIT.search(ir):
        return (f"a single-buffered MMA operand under asynchronous MMAs ({single.group(0)}): feed "
                "the tile to MMAs only (a product with ones sums it)")
    return None


def unspecialized(compiled, config) -> Optional[str]:
    """Why a config that asks for warp specialization (WS=1) did not get it, or None: Triton adds
    its producer and consumer warps (4 become 12), and leaves a loop it cannot specialize as is."""
    if config is None or not config.kwargs.get("WS"):
        return None
    if "ttg.warp_specialize" in compiled.asm.get("ttgir", "") and (
            compiled.metadata.num_warps > config.num_warps):
        return None
    return f"WS=1 but not warp-specialized ({compiled.metadata.num_warps} warps)"


class Case(NamedTuple):
    """One variant to compile. A fallback case is compiled only while no config before it with
    the same call constexprs, inputs, dtypes, logits and alignment fits the shared memory."""

    label: str
    jit: JITFunction
    heuristics: dict
    config: Optional[triton.Config]
    fixed: dict  # the call sites' constexprs
    present: set  # the optional inputs passed
    dtype: torch.dtype
    aligned: bool
    logits: torch.dtype
    fallback: bool

    def group(self) -> tuple:
        """The cases a fitting config is sought among."""
        fixed = tuple(sorted((key, repr(value)) for key, value in self.fixed.items()))
        return (self.jit.__name__, fixed, self.dtype, frozenset(self.present), self.logits,
                self.aligned)


def cases(kernel):
    """The kernel's `Case`s."""
    jit, heuristics, tuner = unwrap(kernel)
    needed = required(jit.__name__)
    groups = [group for group, names in GROUPS.items()
              if any(n in jit.arg_names and n not in needed for n in names)]
    present_all = {n for group in groups for n in GROUPS[group]}
    for dtype in (torch.bfloat16, torch.float32):
        configs = [None] if tuner is None else list(tuner.configs)
        for fixed in call_constexprs(jit, heuristics, dtype):
            # every combination of optional inputs with the first config that applies to it
            for chosen in itertools.product((False, True), repeat=len(groups)):
                present = {n for group, on in zip(groups, chosen) if on for n in GROUPS[group]}
                usable = _pruned(tuner, jit, configs, present, dtype)
                inputs = sorted(g for g, on in zip(groups, chosen) if on)
                for index, config in enumerate(usable):
                    yield Case(f"{jit.__name__} {dtype} {fixed} inputs={inputs}" + (
                        f" config={config} (after configs that failed or need more shared memory)"
                        if index else ""),
                        jit, heuristics, config, fixed, present, dtype, False, torch.float32,
                        index > 0)
            # every config, aligned, with all of them (and without the logits, whose presence
            # picks which configs apply: tile products or a read of kept logits; and without
            # rows where they are optional: rows in order, the only ones the TMA configs take)
            variants = [present_all]
            if present_all & set(GROUPS["logits"]):
                variants.append(present_all - set(GROUPS["logits"]))
            if "rows" in groups:
                variants += [present - set(GROUPS["rows"]) for present in variants]
            for present in variants:
                for config in _pruned(tuner, jit, configs, present, dtype):
                    yield Case(f"{jit.__name__} {dtype} {fixed} aligned config={config} "
                           f"inputs={len(present)}",
                           jit, heuristics, config, fixed, present, dtype, True, torch.float32,
                           False)
            # 16-bit kept logits (bf16 inputs only): with every input, unaligned and per config
            if dtype == torch.bfloat16 and "logits_ptr" in jit.arg_names:
                for present in [present_all | needed] + (
                        [(present_all | needed) - set(GROUPS["rows"])] if "rows" in groups else []):
                    usable = _pruned(tuner, jit, configs, present, dtype)
                    for config, aligned, fallback in ([(c, False, i > 0) for i, c in enumerate(usable)]
                                                      + [(c, True, False) for c in usable]):
                        yield Case(f"{jit.__name__} bf16 {fixed} logits aligned={aligned} "
                                   f"config={config} "
                               f"inputs={len(present)}", jit, heuristics, config, fixed, present,
                               dtype, aligned, torch.bfloat16, fallback)


def _pruned(tuner, jit, configs, present: set, dtype) -> list:
    prune = None if tuner is None else getattr(tuner, "early_config_prune", None)
    if prune is None:
        return configs
    optional = {n for names in GROUPS.values() for n in names} - required(jit.__name__)
    named = {name: (torch.empty(1, dtype=pointer_dtype(jit.__name__, name, dtype))
                    if name in present or name not in optional else None)
             if name.endswith("_ptr") else 1 for name in jit.arg_names}
    return prune(configs, named, **PRUNE_KWARGS.get(jit.__name__, {}))


# The run's cases and target, which the worker processes inherit (forked: cases hold lambdas).
_RUN: dict = {"cases": [], "target": None}


def check_case(index: int) -> tuple[int, Optional[str], int]:
    """Compile case `index` of the run: (index, why it fails or None, its shared memory bytes)."""
    case = _RUN["cases"][index]
    try:
        compiled = compile_one(case.jit, case.heuristics, case.config, case.fixed, case.present,
                               case.dtype, _RUN["target"], case.aligned, case.logits)
    except Exception as error:  # report them all
        first = str(error).strip().splitlines()[-1:] or [""]
        return index, f"{type(error).__name__}: {first[0][:300]}", 0
    return (index, async_mma_hazard(compiled) or unspecialized(compiled, case.config),
            compiled.metadata.shared)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90)
    parser.add_argument("--kernel", default=None, help="only the kernels whose name contains this")
    parser.add_argument("--jobs", type=int, default=len(os.sched_getaffinity(0)),
                        help="compiling processes (default: one per CPU)")
    args = parser.parse_args()
    start = time.perf_counter()
    kernels = discover_kernels()
    print(f"{len(kernels)} kernels: {', '.join(sorted(unwrap(k)[0].__name__ for k in kernels))}")
    _RUN["target"] = GPUTarget("cuda", args.arch, 32)
    _RUN["cases"] = [case for kernel in kernels for case in cases(kernel)
                     if not args.kernel or args.kernel in case.jit.__name__]
    run = _RUN["cases"]
    limit = SHARED_MEMORY.get(args.arch, float("inf"))
    fits: dict[tuple, bool] = {}  # per Case.group: some config fits the shared memory
    firsts = [index for index, case in enumerate(run) if not case.fallback]
    failures = big = done = 0

    def record(index: int, why: Optional[str], shared: int) -> None:
        nonlocal failures, big, done
        done += 1
        if done % 50 == 0 and done <= len(firsts):
            print(f"  {done}/{len(firsts)} compiled, {time.perf_counter() - start:.0f} s", flush=True)
        if why:
            failures += 1
            print(f"FAILED {run[index].label}: {why}", flush=True)
            return
        big += shared > limit
        group = run[index].group()
        fits[group] = fits.get(group, False) or shared <= limit

    if args.jobs > 1:  # compilation is single-threaded: one process per CPU
        pending = set(firsts)
        context = multiprocessing.get_context("fork")
        try:
            with ProcessPoolExecutor(args.jobs, mp_context=context) as pool:
                for result in pool.map(check_case, firsts):
                    pending.discard(result[0])
                    record(*result)
        except BrokenProcessPool:  # a compiler crash killed a worker: name what did not finish
            for index in sorted(pending):
                record(index, "its compiling process died (a crash in the compiler?)", 0)
    else:
        for index in firsts:
            record(*check_case(index))
    total = len(firsts)
    for index, case in enumerate(run):  # the next configs of a combination whose first is too big
        if case.fallback and not fits.get(case.group()):
            total += 1
            record(*check_case(index))
    over = [group for group, fit in fits.items() if not fit]
    for name, fixed, dtype, present, logits, aligned in over:
        print(f"FAILED {name} {dict(fixed)} {dtype} logits {logits} aligned={aligned} "
              f"inputs={sorted(present)}: "
              f"no config fits the {limit // 1024} KiB of shared memory a program may have on "
              f"sm_{args.arch}")
    print(f"{total - failures}/{total} kernel variants compiled for sm_{args.arch} in "
          f"{time.perf_counter() - start:.0f} s; {big} need more shared memory than a program may "
          f"have (the autotuner skips them), {len(over)} input combinations have no config that "
          "fits")
    return 1 if failures or over else 0


if __name__ == "__main__":
    sys.exit(main())
