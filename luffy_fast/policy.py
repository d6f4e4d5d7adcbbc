"""The fused-loss policy: a causal LM whose training forward returns the LUFFY loss, never logits.

The nn.Module layer over `fused_luffy_loss`, for the trainer and for users' own loops:

    from luffy_fast import LuffyLossConfig, PolicyWithFusedLoss

    module = PolicyWithFusedLoss(AutoModelForCausalLM.from_pretrained(path),
                                 LuffyLossConfig.luffy(max_len=8192))
    loss, stats = module(micro_batch)  # a luffy_fast.micro_batches.MicroBatch
    loss.backward()

Only the decoder runs; its last hidden states go with the LM-head weight to the fused op, inside
a module that owns that weight so that DeepSpeed ZeRO-3 gathers it for the call
(docs/design.md §The module layer). The [T, V] logits are never materialized.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Optional

import torch
from torch import Tensor, nn

from luffy_fast.config import LuffyLossConfig
from luffy_fast.micro_batches import MicroBatch, micro_batches
from luffy_fast.ops import fused_luffy_loss, token_logprobs
from luffy_fast.rollout_batch import RolloutBatch


class FusedLossHead(nn.Module):
    """The LM head as a loss: owns the head's weight (shared, not copied), so that ZeRO-3
    gathers it when this module runs, and computes the LUFFY loss from hidden states.

    backend: the op's backend ("torch", "triton", "reference"); None picks it by device.
    """

    def __init__(self, lm_head: nn.Module, loss_config: LuffyLossConfig,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.weight = lm_head.weight
        self.bias = getattr(lm_head, "bias", None)
        self.loss_config = loss_config
        self.backend = backend

    def forward(self, hidden: Tensor, micro: MicroBatch, logprobs_only: bool = False,
                with_entropy: bool = False):
        """(loss, stats) of `fused_luffy_loss` over the micro-batch's tokens; with
        `logprobs_only`, the per-token (log-probs, entropies or None) of `token_logprobs`."""
        if logprobs_only:
            targets = micro.targets.clamp_min(0)
            return token_logprobs(hidden, self.weight, targets,
                                  temperature=self.loss_config.temperature, bias=self.bias,
                                  with_entropy=with_entropy, backend=self.backend,
                                  logits_dtype=self.loss_config.logits_dtype,
                                  memory_budget_mb=self.loss_config.memory_budget_mb)
        return fused_luffy_loss(
            hidden, self.weight, micro.targets, micro.advantages,  # fp32: not rounded to bf16
            micro.loss_mask, micro.off_policy_mask, old_logprobs=micro.old_logprobs,
            config=self.loss_config, seq_ids=micro.seq_ids, bias=self.bias, backend=self.backend)


def uses_packed_attention(policy: nn.Module) -> bool:
    """Whether micro-batches run as one packed row (padding removed) or as padded rows.

    transformers builds a block-diagonal causal mask from position_ids that restart at 0, so a
    packed row is exact for every attention kernel; but only flash-attention's varlen kernel
    makes it cheap: sdpa and eager then attend over the whole [T, T] square, slower on short
    sequences than padding (measured on the CPU). So: packed with flash-attention, else padded
    rows, grouped by length, with the padding dropped before the loss.
    """
    implementation = getattr(policy.config, "_attn_implementation", "") or ""
    return implementation.startswith("flash_attention")


class PolicyWithFusedLoss(nn.Module):
    """A transformers causal LM whose forward returns the LUFFY loss (or per-token log-probs).

    policy: any model with `get_decoder()` and `get_output_embeddings()` (the LM head).
    `packed` (from the attention implementation) says how micro-batches are fed to the decoder.
    """

    def __init__(self, policy: nn.Module, loss_config: LuffyLossConfig,
                 backend: Optional[str] = None) -> None:
        super().__init__()
        self.policy = policy
        self.loss_head = FusedLossHead(policy.get_output_embeddings(), loss_config, backend)
        self.packed = uses_packed_attention(policy)

    def forward(self, micro: MicroBatch, logprobs_only: bool = False, with_entropy: bool = False):
        decoder = self.policy.get_decoder()
        if self.packed:
            hidden = decoder(input_ids=micro.input_ids, position_ids=micro.position_ids,
                             use_cache=False).last_hidden_state[0]
        else:
            rows, mask = micro.padded_rows()
            hidden = decoder(input_ids=rows, attention_mask=mask,
                             use_cache=False).last_hidden_state[mask.bool()]  # back to [T, H]
        return self.loss_head(hidden, micro, logprobs_only=logprobs_only,
                              with_entropy=with_entropy)


@torch.no_grad()
def sequence_logprobs(module: nn.Module, batch: RolloutBatch, indices: Iterable[int],
                      token_budget: int, device: torch.device, packed: bool,
                      ignore_index: int = LuffyLossConfig.ignore_index,
                      with_entropy: bool = False, lockstep: Optional[Callable[[int], int]] = None
                      ) -> tuple[list[Tensor], list[Tensor]]:
    """Per-response-token log-probs (and entropies) of the sequences at `indices` under
    `module` (a PolicyWithFusedLoss, or a DeepSpeed engine around one; `packed` its
    attention layout), one no-grad pass per token-budget micro-batch (and ZeRO-3's filler
    passes: micro_batches' `lockstep`); other sequences get empty tensors."""
    logprobs: list[Tensor] = [torch.empty(0)] * len(batch)
    entropies: list[Tensor] = [torch.empty(0)] * len(batch)
    was_training = module.training
    module.eval()
    try:
        for micro in micro_batches(batch, indices, token_budget, padded=not packed,
                                   ignore_index=ignore_index, lockstep=lockstep):
            values, entropy = module(micro.to(device), logprobs_only=True,
                                     with_entropy=with_entropy)
            if micro.filler:
                continue
            values = values.float().cpu()
            entropy = entropy.float().cpu() if entropy is not None else None
            for index in micro.sequence_indices:
                rows = micro.loss_mask & (micro.seq_ids == index)
                logprobs[index] = values[rows]
                if entropy is not None:
                    entropies[index] = entropy[rows]
    finally:  # also when a sequence is over the token budget
        module.train(was_training)
    return logprobs, entropies
