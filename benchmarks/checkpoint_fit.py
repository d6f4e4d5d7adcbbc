"""The update within a GPU's memory, each loss head at the fewest checkpointed layers that fit:
the `fit` stage of benchmarks/trainer_update.py.

    python -m benchmarks.trainer_update fit --impl fused --work DIR   # also naive, liger, ...

The `update` stages time every head with all 28 layers checkpointed, which leaves the fused
head's memory saving unused (at 16k tokens on an H200, round 2: a 31.7 GiB step peak, set by the
optimizer step, against naive's 68.1 GiB). A user spends it on fewer recomputes
(`model.checkpointed_layers`, the first N layers). This stage measures that under a memory cap:
BENCH_FIT_CAP_GIB, default 78 (what an 80 GB card leaves to PyTorch's allocator, roughly: such
cards report ~79.2 GiB, and the CUDA context sits outside the allocator), set as the process's
memory fraction so that the allocator runs out where it would on that card.

1. One warm-up step at the target size (plan.target_tokens) with every layer checkpointed, then
   one with L - 1 and one with L - 1 - FIT_STEP. The forward + backward peak grows by the same
   amount for each further layer that keeps its values, once the last layer keeps its own (with
   the first k checkpointed, their recomputes come after the kept layers' values are freed); the
   optimizer step's peak does not grow. So the line through the two points below L predicts
   every k < L, and the warm-up's measured peak stands for k = L.
2. The fewest checkpointed layers whose predicted peak stays under FIT_SHARE of the cap
   (`fewest_fitting`).
3. Tokens/s at the target size with every layer checkpointed and with the fewest that fit (one
   retry on a fresh engine with FIT_STEP more layers checkpointed if that runs out of memory).

Rows go to DIR/results/fit-<impl>.jsonl as they are measured. On the CPU (--dry-run) there is no
cap unless BENCH_FIT_CAP_MB gives one, and the peaks are the process's resident memory.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch

from benchmarks import trainer_update as tu
from luffy_fast.model_loading import checkpoint_first_layers, checkpointable_layers

FIT_SHARE = 0.92  # of the cap that the predicted peak may fill (allocator slack, fragmentation)
FIT_STEP = 4  # layers between the two probes below L; added back on the retry


def fewest_fitting(layers: int, peaks: dict[int, tuple[float, float]],
                   limit: float | None) -> tuple[int, float]:
    """(fewest checkpointed layers, its predicted peak) with the peak at most `limit`, from
    measured (backward peak, step peak) by checkpointed count: `layers` itself and two counts
    below it. Below `layers` the backward's peak is the line through the two (a fall, from
    noise, counts as flat); the optimizer step's peak is the largest measured. No limit: the
    fewest is 0. Nothing fits: every layer."""
    (high, (high_peak, _)), (low, (low_peak, _)) = sorted(
        (k, peak) for k, peak in peaks.items() if k < layers)[::-1][:2]
    per_layer = max(0.0, (low_peak - high_peak) / (high - low))
    step_peak = max(step for _, step in peaks.values())

    def predicted(k: int) -> float:
        backward = peaks[layers][0] if k == layers else high_peak + (high - k) * per_layer
        return max(backward, step_peak)

    if limit is None:
        return 0, predicted(0)
    fits = [k for k in range(layers + 1) if predicted(k) <= limit]
    k = min(fits) if fits else layers
    return k, predicted(k)


def cap_bytes(device: torch.device) -> float | None:
    """The memory cap: BENCH_FIT_CAP_GIB (default 78) on CUDA, applied to this process; on the
    CPU only BENCH_FIT_CAP_MB, used for the prediction."""
    if device.type != "cuda":
        mb = os.environ.get("BENCH_FIT_CAP_MB")
        return float(mb) * tu.MIB if mb else None
    index = device.index if device.index is not None else torch.cuda.current_device()
    cap = float(os.environ.get("BENCH_FIT_CAP_GIB", "78")) * tu.GIB
    total = torch.cuda.get_device_properties(index).total_memory
    torch.cuda.set_per_process_memory_fraction(min(1.0, cap / total), index)
    return min(cap, total)


def reserved_mb(device: torch.device) -> dict:
    """The allocator's peak reserved memory, which the cap limits (CUDA only)."""
    return {"reserved_peak_mb": torch.cuda.max_memory_reserved() / tu.MIB} \
        if device.type == "cuda" else {}


def measured_step(engine, micro, memory: tu.Memory) -> tuple[float, int, int]:
    """One update step: (loss, peak of forward + backward, peak of the optimizer step)."""
    memory.start_peak()
    loss, _stats = engine(micro)
    engine.backward(loss)
    backward_peak = memory.peak()
    memory.start_peak()
    engine.step()
    return float(loss.detach()), backward_peak, memory.peak()


def set_checkpointed(engine, count: int) -> int:
    """Checkpoint the first `count` decoder layers of the engine's policy; the layer count."""
    checkpoint_first_layers(engine.module, count)
    return len(checkpointable_layers(engine.module))


def run_fit(plan: tu.Plan, impl: str, work: Path) -> None:
    device = tu.device_for(plan)
    stage = f"fit-{impl}"
    limit_total = cap_bytes(device)
    limit = None if limit_total is None else FIT_SHARE * limit_total
    start = time.perf_counter()
    memory = tu.Memory(device)
    slot = tu.EngineSlot(plan, impl, device, memory, work, stage)
    layers = set_checkpointed(slot.engine, plan.num_hidden_layers)
    tokens = plan.target_tokens
    micro = tu.synthetic_micro_batch(plan, tokens // plan.row_length, plan.row_length, seed=0,
                                     device=device)
    tu.emit(work, stage, {"kind": "setup", "impl": impl, "head": slot.head_note, "layers": layers,
                          "tokens": tokens, "cap_mb": limit_total and limit_total / tu.MIB,
                          "fit_share": FIT_SHARE, "seconds": round(time.perf_counter() - start, 2),
                          "device": torch.cuda.get_device_name() if device.type == "cuda"
                          else "cpu"})
    below = max(0, layers - 1 - FIT_STEP)
    peaks: dict[int, tuple[float, float]] = {}
    failed = False
    for checkpointed in (layers, layers - 1, below):  # the first is also the warm-up
        set_checkpointed(slot.engine, checkpointed)
        try:
            loss, backward_peak, step_peak = measured_step(slot.engine, micro, memory)
        except Exception as error:  # out of memory already: no room to un-checkpoint more
            tu.emit(work, stage, {"kind": "probe", "impl": impl, "checkpointed": checkpointed,
                                  "status": "oom" if tu.is_out_of_memory(error) else "error",
                                  "error": f"{type(error).__name__}: {error}"[:300]})
            failed = True
            break
        peaks[checkpointed] = (backward_peak, step_peak)
        tu.emit(work, stage, {"kind": "probe", "impl": impl, "checkpointed": checkpointed,
                              "status": "ok", "backward_peak_mb": backward_peak / tu.MIB,
                              "step_peak_mb": step_peak / tu.MIB, "loss": loss,
                              **reserved_mb(device)})
    if layers not in peaks:
        return
    if failed:  # a ZeRO-2 engine is not reused after a step that failed half-way
        slot.renew()
    if len(peaks) == 3:
        fewest, predicted = fewest_fitting(layers, peaks, limit)
    else:  # the probes ran out of memory: the fewest that ran
        fewest = min(peaks)
        predicted = max(peaks[fewest])
    tu.emit(work, stage, {"kind": "fit", "impl": impl, "fewest_checkpointed": fewest,
                          "layers": layers, "predicted_peak_mb": predicted / tu.MIB,
                          "limit_mb": limit and limit / tu.MIB})
    for label, checkpointed in (("all", layers), ("fit", fewest)):
        for attempt in (0, 1):
            set_checkpointed(slot.engine, checkpointed)
            try:
                row = tu.time_size(slot.engine, micro, memory, plan, tokens, [])
                failed = None
            except Exception as error:
                failed = "oom" if tu.is_out_of_memory(error) else "error"
                tu.emit(work, stage, {"kind": "throughput", "impl": impl, "which": label,
                                      "checkpointed": checkpointed, "attempt": attempt,
                                      "status": failed,
                                      "error": f"{type(error).__name__}: {error}"[:300]})
            if failed is None:
                tu.emit(work, stage, {"kind": "throughput", "impl": impl, "which": label,
                                      "checkpointed": checkpointed, "tokens": tokens,
                                      "status": "ok", **row, **reserved_mb(device)})
                break
            # here, out of the except block, the failed step's frames no longer hold its tensors
            slot.renew()
            if label == "all" or failed != "oom" or checkpointed == layers:
                break
            checkpointed = min(layers, checkpointed + FIT_STEP)
        memory.free()


# --------------------------------------------------------------------------- report

def summarize_fit(work: Path, impls: tuple[str, ...]) -> dict:
    """Per impl that ran: its fit row and its two throughput rows ("all", "fit")."""
    result = {}
    for impl in impls:
        rows = tu.read_rows(work, f"fit-{impl}")
        if not rows:
            continue
        through = {r["which"]: r for r in rows if r.get("kind") == "throughput"
                   and r.get("status") == "ok"}
        result[impl] = {"setup": next((r for r in rows if r.get("kind") == "setup"), None),
                        "fit": next((r for r in rows if r.get("kind") == "fit"), None),
                        "all": through.get("all"), "fitted": through.get("fit"),
                        "probes": [r for r in rows if r.get("kind") == "probe"]}
    return result


def fit_checks(fit: dict, target_tokens: int, targets: dict) -> list[dict]:
    """The fused head against naive and Liger, each at its own fewest checkpointed layers."""
    def tps(impl: str) -> float | None:
        row = (fit.get(impl) or {}).get("fitted")
        return row["tokens_per_second"] if row else None

    checks = []
    for other, key in (("naive", "tokens_per_second_vs_naive"),
                       ("liger", "tokens_per_second_vs_liger")):
        if "fused" not in fit or other not in fit:
            continue
        value = tps("fused") / tps(other) if tps("fused") and tps(other) else None
        cap = (fit["fused"]["setup"] or {}).get("cap_mb")
        where = f"in {cap / 1024:.0f} GiB" if cap else "uncapped"
        checks.append({"name": f"tokens/s at {tu._fmt_tokens(target_tokens)} {where}, fused / {other}",
                       "value": value, "target": targets[key],
                       "ok": value is not None and value >= targets[key],
                       "note": "informational: each at its fewest checkpointed layers that fit, "
                               "so each recomputes differently (issue 12's target is the "
                               "uncapped row above)"})
    return checks


def format_fit_table(fit: dict, target_tokens: int) -> list[str]:
    if not fit:
        return []
    lines = ["", f"within a memory cap, {tu._fmt_tokens(target_tokens)} tokens per micro-batch "
             "(benchmarks/checkpoint_fit.py):",
             f"{'impl':<11}{'cap GiB':>9}{'checkpointed':>14}{'tok/s':>10}{'peak GiB':>10}"
             f"{'tok/s, all ckpt':>17}{'speed-up':>10}"]
    for impl, info in fit.items():
        cap = (info["setup"] or {}).get("cap_mb")
        layers = (info["setup"] or {}).get("layers", "?")
        fitted, every = info["fitted"], info["all"]
        fitted_text = (f"{fitted['checkpointed']:>9}/{layers:<4}{fitted['tokens_per_second']:>10.0f}"
                       f"{fitted['peak_mb'] / 1024:>10.2f}") if fitted else f"{'-':>14}{'-':>10}{'-':>10}"
        every_text = f"{every['tokens_per_second']:>17.0f}" if every else f"{'-':>17}"
        gain = (f"{fitted['tokens_per_second'] / every['tokens_per_second']:>10.2f}"
                if fitted and every else f"{'-':>10}")
        cap_text = f"{cap / 1024:>9.0f}" if cap else f"{'none':>9}"
        lines.append(f"{impl:<11}{cap_text}{fitted_text}{every_text}{gain}")
    return lines
