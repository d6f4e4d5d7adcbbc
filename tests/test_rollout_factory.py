"""`rollout.engine` -> the engine (luffy_fast/rollout/factory.py): which policy the hf engine
holds, and what the vLLM engine starts from (its model directory, options and seed), with the
vLLM engine replaced by a recorder."""

from pathlib import Path

import pytest
import torch

import luffy_fast.rollout.vllm as vllm_engine
from helpers import tiny_config
from luffy_fast.rollout.factory import build_rollout_engine
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.toy.task import ToyTask

CPU = torch.device("cpu")


def test_the_hf_engine_holds_the_policy_below_zero3_and_a_copy_at_zero3(tmp_path):
    config = tiny_config(tmp_path, "rollout.max_batch_size=3")
    tokenizer, policy = ToyTask(config).components()
    engine = build_rollout_engine(config, policy, tokenizer, CPU, tmp_path)
    assert engine.model is policy and engine.shares_weights
    assert engine.max_batch_size == 3

    config = tiny_config(tmp_path, "train.zero_stage=3", "model.precision=bf16")
    engine = build_rollout_engine(config, policy, tokenizer, CPU, tmp_path)
    assert engine.model is not policy and not engine.shares_weights
    assert {p.dtype for p in engine.model.parameters()} == {torch.bfloat16}  # as ZeRO-3 trains
    assert {p.dtype for p in policy.parameters()} == {torch.float32}


def test_the_vllm_engine_starts_from_the_policy_saved_under_the_work_dir(tmp_path, monkeypatch):
    started = {}

    class Recording:
        def __init__(self, model_dir, options, seed, device):
            started.update(model_dir=Path(model_dir), options=options, seed=seed, device=device,
                           files={path.name for path in Path(model_dir).iterdir()})

    monkeypatch.setattr(vllm_engine, "VLLMRolloutEngine", Recording)
    config = tiny_config(tmp_path / "out", "rollout.engine=vllm", "train.seed=17",
                         "rollout.vllm.sync_bucket_mb=8")
    tokenizer, policy = ToyTask(config).components()
    engine = build_rollout_engine(config, policy, tokenizer, CPU, tmp_path / "work")
    assert isinstance(engine, Recording)  # one training rank: no barrier
    assert started["model_dir"] == tmp_path / "work" / "rollout_model"
    assert {"config.json", "model.safetensors", "tokenizer.json"} <= started["files"]
    # max_model_len: data.max_prompt_length + data.max_response_length = 8 + 24
    assert started["options"] == VLLMConfig(max_model_len=32, sync_bucket_mb=8)
    assert (started["seed"], started["device"]) == (17, CPU)
    assert config.rollout.vllm.max_model_len is None  # the user's config is left as it was

    config = tiny_config(tmp_path / "out", "rollout.engine=vllm", "rollout.vllm.max_model_len=40")
    build_rollout_engine(config, policy, tokenizer, CPU, tmp_path / "work")
    assert started["options"].max_model_len == 40  # set by hand: kept


def test_an_unknown_engine_is_named(tmp_path):
    config = tiny_config(tmp_path)
    config.rollout.engine = "sglang"  # past the config's own check
    with pytest.raises(ValueError, match=r"^rollout.engine: unknown engine 'sglang' \(choose hf "
                                         r"or vllm\)$"):
        build_rollout_engine(config, None, None, CPU, tmp_path)
