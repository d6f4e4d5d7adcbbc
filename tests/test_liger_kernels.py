"""model.liger_kernels: Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels in the policy.

Liger's Triton kernels do not run on this CPU machine (its RMSNorm fails under Triton's
interpreter), so these tests check what can be checked here: the refusals, each naming the key and
raised before a model is built, and that patching a model changes its layers' forwards and
nothing in its state (parameter names and values, which checkpoints and rollout weight syncs
read). The patched model's gradients are checked against the plain one's on a GPU
(benchmarks/trainer_update.py: grad_parity, the `triton+liger` row).
"""

from __future__ import annotations

import json

import pytest
import torch
from transformers import Qwen2Config, Qwen2ForCausalLM

from helpers import tiny_config
from luffy_fast import model_loading
from luffy_fast.errors import ConfigError
from luffy_fast.model_loading import apply_liger_kernels, check_liger
from luffy_fast.train_config import ModelConfig, load_config

CUDA = torch.device("cuda")  # only its .type is read: no GPU is touched


def test_the_key_parses_and_defaults_to_off():
    assert load_config(None, []).model.liger_kernels is False
    assert load_config(None, ["model.liger_kernels=true"]).model.liger_kernels is True
    with pytest.raises(ConfigError, match="model.liger_kernels"):
        load_config(None, ["model.liger_kernels=3"])


def test_off_checks_nothing(monkeypatch):
    monkeypatch.setattr(model_loading.importlib.util, "find_spec", lambda name: None)
    check_liger(ModelConfig(), torch.device("cpu"))


def test_refused_without_the_package(monkeypatch):
    monkeypatch.setattr(model_loading.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match="model.liger_kernels: needs the liger-kernel package"):
        check_liger(ModelConfig(liger_kernels=True), CUDA)


def test_refused_on_the_cpu():
    with pytest.raises(ConfigError, match="model.liger_kernels: .* CUDA devices only, .* on cpu"):
        check_liger(ModelConfig(liger_kernels=True), torch.device("cpu"))


def test_refused_for_a_model_type_liger_does_not_patch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="no kernels for model type 'bert'"):
        check_liger(ModelConfig(path=str(tmp_path), liger_kernels=True), CUDA)
    check_liger(ModelConfig(path="toy", liger_kernels=True), CUDA)  # the demo's Qwen2: accepted


def test_the_trainer_refuses_before_building_a_model(tmp_path, monkeypatch):
    from luffy_fast import trainer

    def no_model(*args, **kwargs):
        raise AssertionError("the policy was built before the check")

    monkeypatch.setattr(trainer, "prepare_components", no_model)
    with pytest.raises(ConfigError, match="model.liger_kernels"):
        trainer.LuffyTrainer(tiny_config(tmp_path, "model.liger_kernels=true"))


@pytest.fixture
def restored_qwen2(monkeypatch):
    """Liger also patches transformers' Qwen2 module itself (its RoPE function and its norm and
    MLP classes, for models built later): put back after the test, as Liger's kernels do not run
    in the other tests' Qwen2 models on this CPU."""
    from transformers.models.qwen2 import modeling_qwen2

    for name in ("apply_rotary_pos_emb", "Qwen2RMSNorm", "Qwen2MLP"):
        monkeypatch.setattr(modeling_qwen2, name, getattr(modeling_qwen2, name))
    return modeling_qwen2


def test_patching_changes_forwards_not_state(restored_qwen2):
    """The norms' and MLPs' forwards become Liger's; every parameter keeps its name and value."""
    config = Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2)
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    before = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    plain_norm, plain_mlp = model.model.norm.forward, model.model.layers[0].mlp.forward
    apply_liger_kernels(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[name], tensor) for name, tensor in before.items())
    for layer in model.model.layers:
        for module in (layer.input_layernorm, layer.post_attention_layernorm, layer.mlp):
            assert "liger" in type(module).__module__ + module.forward.__func__.__module__
    assert model.model.norm.forward.__func__ is not plain_norm.__func__
    assert model.model.layers[0].mlp.forward.__func__ is not plain_mlp.__func__
    assert "liger" in model.model.norm.forward.__func__.__module__
    assert "liger" in restored_qwen2.apply_rotary_pos_emb.__module__  # undone after the test


def test_prepare_policy_applies_what_the_model_section_asks(restored_qwen2):
    from luffy_fast.model_loading import prepare_policy

    def tiny():
        torch.manual_seed(0)
        return Qwen2ForCausalLM(Qwen2Config(vocab_size=64, hidden_size=32, intermediate_size=64,
                                            num_hidden_layers=1, num_attention_heads=4,
                                            num_key_value_heads=2))

    plain = prepare_policy(tiny(), ModelConfig())
    assert not plain.is_gradient_checkpointing
    assert "liger" not in plain.model.norm.forward.__func__.__module__
    both = prepare_policy(tiny(), ModelConfig(liger_kernels=True, gradient_checkpointing=True))
    assert both.is_gradient_checkpointing
    assert "liger" in both.model.norm.forward.__func__.__module__
