"""model.liger_kernels: Liger-Kernel's RMSNorm, SwiGLU and RoPE kernels in the policy.

Liger's Triton kernels do not run on this CPU machine (its RMSNorm fails under Triton's
interpreter), so these tests check what can be checked here:
- the refusals, each naming the key, raised before a model is built where they can be;
- that patching changes the layers' forwards and nothing in the model's state (parameter names
  and values, which checkpoints and rollout weight syncs read);
- the wiring, with PyTorch stand-ins for Liger's three kernels (the HF formulas, counting their
  calls): the patched policy's loss, gradients (under gradient checkpointing), KV-cache
  generation and deep copy (the hf engine's at ZeRO-3) equal the plain policy's, and every
  stand-in ran.
The kernels' own numbers are checked on a GPU (benchmarks/trainer_update.py: grad_parity, the
`triton+liger` row against the `triton` one).
"""

from __future__ import annotations

import copy
import json

import pytest
import torch

from helpers import tiny_config, tiny_qwen2
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


def test_refused_for_a_model_liger_does_not_patch(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ConfigError, match="no kernels for model type 'bert'"):
        check_liger(ModelConfig(path=str(tmp_path), liger_kernels=True), CUDA)
    # a Qwen2 whose MLP is not SiLU-gated: Liger's SwiGLU would change what it computes
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2", "hidden_act": "gelu"}))
    with pytest.raises(ConfigError, match="SwiGLU kernel computes SiLU.*'gelu'"):
        check_liger(ModelConfig(path=str(tmp_path), liger_kernels=True), CUDA)
    for silu in ("silu", "swish"):  # two names of one function (transformers' ACT2FN)
        (tmp_path / "config.json").write_text(json.dumps({"model_type": "qwen2",
                                                          "hidden_act": silu}))
        check_liger(ModelConfig(path=str(tmp_path), liger_kernels=True), CUDA)
    check_liger(ModelConfig(path="toy", liger_kernels=True), CUDA)  # checked when it is built


def test_a_policy_liger_would_leave_unpatched_is_refused_when_built():
    """A task's own policy (model.path toy) is checked when built: GPT-2 has no Liger kernels,
    and Liger would only log that and patch nothing."""
    from transformers import GPT2Config, GPT2LMHeadModel

    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_embd=32, n_layer=1, n_head=2))
    with pytest.raises(ConfigError, match="no kernels for model type 'gpt2'"):
        apply_liger_kernels(gpt2)
    with pytest.raises(ConfigError, match="'gelu'"):
        apply_liger_kernels(tiny_qwen2(layers=1, hidden_act="gelu"))


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
    model = tiny_qwen2()
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

    plain = prepare_policy(tiny_qwen2(layers=1), ModelConfig())
    assert not plain.is_gradient_checkpointing
    assert "liger" not in plain.model.norm.forward.__func__.__module__
    both = prepare_policy(tiny_qwen2(layers=1),
                          ModelConfig(liger_kernels=True, gradient_checkpointing=True))
    assert both.is_gradient_checkpointing
    assert "liger" in both.model.norm.forward.__func__.__module__


@pytest.fixture
def torch_stand_ins(monkeypatch, restored_qwen2):
    """Liger's RMSNorm, SiLU-and-multiply and RoPE kernels replaced by the HF formulas in PyTorch
    (what Liger's kernels compute), counting their calls."""
    import liger_kernel.transformers.rms_norm as liger_rms_norm
    import liger_kernel.transformers.rope as liger_rope
    import liger_kernel.transformers.swiglu as liger_swiglu

    calls = {"rms_norm": 0, "swiglu": 0, "rope": 0}
    plain_rope = restored_qwen2.apply_rotary_pos_emb

    class RMSNorm:
        @staticmethod
        def apply(hidden, weight, eps, offset, casting_mode, in_place, row_mode):
            # Qwen2's norm: no weight offset (Gemma's is 1), Llama's casting (normalize in fp32,
            # cast back, then scale); the arguments the real kernel would compute with
            assert (offset, casting_mode) == (0.0, "llama"), (offset, casting_mode)
            calls["rms_norm"] += 1
            h = hidden.float()
            h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + eps)
            return (weight + offset) * h.to(hidden.dtype)

    def swiglu(a, b, gate_multiplier=1.0, down_multiplier=1.0):
        assert (gate_multiplier, down_multiplier) == (1.0, 1.0)  # the plain SiLU-gated MLP
        calls["swiglu"] += 1
        return torch.nn.functional.silu(a) * b

    def dispatch(name, q, k, cos, sin, position_ids=None, unsqueeze_dim=1, **_):
        assert name == "rope"
        calls["rope"] += 1
        return plain_rope(q, k, cos, sin, unsqueeze_dim=unsqueeze_dim)

    monkeypatch.setattr(liger_rms_norm, "LigerRMSNormFunction", RMSNorm)
    monkeypatch.setattr(liger_swiglu, "_swiglu_dispatch", swiglu)
    monkeypatch.setattr(liger_rope, "dispatch", dispatch)
    return calls


def test_the_patched_policy_trains_and_generates_as_the_plain_one(torch_stand_ins):
    """As the trainer runs the policy (the decoder under gradient checkpointing, then a loss on
    the LM head's weight): the same loss and gradients as the plain policy; greedy KV-cache
    generation, and a deep copy (the hf engine's at ZeRO-3), give the same tokens. The plain
    policy runs first: Liger's RoPE patch is process-wide. Every stand-in ran, the norms and MLPs
    again in the checkpointed recompute."""
    from luffy_fast.model_loading import prepare_policy

    ids = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))

    def train_and_generate(policy):
        policy.train()
        hidden = policy.model(input_ids=ids).last_hidden_state
        logits = hidden @ policy.get_output_embeddings().weight.T
        loss = logits.log_softmax(-1).gather(-1, ids[..., None]).mean()
        loss.backward()
        grads = {name: p.grad.clone() for name, p in policy.named_parameters()}
        policy.eval()
        with torch.no_grad():
            tokens = policy.generate(ids[:, :4], max_new_tokens=6, do_sample=False, use_cache=True,
                                     pad_token_id=0)
        return loss.detach(), grads, tokens

    loss, grads, tokens = train_and_generate(
        prepare_policy(tiny_qwen2(), ModelConfig(gradient_checkpointing=True)))
    assert torch_stand_ins == {"rms_norm": 0, "swiglu": 0, "rope": 0}
    patched = prepare_policy(tiny_qwen2(),
                             ModelConfig(gradient_checkpointing=True, liger_kernels=True))
    patched_loss, patched_grads, patched_tokens = train_and_generate(patched)
    assert torch.equal(patched_loss, loss)
    for name, grad in grads.items():
        assert torch.allclose(patched_grads[name], grad, rtol=1e-5, atol=1e-7), name
    assert torch.equal(patched_tokens, tokens)
    layers, trained = 2, dict(torch_stand_ins)
    assert trained["swiglu"] >= 2 * layers + 6 * layers  # forward, recompute, 6 generated tokens
    assert trained["rms_norm"] >= 2 * (2 * layers) + 1 and trained["rope"] >= 2 * layers

    copied = copy.deepcopy(patched)
    assert copied.model.norm.forward.__self__ is copied.model.norm  # bound to the copy
    with torch.no_grad():
        copied_tokens = copied.generate(ids[:, :4], max_new_tokens=6, do_sample=False,
                                        use_cache=True, pad_token_id=0)
    assert torch.equal(copied_tokens, tokens) and torch_stand_ins["swiglu"] > trained["swiglu"]


@pytest.mark.parametrize("zero_stage", [3, 2])
def test_the_patched_trainer_steps_as_the_plain_one_under_zero(tmp_path, monkeypatch,
                                                               torch_stand_ins, zero_stage):
    """The trainer at ZeRO-3 (the policy partitioned, each module's parameters gathered by hooks
    around its forward, also in the checkpointed recompute) and ZeRO-2 (the GPU check's stage),
    with the stand-ins patched in by model.liger_kernels: two training steps give the plain
    trainer's metrics (loss, rewards, ...) and its updated (gathered) parameters, and every
    stand-in ran inside the update's forward and backward, not only in the rollouts. The plain
    run goes first (Liger's RoPE patch is process-wide); the CPU refusal is bypassed by checking
    the options as on a CUDA device."""
    from luffy_fast.distributed import gathered_parameters
    from luffy_fast.trainer import LuffyTrainer

    checked = check_liger
    monkeypatch.setattr(model_loading, "check_liger", lambda model, device: checked(model, CUDA))
    in_update = []

    def run(name, *overrides):
        trainer = LuffyTrainer(tiny_config(
            tmp_path / name, "eval.every=0", "output.save_every=0", "optim.lr=1e-2",
            f"train.zero_stage={zero_stage}", "model.gradient_checkpointing=true", *overrides))
        accumulate = trainer.accumulate_gradients

        def counted(*args, **kwargs):  # the stand-ins' calls inside the update itself
            before = dict(torch_stand_ins)
            result = accumulate(*args, **kwargs)
            in_update.append({k: torch_stand_ins[k] - before[k] for k in before})
            return result

        trainer.accumulate_gradients = counted
        policy = trainer.engine.module.policy
        with gathered_parameters(policy.parameters(), zero_stage):
            initial = {n: p.detach().clone() for n, p in policy.named_parameters()}
        metrics = []
        for step in range(2):
            metrics.append({k: v for k, v in trainer.training_step(step).items()
                            if not any(part in k for part in ("seconds", "time/", "per_second",
                                                              "memory"))})
            trainer.step = step + 1
        with gathered_parameters(policy.parameters(), zero_stage):
            weights = {n: p.detach().clone() for n, p in policy.named_parameters()}
        assert max(float((weights[n] - p).abs().max()) for n, p in initial.items()) > 1e-3  # trained
        return trainer, metrics, weights

    _, metrics, weights = run("plain")
    assert torch_stand_ins == {"rms_norm": 0, "swiglu": 0, "rope": 0} and in_update
    assert all(counts == {"rms_norm": 0, "swiglu": 0, "rope": 0} for counts in in_update)
    in_update.clear()
    patched, patched_metrics, patched_weights = run("patched", "model.liger_kernels=true")
    assert "liger" in patched.engine.module.policy.model.norm.forward.__func__.__module__
    assert (zero_stage == 3) == (not patched.rollout.shares_weights)  # ZeRO-3: a patched copy

    # every stand-in ran in each update: per decoder layer (2), the norms and the MLP in the
    # forward and again in the checkpointed recompute, RoPE in the forward and the recompute
    layers = 2
    assert len(in_update) == 2
    for counts in in_update:
        assert counts["rms_norm"] >= 2 * (2 * layers) + 1, counts
        assert counts["swiglu"] >= 2 * layers and counts["rope"] >= 2 * layers, counts
    assert torch_stand_ins["swiglu"] > sum(counts["swiglu"] for counts in in_update)  # rollouts

    assert patched_metrics[0]["loss"] != 0.0 and weights.keys() == patched_weights.keys()
    for step, (got, want) in enumerate(zip(patched_metrics, metrics)):
        assert got.keys() == want.keys()
        for key, value in want.items():
            assert got[key] == pytest.approx(value, rel=1e-6, abs=1e-8), (step, key)
    for name, value in weights.items():
        got = patched_weights[name]
        assert got.shape == value.shape and got.numel() > 0, name  # whole, not a partition
        assert torch.allclose(got, value, rtol=1e-6, atol=1e-8), \
            f"{name}: max |diff| {float((got - value).abs().max()):.2e}"
