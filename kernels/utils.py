"""Shared helpers for the Triton kernels: interpreter detection, tile configs, the autotuners'
timing, launch flags, split counts, and the logit tile both kernels form."""

from __future__ import annotations

import os
import time

import torch
import triton
import triton.language as tl

INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"


def lean_passes() -> bool:
    """LUFFY_FAST_LEAN=1 (read at each call): the passes over kept logits run their lean kernels,
    kernels/forward_lean.py and kernels/backward_lean.py (opt-in until timed on a GPU)."""
    return os.environ.get("LUFFY_FAST_LEAN", "0") == "1"


def hopper() -> bool:
    return torch.cuda.is_available() and torch.cuda.get_device_capability()[0] == 9


def tile_configs() -> list[triton.Config]:
    """Tile shapes to autotune over: a few for Hopper, one safe default elsewhere.

    Under the interpreter every tile is simulated on the CPU, so it gets small ones.
    """
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4)]
    if hopper():
        # The last one fits fp32 tiles in shared memory, where the larger ones run out.
        return [
            triton.Config({"BLOCK_T": 128, "BLOCK_V": 128, "BLOCK_H": 64}, num_warps=8, num_stages=4),
            triton.Config({"BLOCK_T": 128, "BLOCK_V": 256, "BLOCK_H": 64}, num_warps=8, num_stages=3),
            triton.Config({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=4, num_stages=3),
        ]
    return [triton.Config({"BLOCK_T": 64, "BLOCK_V": 128, "BLOCK_H": 32}, num_warps=4, num_stages=3)]


def stream_configs() -> list[triton.Config]:
    """Tile shapes for the kernels' other mode, reading logits a GEMM wrote: no products, a
    memory-bound pass, so narrow row blocks and many programs in flight (BLOCK_H is unused)."""
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_H": 16}, num_warps=4)]
    return [
        triton.Config({"BLOCK_T": 16, "BLOCK_V": 512, "BLOCK_H": 16}, num_warps=4),
        triton.Config({"BLOCK_T": 8, "BLOCK_V": 1024, "BLOCK_H": 16}, num_warps=4),
        triton.Config({"BLOCK_T": 32, "BLOCK_V": 256, "BLOCK_H": 16}, num_warps=4),
        triton.Config({"BLOCK_T": 16, "BLOCK_V": 1024, "BLOCK_H": 16}, num_warps=8),
        triton.Config({"BLOCK_T": 4, "BLOCK_V": 2048, "BLOCK_H": 16}, num_warps=8),
        triton.Config({"BLOCK_T": 8, "BLOCK_V": 2048, "BLOCK_H": 16}, num_warps=8),
    ]


def in_place_configs() -> list[triton.Config]:
    """Rows per program and tile width for the in-place dL/dz passes (backward.py's and
    backward_lean.py's; memory-bound, whole rows per program, so few rows per program for
    enough programs in flight)."""
    if INTERPRET or not torch.cuda.is_available():
        return [triton.Config({"BLOCK_T": 4, "BLOCK_V": 32}, num_warps=4)]
    return [triton.Config({"BLOCK_T": t, "BLOCK_V": v}, num_warps=w)
            for t, v, w in ((2, 4096, 8), (2, 2048, 4), (4, 2048, 8), (4, 1024, 4), (8, 1024, 8),
                            (16, 512, 8))]


def tuning_bench(kernel_call, quantiles=(0.5, 0.2, 0.8)) -> list[float]:
    """Milliseconds of one autotune config at `quantiles` (the autotuners' `do_bench`).

    Triton's own benchmark allocates a 256 MiB buffer to flush the L2 cache before each run, which
    passes the op's memory budget on the first call of a size class; this one allocates nothing.
    The kernels tuned here stream buffers of a few hundred MiB or more (chunks of logits, the
    [V, H] weight) through a ~50 MiB L2, so a warm cache changes every config's time alike."""
    if INTERPRET or not torch.cuda.is_available():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            kernel_call()
            times.append((time.perf_counter() - start) * 1e3)
    else:
        kernel_call()  # compiles
        torch.cuda.synchronize()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        kernel_call()
        end.record()
        end.synchronize()
        reps = max(5, min(100, int(TUNING_MS / max(start.elapsed_time(end), 1e-3))))
        events = [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True))
                  for _ in range(reps)]
        # a head start, so the GPU times back-to-back launches and not the host's launch path
        torch.cuda._sleep(reps * 100_000)  # clock cycles: ~60 us a run at ~1.7 GHz
        for begin, finish in events:
            begin.record()
            kernel_call()
            finish.record()
        torch.cuda.synchronize()
        times = [begin.elapsed_time(finish) for begin, finish in events]
    return torch.quantile(torch.tensor(times, dtype=torch.float32),
                          torch.tensor(quantiles, dtype=torch.float32)).tolist()


# Timed milliseconds per config when tuning (Triton's default is 100, after 25 of warm-up).
TUNING_MS = 50.0

_TILES, _STREAMS = tile_configs(), stream_configs()
# Autotune arguments of the kernels that either multiply logit tiles or read them from a buffer
# (`FROM_LOGITS`): each mode is tuned over its own configs only.
AUTOTUNE = {
    "configs": _TILES + _STREAMS,
    "key": ["V_BUCKET", "H_BUCKET", "FROM_LOGITS"],
    "do_bench": tuning_bench,
    "prune_configs_by": {"early_config_prune": lambda configs, named_args, **_: (
        _STREAMS if named_args["logits_ptr"] is not None else _TILES)},
}


def dot_precision(dtype: torch.dtype) -> str:
    """fp32 inputs get full-precision products (Triton would default to tf32)."""
    return "ieee" if dtype == torch.float32 else "tf32"


# Launch flags derived from the arguments (`triton.heuristics`): absent optional inputs are passed
# as None, and the kernels compile without the code that would read them.
LOGIT_FLAGS = {
    "HAS_BIAS": lambda args: args["bias_ptr"] is not None,
    "FROM_LOGITS": lambda args: args["logits_ptr"] is not None,
    "DOT_PRECISION": lambda args: dot_precision(args["hidden_ptr"].dtype),
}
# The interpreter's tl.dot returns garbage on 16-bit operands (seen with Triton 3.9: errors of
# 1e10 on a 16 x 16 product of small bf16 numbers), so a kernel that multiplies 16-bit tiles
# under it upcasts them first (`tile_product`'s UPCAST); compiled kernels never do.
INTERPRETED_16_BIT = {"UPCAST": lambda args: INTERPRET and args["hidden_ptr"].element_size() == 2}
# The two in-place dL/dz kernels (backward.py, backward_lean.py), which
# backward.grad_logits_in_place launches with the same arguments: their flags and their
# autotuning (timing a config overwrites the logits; grad_logits_in_place puts them back).
IN_PLACE_FLAGS = {"HAS_BIAS": LOGIT_FLAGS["HAS_BIAS"],
                  "WITH_ENTROPY": lambda args: args["entropy_weight_ptr"] is not None}


def in_place_autotune() -> dict:
    """`triton.autotune` arguments of the in-place dL/dz kernels (a fresh config list each)."""
    return {"configs": in_place_configs(), "key": ["C_BUCKET", "V_BUCKET"],
            "do_bench": tuning_bench}


def shape_bucket(n: int) -> int:
    """Autotune key: round up to a power of two, so nearby shapes share one tuning."""
    return 1 << max(0, int(n) - 1).bit_length()


def num_sms() -> int:
    """Streaming multiprocessors of the current CUDA device."""
    return torch.cuda.get_device_properties(torch.cuda.current_device()).multi_processor_count


def num_vocab_splits(num_tokens: int, vocab_size: int) -> int:
    """Vocabulary splits for the forward grid, so that small token counts still fill the GPU."""
    if INTERPRET or not torch.cuda.is_available():
        return max(1, min(3, triton.cdiv(vocab_size, 64)))
    # About 4k vocabulary entries per split keeps each program's loop long and its partials few;
    # more splits when there are too few token tiles to fill the GPU.
    sms = num_sms()
    token_tiles = triton.cdiv(max(num_tokens, 1), 128)
    splits = max(triton.cdiv(vocab_size, 4096), triton.cdiv(2 * sms, token_tiles))
    return max(1, min(splits, triton.cdiv(vocab_size, 512)))


@triton.jit
def kept_logit_tile(logits_ptr, bias_ptr, logit_rows, offs_v, t_mask, v_mask, stride_logits,
                    inv_temperature, HAS_BIAS: tl.constexpr):
    """A tile of z = (h W^T + b) / temperature in fp32 read from a buffer of raw h W^T that a GEMM
    filled (fp32 or 16-bit; rows `logit_rows`, columns `offs_v`): the kernels that read kept
    logits, and `logit_tile`."""
    raw = tl.load(logits_ptr + logit_rows[:, None] * stride_logits + offs_v[None, :],
                  mask=t_mask[:, None] & v_mask[None, :], other=0.0).to(tl.float32)
    if HAS_BIAS:
        raw += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    return raw * inv_temperature


@triton.jit
def raw_logit_tile(row_starts, bias_ptr, offs_v, v_mask, HAS_BIAS: tl.constexpr,
                   MASKED: tl.constexpr):
    """A [rows, BLOCK_V] tile of raw h W^T (plus bias) in fp32 from a buffer of kept logits, rows
    starting at the pointers `row_starts`: loads without masks (the lean passes' whole tiles),
    or masked by column `v_mask` (their ragged last tile, where masked entries read 0)."""
    if MASKED:
        u = tl.load(row_starts[:, None] + offs_v[None, :], mask=v_mask[None, :],
                    other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
    else:
        u = tl.load(row_starts[:, None] + offs_v[None, :]).to(tl.float32)
        if HAS_BIAS:
            u += tl.load(bias_ptr + offs_v).to(tl.float32)[None, :]
    return u


@triton.jit
def tile_product(hidden_ptr, weight_ptr, rows, offs_v, t_mask, v_mask, HD, stride_hidden,
                 stride_weight, DOT_PRECISION: tl.constexpr, BLOCK_T: tl.constexpr,
                 BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr, UPCAST: tl.constexpr = False):
    """A [BLOCK_T, BLOCK_V] tile of raw h W^T in fp32: hidden rows `rows` times weight rows
    `offs_v`, over H in steps of BLOCK_H with fp32 accumulation. `UPCAST` (the interpreter only,
    `INTERPRETED_16_BIT`): 16-bit operands multiplied as fp32, where they are exact."""
    raw = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for k0 in range(0, HD, BLOCK_H):
        offs_k = k0 + tl.arange(0, BLOCK_H)
        k_mask = offs_k < HD
        h = tl.load(hidden_ptr + rows[:, None] * stride_hidden + offs_k[None, :],
                    mask=t_mask[:, None] & k_mask[None, :], other=0.0)
        w = tl.load(weight_ptr + offs_v[:, None].to(tl.int64) * stride_weight + offs_k[None, :],
                    mask=v_mask[:, None] & k_mask[None, :], other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        raw = tl.dot(h, tl.trans(w), raw, input_precision=DOT_PRECISION)
    return raw


@triton.jit
def logit_tile(hidden_ptr, weight_ptr, bias_ptr, logits_ptr, rows, logit_rows, offs_v, t_mask, v_mask,
               HD, stride_hidden, stride_weight, stride_logits, inv_temperature,
               HAS_BIAS: tl.constexpr, FROM_LOGITS: tl.constexpr, DOT_PRECISION: tl.constexpr,
               BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """A [BLOCK_T, BLOCK_V] tile of z = (h W^T + b) / temperature in fp32.

    Either multiplied here from hidden and weight tiles (`tile_product`), or read from a buffer
    of raw h W^T (`logits_ptr`, rows `logit_rows`) that a GEMM filled (`kept_logit_tile`).
    """
    if FROM_LOGITS:
        z = kept_logit_tile(logits_ptr, bias_ptr, logit_rows, offs_v, t_mask, v_mask,
                            stride_logits, inv_temperature, HAS_BIAS)
    else:
        raw = tile_product(hidden_ptr, weight_ptr, rows, offs_v, t_mask, v_mask, HD, stride_hidden,
                           stride_weight, DOT_PRECISION, BLOCK_T, BLOCK_V, BLOCK_H)
        if HAS_BIAS:
            raw += tl.load(bias_ptr + offs_v, mask=v_mask, other=0.0).to(tl.float32)[None, :]
        z = raw * inv_temperature
    return z


@triton.jit
def online_softmax_step(logits, offs_v, v_mask, targets, run_max, run_sum, run_sum_all,
                        run_sum_pz, target_logit, WITH_ENTROPY: tl.constexpr):
    """One logit tile [rows, BLOCK_V] folded into its rows' running statistics (max, sum of
    exp(z - max) over the non-target entries, and with entropy the sum of exp(z - max) and of
    exp(z - max) (z - max) over all), and the target logit added where the tile holds it.
    Columns outside `v_mask` count for nothing. Returns the five updated [rows] values."""
    logits = tl.where(v_mask[None, :], logits, float("-inf"))
    new_max = tl.maximum(run_max, tl.max(logits, axis=1))
    rescale = tl.exp(run_max - new_max)
    exp = tl.exp(logits - new_max[:, None])
    is_target = offs_v[None, :] == targets[:, None]
    # The sum leaves the target out: log pi = -log1p(others / exp(z_y)) stays exact as pi -> 1.
    run_sum = run_sum * rescale + tl.sum(tl.where(is_target, 0.0, exp), axis=1)
    if WITH_ENTROPY:
        # sum of p (z - max) with the running max: E_p[z] - max keeps its relative precision
        # when the distribution is peaked (z - E_p[z] would cancel otherwise).
        shifted = tl.where(v_mask[None, :], logits - new_max[:, None], 0.0)
        moved = tl.where(run_sum_all > 0, (run_max - new_max) * run_sum_all, 0.0)
        run_sum_pz = (run_sum_pz + moved) * rescale + tl.sum(exp * shifted, axis=1)
        run_sum_all = run_sum_all * rescale + tl.sum(exp, axis=1)
    target_logit += tl.sum(tl.where(is_target, logits, 0.0), axis=1)
    return new_max, run_sum, run_sum_all, run_sum_pz, target_logit


@triton.jit
def expm1(x):
    """exp(x) - 1 without cancellation near 0 (a degree-6 Taylor polynomial for |x| < 0.1)."""
    taylor = x * (1.0 + x * (0.5 + x * (1.0 / 6 + x * (1.0 / 24 + x * (1.0 / 120 + x * (1.0 / 720))))))
    return tl.where(tl.abs(x) < 0.1, taylor, tl.exp(x) - 1.0)


@triton.jit
def lse_and_logprob(top, others, target_shift):
    """logsumexp and log pi of tokens from their max logit `top`, the sum of exp(z - top) over
    the non-target entries and z_y - top. log pi = -log1p(others / exp(z_y - top)) keeps full
    relative precision as pi -> 1 (where z_y - logsumexp would cancel); log1p as log(u) x / (u - 1)
    with u = 1 + x (exact to rounding for small x, where log(1 + x) would lose it)."""
    target_exp = tl.exp(target_shift)
    log_total = tl.log(others + target_exp)
    ratio = others / target_exp
    u = 1.0 + ratio
    log1p = tl.where(u == 1.0, ratio, tl.log(u) * ratio / (u - 1.0))
    return top + log_total, tl.where(target_shift > -20, -log1p, target_shift - log_total)


@triton.jit
def dz_buffer_rows(dz_rows_ptr, offs_t, t_mask, DZ_ROWS: tl.constexpr):
    """The buffer rows of tokens `offs_t`' dL/dz in the gradient filter's kernels
    (backward_filtered.GradLogitBlocks.rows, or the tokens' own)."""
    if DZ_ROWS:
        return tl.load(dz_rows_ptr + offs_t, mask=t_mask, other=0).to(tl.int64)
    return offs_t.to(tl.int64)


@triton.jit
def dz_block(grad_logits_ptr, dz_rows, tile_v, stride_dz, stride_dz_tile, BLOCK_V: tl.constexpr):
    """Pointers to vocabulary tile `tile_v` of dL/dz rows `dz_rows` (the layout of
    backward_filtered.GradLogitBlocks)."""
    return (grad_logits_ptr + dz_rows[:, None] * stride_dz + tile_v * stride_dz_tile
            + tl.arange(0, BLOCK_V)[None, :])
