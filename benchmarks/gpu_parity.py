"""GPU parity: the triton (and torch) backends compiled for CUDA against the reference.

fp32 inputs against the fp32 reference; bf16 inputs against the float64 reference on the same
(bf16-rounded) values: <= 1e-2 relative on gradients, <= 1e-3 on the loss. Fresh random inputs
for every case. Writes gpu_parity.json under $OUT (or ./gpu_results) and prints a table.
Run: python benchmarks/gpu_parity.py [--quick]
"""

from __future__ import annotations

import json
import os
import sys
import time

import torch

from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs

LIMITS = {torch.float32: {"loss": 1e-5, "grad": 1e-5}, torch.bfloat16: {"loss": 1e-3, "grad": 1e-2}}


def make_batch(T, H, V, dtype, seed, zero_adv_fraction=0.3):
    gen = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
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
    torch.cuda.synchronize()
    return loss.detach(), hidden.grad, weight.grad


def rel(a, b):
    a, b = a.double(), b.double()
    if not torch.isfinite(a).all():
        return float("nan")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def main() -> int:
    quick = "--quick" in sys.argv
    out_dir = os.environ.get("OUT") or "gpu_results"
    os.makedirs(out_dir, exist_ok=True)
    torch.backends.cuda.matmul.allow_tf32 = False
    configs = {
        "luffy": LuffyLossConfig.luffy(max_len=4096),
        "grpo_old_lp": LuffyLossConfig.grpo(),
        "entropy_temp": LuffyLossConfig(entropy_coef=0.01, temperature=0.7, normalizer="seq_mean_token_mean"),
    }
    shapes = [(1000, 1000, 5003), (4097, 2048, 32011)]
    if not quick:
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
            row_mb = V * 6 / 2**20  # one token's fp32 logits + its bf16 dL/dz
            for budget_name, budget in (("kept", 1e6), ("kept_300", 300 * row_mb),
                                        ("recompute", 100 * row_mb)):
                if budget_name == "kept" and T * V * 6 > 8 * 2**30:
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
                    try:
                        ref = run(batch, "reference", config, dtype=oracle_dtype)
                        for backend in ("triton", "torch"):
                            if backend == "torch" and budget_name != "recompute":
                                continue
                            got = run(batch, backend, config)
                            errs = {"loss": rel(got[0], ref[0]), "d_hidden": rel(got[1], ref[1]),
                                    "d_weight": rel(got[2], ref[2])}
                            limit = LIMITS[dtype]
                            ok = (errs["loss"] <= limit["loss"] and errs["d_hidden"] <= limit["grad"]
                                  and errs["d_weight"] <= limit["grad"])
                            failures += not ok
                            rows.append({"T": T, "H": H, "V": V, "config": name, "budget": budget_name,
                                         "dtype": str(dtype).split(".")[-1], "backend": backend,
                                         **errs, "ok": ok})
                            print(json.dumps(rows[-1]), flush=True)
                        del ref
                    except Exception as error:  # keep going: one failure must not hide the rest
                        failures += 1
                        rows.append({"T": T, "H": H, "V": V, "config": name, "budget": budget_name,
                                     "dtype": str(dtype), "error": repr(error)[:500], "ok": False})
                        print(json.dumps(rows[-1]), flush=True)
                    torch.cuda.empty_cache()

    # The no-grad log-prob op.
    batch = make_batch(3001, 1536, 50257, torch.bfloat16, seed + 99)
    lp, ent = token_logprobs(batch["hidden"], batch["weight"], batch["targets"], with_entropy=True,
                             backend="triton")
    lp_ref, ent_ref = token_logprobs(batch["hidden"].double(), batch["weight"].double(),
                                     batch["targets"], with_entropy=True, backend="reference")
    tl_errs = {"logprobs": rel(lp, lp_ref), "entropy": rel(ent, ent_ref)}
    tl_ok = all(v <= 1e-3 for v in tl_errs.values())
    failures += not tl_ok
    rows.append({"op": "token_logprobs", "dtype": "bfloat16", **tl_errs, "ok": tl_ok})

    with open(os.path.join(out_dir, "gpu_parity.json"), "w") as f:
        json.dump({"device": torch.cuda.get_device_name(), "torch": torch.__version__,
                   "rows": rows, "failures": failures}, f, indent=1)
    print(f"\nGPU parity on {torch.cuda.get_device_name()} (max relative errors)")
    print(f"{'shape':<22}{'config':<14}{'budget':<10}{'dtype':<10}{'backend':<8}"
          f"{'loss':>10}{'d_hidden':>10}{'d_weight':>10}  ok")
    for r in rows:
        if "op" in r:
            print(f"token_logprobs bf16: logprobs {r['logprobs']:.2e} entropy {r['entropy']:.2e} "
                  f"{'ok' if r['ok'] else 'FAIL'}")
        elif "error" in r:
            print(f"{r['T']}x{r['H']}x{r['V']:<8} {r['config']:<14}{r['budget']:<10}ERROR {r['error'][:80]}")
        else:
            print(f"{r['T']}x{r['H']}x{r['V']:<8} {r['config']:<14}{r['budget']:<10}{r['dtype']:<10}"
                  f"{r['backend']:<8}{r['loss']:>10.2e}{r['d_hidden']:>10.2e}{r['d_weight']:>10.2e}  "
                  f"{'ok' if r['ok'] else 'FAIL'}")
    print(f"parity failures: {failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
