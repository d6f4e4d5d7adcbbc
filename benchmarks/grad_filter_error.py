"""The gradient filter's error and skipped share on peaked (trained-LM-like) logits, on the CPU
through the Triton interpreter (fp32 against the float64 reference); not a timing.

    TRITON_INTERPRET=1 PYTHONPATH=tests python benchmarks/grad_filter_error.py
"""

from __future__ import annotations

from helpers import peaked_batch, rel_err, run_loss
from luffy_fast import LuffyLossConfig

if __name__ == "__main__":
    batch = peaked_batch(64, 64, 1024, margin=20.0)
    double = {k: v.double() if v.is_floating_point() else v for k, v in batch.items()}
    print("T=64 H=64 V=1024, peaked logits, LUFFY config")
    print(f"{'budget':>8} {'threshold':>10} {'skipped':>8} {'d(hidden) err':>14} {'d(weight) err':>14}")
    for budget in (64.0, 0.002):  # kept logits, recompute
        config = LuffyLossConfig.luffy(max_len=64, memory_budget_mb=budget)
        _, _, expected = run_loss(double, "reference", config)
        for threshold in (1e-6, 1e-5, 1e-4, 1e-3):
            _, stats, grads = run_loss(batch, "triton", config.replace(grad_filter=threshold))
            print(f"{budget:>8g} {threshold:>10g} {float(stats['grad_filter_skipped_fraction']):>8.1%} "
                  f"{rel_err(grads['hidden'], expected['hidden']):>14.2e} "
                  f"{rel_err(grads['weight'], expected['weight']):>14.2e}")
