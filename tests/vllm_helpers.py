"""What the vLLM tests and their scenario processes share: the trainer's (transformers) log-probs
of fixed continuations, the gap to an engine's, and one real optimizer step to sync."""

from __future__ import annotations

import torch


def trainer_logprobs(policy, prompt, continuation, temperature=1.0) -> torch.Tensor:
    """The trainer's (transformers) log-prob of each continuation token, fp32."""
    ids = torch.tensor([list(prompt) + list(continuation)])
    with torch.no_grad():
        logits = policy(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(continuation)[:, None])[:, 0]


def max_gap(engine_values, trainer_values) -> float:
    return max(float((torch.tensor(e) - t).abs().max())
               for e, t in zip(engine_values, trainer_values))


def adamw_step(policy, prompts, continuations) -> set[str]:
    """One AdamW step on the continuations (prompt tokens masked out of the labels); returns
    the names of the parameters it changed."""
    before = {name: p.detach().clone() for name, p in policy.named_parameters()}
    optimizer = torch.optim.AdamW(policy.parameters(), lr=0.05, weight_decay=0.0)
    for prompt, continuation in zip(prompts, continuations):
        ids = torch.tensor([list(prompt) + list(continuation)])
        labels = ids.clone()
        labels[0, :len(prompt)] = -100
        (policy(ids, labels=labels).loss / len(prompts)).backward()
    optimizer.step()
    optimizer.zero_grad()
    return {name for name, p in policy.named_parameters() if not torch.equal(p, before[name])}
