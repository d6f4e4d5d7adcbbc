"""GPU check of the trainer's update path (no DeepSpeed needed): the policy's fused-loss forward
and backward through `PolicyWithFusedLoss` on a real mixed batch, for every loss backend, in
fp32 and bf16, against the `reference` backend in the same dtype. Prints one JSON line per case.

    python scripts/gpu_check_trainer.py            # on a CUDA machine
"""

from __future__ import annotations

import copy
import json
import sys
import time

import torch

from luffy_fast import LuffyLossConfig
from luffy_fast.micro_batches import pack_micro_batch
from luffy_fast.policy import PolicyWithFusedLoss
from luffy_fast.rollout import HFGenerateEngine, SamplingParams
from luffy_fast.rollout_batch import assemble_groups
from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer
from luffy_fast.toy.problems import sample_problems
from luffy_fast.toy.task import toy_samples


def main() -> int:
    device = torch.device("cuda")
    tokenizer = build_tokenizer(5)
    shape = TinyQwen2Config(hidden_size=256, intermediate_size=512, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=2)
    policy = build_policy(tokenizer, shape, seed=0).to(device)
    samples = toy_samples(sample_problems(16, 5, "train", seed=0), tokenizer)
    engine = HFGenerateEngine(copy.deepcopy(policy), tokenizer.pad_token_id,
                              tokenizer.eos_token_id)
    completions = engine.generate([s.prompt_ids for s in samples], n=3,
                                  params=SamplingParams(32, seed=0))
    batch = assemble_groups(samples, completions, n_off=1)
    batch.advantages = torch.linspace(-1, 1, len(batch))
    micro = pack_micro_batch(batch, range(len(batch))).to(device)
    config = LuffyLossConfig.luffy(max_len=32, entropy_coef=0.01)
    failures = 0
    for dtype, rtol in ((torch.float32, 1e-4), (torch.bfloat16, 3e-2)):
        grads = {}
        for backend in ("reference", "torch", "triton"):
            model = copy.deepcopy(policy).to(dtype)
            module = PolicyWithFusedLoss(model, config, backend)
            torch.cuda.synchronize()
            start = time.perf_counter()
            loss, stats = module(micro)
            loss.backward()
            torch.cuda.synchronize()
            grads[backend] = {n: p.grad.float() for n, p in model.named_parameters()}
            worst = 0.0
            for name, ref in grads["reference"].items():
                scale = ref.abs().max().clamp_min(1e-12)
                worst = max(worst, float((grads[backend][name] - ref).abs().max() / scale))
            ok = worst <= rtol and bool(torch.isfinite(loss))
            failures += not ok
            print(json.dumps({"dtype": str(dtype), "backend": backend, "loss": float(loss),
                              "entropy": float(stats["entropy_mean"]),
                              "max_rel_grad_diff_vs_reference": worst, "tolerance": rtol,
                              "seconds": round(time.perf_counter() - start, 4), "ok": ok}))
    print(json.dumps({"tokens": micro.num_tokens, "sequences": len(batch),
                      "failures": failures, "device": torch.cuda.get_device_name()}))
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
