"""model.checkpointed_layers: gradient checkpointing of the first N decoder layers only.

The oracle is the policy itself: with any number of layers checkpointed, the loss and every
parameter's gradient equal the policy's without checkpointing (float64, to rounding), and the
layers that recompute are exactly the first N (each of them runs its forward twice in one
forward + backward, every other layer once). The refusals name the key and come before any
weight is read where the layer count is known from the config.
"""

from __future__ import annotations

import json

import pytest
import torch

from helpers import tiny_config, tiny_qwen2
from luffy_fast.errors import ConfigError
from luffy_fast.model_loading import check_checkpointed_layers, checkpointable_layers, prepare_policy
from luffy_fast.train_config import ModelConfig, load_config

LAYERS = 3


def forward_backward(policy) -> tuple[float, dict[str, torch.Tensor], list[int]]:
    """Loss, gradients and the number of forward calls of each decoder layer, for one causal-LM
    forward + backward on a fixed batch in float64."""
    calls = [0] * LAYERS
    # pre-hooks: torch's recompute stops early, once it has what the backward needs, so a
    # layer's forward hook does not run again, but its pre-hook does
    hooks = [layer.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
             for i, layer in enumerate(checkpointable_layers(policy))]
    policy.train()
    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    loss = policy(input_ids=ids, labels=ids).loss
    loss.backward()
    for hook in hooks:
        hook.remove()
    return float(loss.detach()), {n: p.grad.clone() for n, p in policy.named_parameters()}, calls


@pytest.mark.parametrize("checkpointed", [None, 0, 1, 2, 3])
def test_gradients_equal_the_plain_policy_and_the_first_layers_recompute(checkpointed):
    plain_loss, plain_grads, plain_calls = forward_backward(tiny_qwen2(LAYERS).double())
    assert plain_calls == [1, 1, 1]
    model = ModelConfig(gradient_checkpointing=True, checkpointed_layers=checkpointed)
    policy = prepare_policy(tiny_qwen2(LAYERS).double(), model)
    loss, grads, calls = forward_backward(policy)
    recomputing = LAYERS if checkpointed is None else checkpointed
    assert calls == [2] * recomputing + [1] * (LAYERS - recomputing)
    assert loss == pytest.approx(plain_loss, rel=1e-14)
    for name, grad in plain_grads.items():
        torch.testing.assert_close(grads[name], grad, rtol=1e-12, atol=1e-14, msg=name)


def test_without_checkpointing_no_layer_recomputes():
    _, _, calls = forward_backward(prepare_policy(tiny_qwen2(LAYERS).double(), ModelConfig()))
    assert calls == [1, 1, 1]


def test_the_key_is_checked_with_the_config():
    assert load_config(None, []).model.checkpointed_layers is None
    config = load_config(None, ["model.gradient_checkpointing=true", "model.checkpointed_layers=2"])
    assert config.model.checkpointed_layers == 2
    with pytest.raises(ConfigError, match=r"model.checkpointed_layers: must be an integer >= 0"):
        load_config(None, ["model.gradient_checkpointing=true", "model.checkpointed_layers=-1"])
    with pytest.raises(ConfigError, match=r"model.checkpointed_layers: expected an integer"):
        load_config(None, ["model.gradient_checkpointing=true", "model.checkpointed_layers=true"])
    with pytest.raises(ConfigError, match=r"model.checkpointed_layers: needs "
                                          r"model.gradient_checkpointing: true"):
        load_config(None, ["model.checkpointed_layers=2"])


def test_the_count_is_logged(caplog):
    with caplog.at_level("INFO", logger="luffy_fast"):
        prepare_policy(tiny_qwen2(LAYERS),
                       ModelConfig(gradient_checkpointing=True, checkpointed_layers=2))
    assert "gradient checkpointing: the first 2 of 3 decoder layers" in caplog.text


def test_only_the_decoder_layers_count():
    # a checkpointable block outside the decoder (as a vision tower's would be), registered
    # before the decoder so that module order would put it first
    from transformers.modeling_layers import GradientCheckpointingLayer

    policy = tiny_qwen2(LAYERS)
    tower = GradientCheckpointingLayer()
    policy._modules = {"tower": tower, **policy._modules}
    assert next(policy.modules()) is policy and list(policy.children())[0] is tower
    layers = checkpointable_layers(policy)
    assert layers == list(policy.model.layers)
    prepare_policy(policy, ModelConfig(gradient_checkpointing=True, checkpointed_layers=1))
    assert [layer.gradient_checkpointing for layer in policy.model.layers] == [True, False, False]


def test_more_layers_than_the_model_has_is_refused():
    with pytest.raises(ConfigError, match=r"model.checkpointed_layers: 4 is more than the "
                                          r"model's 3 decoder layers"):
        prepare_policy(tiny_qwen2(LAYERS),
                       ModelConfig(gradient_checkpointing=True, checkpointed_layers=4))


def test_a_model_directory_is_checked_before_its_weights_are_read(tmp_path):
    # config.json only: reading a weight would fail, so the refusal comes from the config
    tiny_qwen2(LAYERS).config.to_json_file(tmp_path / "config.json")
    assert json.loads((tmp_path / "config.json").read_text())["num_hidden_layers"] == LAYERS
    model = ModelConfig(path=str(tmp_path), gradient_checkpointing=True, checkpointed_layers=3)
    check_checkpointed_layers(model)  # all three: fine
    model.checkpointed_layers = 4
    with pytest.raises(ConfigError, match=r"model.checkpointed_layers: 4 is more than the "
                                          r"model's 3 layers \(num_hidden_layers"):
        check_checkpointed_layers(model)


def test_the_trainer_checkpoints_the_first_layers_of_its_policy(tmp_path):
    from luffy_fast.trainer import LuffyTrainer

    with pytest.raises(ConfigError, match=r"model.checkpointed_layers: 3 is more than the "
                                          r"model's 2 layers"):  # the toy's, with the config
        tiny_config(tmp_path / "run", "model.gradient_checkpointing=true",
                    "model.num_hidden_layers=2", "model.checkpointed_layers=3")
    config = tiny_config(tmp_path / "run", "model.gradient_checkpointing=true",
                         "model.num_hidden_layers=2", "model.checkpointed_layers=1")
    trainer = LuffyTrainer(config)
    layers = checkpointable_layers(trainer.engine.module)
    assert [layer.gradient_checkpointing for layer in layers] == [True, False]


def test_checkpointing_the_first_layers_peaks_lower_than_the_last():
    """Why the first N: the backward reaches them after the kept layers' activations are freed,
    so their recomputes add nothing to the peak. Peaks of one forward + backward, tracked by
    torch's MemTracker (every tensor the step allocates), for 3 of 6 layers checkpointed."""
    from torch.distributed._tools.mem_tracker import MemTracker

    policy = tiny_qwen2(6, hidden_size=128, intermediate_size=512)
    policy.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    policy.train()
    ids = torch.randint(0, 64, (1, 512), generator=torch.Generator().manual_seed(0))

    def peak(flags: list[bool]) -> float:
        for layer, flag in zip(checkpointable_layers(policy), flags):
            layer.gradient_checkpointing = flag
        policy.zero_grad(set_to_none=True)
        tracker = MemTracker()
        tracker.track_external(policy)
        with tracker:
            policy(input_ids=ids, labels=ids).loss.backward()
        (per_device,) = tracker.get_tracker_snapshot("peak").values()
        return per_device["Total"]

    first, last = peak([True] * 3 + [False] * 3), peak([False] * 3 + [True] * 3)
    none, every = peak([False] * 6), peak([True] * 6)
    assert every < first < last < none
