"""The softmax statistics in the logits GEMM's epilogue (opt-in: LUFFY_FAST_FUSED_FORWARD=1).

By default a kept chunk's logits come from cuBLAS and a second kernel reads them back for the
per-token logsumexp, target logit and E_p[z] (kernels/forward.py); the recompute strategy and
`token_logprobs` at small budgets multiply the tiles inside that kernel, one vocabulary tile at a
time, each tile's software pipeline filled and drained on its own.

This kernel is the same forward built as a GEMM. A program owns a token tile and a share of the
vocabulary, and walks it in one loop over (vocabulary tile, H step) that Triton flattens and
pipelines across tile boundaries (`tl.range(flatten=True)`): the next tile's loads are in flight
while the epilogue folds the finished tile into the running statistics. The epilogue can also
store the raw tile (fp32, or the inputs' 16-bit dtype) for the dL/dz pass, so a kept chunk needs
no cuBLAS GEMM and no pass over its logits; without a buffer the logits are never written
(`token_logprobs`, the recompute strategy's forward). The vocabulary is split so that the grid
fills whole waves of the GPU's SMs (`wave_splits`). Not yet timed on a GPU; hence opt-in.

On Hopper the operand tiles can come by TMA (tensor descriptors: one instruction per tile, no
address arithmetic in the loop, out-of-range rows and columns filled with zeros) instead of
`cp.async` loads: every tile config exists in both forms and the autotuner times them, where the
hidden rows are a contiguous block (`rows=None`; TMA cannot gather rows) and both operands meet
TMA's 16-byte alignment (`LUFFY_FAST_FUSED_TMA`: `auto`, `0` never, `1` wherever it can).
"""

from __future__ import annotations

import os
from functools import lru_cache
from typing import Optional

import torch
import triton
import triton.language as tl

from .forward import merge_splits, split_partials
from .utils import (
    INTERPRET,
    INTERPRETED_16_BIT,
    LOGIT_FLAGS,
    hopper,
    num_sms,
    num_vocab_splits,
    online_softmax_step,
    shape_bucket,
    tile_configs,
    tile_product,
    tuning_bench,
)


def fused_forward_enabled() -> bool:
    """LUFFY_FAST_FUSED_FORWARD=1 (read at each call)."""
    return os.environ.get("LUFFY_FAST_FUSED_FORWARD", "0") == "1"


def tma_mode() -> str:
    """LUFFY_FAST_FUSED_TMA (read at each call): `auto` (the default: the autotuner times TMA and
    `cp.async` loads), `0` (never TMA) or `1` (TMA wherever the inputs allow it)."""
    mode = os.environ.get("LUFFY_FAST_FUSED_TMA", "auto")
    if mode not in ("auto", "0", "1"):
        raise ValueError(f"LUFFY_FAST_FUSED_TMA must be auto, 0 or 1, not {mode!r}")
    return mode


def _tma_capable() -> bool:
    """TMA exists from Hopper (sm_90) on; the interpreter runs descriptors on the CPU."""
    return INTERPRET or (torch.cuda.is_available() and torch.cuda.get_device_capability()[0] >= 9)


def tma_possible(hidden: torch.Tensor) -> bool:
    """Whether a launch over `hidden`'s rows in order could take the TMA configs (the rest of
    `_tma_allowed`'s conditions are alignment): where it could not, a caller need not gather the
    rows it would otherwise hand the kernel in order."""
    return hidden.element_size() == 2 and tma_mode() != "0" and _tma_capable()


def _tma_allowed(args: dict) -> int:
    """0: no TMA configs for this launch (the hidden rows gathered, an operand not 16-byte aligned
    as TMA needs, fp32 inputs, no TMA on the device, or LUFFY_FAST_FUSED_TMA=0); 1: TMA and
    `cp.async` configs both; 2: TMA configs only. Part of the autotune key, so that a config
    tuned for one launch is never reused where it cannot run. fp32 inputs (full-precision
    products, no tensor cores) compile with TMA loads to a few thousand register spills for
    sm_90 with Triton 3.6, so they keep `cp.async`."""
    if args["rows_ptr"] is not None or not tma_possible(args["hidden_ptr"]):
        return 0
    for name, stride in (("hidden_ptr", "stride_hidden"), ("weight_ptr", "stride_weight")):
        tensor = args[name]
        if tensor.data_ptr() % 16 or (args[stride] * tensor.element_size()) % 16:
            return 0
    return 2 if tma_mode() == "1" else 1


def fused_tile_configs() -> list[triton.Config]:
    """utils.tile_configs without its 128 x 256 tile: compiled for sm_90 with the statistics (and
    a stored tile) in the flattened loop's epilogue, that one spills hundreds of registers and,
    storing fp32 tiles, needs more shared memory than an SM has (tests/cuda_compile.py). Each
    in two forms where TMA exists: `cp.async` loads (TMA=0) and TMA loads (TMA=1); and on Hopper
    the 128 x 128 tile warp-specialized (WS=1: 4 warps that Triton makes 12, a producer group and
    two consumer groups; no register spills with any store, compiled for sm_90)."""
    configs = [c for c in tile_configs() if c.kwargs["BLOCK_V"] * c.kwargs["BLOCK_T"] <= 128 * 128]
    if hopper():  # the 128 x 128 tile with one pipeline stage fewer, for the stored fp32 tile's room
        configs.insert(1, triton.Config(dict(configs[0].kwargs), num_warps=8, num_stages=3))
    forms = (0, 1) if _tma_capable() else (0,)
    tuned = [triton.Config({**c.kwargs, "TMA": tma, "WS": 0}, num_warps=c.num_warps,
                           num_stages=c.num_stages) for tma in forms for c in configs]
    if hopper():
        tuned.append(triton.Config({**configs[0].kwargs, "TMA": 1, "WS": 1}, num_warps=4,
                                   num_stages=3))
    return tuned


CONFIGS = fused_tile_configs()


def _configs_for(configs: list, named_args: dict, TMA_ALLOWED: int = 0, **_) -> list:
    """The configs a launch may take. 16-bit inputs tune over the 128-row tiles only: the 64-row
    one is there for fp32 tiles' shared memory, and each config costs a compilation on the first
    call. TMA configs only where `TMA_ALLOWED` (`_tma_allowed`), and never with gathered rows or
    fp32 inputs, and then only those when it is 2 or on the interpreter (whose one tile is
    tested in each form by LUFFY_FAST_FUSED_TMA)."""
    if named_args.get("rows_ptr") is not None or named_args["hidden_ptr"].element_size() == 4:
        TMA_ALLOWED = 0
    forms = {0: (0,), 1: (1,) if INTERPRET else (0, 1), 2: (1,)}[TMA_ALLOWED]
    configs = ([c for c in configs if c.kwargs.get("TMA", 0) in forms]
               or [c for c in configs if not c.kwargs.get("TMA", 0)])
    if named_args["hidden_ptr"].element_size() == 4:
        return configs
    return [c for c in configs if c.kwargs["BLOCK_T"] >= 128] or configs


@triton.jit
def _described_tile_product(hidden_desc, weight_desc, t0, v0, HD, DOT_PRECISION: tl.constexpr,
                            BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
                            UPCAST: tl.constexpr):
    """utils.tile_product with TMA loads: the [BLOCK_T, BLOCK_V] tile of raw h W^T at token `t0`
    and vocabulary entry `v0` in fp32, its operand tiles read through tensor descriptors (zeros
    past either operand's end)."""
    raw = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for k0 in range(0, HD, BLOCK_H):
        h = hidden_desc.load([t0, k0])
        w = weight_desc.load([v0, k0])
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        raw = tl.dot(h, tl.trans(w), raw, input_precision=DOT_PRECISION)
    return raw


@triton.heuristics({"HAS_BIAS": LOGIT_FLAGS["HAS_BIAS"], "DOT_PRECISION": LOGIT_FLAGS["DOT_PRECISION"],
                    "STORE_LOGITS": lambda args: args["logits_ptr"] is not None,
                    "WITH_ENTROPY": lambda args: args["sum_pz_ptr"] is not None,
                    "GATHER": lambda args: args["rows_ptr"] is not None,
                    "TMA_ALLOWED": _tma_allowed, **INTERPRETED_16_BIT})
@triton.autotune(configs=CONFIGS, key=["V_BUCKET", "H_BUCKET", "STORE_LOGITS", "TMA_ALLOWED"],
                 prune_configs_by={"early_config_prune": _configs_for}, do_bench=tuning_bench)
@triton.jit
def _fused_forward_kernel(
    hidden_ptr, weight_ptr, bias_ptr, rows_ptr, targets_ptr, logits_ptr,
    max_ptr, sum_ptr, sum_all_ptr, sum_pz_ptr, target_logit_ptr,
    N, V, HD, stride_hidden, stride_weight, stride_logits, inv_temperature,
    V_BUCKET, H_BUCKET,
    HALF_LOGITS: tl.constexpr, HAS_BIAS: tl.constexpr, WITH_ENTROPY: tl.constexpr,
    STORE_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST: tl.constexpr,
    GATHER: tl.constexpr, TMA_ALLOWED: tl.constexpr, TMA: tl.constexpr, WS: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    # The setup and the partials' stores repeat forward._forward_kernel's on purpose: as shared
    # jit helpers they changed that kernel's register allocation in one sm_90 variant, and its
    # machine code is the one the GPU rounds timed.
    split = tl.program_id(0)
    num_splits = tl.num_programs(0)
    t0 = tl.program_id(1) * BLOCK_T
    offs_t = t0 + tl.arange(0, BLOCK_T)
    t_mask = offs_t < N
    if GATHER:
        rows = tl.load(rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    else:  # token i is hidden row i
        rows = offs_t.to(tl.int64)
    targets = tl.load(targets_ptr + offs_t, mask=t_mask, other=0)
    tiles_per_split = tl.cdiv(tl.cdiv(V, BLOCK_V), num_splits)
    v_begin = split * tiles_per_split * BLOCK_V
    v_end = tl.minimum(v_begin + tiles_per_split * BLOCK_V, V)
    tl.static_assert(not (TMA and GATHER), "TMA loads whole tiles of rows in order: rows=None")
    if TMA:
        hidden_desc = tl.make_tensor_descriptor(hidden_ptr, [N, HD], [stride_hidden, 1],
                                                [BLOCK_T, BLOCK_H])
        weight_desc = tl.make_tensor_descriptor(weight_ptr, [V, HD], [stride_weight, 1],
                                                [BLOCK_V, BLOCK_H])

    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    run_sum_all = tl.zeros((BLOCK_T,), tl.float32)
    run_sum_pz = tl.zeros((BLOCK_T,), tl.float32)
    target_logit = tl.zeros((BLOCK_T,), tl.float32)
    # warp-specialized (WS, TMA only): a producer warp group issues the TMA loads, two consumer
    # groups multiply and fold; Triton 3.6 specializes unflattened loops only on Hopper
    for v0 in tl.range(v_begin, v_end, BLOCK_V, flatten=not WS, warp_specialize=WS):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        v_mask = offs_v < v_end
        if TMA:
            raw = _described_tile_product(hidden_desc, weight_desc, t0, v0, HD, DOT_PRECISION,
                                          BLOCK_T, BLOCK_V, BLOCK_H, UPCAST)
        else:
            raw = tile_product(hidden_ptr, weight_ptr, rows, offs_v, t_mask, v_mask, HD,
                               stride_hidden, stride_weight, DOT_PRECISION, BLOCK_T, BLOCK_V,
                               BLOCK_H, UPCAST)
        if HALF_LOGITS:  # the statistics of the logits as a 16-bit LM head rounds them
            raw = raw.to(hidden_ptr.dtype.element_ty).to(tl.float32)
        if STORE_LOGITS:  # raw h W^T, row i for token i, as the GEMM of the kept strategy writes it
            tl.store(logits_ptr + offs_t.to(tl.int64)[:, None] * stride_logits + offs_v[None, :],
                     raw.to(logits_ptr.dtype.element_ty), mask=t_mask[:, None] & v_mask[None, :])
        if HAS_BIAS:
            raw += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        run_max, run_sum, run_sum_all, run_sum_pz, target_logit = online_softmax_step(
            raw * inv_temperature, offs_v, v_mask, targets, run_max, run_sum, run_sum_all,
            run_sum_pz, target_logit, WITH_ENTROPY)

    out = split * N + offs_t
    tl.store(max_ptr + out, run_max, mask=t_mask)
    tl.store(sum_ptr + out, run_sum, mask=t_mask)
    tl.store(target_logit_ptr + out, target_logit, mask=t_mask)
    if WITH_ENTROPY:
        tl.store(sum_all_ptr + out, run_sum_all, mask=t_mask)
        tl.store(sum_pz_ptr + out, run_sum_pz, mask=t_mask)


# Grid axis 1 (token tiles) takes at most 65535 programs, so one launch covers at most this many
# tokens at the smallest token tile; longer inputs take several launches.
MAX_LAUNCH_ROWS = 65535 * 64


@lru_cache(maxsize=1024)
def wave_splits(num_tokens: int, vocab_size: int, slots: int, block_t: int = 128,
                block_v: int = 128, per_program: float = 2.0) -> int:
    """Vocabulary splits for a grid of splits x token tiles (`block_t` x `block_v` tiles) whose
    programs fill whole waves of the GPU's `slots` (programs it runs at once): the split count
    with the least time, counted as waves x (vocabulary tiles per program + `per_program`, a
    program's start and partials in tiles), the fewest splits among equals."""
    token_tiles = -(-max(num_tokens, 1) // block_t)
    vocab_tiles = -(-vocab_size // block_v)

    def cost(splits: int) -> float:
        waves = -(-splits * token_tiles // slots)
        return waves * (-(-vocab_tiles // splits) + per_program)

    return min(range(1, vocab_tiles + 1), key=lambda splits: (cost(splits), splits))


def _splits(num_tokens: int, vocab_size: int, meta: dict) -> int:
    """The split count for a launch at config `meta` (the interpreter's: num_vocab_splits). On a
    GPU a 128 x 128 tile's shared memory leaves room for one program per SM, a 64-row one for
    two (tests/cuda_compile.py's figures)."""
    if INTERPRET or not torch.cuda.is_available():
        return num_vocab_splits(num_tokens, vocab_size)
    per_sm = 1 if meta["BLOCK_T"] * meta["BLOCK_V"] >= 128 * 128 else 2
    return wave_splits(num_tokens, vocab_size, num_sms() * per_sm, meta["BLOCK_T"],
                       meta["BLOCK_V"])


def _most_splits(hidden: torch.Tensor, num_tokens: int, vocab_size: int) -> int:
    """The most vocabulary splits any config the launch may take would use."""
    tuned = _configs_for(CONFIGS, {"hidden_ptr": hidden})
    return max(_splits(num_tokens, vocab_size, config.kwargs) for config in tuned)


def launch_bytes(hidden: torch.Tensor, num_tokens: int, vocab_size: int, with_entropy: bool) -> int:
    """Device memory a launch over `num_tokens` rows allocates beside its outputs: its per-split
    partials (3 fp32 values a row and split, 5 with entropy)."""
    rows = min(num_tokens, MAX_LAUNCH_ROWS)
    return _most_splits(hidden, rows, vocab_size) * num_tokens * 4 * (5 if with_entropy else 3)


def _scratch(size: int, alignment: int, stream) -> torch.Tensor:
    """Device memory for the tensor descriptors a TMA launch builds (two of 128 bytes a program;
    torch's allocations are aligned to 512 bytes)."""
    return torch.empty(size, dtype=torch.int8, device=torch.cuda.current_device())


def _ensure_allocator() -> None:
    """Triton's allocator for kernels that need device memory of their own (a per-thread context
    variable, read at each launch): ours, unless the process has set one."""
    from triton.runtime import _allocation

    if isinstance(_allocation._allocator.get(), _allocation.NullAllocator):
        triton.set_allocator(_scratch)


def fused_forward(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
                  rows: Optional[torch.Tensor], targets: torch.Tensor, temperature: float,
                  with_entropy: bool, logits: Optional[torch.Tensor] = None, half: bool = False,
                  out=None):
    """Per-token logsumexp, log pi, max and E_p[z] - max (the last None without entropy), as
    forward.logsumexp_forward returns them (written into `out` when given).

    Tokens are rows `rows` [N] of `hidden` [T, H] with `targets` [N], or with `rows` None every
    row of `hidden` in order (N = T; the only case whose operand tiles may come by TMA).
    `logits`: an [N, V] buffer (fp32 or the inputs' 16-bit dtype, rows contiguous) that receives
    raw h W^T, row i for token i; None keeps no logits. `half`: the statistics are those of the
    logits rounded to the inputs' 16-bit dtype (LuffyLossConfig.logits_dtype = "input"), as the
    kept buffer holds them.
    """
    N, V, HD = hidden.shape[0] if rows is None else rows.numel(), weight.shape[0], weight.shape[1]
    if N > MAX_LAUNCH_ROWS:
        def launch(start: int):
            def part(tensor):
                return None if tensor is None else tensor[start:start + MAX_LAUNCH_ROWS]
            return fused_forward(hidden if rows is not None else part(hidden), weight, bias,
                                 part(rows), part(targets), temperature, with_entropy,
                                 part(logits), half)

        parts = [launch(start) for start in range(0, N, MAX_LAUNCH_ROWS)]
        merged = [None if values[0] is None else torch.cat(values) for values in zip(*parts)]
        if out is None:
            return tuple(merged)
        for into, values in zip(out, merged):
            if into is not None:
                into.copy_(values)
        return out
    if rows is None and not INTERPRET and hidden.is_cuda and tma_possible(hidden):
        _ensure_allocator()  # the descriptors' memory, should a TMA config run
    # partials for the most splits any config takes; the launch's own count is its grid's
    most = _most_splits(hidden, N, V)
    partials = split_partials(most, N, hidden.device, with_entropy)
    launched = [most]
    if N > 0:
        def grid(meta):
            launched.append(_splits(N, V, meta))
            return launched[-1], triton.cdiv(N, meta["BLOCK_T"])

        _fused_forward_kernel[grid](
            hidden, weight, bias, rows, targets, logits, *partials,
            N, V, HD, hidden.stride(0), weight.stride(0),
            logits.stride(0) if logits is not None else 0, 1.0 / temperature,
            shape_bucket(V), shape_bucket(HD), HALF_LOGITS=half)
    return merge_splits(*(None if p is None else p[:launched[-1]] for p in partials), out)
