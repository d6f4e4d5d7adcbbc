"""`luffy-fast train` on official-layout data (Parquet and JSONL) with a tiny model directory
whose tokenizer has a chat template; the epoch order across `--resume`; and the clear errors a
user's model directory or data can cause, raised before any weight is read."""

from __future__ import annotations

import dataclasses
import logging

import pytest
import torch

from luffy_fast.cli import main
from luffy_fast.data_files import DataError
from luffy_fast.errors import ConfigError
from luffy_fast.metrics import read_metrics
from luffy_fast.train_config import load_config
from luffy_fast.trainer import LuffyTrainer
from math_helpers import (
    SKIPPED_ROWS,
    math_rows,
    math_tokenizer,
    tiny_model_dir,
    train_yaml,
    write_jsonl,
    write_parquet,
)


@pytest.mark.parametrize("writer, name", [(write_parquet, "train.parquet"),
                                          (write_jsonl, "train.jsonl")])
def test_train_runs_three_steps(tmp_path, model_dir, writer, name, capsys):
    data = writer(tmp_path / name, math_rows())
    config = train_yaml(tmp_path / "run.yaml", model_dir, data, tmp_path / "out")
    assert main(["train", "--config", str(config)]) == 0
    err = capsys.readouterr().err
    assert err.count("prompts kept") == 1  # the start-up line, once
    assert "16 prompts kept, 4 skipped (prompt too long), 4 traces truncated" in err
    metrics = read_metrics(tmp_path / "out" / "metrics.jsonl")
    assert [m["step"] for m in metrics] == [1, 2, 3]
    for m in metrics:
        assert m["data/skipped_prompts"] == 4 and m["data/truncated_traces"] == 4
        assert m["data/prompts"] == 16 and m["data/epoch"] == 0  # 16 // 4 = 4 steps per epoch
        assert m["loss"] == m["loss"] and m["micro_batches"] >= 1  # finite
    latest = (tmp_path / "out" / "checkpoints" / "latest").read_text().strip()
    import json

    state = json.loads((tmp_path / "out" / "checkpoints" / latest / "trainer_state.json")
                       .read_text())
    data = state["sampler"].pop("data")  # the prompts' fingerprint, 16 hex digits
    assert state["sampler"] == {"epoch": 0, "batch": 3, "seed": 5, "size": 16, "batch_size": 4}
    assert len(data) == 16 and int(data, 16) >= 0


def _recording(trainer: LuffyTrainer, seen: list, crash_at: int | None = None):
    real = trainer.training_step

    def step(index):
        if index == crash_at:
            raise KeyboardInterrupt("killed")
        seen.append([s.where for s in trainer.prompt_batch(index)])
        return real(index)

    trainer.training_step = step


def test_the_epoch_order_survives_resume(tmp_path, model_dir):
    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    overrides = ["train.steps=6", "output.save_every=2", "rollout.n_on=1"]

    straight_seen: list = []
    config = load_config(train_yaml(tmp_path / "a.yaml", model_dir, data, tmp_path / "a"),
                         overrides)
    straight = LuffyTrainer(config)
    _recording(straight, straight_seen)
    straight.train()

    crashed_seen: list = []
    config = load_config(train_yaml(tmp_path / "b.yaml", model_dir, data, tmp_path / "b"),
                         overrides)
    crashed = LuffyTrainer(config)
    _recording(crashed, crashed_seen, crash_at=4)  # after the step-4 checkpoint
    with pytest.raises(KeyboardInterrupt):
        crashed.train()
    resumed = LuffyTrainer(load_config(tmp_path / "b.yaml", overrides))
    _recording(resumed, crashed_seen)
    resumed.train(resume=True)

    assert crashed_seen == straight_seen and len(straight_seen) == 6
    # epoch 0 (steps 1-4) visits every kept prompt once; step 5 starts a new permutation
    kept = {f"{data}:{i + 1}" for i in range(20) if i not in SKIPPED_ROWS}
    epoch0 = [w for batch in straight_seen[:4] for w in batch]
    assert sorted(epoch0) == sorted(kept)
    assert set(straight_seen[4] + straight_seen[5]) <= kept
    metrics = read_metrics(tmp_path / "b" / "metrics.jsonl")
    assert [m["data/epoch"] for m in metrics] == [0, 0, 0, 0, 1, 1]
    # the file rewritten in another row order (as many prompts): the order would index other
    # prompts, so a resume is refused before the load
    write_jsonl(tmp_path / "train.jsonl", math_rows()[::-1])
    with pytest.raises(ConfigError, match="data.source: the 16 training prompts are not the "
                                          "checkpoint's run's"):
        LuffyTrainer(load_config(tmp_path / "b.yaml", [*overrides[1:], "train.steps=8"])
                     ).train(resume=True)


# --------------------------------------------------------------------------- clear errors

def _never_load(monkeypatch):
    import luffy_fast.tasks as tasks

    def refuse(*args, **kwargs):
        raise AssertionError("the policy was loaded before the error")

    monkeypatch.setattr(tasks, "load_policy", refuse)


def _config(tmp_path, model, data, *overrides):
    return load_config(train_yaml(tmp_path / "run.yaml", model, data, tmp_path / "out"),
                       list(overrides))


def test_eval_num_problems_takes_an_even_spread_of_the_heldout_file(tmp_path, model_dir, capsys):
    """A held-out file ordered by source: 4 of its 9 problems come from every source, not the
    first source's rows only; null takes all."""
    from luffy_fast.tasks import MathTask

    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    rows = [{"problem": f"q {i}", "answer": str(i), "data_source": source}
            for i, source in enumerate(["aime"] * 3 + ["amc"] * 3 + ["math500"] * 3)]
    heldout = write_jsonl(tmp_path / "valid.jsonl", rows)
    tokenizer = math_tokenizer()
    spread = MathTask(_config(tmp_path, model_dir, data, f"data.heldout_source={heldout}",
                              "eval.num_problems=4")).heldout_samples(tokenizer)
    assert [s.ground_truth for s in spread] == ["0", "2", "4", "6"]  # positions 9 * k // 4
    assert [s.data_source for s in spread] == ["aime", "aime", "amc", "math500"]
    assert "9 rows, 0 skipped (prompt too long); validating on 4 of the 9 left" in \
        capsys.readouterr().err
    everything = MathTask(_config(tmp_path, model_dir, data, f"data.heldout_source={heldout}",
                                  "eval.num_problems=null")).heldout_samples(tokenizer)
    assert [s.ground_truth for s in everything] == [str(i) for i in range(9)]
    assert "validating on" not in capsys.readouterr().err
    # prompts over the limit are skipped and counted; none left is an error naming the limit
    rows[0]["problem"] = rows[4]["problem"] = "q 0 0 0 0 0 0 0 0"
    write_jsonl(tmp_path / "valid.jsonl", rows)
    kept = MathTask(_config(tmp_path, model_dir, data, f"data.heldout_source={heldout}",
                            "eval.num_problems=null")).heldout_samples(tokenizer)
    assert [s.ground_truth for s in kept] == ["1", "2", "3", "5", "6", "7", "8"]
    assert "9 rows, 2 skipped (prompt too long); validating on 7 of the 7 left" in \
        capsys.readouterr().err
    for row in rows:
        row["problem"] = "q 0 0 0 0 0 0 0 0"
    write_jsonl(tmp_path / "valid.jsonl", rows)
    with pytest.raises(DataError, match=r"data.heldout_source: every one of the 9 held-out .* "
                                        r"data.max_prompt_length \(5 tokens"):
        MathTask(_config(tmp_path, model_dir, data, f"data.heldout_source={heldout}",
                         "data.max_prompt_length=5")).heldout_samples(tokenizer)


def test_token_budget_below_the_longest_sequence_fails_at_start_up(tmp_path, model_dir,
                                                                  monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    _never_load(monkeypatch)
    # longest: a 3-token prompt + a response of up to 8 tokens = 11
    with pytest.raises(ConfigError, match=r"train.token_budget: 10 tokens per micro-batch, but the "
                                          r"longest sequence is 11 tokens .*at least 11"):
        LuffyTrainer(_config(tmp_path, model_dir, data, "train.token_budget=10"))
    config = train_yaml(tmp_path / "cli.yaml", model_dir, data, tmp_path / "out")
    assert main(["train", "--config", str(config), "train.token_budget=10"]) == 2


def test_in_process_scoring_with_an_old_math_verify_fails_at_start_up(tmp_path, model_dir,
                                                                      monkeypatch):
    """reward.workers=0 with a math-verify that parses only in a main thread (before 0.8, the
    official pin among them) would score every answer 0: refused before the policy loads."""
    import luffy_fast.rewards as rewards

    monkeypatch.setattr(rewards, "verifier_runs_in_threads", lambda version: False)
    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    _never_load(monkeypatch)
    with pytest.raises(ValueError, match=r"`workers` = 0 .*math-verify before 0.8"):
        LuffyTrainer(_config(tmp_path, model_dir, data, "reward.workers=0"))


def test_prompts_without_a_trace_are_named(tmp_path, model_dir, monkeypatch):
    rows = math_rows()
    for i in (2, 4):
        del rows[i]["target"]
    data = write_jsonl(tmp_path / "train.jsonl", rows)
    _never_load(monkeypatch)
    with pytest.raises(ConfigError, match=rf"data.source: 2 of 16 training prompts have no "
                                          rf"off-policy trace, but rollout.n_off=1 needs one "
                                          rf"each: {data}:3, {data}:5 "):
        LuffyTrainer(_config(tmp_path, model_dir, data))


def test_model_directory_errors(tmp_path, model_dir, monkeypatch):
    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    _never_load(monkeypatch)
    with pytest.raises(ConfigError, match="model.path: no such directory '/nowhere/Qwen'"):
        LuffyTrainer(_config(tmp_path, "/nowhere/Qwen", data))
    flash = _config(tmp_path, model_dir, data, "model.attn_implementation=flash_attention_2")
    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attention_2' runs in "
                                          "bf16 on CUDA only, and this run trains in fp32 on cpu"):
        LuffyTrainer(flash)
    from luffy_fast.model_loading import check_attention, check_flash_attention_precision

    with pytest.raises(ConfigError, match="model.attn_implementation: 'flash_attention_2' needs "
                                          "the flash-attn package"):
        check_attention(flash.model)
    gpu = torch.device("cuda", 0)
    check_flash_attention_precision(flash.model, gpu)  # auto: bf16 on a GPU
    with pytest.raises(ConfigError, match="trains in fp32 on cuda"):
        check_flash_attention_precision(dataclasses.replace(flash.model, precision="fp32"), gpu)
    bare = tiny_model_dir(tmp_path / "bare", math_tokenizer(chat_template=None))
    with pytest.raises(DataError, match="model.chat_template: the tokenizer has no chat template"):
        LuffyTrainer(_config(tmp_path, bare, data))
    with pytest.raises(ConfigError, match="model.chat_template: no such file"):
        LuffyTrainer(_config(tmp_path, bare, data, "model.chat_template=/nowhere.jinja"))
    (tmp_path / "broken.jinja").write_text("{% for m in messages %}{{ m['content'] }")
    with pytest.raises(ConfigError, match=r"model.chat_template: .*broken.jinja' line 1: "
                                          r"unexpected '}' \(a Jinja syntax error\)"):
        LuffyTrainer(_config(tmp_path, bare, data, f"model.chat_template={tmp_path / 'broken.jinja'}"))
    (tmp_path / "empty.jinja").write_text("\n")  # was "the tokenizer has no chat template"
    with pytest.raises(ConfigError, match=r"model.chat_template: .*empty.jinja' is empty"):
        LuffyTrainer(_config(tmp_path, bare, data, f"model.chat_template={tmp_path / 'empty.jinja'}"))
    (tmp_path / "t.jinja").write_text("{% for m in messages %}sys {{ m['content'] }} {% endfor %}")
    task_config = _config(tmp_path, bare, data, f"model.chat_template={tmp_path / 't.jinja'}")
    monkeypatch.undo()
    trainer = LuffyTrainer(task_config)  # the template file replaces the missing one
    assert trainer.tokenizer.decode(trainer.train_samples[0].prompt_ids) == "sys q 1"


def test_a_tokenizer_without_pad_pads_with_eos(tmp_path, caplog):
    model = tiny_model_dir(tmp_path / "model", math_tokenizer(pad=False))
    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    with caplog.at_level(logging.WARNING, logger="luffy_fast"):
        trainer = LuffyTrainer(_config(tmp_path, model, data))
    assert trainer.tokenizer.pad_token_id == trainer.tokenizer.eos_token_id == 1
    assert "no pad token: padding with its EOS token '<eos>'" in caplog.text


def test_model_overrides_apply_at_load(tmp_path, model_dir):
    from luffy_fast.model_loading import load_policy, rope_theta

    config = load_config(None, [f"model.path={model_dir}", "model.rope_theta=40000",
                                "model.max_position_embeddings=96"])
    policy = load_policy(config.model, torch.float32)
    assert rope_theta(policy.config) == 40000 and policy.config.max_position_embeddings == 96
    plain = load_policy(load_config(None, [f"model.path={model_dir}"]).model, torch.float32)
    assert rope_theta(plain.config) == 10000.0 and plain.config.max_position_embeddings == 128


def test_heldout_problems_in_a_benchmark_layout(tmp_path, model_dir):
    from luffy_fast.tasks import MathTask

    data = write_jsonl(tmp_path / "train.jsonl", math_rows())
    heldout = write_jsonl(tmp_path / "math500.jsonl", [
        {"problem": "q 4", "solution": "so \\boxed{4}"},
        {"prompt": [{"role": "system", "content": "sys"}, {"role": "user", "content": "q 2"}],
         "reward_model": {"ground_truth": "2"}, "data_source": "official"}])
    config = _config(tmp_path, model_dir, data, f"data.heldout_source={heldout}")
    tokenizer = math_tokenizer()
    first, second = MathTask(config).heldout_samples(tokenizer)
    assert tokenizer.decode(first.prompt_ids) == "q 4 so"
    assert (first.ground_truth, first.data_source) == ("4", "math500")
    # the training prompt's handling: the system prompt is kept, as the official validation
    assert tokenizer.decode(second.prompt_ids) == "sys q 2 so" and second.ground_truth == "2"
