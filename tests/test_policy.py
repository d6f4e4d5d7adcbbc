"""luffy_fast/policy.py with a stub decoder (an embedding: hidden = E[input_id]) and a biased
LM head: the head hands the op every field of the micro-batch, and sequence_logprobs returns
each sequence's response log-probs. Oracle: the op called directly (reference backend) and
log_softmax of the stub's logits."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from torch import nn

from luffy_fast import LuffyLossConfig, fused_luffy_loss, token_logprobs
from luffy_fast.micro_batches import pack_micro_batch
from luffy_fast.policy import FusedLossHead, PolicyWithFusedLoss, sequence_logprobs, uses_packed_attention
from luffy_fast.rollout_batch import RolloutBatch

V, H = 11, 6


class Decoder(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(V, H)

    def forward(self, input_ids, position_ids=None, attention_mask=None, use_cache=False):
        return SimpleNamespace(last_hidden_state=self.embed(input_ids))


class Policy(nn.Module):
    def __init__(self, attention="sdpa"):
        super().__init__()
        torch.manual_seed(0)
        self.config = SimpleNamespace(_attn_implementation=attention)
        self.decoder, self.lm_head = Decoder().double(), nn.Linear(H, V).double()

    def get_decoder(self):
        return self.decoder

    def get_output_embeddings(self):
        return self.lm_head


def rollout_batch() -> RolloutBatch:
    return RolloutBatch(prompt_ids=[[1, 2], [3], [4, 5, 6]],
                        response_ids=[[7, 8, 9], [10, 2], [5]],
                        off_policy=torch.tensor([False, True, False]),
                        group_ids=torch.tensor([0, 0, 1]), finished=[True] * 3,
                        advantages=torch.tensor([0.5, -1.0, 2.0]))


def direct_logprobs(policy: Policy, batch: RolloutBatch, index: int) -> torch.Tensor:
    """log_softmax of the stub's logits at the response positions, by hand."""
    prompt, response = batch.prompt_ids[index], batch.response_ids[index]
    hidden = policy.decoder.embed(torch.tensor(prompt + response)[:-1])[len(prompt) - 1:]
    logits = (hidden @ policy.lm_head.weight.T + policy.lm_head.bias) / 0.7
    return torch.log_softmax(logits, -1).gather(1, torch.tensor(response)[:, None]).squeeze(1)


def test_the_head_hands_the_op_every_field_of_the_micro_batch():
    """Old log-probs, seq_ids (two sequences under the constant normalizer), the head's bias and
    the config's temperature all reach the op: the same loss and statistics as the op's own call."""
    policy, batch = Policy(), rollout_batch()
    config = LuffyLossConfig(normalizer="constant", max_len=4, temperature=0.7, entropy_coef=0.1)
    old = [torch.full((len(r),), -1.5) for r in batch.response_ids]
    micro = pack_micro_batch(batch, [0, 1, 2], old_logprobs=old)
    head = FusedLossHead(policy.lm_head, config, backend="reference")
    hidden = policy.decoder.embed(micro.input_ids[0]).detach()
    loss, stats = head(hidden, micro)
    expected, expected_stats = fused_luffy_loss(
        hidden, policy.lm_head.weight, micro.targets, micro.advantages, micro.loss_mask,
        micro.off_policy_mask, old_logprobs=micro.old_logprobs, config=config,
        seq_ids=micro.seq_ids, bias=policy.lm_head.bias, backend="reference")
    torch.testing.assert_close(loss, expected, rtol=1e-12, atol=0.0)
    assert float(stats["num_sequences"]) == 3.0 and float(stats["ratio_max"]) != 1.0


def test_the_heads_logprob_pass_uses_the_bias_temperature_and_entropy():
    policy, batch = Policy(), rollout_batch()
    micro = pack_micro_batch(batch, [0, 1, 2])
    head = FusedLossHead(policy.lm_head, LuffyLossConfig(temperature=0.7), backend="reference")
    hidden = policy.decoder.embed(micro.input_ids[0]).detach()
    lp, entropy = head(hidden, micro, logprobs_only=True, with_entropy=True)
    expected = token_logprobs(hidden, policy.lm_head.weight, micro.targets.clamp_min(0),
                              temperature=0.7, bias=policy.lm_head.bias, with_entropy=True,
                              backend="reference")
    torch.testing.assert_close(lp, expected[0], rtol=1e-12, atol=0.0)
    torch.testing.assert_close(entropy, expected[1], rtol=1e-12, atol=0.0)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("lockstep", [None, lambda count: count + 2])
def test_sequence_logprobs_are_each_responses_log_softmax(training, lockstep):
    """Sequences 0 and 2 in micro-batches of at most 5 tokens (and two ZeRO-3 fillers, which
    must not overwrite a sequence's values); sequence 1 gets an empty tensor. The module's
    training mode is restored."""
    policy = Policy()
    module = PolicyWithFusedLoss(policy, LuffyLossConfig(temperature=0.7), backend="torch")
    module.train(training)
    batch = rollout_batch()
    logprobs, entropies = sequence_logprobs(module, batch, [0, 2], token_budget=5,
                                            device=torch.device("cpu"), packed=module.packed,
                                            with_entropy=True, lockstep=lockstep)
    assert module.training == training
    assert logprobs[1].numel() == 0 and entropies[1].numel() == 0
    for index in (0, 2):
        expected = direct_logprobs(policy, batch, index).float().detach()
        torch.testing.assert_close(logprobs[index], expected, rtol=1e-6, atol=1e-6)
        assert entropies[index].shape == expected.shape and bool((entropies[index] > 0).all())


def test_only_flash_attention_runs_packed():
    assert uses_packed_attention(Policy("flash_attention_2"))
    assert not uses_packed_attention(Policy("sdpa")) and not uses_packed_attention(Policy(""))
