"""micro_batches on small hand-made batches: where old log-probs land, which sequences a
zero-advantage mini-batch keeps, and moving a micro-batch between devices."""

from __future__ import annotations

import torch

from luffy_fast import LuffyLossConfig
from luffy_fast.micro_batches import pack_micro_batch, sequences_with_gradient
from luffy_fast.rollout_batch import RolloutBatch


def small_batch(advantages) -> RolloutBatch:
    # sequence lengths (prompt + response - 1): 3, 4, 1, 2
    return RolloutBatch(prompt_ids=[[5, 6], [5, 6], [9], [9]],
                        response_ids=[[2, 1], [7, 8, 1], [4], [3, 1]],
                        off_policy=torch.tensor([False, True, False, True]),
                        group_ids=torch.tensor([0, 0, 1, 1]), finished=[True] * 4,
                        advantages=torch.tensor(advantages, dtype=torch.float32))


def test_old_logprobs_sit_on_the_response_positions_and_zero_on_the_prompt():
    batch = small_batch([0.5, -0.5, 0.0, 0.0])
    old = [torch.tensor([-0.5, -0.25]), torch.tensor([-1.0, -2.0, -3.0]), torch.tensor([-4.0]),
           torch.tensor([-6.0, -7.0])]
    micro = pack_micro_batch(batch, [1, 3, 0], old)
    # sequence 1: inputs [5, 6, 7, 8], targets [-, 7, 8, 1] -> old [0, -1, -2, -3]
    # sequence 3: inputs [9, 3],       targets [3, 1]       -> old [-6, -7]
    # sequence 0: inputs [5, 6, 2],    targets [-, 2, 1]    -> old [0, -0.5, -0.25]
    assert micro.old_logprobs.tolist() == [0, -1, -2, -3, -6, -7, 0, -0.5, -0.25]
    assert micro.loss_mask.tolist() == [False, True, True, True, True, True, False, True, True]


def test_a_mini_batch_of_zero_advantages_keeps_only_its_shortest_sequence():
    no_entropy = LuffyLossConfig(entropy_coef=0.0)
    batch = small_batch([0.5, 0.0, 0.0, -0.25])
    assert sequences_with_gradient(batch, [0, 1, 2, 3], no_entropy) == [0, 3]
    # all four at zero advantage: one backward still runs, on the shortest (sequence 2, 1 token)
    batch = small_batch([0.0, 0.0, 0.0, 0.0])
    assert sequences_with_gradient(batch, [0, 1, 2, 3], no_entropy) == [2]
    assert sequences_with_gradient(batch, [1, 0], no_entropy) == [0]  # lengths 4, 3
    assert sequences_with_gradient(batch, [], no_entropy) == []
    # with an entropy bonus every sequence has a gradient
    with_entropy = no_entropy.replace(entropy_coef=0.001)
    assert sequences_with_gradient(batch, [3, 1], with_entropy) == [3, 1]


def test_moving_a_micro_batch_moves_every_tensor_and_keeps_the_lists():
    batch = small_batch([0.5, -0.5, 0.0, 0.0])
    micro = pack_micro_batch(batch, [0, 2], [torch.zeros(len(r)) for r in batch.response_ids])
    moved = micro.to(torch.device("meta"))
    tensors = {name for name, value in vars(micro).items() if isinstance(value, torch.Tensor)}
    assert tensors == {"input_ids", "position_ids", "targets", "advantages", "loss_mask",
                       "off_policy_mask", "seq_ids", "old_logprobs"}
    assert all(getattr(moved, name).device.type == "meta" for name in tensors)
    assert all(getattr(micro, name).device.type == "cpu" for name in tensors)
    assert (moved.sequence_indices, moved.lengths, moved.filler) == ([0, 2], [3, 1], False)
