"""Train LUFFY on your own task: a `Task` owns its prompts, traces and reward (docs/design.md §Tasks).

    python examples/custom_task.py     # 3 steps on the CPU
    PYTHONPATH=examples luffy-fast train --config FILE.yaml data.task=custom_task:CopyDigits

The task copies three digits. The tiny policy and tokenizer are the demo's; with a real model set
model.path to its directory and leave `components` out.
"""

import random
import sys

from luffy_fast import Task
from luffy_fast.data import Sample
from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer


class CopyDigits(Task):
    # Rewards are scored in worker processes under reward.timeout by default; a cheap, trusted
    # reward like this one runs in-process instead (no process start-up).
    reward_workers = 0

    def components(self):  # (tokenizer, policy), used when model.path is "toy"
        tokenizer = build_tokenizer(num_digits=3)
        shape = TinyQwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                                num_attention_heads=2, num_key_value_heads=1)
        return tokenizer, build_policy(tokenizer, shape, seed=0)

    def train_samples(self, tokenizer):
        rng, ids = random.Random(0), lambda text: tokenizer(text, add_special_tokens=False).input_ids
        digits = ["".join(rng.choices("0123456789", k=3)) for _ in range(64)]
        return [Sample(ids(" ".join(d) + " >"), d, traces=[ids(f"= {' '.join(d)} <eos>")]) for d in digits]

    def reward(self, response, sample):  # 1 for "= <the digits> <eos>", else 0
        return float(response.split() == ["=", *sample.ground_truth, "<eos>"])


def main(output_dir="runs/custom_task", *overrides):
    from luffy_fast.train_config import load_config
    from luffy_fast.trainer import LuffyTrainer

    config = load_config(None, [
        "data.task=custom_task:CopyDigits", "data.max_prompt_length=8", "data.max_response_length=8",
        "rollout.n_on=3", "rollout.n_off=1", "train.prompts_per_step=4", "train.mini_batch_size=4",
        "train.steps=3", "optim.lr=1e-3", "eval.every=0", "output.tensorboard=false",
        f"output.dir={output_dir}", *overrides])
    trainer = LuffyTrainer(config)
    try:
        return trainer.train()
    finally:
        trainer.close()


if __name__ == "__main__":
    for row in main(*sys.argv[1:]):
        print({k: round(row[k], 3) for k in ("step", "reward_on_policy", "reward_off_policy", "loss")
               if k in row})
