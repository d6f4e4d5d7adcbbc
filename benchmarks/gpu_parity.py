"""GPU parity: the triton (and torch) backends compiled for CUDA against the reference.

fp32 inputs against the fp32 reference; bf16 inputs against the float64 reference on the same
(bf16-rounded) values: <= 1e-2 relative on gradients, <= 1e-3 on the loss. Fresh random inputs
for every case. Then issue 13's precision targets against float64: fp32 gradients at the LM-head
shape (H = 4096, V = 151936: <= 2e-5) and the gradient filter on peaked logits (<= 1e-3 at
benchmarks.cases.GRAD_FILTER), rows tagged "target" for benchmarks/targets.py.
Writes gpu_parity.json under $OUT (or ./gpu_results) and prints a table.
Run: python benchmarks/gpu_parity.py [--quick] [--targets-only]
PARITY_BUDGETS (comma list of kept, kept_300, recompute) narrows the option cases' budgets;
PARITY_TARGETS=0 leaves out the precision-target rows.
Every row carries the seconds since the start; PARITY_TRACE_S=N prints every thread's Python stack
every N seconds (faulthandler), so a run that stalls says where.
"""

from __future__ import annotations

import faulthandler
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run as a script from anywhere

from benchmarks.cases import GRAD_FILTER, peaked_hidden_weight  # noqa: E402
from benchmarks.impls import switched, variant  # noqa: E402
from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs  # noqa: E402

START = time.perf_counter()
# PARITY_BUDGETS=kept,kept_300 narrows the option cases to those strategies (default: all three).
BUDGETS = os.environ.get("PARITY_BUDGETS", "kept,kept_300,recompute").split(",")
LIMITS = {torch.float32: {"loss": 1e-5, "grad": 1e-5}, torch.bfloat16: {"loss": 1e-3, "grad": 1e-2}}
# 16-bit kept logits ("+half": LuffyLossConfig.logits_dtype = "input") round each logit to bf16
# (2^-9 relative, so ~1e-2 on p for |z| ~ 5), as the naive loss on a bf16 model's logits does:
# measured on an H200, 0.6-1.8e-2 gradient error against float64, 4 x fp32 logits'.
HALF_LIMITS = {"loss": 5e-3, "grad": 3e-2}


def limits(backend: str, dtype: torch.dtype) -> dict:
    half = variant(backend).config.get("logits_dtype") == "input"
    return HALF_LIMITS if half and dtype != torch.float32 else LIMITS[dtype]


def make_batch(T, H, V, dtype, seed, zero_adv_fraction=0.3, dev="cuda"):
    gen = torch.Generator(device=dev).manual_seed(seed)
    num_seqs = max(1, T // 512)
    seq_ids = torch.randint(0, num_seqs, (T,), generator=gen, device=dev).sort().values
    seq_adv = torch.randn(num_seqs, generator=gen, device=dev)
    seq_adv[torch.rand(num_seqs, generator=gen, device=dev) < zero_adv_fraction] = 0
    return {
        "hidden": (torch.randn(T, H, generator=gen, device=dev)).to(dtype),
        "weight": (torch.randn(V, H, generator=gen, device=dev) * (2.0 / H**0.5)).to(dtype),
        "targets": torch.randint(0, V, (T,), generator=gen, device=dev),
        "advantages": seq_adv[seq_ids],
        "loss_mask": torch.rand(T, generator=gen, device=dev) < 0.9,
        "off_policy_mask": torch.rand(T, generator=gen, device=dev) < 0.3,
        "old_logprobs": -torch.rand(T, generator=gen, device=dev) * 8,
        "seq_ids": seq_ids,
    }


def run(batch, backend, config, dtype=None):
    v = variant(backend)  # "triton+lean": the opt-in lean passes; "+half": 16-bit logits
    if v.env or v.config:
        return switched(lambda: run(batch, v.base, config.replace(**v.config), dtype), v.env)()
    hidden = batch["hidden"].detach().clone()
    weight = batch["weight"].detach().clone()
    if dtype is not None:
        hidden, weight = hidden.to(dtype), weight.to(dtype)
    hidden.requires_grad_(True)
    weight.requires_grad_(True)
    old = batch["old_logprobs"]
    loss, stats = fused_luffy_loss(hidden, weight, batch["targets"], batch["advantages"],
                                   batch["loss_mask"], batch["off_policy_mask"], old_logprobs=old,
                                   config=config, seq_ids=batch["seq_ids"], backend=backend)
    loss.backward()
    if hidden.is_cuda:
        torch.cuda.synchronize()
    return loss.detach(), hidden.grad, weight.grad, stats


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def target_rows(seed: int, T: int = 1000, H: int = 4096, V: int = 151936, peaked_T: int = 2048,
                dev: str = "cuda") -> list[dict]:
    """fp32 gradients at the LM-head shape against float64, for both strategies; the gradient
    filter's error and skipped share on peaked logits (fp32, and bf16 at the bf16 limit)."""
    budgets = {"kept": 1e6, "recompute": 100 * V * 4 / 2**20}
    rows = []

    def add(row: dict, limit: float) -> None:
        row["ok"] = max(row["d_hidden"], row["d_weight"]) <= limit
        row["s"] = round(time.perf_counter() - START, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)

    # The kept strategy's rows first, then the recompute strategy's (a run cut short keeps whole
    # strategies).
    peaked = make_batch(peaked_T, H, V, torch.float32, seed + 10, dev=dev)
    gen = torch.Generator(device=dev).manual_seed(seed + 11)
    peaked["hidden"], peaked["weight"], peaked["targets"] = peaked_hidden_weight(peaked_T, H, V, gen, dev)
    # bf16 is compared with the float64 oracle on the same bf16-rounded inputs.
    rounded = dict(peaked, hidden=peaked["hidden"].bfloat16().float(),
                   weight=peaked["weight"].bfloat16().float())
    for budget_name, budget in budgets.items():
        config = LuffyLossConfig.luffy(max_len=4096, memory_budget_mb=budget)
        for k in range(int(os.environ.get("PARITY_SEEDS", "3"))):
            batch = make_batch(T, H, V, torch.float32, seed + k, dev=dev)
            ref = run(batch, "reference", config, dtype=torch.float64)
            got = run(batch, "triton", config)
            add({"target": "fp32_lm_head", "T": T, "H": H, "V": V, "budget": budget_name,
                 "d_hidden": rel(got[1], ref[1]), "d_weight": rel(got[2], ref[2])}, 2e-5)
            del ref, got, batch
            torch.cuda.empty_cache()
        for dtype, inputs, thresholds in ((torch.float32, peaked, (GRAD_FILTER, GRAD_FILTER / 10)),
                                          (torch.bfloat16, rounded, (GRAD_FILTER,))):
            ref = run(inputs, "reference", config, dtype=torch.float64)
            if dtype == torch.bfloat16 and budget_name == "kept":
                # 16-bit kept logits on peaked logits (large ones, which bf16 rounds the most),
                # beside fp32 kept logits: both against float64
                for backend in ("triton", "triton+half"):
                    got = run(inputs, backend, config, dtype=dtype)
                    add({"target": None, "T": peaked_T, "H": H, "V": V, "budget": budget_name,
                         "backend": backend, "dtype": "bfloat16", "loss": rel(got[0], ref[0]),
                         "d_hidden": rel(got[1], ref[1]), "d_weight": rel(got[2], ref[2])},
                        limits(backend, dtype)["grad"])
                    del got
            for threshold in thresholds:
                got = run(inputs, "triton", config.replace(grad_filter=threshold), dtype=dtype)
                tag = "grad_filter" if dtype == torch.float32 and threshold == GRAD_FILTER else None
                add({"target": tag, "T": peaked_T, "H": H, "V": V, "budget": budget_name,
                     "grad_filter": threshold, "dtype": str(dtype).split(".")[-1],
                     "d_hidden": rel(got[1], ref[1]), "d_weight": rel(got[2], ref[2]),
                     "skipped": float(got[3]["grad_filter_skipped_fraction"])},
                    1e-3 if dtype == torch.float32 else LIMITS[dtype]["grad"])
                del got
            del ref
            torch.cuda.empty_cache()
    return rows


def main() -> int:
    quick = "--quick" in sys.argv
    targets_only = "--targets-only" in sys.argv
    if os.environ.get("PARITY_TRACE_S"):
        faulthandler.dump_traceback_later(int(os.environ["PARITY_TRACE_S"]), repeat=True)
    out_dir = os.environ.get("OUT") or "gpu_results"
    os.makedirs(out_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = {
        "luffy": LuffyLossConfig.luffy(max_len=4096),
        "grpo_old_lp": LuffyLossConfig.grpo(),
        "entropy_temp": LuffyLossConfig(entropy_coef=0.01, temperature=0.7, normalizer="seq_mean_token_mean"),
    }
    shapes = [] if targets_only else [(1000, 1000, 5003), (4097, 2048, 32011)]
    if not quick and not targets_only:
        shapes.append((8192, 4096, 151936))
    rows, failures = [], 0
    seed = int(time.time())
    for T, H, V in shapes:
        for name, base in configs.items():
            if (T, H, V) == shapes[-1] and len(shapes) == 3 and name != "luffy":
                continue  # the large shape once: it is about memory and indexing, not options
            if quick and (T, H, V) != shapes[0] and name == "entropy_temp":
                continue  # --quick: options at the small shape, the second shape for size
            # Budgets that pick each strategy of the triton backend (kernels/function.py: plan):
            # logits kept in one chunk, kept in ~300-token chunks, and recomputed in the backward.
            row_mb = V * 4 / 2**20  # one token's fp32 logits (dL/dz is written over them)
            for budget_name, budget in (("kept", 1e6), ("kept_300", 300 * row_mb),
                                        ("recompute", 100 * row_mb)):
                if budget_name not in BUDGETS or (budget_name == "kept" and T * V * 6 > 8 * 2**30):
                    continue
                config = base.replace(memory_budget_mb=budget)
                for dtype in (torch.float32, torch.bfloat16):
                    if dtype == torch.float32 and T * V > 2e8:
                        continue
                    if dtype == torch.float32 and budget_name == "kept_300":
                        continue
                    seed += 1
                    batch = make_batch(T, H, V, dtype, seed)
                    # float64 oracle for bf16, but fp32 at the largest shape (fp64 logits would not fit).
                    big = T * V > 5e8
                    oracle_dtype = torch.float32 if dtype == torch.float32 or big else torch.float64
                    backend = "reference"  # named in the row of an error
                    try:
                        ref = run(batch, backend, config, dtype=oracle_dtype)
                        for backend in ("triton", "triton+lean", "triton+half",
                                        "triton+lean+half", "torch"):
                            if backend == "torch" and budget_name != "recompute":
                                continue
                            # the switches act on kept logits (16-bit ones on 16-bit inputs
                            # only); bf16 only but for the lean passes, for the stage's time
                            if "+" in backend and (budget_name == "recompute" or (
                                    dtype != torch.bfloat16 and backend != "triton+lean")):
                                continue
                            got = run(batch, backend, config)
                            errs = {"loss": rel(got[0], ref[0]), "d_hidden": rel(got[1], ref[1]),
                                    "d_weight": rel(got[2], ref[2])}
                            limit = limits(backend, dtype)
                            ok = (errs["loss"] <= limit["loss"] and errs["d_hidden"] <= limit["grad"]
                                  and errs["d_weight"] <= limit["grad"])
                            failures += not ok
                            rows.append({"T": T, "H": H, "V": V, "config": name, "budget": budget_name,
                                         "dtype": str(dtype).split(".")[-1], "backend": backend,
                                         **errs, "ok": ok, "s": round(time.perf_counter() - START, 1)})
                            print(json.dumps(rows[-1]), flush=True)
                        del ref
                    except Exception as error:  # keep going: one failure must not hide the rest
                        failures += 1
                        rows.append({"T": T, "H": H, "V": V, "config": name, "budget": budget_name,
                                     "dtype": str(dtype), "backend": backend,
                                     "error": repr(error)[:500], "ok": False})
                        print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()

    try:
        target = target_rows(seed + 1000) if os.environ.get("PARITY_TARGETS", "1") != "0" else []
    except Exception as error:  # keep the rest of the report
        target = [{"target": "error", "error": repr(error)[:500], "ok": False}]
        print(json.dumps(target[0]), flush=True)
    failures += sum(not r["ok"] for r in target)
    rows += target

    # The no-grad log-prob op (and with 16-bit kept logits, whose rounding is bf16's: 1e-2).
    batch = make_batch(3001, 1536, 50257, torch.bfloat16, seed + 99)
    lp_ref, ent_ref = token_logprobs(batch["hidden"].double(), batch["weight"].double(),
                                     batch["targets"], with_entropy=True, backend="reference")
    for switch, limit in (("", 1e-3), ("+lean", 1e-3), ("+half", HALF_LIMITS["loss"])):
        v = variant("triton" + switch)
        lp, ent = switched(lambda v=v: token_logprobs(
            batch["hidden"], batch["weight"], batch["targets"], with_entropy=True,
            backend="triton", **v.config), v.env)()
        tl_errs = {"logprobs": rel(lp, lp_ref), "entropy": rel(ent, ent_ref)}
        tl_ok = all(v <= limit for v in tl_errs.values())
        failures += not tl_ok
        rows.append({"op": "token_logprobs" + switch, "dtype": "bfloat16", **tl_errs, "ok": tl_ok})

    with open(os.path.join(out_dir, "gpu_parity.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows, "failures": failures}, f, indent=1)
    print(f"\nGPU parity on {torch.cuda.get_device_name()} (max relative errors)")
    print(f"{'shape':<22}{'config':<14}{'budget':<10}{'dtype':<10}{'backend':<12}"
          f"{'loss':>10}{'d_hidden':>10}{'d_weight':>10}  ok")
    for r in rows:
        if "target" in r:
            if "error" in r:
                print(f"precision targets: ERROR {r['error'][:80]}")
                continue
            extra = (f" filter {r['grad_filter']:g} {r['dtype']} skipped {r['skipped']:.3f}"
                     if "grad_filter" in r else "")
            if "backend" in r:
                extra = f" {r['backend']} {r['dtype']} loss {r['loss']:.2e}"
            print(f"{r['T']}x{r['H']}x{r['V']:<8} {str(r['target']):<14}{r['budget']:<10}vs float64: "
                  f"d_hidden {r['d_hidden']:.2e} d_weight {r['d_weight']:.2e}{extra}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        elif "op" in r:
            print(f"{r['op']} bf16: logprobs {r['logprobs']:.2e} entropy {r['entropy']:.2e} "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        elif "error" in r:
            print(f"{r['T']}x{r['H']}x{r['V']:<8} {r['config']:<14}{r['budget']:<10}ERROR {r['error'][:80]}")
        else:
            print(f"{r['T']}x{r['H']}x{r['V']:<8} {r['config']:<14}{r['budget']:<10}{r['dtype']:<10}"
                  f"{r['backend']:<12}{r['loss']:>10.2e}{r['d_hidden']:>10.2e}{r['d_weight']:>10.2e}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
    print(f"parity failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
