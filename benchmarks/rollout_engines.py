"""Rollout throughput of the `hf` (transformers generate) and `vllm` engines on one model.

    python -m benchmarks.rollout_engines [--checkpoint runs/demo/luffy/checkpoints/step-000300/hf]

Both engines sample the demo's rollout batch (32 prompts x 3 samples, up to 32 new tokens,
temperature 1) from the same weights, alternating, after one warm-up call each; prints the
generated tokens per second of each (median of the repeats). Without --checkpoint the demo's
random-initialized policy is used.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--checkpoint", help="a transformers directory (model + tokenizer)")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--prompts", type=int, default=32)
    parser.add_argument("--n", type=int, default=3)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch CPU threads (1: tiny models gain nothing from more, and a "
                             "busy machine makes more much slower)")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from luffy_fast.rollout.base import SamplingParams
    from luffy_fast.rollout.hf import HFGenerateEngine
    from luffy_fast.rollout.vllm import VLLMRolloutEngine
    from luffy_fast.rollout.vllm_config import VLLMConfig
    from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer, save_pretrained_pair
    from luffy_fast.toy.problems import sample_problems
    from luffy_fast.toy.task import toy_samples

    with tempfile.TemporaryDirectory() as scratch:
        if args.checkpoint:
            directory = Path(args.checkpoint)
            tokenizer = AutoTokenizer.from_pretrained(directory)
            policy = AutoModelForCausalLM.from_pretrained(directory, dtype=torch.float32)
        else:
            tokenizer = build_tokenizer(5)
            policy = build_policy(tokenizer, TinyQwen2Config(), seed=0)
            directory = save_pretrained_pair(policy, tokenizer, scratch)
        samples = toy_samples(sample_problems(args.prompts, 5, "train", seed=0), tokenizer)
        prompts = [s.prompt_ids for s in samples]
        engines = {
            "hf": HFGenerateEngine(policy.eval(), pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id),
            "vllm": VLLMRolloutEngine(directory, VLLMConfig(max_model_len=64), seed=0),
        }
        rates: dict[str, list[float]] = {name: [] for name in engines}
        lengths: dict[str, list[float]] = {name: [] for name in engines}
        try:
            for repeat in range(args.repeats + 1):
                for name, engine in engines.items():
                    params = SamplingParams(max_new_tokens=args.max_new_tokens, seed=repeat)
                    start = time.perf_counter()
                    groups = engine.generate(prompts, n=args.n, params=params)
                    seconds = time.perf_counter() - start
                    tokens = sum(len(c.token_ids) for g in groups for c in g)
                    if repeat:  # the first call of each engine is a warm-up
                        rates[name].append(tokens / seconds)
                        lengths[name].append(tokens / (len(prompts) * args.n))
        finally:
            engines["vllm"].close()
        print(f"torch threads: {torch.get_num_threads()}, {len(prompts)} prompts x {args.n} "
              f"samples, max {args.max_new_tokens} new tokens, {args.repeats} repeats")
        for name in engines:
            print(f"{name:>5}: {statistics.median(rates[name]):8.0f} tokens/s (median; "
                  f"min {min(rates[name]):.0f}, max {max(rates[name]):.0f}), mean response "
                  f"{statistics.mean(lengths[name]):.1f} tokens")


if __name__ == "__main__":
    main()
