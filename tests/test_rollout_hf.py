"""The transformers `generate` rollout engine against the policy's own log-softmax."""

from __future__ import annotations

import pytest
import torch

from helpers import nucleus_logprobs
from luffy_fast.rollout import HFGenerateEngine, SamplingParams
from luffy_fast.rollout.base import request_seed
from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer

SHAPE = TinyQwen2Config(hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                        num_attention_heads=2, num_key_value_heads=1)


@pytest.fixture(scope="module")
def engine():
    tokenizer = build_tokenizer(3)
    policy = build_policy(tokenizer, SHAPE, seed=0)
    return HFGenerateEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id,
                            max_batch_size=5)


def oracle_logprobs(model, prompt, response, temperature):
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:-1].float() / temperature
    return logits.log_softmax(-1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def test_behaviour_logprobs_match_the_policy(engine):
    prompts = [[2, 3, 4, 12], [5, 12], [6, 7, 8, 9, 12]]  # different lengths: left padding
    out = engine.generate(prompts, n=4, params=SamplingParams(10, temperature=0.7, seed=1))
    assert [len(group) for group in out] == [4, 4, 4]
    for prompt, group in zip(prompts, out):
        for completion in group:
            assert 1 <= len(completion.token_ids) <= 10
            assert completion.finished == (completion.token_ids[-1] == engine.eos_token_id)
            assert engine.eos_token_id not in completion.token_ids[:-1]
            expected = oracle_logprobs(engine.model, prompt, completion.token_ids, 0.7)
            torch.testing.assert_close(torch.tensor(completion.logprobs), expected,
                                       atol=1e-4, rtol=1e-4)
    # the policy's entropy at temperature 0.7 over every sampled position
    entropies = []
    for prompt, group in zip(prompts, out):
        for completion in group:
            ids = torch.tensor([prompt + completion.token_ids])
            with torch.no_grad():
                logits = engine.model(ids).logits[0, len(prompt) - 1:-1].float() / 0.7
            entropies.append(torch.distributions.Categorical(logits=logits).entropy())
    assert engine.metrics()["rollout_entropy"] == pytest.approx(
        float(torch.cat(entropies).mean()), rel=1e-4)


def test_seeded_calls_repeat_and_greedy_is_argmax(engine):
    params = SamplingParams(8, temperature=1.0, seed=5)
    first = engine.generate([[2, 3, 12]], n=6, params=params)
    again = engine.generate([[2, 3, 12]], n=6, params=params)
    assert [c.token_ids for c in first[0]] == [c.token_ids for c in again[0]]
    greedy = engine.generate([[2, 3, 12]], n=2, params=SamplingParams(6, temperature=0.0))[0]
    assert greedy[0].token_ids == greedy[1].token_ids
    ids = [2, 3, 12]
    for token in greedy[0].token_ids:
        with torch.no_grad():
            assert token == int(engine.model(torch.tensor([ids])).logits[0, -1].argmax())
        ids.append(token)


def test_sync_weights_copies_tensors_and_rejects_unknown_names(engine):
    other = build_policy(build_tokenizer(3), SHAPE, seed=1)
    engine.sync_weights(other.named_parameters())
    for name, value in other.named_parameters():
        torch.testing.assert_close(dict(engine.model.named_parameters())[name], value)
    with pytest.raises(KeyError, match="no parameter 'nope'"):
        engine.sync_weights([("nope", torch.zeros(1))])
    # buffers by name too (the rotary frequencies), as the trainer's module holds them
    name = "model.rotary_emb.inv_freq"
    frequencies = dict(other.named_buffers())[name]
    engine.sync_weights([(name, 2 * frequencies)])
    assert torch.equal(dict(engine.model.named_buffers())[name], 2 * frequencies)
    engine.sync_weights([(name, frequencies)])
    # the engine's own copy is frozen and in eval mode
    assert not engine.model.training
    assert not any(p.requires_grad for p in engine.model.parameters())
    with pytest.raises(ValueError, match="max_new_tokens"):
        SamplingParams(0)


def test_shared_module_is_left_as_the_trainer_set_it():
    """shares_weights: the module is not frozen, its mode comes back, and the sync is a no-op
    that does not even iterate its argument (a ZeRO gather would be wasted)."""
    tokenizer = build_tokenizer(3)
    policy = build_policy(tokenizer, SHAPE, seed=2).train()
    shared = HFGenerateEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id,
                              shares_weights=True)
    copied = HFGenerateEngine(build_policy(tokenizer, SHAPE, seed=2), tokenizer.pad_token_id,
                              tokenizer.eos_token_id)
    params = SamplingParams(8, temperature=0.9, seed=3)
    got = shared.generate([[2, 3, 12], [4, 12]], n=3, params=params)
    want = copied.generate([[2, 3, 12], [4, 12]], n=3, params=params)
    assert [[c.token_ids for c in g] for g in got] == [[c.token_ids for c in g] for g in want]
    assert [[c.logprobs for c in g] for g in got] == [[c.logprobs for c in g] for g in want]
    assert policy.training and all(p.requires_grad for p in policy.parameters())

    def never_iterated():
        raise AssertionError("sync_weights iterated the weights")
        yield

    shared.sync_weights(never_iterated())
    # an update to the module is what the next call samples from
    with torch.no_grad():
        for param in policy.parameters():
            param.add_(0.05 * torch.randn_like(param))
    copied.sync_weights(policy.named_parameters())
    got = shared.generate([[2, 3, 12]], n=4, params=params)
    want = copied.generate([[2, 3, 12]], n=4, params=params)
    assert [c.logprobs for c in got[0]] == [c.logprobs for c in want[0]]


def test_a_shared_module_samples_without_dropout_and_keeps_its_mode():
    """Generation runs in eval mode (no dropout: the log-probs are the eval-mode policy's) and
    the module's own mode, training or not, is back after the call."""
    tokenizer = build_tokenizer(3)
    policy = build_policy(tokenizer, SHAPE, seed=4)
    for layer in policy.model.layers:
        layer.self_attn.attention_dropout = 0.5  # active in training mode only
    shared = HFGenerateEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id,
                              shares_weights=True)
    prompt = [2, 3, 4, 12]
    for training in (True, False):
        policy.train(training)
        [group] = shared.generate([prompt], n=3, params=SamplingParams(6, seed=2))
        assert policy.training == training
        policy.eval()
        for completion in group:
            torch.testing.assert_close(torch.tensor(completion.logprobs), oracle_logprobs(
                policy, prompt, completion.token_ids, 1.0), atol=1e-4, rtol=1e-4)


def test_a_models_generation_defaults_change_nothing(engine):
    """The engine's temperature and top-p are the only ones: a model whose generation config
    asks for top-k 1, top-p 0.5 and temperature 3 samples as one without them."""
    tokenizer = build_tokenizer(3)
    plain = build_policy(tokenizer, SHAPE, seed=0)
    tuned = build_policy(tokenizer, SHAPE, seed=0)
    tuned.generation_config.update(top_k=1, top_p=0.5, temperature=3.0, do_sample=True)
    params = SamplingParams(6, temperature=0.9, seed=4)
    got, want = (HFGenerateEngine(model, tokenizer.pad_token_id, tokenizer.eos_token_id)
                 .generate([[2, 3, 12]], n=6, params=params)[0] for model in (tuned, plain))
    assert [c.token_ids for c in got] == [c.token_ids for c in want]
    assert len({tuple(c.token_ids) for c in want}) > 1  # sampled, not top-1
    assert [c.logprobs for c in got] == [c.logprobs for c in want]


def test_seeded_calls_leave_the_callers_random_state_and_each_rank_its_stream(engine,
                                                                             monkeypatch):
    """A seeded call samples from a forked generator: the global one is as it was. Rank 0 uses
    the seed itself, rank r the stream of request_seed(seed, 0, r)."""
    import luffy_fast.rollout.hf as hf

    def tokens(seed, rank):
        monkeypatch.setattr(hf, "rank_and_world", lambda: (rank, 2))
        group = engine.generate([[2, 3, 12]], n=4, params=SamplingParams(6, seed=seed))[0]
        return [c.token_ids for c in group]

    torch.manual_seed(123)
    state = torch.get_rng_state()
    rank0 = tokens(9, 0)
    assert torch.equal(torch.get_rng_state(), state)
    assert tokens(9, 1) == tokens(request_seed(9, 0, 1), 0) != rank0


def test_trainer_engine_shares_the_policy_below_zero3_and_keeps_the_batch_size():
    from luffy_fast.rollout.hf import trainer_hf_engine

    tokenizer = build_tokenizer(3)
    policy = build_policy(tokenizer, SHAPE, seed=0)
    cpu = torch.device("cpu")
    shared = trainer_hf_engine(policy, tokenizer, cpu, zero_stage=2, bf16=False, max_batch_size=3)
    assert shared.shares_weights and shared.model is policy and shared.max_batch_size == 3
    copied = trainer_hf_engine(policy, tokenizer, cpu, zero_stage=3, bf16=True, max_batch_size=5)
    assert not copied.shares_weights and copied.model is not policy
    assert copied.max_batch_size == 5
    assert (copied.pad_token_id, copied.eos_token_id) == (tokenizer.pad_token_id,
                                                          tokenizer.eos_token_id)
    assert {p.dtype for p in copied.model.parameters()} == {torch.bfloat16}
    with pytest.raises(ValueError, match=r"max_batch_size must be positive \(got 0\)"):
        HFGenerateEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id, max_batch_size=0)


def test_progress_over_the_sequences_only_when_asked(engine, capsys):
    params = SamplingParams(max_new_tokens=3, seed=1)
    engine.generate([[5, 6], [7]], n=3, params=params)
    assert "generating" not in capsys.readouterr().err  # the trainer's default: quiet
    engine.show_progress = True  # as `luffy-fast eval` sets it
    try:
        shown = engine.generate([[5, 6], [7]], n=3, params=params)
        err = capsys.readouterr().err
    finally:
        engine.show_progress = False
    assert "generating" in err and "6/6" in err
    assert shown == engine.generate([[5, 6], [7]], n=3, params=params)  # the same samples


def test_top_p_logprobs_are_those_of_the_truncated_distribution(engine):
    """With top-p the behaviour log-prob is that of the renormalized nucleus the token was
    drawn from (the oracle: the policy's tempered logits truncated by hand)."""
    prompt, temperature, top_p = [2, 3, 4, 12], 0.8, 0.7
    [group] = engine.generate([prompt], n=6, params=SamplingParams(
        8, temperature=temperature, top_p=top_p, seed=3))
    for completion in group:
        expected, inside = nucleus_logprobs(engine.model, prompt, completion.token_ids, top_p,
                                            temperature)
        assert bool(inside.all())  # every token drawn from its nucleus
        torch.testing.assert_close(torch.tensor(completion.logprobs), expected, atol=1e-4,
                                   rtol=1e-4)


def test_the_recorder_keeps_one_step_of_scores():
    """SampledLogprobs, fed by hand: each step's drawn token is read at the next step (or at the
    end) from that step's log-softmax; only one [B, V] is held between steps."""
    from luffy_fast.rollout.hf import SampledLogprobs

    scores = torch.randn(3, 2, 5, generator=torch.Generator().manual_seed(0))  # steps, B, V
    scores[1, 0, 4] = float("-inf")  # a token top-p removed
    drawn = torch.tensor([[1, 3], [0, 2], [4, 4]])  # steps, B
    prompt = torch.tensor([[7], [7]])
    recorder = SampledLogprobs()
    sequences = prompt
    for step in range(3):
        step_scores = scores[step]
        assert recorder(sequences, step_scores) is step_scores  # passed on unchanged
        assert recorder._last.shape == (2, 5) and len(recorder.logprobs) == step
        sequences = torch.cat([sequences, drawn[step][:, None]], dim=1)
    logprobs, entropies = recorder.finish(sequences)
    expected = scores.log_softmax(-1)
    assert torch.equal(logprobs, expected.gather(-1, drawn[..., None])[..., 0].T)
    finite = expected.exp() * expected.nan_to_num(neginf=0.0)
    torch.testing.assert_close(entropies, -finite.sum(-1).T)
    assert recorder._last is None
