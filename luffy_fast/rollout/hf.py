"""Rollouts with transformers' `generate`: the engine for CPUs and small runs."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch
from transformers import PreTrainedModel

from luffy_fast.rollout.base import Completion, RolloutEngine, SamplingParams, check_generate_args


class HFGenerateEngine(RolloutEngine):
    """Samples with `model.generate` on the engine's own copy of the policy.

    The copy is refreshed by `sync_weights` after every update, which keeps generation
    independent of how the trainer shards its weights (ZeRO-3 partitions them).
    Prompts are left-padded into batches of at most `max_batch_size` sequences.
    """

    def __init__(self, model: PreTrainedModel, pad_token_id: int, eos_token_id: int,
                 max_batch_size: int = 256) -> None:
        if max_batch_size <= 0:
            raise ValueError(f"max_batch_size must be positive (got {max_batch_size})")
        self.model = model.eval().requires_grad_(False)
        self.pad_token_id = pad_token_id
        self.eos_token_id = eos_token_id
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        # of the latest generate call: mean entropy of the sampling distribution per sampled token
        self._metrics: dict[str, float] = {}

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], n: int,
                 params: SamplingParams) -> list[list[Completion]]:
        check_generate_args(prompts, n)
        flat = [list(p) for p in prompts for _ in range(n)]
        completions: list[Completion] = []
        self._entropy_sum, self._entropy_count = 0.0, 0
        with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
            if params.seed is not None:
                torch.manual_seed(params.seed)
            for start in range(0, len(flat), self.max_batch_size):
                completions.extend(self._generate_batch(flat[start:start + self.max_batch_size],
                                                        params))
        self._metrics = {"rollout_entropy": self._entropy_sum / max(self._entropy_count, 1)}
        return [completions[i * n:(i + 1) * n] for i in range(len(prompts))]

    def _generate_batch(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        width = max(len(p) for p in prompts)
        input_ids = torch.full((len(prompts), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):  # left padding: generation continues at the right
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention_mask[row, width - len(prompt):] = 1
        greedy = params.temperature == 0
        sampling = {} if greedy else dict(temperature=params.temperature, top_p=params.top_p,
                                          top_k=0)
        out = self.model.generate(
            input_ids=input_ids.to(self.device), attention_mask=attention_mask.to(self.device),
            do_sample=not greedy, max_new_tokens=params.max_new_tokens,
            pad_token_id=self.pad_token_id, eos_token_id=self.eos_token_id,
            output_scores=True, return_dict_in_generate=True, **sampling)
        new_tokens = out.sequences[:, width:].cpu()
        # scores are the processed logits actually sampled from (temperature, top-p applied)
        logprobs = torch.stack(out.scores, dim=1).float().log_softmax(-1).cpu()
        token_logprobs = logprobs.gather(-1, new_tokens[..., None]).squeeze(-1)
        entropy = -(logprobs.exp() * logprobs.clamp_min(-1e30)).sum(-1)  # [B, new tokens]
        result = []
        for row, (tokens, lps) in enumerate(zip(new_tokens.tolist(), token_logprobs.tolist())):
            finished = self.eos_token_id in tokens
            length = tokens.index(self.eos_token_id) + 1 if finished else len(tokens)
            result.append(Completion(tokens[:length], lps[:length], finished))
            self._entropy_sum += float(entropy[row, :length].sum())
            self._entropy_count += length
        return result

    @torch.no_grad()
    def sync_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        own = dict(self.model.named_parameters())
        own.update(dict(self.model.named_buffers()))
        for name, tensor in named_tensors:
            if name not in own:
                raise KeyError(f"sync_weights: the rollout model has no parameter {name!r}")
            own[name].copy_(tensor.to(own[name].device, own[name].dtype))

    def metrics(self) -> dict[str, float]:
        """`rollout_entropy`: the sampling distribution's mean entropy per sampled token, over
        the latest generate call."""
        return dict(self._metrics)

    def close(self) -> None:
        self.model = None  # the copy is the engine's only resource
