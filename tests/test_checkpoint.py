"""CheckpointManager's bookkeeping with folders made by hand and a stand-in engine: pruning,
the `latest` fall-backs, the weight check before a save, and a linked save's trainer state."""

from __future__ import annotations

import json
import math
import os
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from luffy_fast.checkpoint import CheckpointManager, NonFiniteWeightsError, unique_parameters


def make_checkpoints(root, *steps):
    for step in steps:
        folder = root / f"step-{step:06d}"
        folder.mkdir(parents=True)
        (folder / "trainer_state.json").write_text(json.dumps({"step": step}))


def engine_of(policy):
    return SimpleNamespace(module=SimpleNamespace(policy=policy),
                           zero_optimization_stage=lambda: 0, bfloat16_enabled=lambda: False)


def test_pruning_keeps_the_newest_and_never_the_named_one(tmp_path):
    make_checkpoints(tmp_path, 1, 2, 3, 4, 5)
    CheckpointManager(tmp_path, keep=2).prune(keep="step-000001")
    # the newest 2 (4, 5) stay, and 1 because it is named; 2 and 3 go
    assert sorted(p.name for p in tmp_path.glob("step-*")) == ["step-000001", "step-000004",
                                                               "step-000005"]


def test_without_a_latest_pointer_the_newest_complete_checkpoint_is_resumed(tmp_path):
    make_checkpoints(tmp_path, 3, 7)
    (tmp_path / "step-000009").mkdir()  # incomplete: no trainer_state.json
    with pytest.warns(RuntimeWarning, match="no `latest` pointer; .* step-000007"):
        assert CheckpointManager(tmp_path, keep=3).latest() == tmp_path / "step-000007"


def test_a_latest_pointer_into_another_folder_is_not_followed(tmp_path):
    make_checkpoints(tmp_path, 2)
    make_checkpoints(tmp_path / "best", 5)  # complete, but not one of this root's
    (tmp_path / "latest").write_text("best/step-000005\n")
    with pytest.warns(RuntimeWarning, match="points to 'best/step-000005', which is not"):
        assert CheckpointManager(tmp_path, keep=3).latest() == tmp_path / "step-000002"


@pytest.mark.parametrize("bad", [math.inf, -math.inf, math.nan])
def test_weights_holding_any_nonfinite_value_are_not_saved(tmp_path, bad):
    policy = nn.Linear(2, 2)
    with torch.no_grad():
        policy.bias[1] = bad
    with pytest.raises(NonFiniteWeightsError, match=r"step 4: .*\(bias\.\.\.\); checkpoint not"):
        CheckpointManager(tmp_path, keep=1).save(engine_of(policy), None, 4, {})
    assert not (tmp_path / "latest").exists() and not list(tmp_path.glob("*step-*"))


def test_a_linked_save_writes_its_own_trainer_state_and_leaves_the_sources(tmp_path):
    best = tmp_path / "best" / "step-000006"
    (best / "hf").mkdir(parents=True)
    (best / "hf" / "model.bin").write_bytes(b"weights")
    (best / "trainer_state.json").write_text(json.dumps({"step": 6, "best": True}))
    saved = CheckpointManager(tmp_path, keep=2).save(engine_of(nn.Linear(1, 1)), None, 6,
                                                     {"lr": 1}, {"sampler": {"epoch": 0}},
                                                     link_from=best)
    assert saved == tmp_path / "step-000006"
    assert os.path.samefile(saved / "hf" / "model.bin", best / "hf" / "model.bin")
    assert json.loads((best / "trainer_state.json").read_text()) == {"step": 6, "best": True}
    assert json.loads((saved / "trainer_state.json").read_text()) == {
        "step": 6, "config": {"lr": 1}, "world_size": 1, "zero_stage": 0, "bf16": False,
        "sampler": {"epoch": 0}}
    assert (tmp_path / "latest").read_text() == "step-000006\n"


def test_a_tied_weight_is_gathered_once_and_buffers_not_at_all():
    shared, other = nn.Parameter(torch.zeros(2)), nn.Parameter(torch.ones(1))
    bucket = [("embed.weight", shared), ("norm.running", torch.zeros(3)), ("head.weight", shared),
              ("bias", other)]
    assert unique_parameters(bucket) == [shared, other]
