"""Epoch-wise shuffling without replacement: the official loader's order, and a position that
a checkpoint can check."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch.utils.data import BatchSampler, RandomSampler

from luffy_fast.checkpoint import CheckpointManager, read_trainer_state
from luffy_fast.data import Sample
from luffy_fast.errors import ConfigError
from luffy_fast.sampler import EpochSampler, data_metrics, prompt_sampler, rank_share
from luffy_fast.train_config import load_config


def test_each_epoch_is_a_permutation_and_the_tail_is_dropped():
    sampler = EpochSampler(size=10, batch_size=3, seed=47)
    assert sampler.batches_per_epoch == 3  # 10 // 3: one prompt per epoch left out
    for epoch in range(3):
        drawn = [i for step in range(3 * epoch, 3 * epoch + 3) for i in sampler.batch(step)]
        assert len(drawn) == len(set(drawn)) == 9 and set(drawn) <= set(range(10))
    assert sampler.batch(0) != sampler.batch(3)  # a fresh order each epoch


def test_the_order_is_the_official_loaders():
    """verl's loader: RandomSampler over a generator seeded once, batches with drop_last."""
    generator = torch.Generator().manual_seed(47)
    official = BatchSampler(RandomSampler(range(23), generator=generator), 5, drop_last=True)
    expected = [batch for _ in range(3) for batch in official]  # three epochs
    sampler = EpochSampler(size=23, batch_size=5, seed=47)
    assert [sampler.batch(step) for step in range(12)] == expected
    # a resumed sampler (a new object) draws the same batch for the same step
    assert EpochSampler(23, 5, 47).batch(9) == expected[9]


def test_the_state_names_the_position_and_refuses_changed_data():
    sampler = EpochSampler(size=20, batch_size=4, seed=3)
    state = sampler.state_dict(7)
    assert state == {"epoch": 1, "batch": 2, "seed": 3, "size": 20, "batch_size": 4}
    sampler.check_state(state, 7)
    with pytest.raises(ConfigError, match="^data.source: .*the data, train.prompts_per_step or "
                                          "train.seed changed"):
        EpochSampler(size=19, batch_size=4, seed=3).check_state(state, 7)
    with pytest.raises(ConfigError, match="^train.prompts_per_step: .* batches of 4 from 20 .* "
                                          "batches of 5 from 20"):
        EpochSampler(size=20, batch_size=5, seed=3).check_state(state, 7)
    with pytest.raises(ConfigError, match="^train.seed: .*with seed 3; .* with seed 4"):
        EpochSampler(size=20, batch_size=4, seed=4).check_state(state, 7)
    with pytest.raises(ConfigError, match="position 1:2 is not step 6's"):
        sampler.check_state(state, 6)
    with pytest.raises(ConfigError, match="train.prompts_per_step: 8 prompts per step but only 5"):
        EpochSampler(size=5, batch_size=8, seed=0)


def test_a_resume_over_other_prompts_of_the_same_number_is_refused():
    """The sampler's state holds a fingerprint of the prompts, answers and trace lengths: the
    same count of other prompts (a file rewritten, reordered) would be drawn by the old order."""
    config = load_config(None, ["train.prompts_per_step=4", "train.mini_batch_size=2"])
    samples = [Sample([i, i + 1], str(i), [[7] * (i % 3 + 1)]) for i in range(20)]
    state = prompt_sampler(samples, config).state_dict(3)
    assert set(state) == {"epoch", "batch", "seed", "size", "batch_size", "data"}
    prompt_sampler([Sample(list(s.prompt_ids), s.ground_truth, [list(t) for t in s.traces])
                    for s in samples], config).check_state(state, 3)  # equal data: accepted
    # sample 19 is Sample([19, 20], "19", [[7, 7]]) (19 % 3 + 1 = 2): each change below alters
    # exactly one of its prompt, answer or trace lengths
    changed = {"reordered": samples[::-1], "an answer": [*samples[:-1], Sample([19, 20], "x", [[7] * 2])],
               "a trace": [*samples[:-1], Sample([19, 20], "19", [[7] * 5])],
               "a prompt": [*samples[:-1], Sample([19, 21], "19", [[7] * 2])]}
    for other in changed.values():
        with pytest.raises(ConfigError, match=r"^data.source: the 20 training prompts are not the "
                                              r"checkpoint's run's"):
            prompt_sampler(other, config).check_state(state, 3)
    del state["data"]  # a checkpoint from before the fingerprint: trusted
    prompt_sampler(samples[::-1], config).check_state(state, 3)


def test_epochs_set_the_run_length():
    config = load_config(None, ["train.epochs=3", "train.prompts_per_step=4",
                                "train.mini_batch_size=2"])
    sampler = prompt_sampler([Sample([i], str(i)) for i in range(18)], config)  # 4 steps an epoch
    assert config.train.steps == 12
    assert data_metrics(None, sampler, 11) == {"data/epoch": 2}
    assert load_config(None).train.epochs is None
    with pytest.raises(ConfigError, match="train.epochs: must be an integer >= 1"):
        load_config(None, ["train.epochs=0"])


def test_a_resume_reads_the_trainer_state_once_and_checks_the_sampler_before_the_load(
        tmp_path, monkeypatch):
    folder = tmp_path / "step-000007"
    folder.mkdir()
    sampler = EpochSampler(size=20, batch_size=4, seed=3)
    (folder / "trainer_state.json").write_text(json.dumps(
        {"step": 7, "config": {}, "sampler": sampler.state_dict(7)}))
    reads, loads = [], []
    real_read_text = Path.read_text
    monkeypatch.setattr(Path, "read_text", lambda self, *args, **kwargs: reads.append(
        self.name) or real_read_text(self, *args, **kwargs))

    class Engine:  # DeepSpeed's load_checkpoint, recorded
        def load_checkpoint(self, path, tag):
            loads.append((path, tag))
            return path, {}

    saved = read_trainer_state(folder)
    sampler.check_trainer_state(saved)  # the same data, the same position: no error
    with pytest.raises(ConfigError, match="the data, train.prompts_per_step or train.seed changed"):
        EpochSampler(size=19, batch_size=4, seed=3).check_trainer_state(saved)
    assert loads == []  # refused before the DeepSpeed state is read
    assert CheckpointManager.load(Engine(), folder, saved) == 7
    assert reads == ["trainer_state.json"] and loads == [(str(folder), "deepspeed")]
    EpochSampler(size=19, batch_size=4, seed=3).check_trainer_state({"step": 7})  # no sampler


def test_each_rank_takes_its_slice_of_every_mini_batch():
    picks = [10, 11, 12, 13, 14, 15, 16, 17]  # two mini-batches of 4 prompts, over 2 ranks
    assert rank_share(picks, 4, 0, 2) == [10, 11, 14, 15]
    assert rank_share(picks, 4, 1, 2) == [12, 13, 16, 17]
    assert rank_share(picks, 4, 0, 1) == picks


def test_a_step_may_take_every_prompt():
    # 4 prompts, 4 per step: one batch an epoch, each epoch the whole set in a fresh order
    sampler = EpochSampler(size=4, batch_size=4, seed=5)
    assert sampler.batches_per_epoch == 1 and sampler.position(3) == (3, 0)
    assert sorted(sampler.batch(0)) == sorted(sampler.batch(1)) == [0, 1, 2, 3]


def test_the_data_metrics_add_the_loading_reports():
    sampler = EpochSampler(size=10, batch_size=3, seed=0)  # 3 steps an epoch: step 7 is epoch 2
    report = SimpleNamespace(metrics=lambda: {"data/skipped": 4, "data/truncated_traces": 1})
    assert data_metrics(report, sampler, 7) == {"data/epoch": 2, "data/skipped": 4,
                                                "data/truncated_traces": 1}
