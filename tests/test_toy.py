"""The embedded demo: task, tokenizer, reward, the demo's config and outputs, CLI errors."""

from __future__ import annotations

import json
import re

import pytest
import yaml

from helpers import TINY
from luffy_fast.cli import main
from luffy_fast.metrics import read_metrics
from luffy_fast.toy.demo import DEMO_CONFIG, demo_config, run_demo
from luffy_fast.toy.model import build_tokenizer
from luffy_fast.toy.problems import (
    chance_of_random_answer,
    extract_answer,
    is_heldout,
    make_problem,
    sample_problems,
    vocabulary,
)
from luffy_fast.toy.task import ToyReverseReward, toy_samples
from luffy_fast.train_config import ConfigError, config_from_dict, load_config


@pytest.fixture
def one_thread():
    """Tiny-model generation is fastest on one thread, and immune to a busy machine."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def test_problem_trace_and_answer():
    problem = make_problem("38146")
    assert problem.prompt == "3 8 1 4 6 >"
    assert problem.answer == "64183"
    assert problem.trace == "a 3 b 8 c 1 d 4 e 6 | e 6 d 4 c 1 b 8 a 3 = 6 4 1 8 3 <eos>"
    assert extract_answer(problem.trace) == "64183"
    assert extract_answer("= 6 4 1 8 3") is None  # no <eos>: unfinished
    assert extract_answer("6 4 1 8 3 <eos>") is None  # no answer mark
    assert extract_answer("= 1 = 6 4 1 8 3 <eos> = 9") == "64183"


def test_tokenizer_round_trip_and_reward():
    tokenizer = build_tokenizer(5)
    assert tokenizer.convert_ids_to_tokens([0, 1]) == ["<pad>", "<eos>"]
    assert len(tokenizer) == len(vocabulary(5)) == 20
    sample = toy_samples([make_problem("38146")], tokenizer)[0]
    assert tokenizer.decode(sample.traces[0]) == make_problem("38146").trace
    assert sample.traces[0][-1] == tokenizer.eos_token_id
    reward = ToyReverseReward()
    assert reward(tokenizer.decode(sample.traces[0]), sample) == 1.0
    assert reward("= 6 4 1 8 4 <eos>", sample) == 0.0


def test_untrained_policy_is_almost_never_right():
    # "=", five digits and <eos> in a row from a 20-token vocabulary
    assert chance_of_random_answer(5) == pytest.approx(20.0 ** -7)
    assert chance_of_random_answer(5) < 1e-3


def test_heldout_problems_never_appear_in_training():
    # the hash buckets are uniform: about 10 % (50 %) of the 10,000 4-digit strings are held
    # out (checked first: with a skewed hash the sampling below would never end)
    strings = [f"{n:04d}" for n in range(10_000)]
    assert 900 <= sum(is_heldout(s, 0.1) for s in strings) <= 1100
    assert 4800 <= sum(is_heldout(s, 0.5) for s in strings) <= 5200
    train = sample_problems(3000, 5, "train", seed=0)
    heldout = sample_problems(200, 5, "heldout", seed=0)
    assert len({p.digits for p in train}) == 3000
    assert not {p.digits for p in train} & {p.digits for p in heldout}
    assert all(is_heldout(p.digits, 0.1) for p in heldout)
    assert not any(is_heldout(p.digits, 0.1) for p in train)
    with pytest.raises(ValueError, match="only about"):
        sample_problems(600, 2, "heldout", seed=0)


def test_demo_yaml_matches_the_demo_defaults():
    from_yaml = load_config("configs/demo_luffy.yaml", ["output.dir=x"])
    built = demo_config("luffy", "x")
    built.output.dir = "x"
    assert from_yaml.to_dict() == built.to_dict()
    grpo = demo_config("grpo", "x")
    assert (grpo.rollout.n_on, grpo.rollout.n_off, grpo.loss.clip_on_policy) == (4, 0, True)
    assert grpo.train == built.train  # same seed, steps, prompts per step
    assert config_from_dict(DEMO_CONFIG).loss.shaping is True


def test_demo_end_to_end_writes_summary_and_plot(tmp_path, capsys):
    tiny = [o for o in TINY if not o.startswith(("output.", "eval.every", "rollout."))]
    summary = run_demo(tmp_path, runs=("luffy", "grpo"),
                       overrides=[*tiny, "train.steps=2", "eval.every=1", "train.cpu_threads=0"])
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == summary
    assert set(summary["runs"]) == {"luffy", "grpo"}
    for row in summary["runs"].values():
        assert set(row) == {"heldout_accuracy", "steps", "seconds"}
        assert row["steps"] == 2 and 0.0 <= row["heldout_accuracy"] <= 1.0 and row["seconds"] > 0
    assert (tmp_path / "demo.png").stat().st_size > 10_000
    for run in ("luffy", "grpo"):
        assert (tmp_path / run / "checkpoints" / "latest").exists()
        # the summary's accuracy is the run's last validation (eval.every=1: at step 2)
        evaluated = [r for r in read_metrics(tmp_path / run / "metrics.jsonl")
                     if "heldout_accuracy" in r]
        assert evaluated[-1]["step"] == 2
        assert summary["runs"][run]["heldout_accuracy"] == evaluated[-1]["heldout_accuracy"]
    # GRPO's groups are all wrong: zero advantages everywhere, and no traces
    grpo = [json.loads(line) for line in (tmp_path / "grpo" / "metrics.jsonl").open()]
    assert all(r["zero_advantage_fraction"] == 1.0 and "reward_off_policy" not in r
               for r in grpo if "loss" in r)
    # a rerun replaces the run it repeats, and says so
    capsys.readouterr()
    run_demo(tmp_path, runs=("luffy",), overrides=[*tiny, "train.steps=1", "eval.every=0",
                                                   "train.cpu_threads=0"])
    assert f"demo: replacing the earlier luffy run(s) in {tmp_path}" in capsys.readouterr().err
    assert [r["step"] for r in read_metrics(tmp_path / "luffy" / "metrics.jsonl")] == [1]


def test_unwritable_demo_output_dir_is_a_clear_error(tmp_path, capsys):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    with pytest.raises(ConfigError, match=rf"demo output directory: '{blocker}/demo' cannot be a "
                                          rf"folder: '{blocker}' is a file"):
        run_demo(blocker / "demo")
    assert main(["demo", "--output-dir", str(blocker / "demo")]) == 2
    assert "is a file" in capsys.readouterr().err
    assert main(["demo", "--output-dir", str(blocker)]) == 2
    assert f"'{blocker}' cannot be a folder: '{blocker}' is a file" in capsys.readouterr().err
    # /proc takes no new folder, even from root (a read-only mode bit would not stop root)
    with pytest.raises(ConfigError, match="demo output directory: '/proc/luffy-fast-test/demo' "
                                          "is not writable"):
        run_demo("/proc/luffy-fast-test/demo")


def test_cli_reports_config_errors(tmp_path, capsys):
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"optim": {"learning_rate": 1e-3}}))
    assert main(["train", "--config", str(config)]) == 2
    assert "optim.learning_rate: unknown key" in capsys.readouterr().err
    assert main(["demo", "--runs", "luffy,ppo", "--output-dir", str(tmp_path / "d")]) == 2
    assert "demo run 'ppo'" in capsys.readouterr().err
    # no run named: nothing trained, nothing written (an empty plot and exit 0 before)
    with pytest.raises(ConfigError, match=r"demo --runs: no run named \(choose from \['grpo', "
                                          r"'luffy', 'luffy_no_shaping'\]\)"):
        run_demo(tmp_path / "e", runs=[])
    for runs in ("", ",", " , "):
        assert main(["demo", "--runs", runs, "--output-dir", str(tmp_path / "e")]) == 2
        assert "demo --runs: no run named" in capsys.readouterr().err
    assert not (tmp_path / "e").exists()


def test_more_heldout_problems_than_the_toy_task_holds_name_the_key(tmp_path):
    """eval.num_problems past the held-out share of the digit strings was "asked for ... distinct
    heldout problems", naming no key."""
    from luffy_fast.toy.task import ToyTask
    from luffy_fast.train_config import load_config

    config = load_config(None, ["data.num_digits=3", "eval.num_problems=1000"])
    task = ToyTask(config)
    with pytest.raises(ConfigError, match=r"^eval.num_problems: asked for 1000 distinct heldout "
                                          r"problems of 3 digits; only about 100 exist"):
        task.heldout_samples(task.components()[0])


@pytest.mark.slow
def test_untrained_demo_policy_samples_are_never_correct(one_thread):
    """4096 samples of the untrained demo policy, none correct: below 3 / 4096 = 7.3e-4 per
    sample (95 % upper bound), so under 1e-3."""
    from luffy_fast.rollout import HFGenerateEngine, SamplingParams
    from luffy_fast.toy.model import TinyQwen2Config, build_policy

    config = demo_config("grpo", "unused")
    tokenizer = build_tokenizer(config.data.num_digits)
    shape = TinyQwen2Config(hidden_size=config.model.hidden_size,
                            intermediate_size=config.model.intermediate_size,
                            num_hidden_layers=config.model.num_hidden_layers)
    engine = HFGenerateEngine(build_policy(tokenizer, shape, seed=config.train.seed),
                              tokenizer.pad_token_id, tokenizer.eos_token_id, max_batch_size=512)
    samples = toy_samples(sample_problems(128, config.data.num_digits, "heldout", seed=0),
                          tokenizer)
    out = engine.generate([s.prompt_ids for s in samples], n=32,
                          params=SamplingParams(config.data.max_response_length, seed=0))
    reward = ToyReverseReward()
    correct = sum(reward(tokenizer.decode(c.token_ids), s)
                  for s, group in zip(samples, out) for c in group)
    assert sum(len(group) for group in out) == 4096
    assert correct == 0


@pytest.mark.parametrize("override, message", [
    ("model.chat_template=/tmp/t.jinja", "model.chat_template: the toy model (model.path: toy) "
     "builds its own tokenizer and shape and would ignore it (got '/tmp/t.jinja')"),
    ("model.max_position_embeddings=10", "model.max_position_embeddings: the toy model"),
    # built with its weights on the CPU (the dry run allocated 40 GB, or ran for 14 minutes)
    ("model.hidden_size=100000", "model: the toy model's shape (hidden_size, intermediate_size, "
     "num_hidden_layers) makes 1.2e+11 parameters, over the toy model's 1e+09"),
])
def test_the_toy_model_refuses_settings_it_would_ignore_or_could_not_build(override, message):
    """A copy of the demo's config with a model's settings trained the toy model silently; a
    user's task with model.path: toy builds its own policy and may read them: no error there."""
    from luffy_fast.toy.task import ToyTask
    from luffy_fast.train_config import load_config

    with pytest.raises(ConfigError, match=re.escape(message)):
        ToyTask(load_config(None, [override]))
    load_config(None, [override, "data.task=examples.custom_task:CopyDigits"])


class FakeTrainer:
    """Stands in for LuffyTrainer in run_demo: records how each run is driven and writes the
    metrics rows given for its run to its metrics.jsonl (`fail`: the run whose train raises)."""

    rows: dict[str, list[dict]] = {}
    calls: list[tuple] = []
    fail: str | None = None

    def __init__(self, config):
        self.config, self.run = config, config.output.dir.rsplit("/", 1)[1]
        self.calls.append(("init", self.run, config.train.steps, config.rollout.n_on))

    def train(self, resume: bool = False):
        self.calls.append(("train", self.run, resume))
        if self.run == self.fail:
            raise RuntimeError(f"{self.run} crashed")
        folder = __import__("pathlib").Path(self.config.output.dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in self.rows[self.run]))

    def close(self):
        self.calls.append(("close", self.run))


@pytest.fixture
def fake_trainer(monkeypatch):
    import types

    FakeTrainer.calls, FakeTrainer.fail = [], None
    FakeTrainer.rows = {
        "grpo": [{"step": 1, "loss": 0.0}, {"step": 2, "heldout_accuracy": 0.0, "heldout_entropy": 2.5},
                 {"step": 4, "heldout_accuracy": 0.0, "heldout_entropy": 2.25}],
        "luffy": [{"step": 2, "heldout_accuracy": 0.25, "heldout_entropy": 1.5},
                  {"step": 3, "loss": 0.5}, {"step": 4, "heldout_accuracy": 0.75, "heldout_entropy": 1.0}],
        "luffy_no_shaping": [{"step": 1, "loss": 0.5}],  # never validated
    }
    monkeypatch.setattr("luffy_fast.trainer.LuffyTrainer", FakeTrainer)
    # each run's clock: started at 10 s, done at 100.54 s: 90.54 s, shown as 90.5
    clock = __import__("itertools").cycle([10.0, 100.54])
    monkeypatch.setattr("luffy_fast.toy.demo.time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
    plotted = []
    monkeypatch.setattr("luffy_fast.toy.demo.plot_runs", lambda h, p: plotted.append((h, p)))
    return plotted


def test_run_demo_trains_each_run_in_turn_and_summarizes_its_last_validation(tmp_path, fake_trainer,
                                                                            capsys):
    from luffy_fast.toy.demo import format_summary

    summary = run_demo(tmp_path, runs=("grpo", "luffy", "luffy_no_shaping"),
                       overrides=["train.steps=4"])
    # one run at a time, each closed; grpo with its own 4 rollouts, the overrides in every run
    assert FakeTrainer.calls == [
        ("init", "grpo", 4, 4), ("train", "grpo", False), ("close", "grpo"),
        ("init", "luffy", 4, 3), ("train", "luffy", False), ("close", "luffy"),
        ("init", "luffy_no_shaping", 4, 3), ("train", "luffy_no_shaping", False),
        ("close", "luffy_no_shaping")]
    assert summary == {"runs": {
        "grpo": {"heldout_accuracy": 0.0, "steps": 4, "seconds": 90.5},
        "luffy": {"heldout_accuracy": 0.75, "steps": 4, "seconds": 90.5},  # step 4's, not step 2's
        "luffy_no_shaping": {"heldout_accuracy": None, "steps": 4, "seconds": 90.5}}}
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    (histories, path), = fake_trainer
    assert path == tmp_path / "demo.png" and histories == FakeTrainer.rows
    assert list(histories) == ["grpo", "luffy", "luffy_no_shaping"]
    assert "replacing" not in capsys.readouterr().err  # nothing there before
    # columns of 18 (left), 18, 8 and 9 characters; 90.5 s = 1.5 minutes; a run never validated
    # has no accuracy
    assert format_summary(summary).split("\n") == [
        "run" + " " * 16 + "held-out accuracy" + " " * 3 + "steps" + " " * 2 + "minutes",
        "grpo" + " " * 14 + " " * 13 + "0.000" + " " * 7 + "4" + " " * 6 + "1.5",
        "luffy" + " " * 13 + " " * 13 + "0.750" + " " * 7 + "4" + " " * 6 + "1.5",
        "luffy_no_shaping" + " " * 2 + " " * 15 + "n/a" + " " * 7 + "4" + " " * 6 + "1.5"]


def test_run_demo_resumes_or_names_the_runs_it_replaces(tmp_path, fake_trainer, capsys):
    (tmp_path / "luffy").mkdir()
    (tmp_path / "luffy" / "metrics.jsonl").write_text('{"step": 1}\n')
    run_demo(tmp_path, resume=True)  # the default runs: LUFFY, then GRPO
    assert [c for c in FakeTrainer.calls if c[0] == "train"] == [("train", "luffy", True),
                                                                ("train", "grpo", True)]
    assert capsys.readouterr().err == ""
    (tmp_path / "grpo" / "metrics.jsonl").unlink()
    run_demo(tmp_path, runs=("luffy", "grpo"))
    assert capsys.readouterr().err == (
        f"demo: replacing the earlier luffy run(s) in {tmp_path} (--resume continues them, "
        f"--output-dir keeps them)\n")


def test_run_demo_checks_every_run_first_and_keeps_the_summary_of_finished_runs(tmp_path,
                                                                               fake_trainer):
    with pytest.raises(ConfigError, match=r"demo run 'ppo': unknown \(choose from \['grpo', "
                                          r"'luffy', 'luffy_no_shaping'\]\)"):
        run_demo(tmp_path, runs=("luffy", "ppo"))
    assert FakeTrainer.calls == []  # refused before the first run trained
    FakeTrainer.fail = "luffy"
    with pytest.raises(RuntimeError, match="luffy crashed"):
        run_demo(tmp_path, runs=("grpo", "luffy"))
    assert FakeTrainer.calls[-1] == ("close", "luffy")  # closed after a crash too
    assert json.loads((tmp_path / "summary.json").read_text()) == {
        "runs": {"grpo": {"heldout_accuracy": 0.0, "steps": 250, "seconds": 90.5}}}


def test_demo_config_applies_the_user_overrides_last():
    assert demo_config("grpo", "out", ["rollout.n_on=6"]).rollout.n_on == 6
    assert demo_config("grpo", "out").output.dir == "out/grpo"
    luffy, plain = demo_config("luffy", "out").to_dict(), demo_config("luffy_no_shaping", "out").to_dict()
    assert (luffy["loss"].pop("shaping"), plain["loss"].pop("shaping")) == (True, False)
    luffy["output"].pop("dir"), plain["output"].pop("dir")
    assert luffy == plain  # the ablation changes f(p) and nothing else


def test_plot_runs_draws_held_out_accuracy_and_entropy_per_run(tmp_path, monkeypatch):
    import matplotlib.pyplot as plt

    from luffy_fast.toy.demo import plot_runs

    figures, close = [], plt.close
    monkeypatch.setattr(plt, "close", lambda figure: (figures.append(figure), close(figure)))
    histories = {"luffy": [{"step": 1, "loss": 0.5}, {"step": 2, "heldout_accuracy": 0.25,
                                                      "heldout_entropy": 1.5},
                           {"step": 4, "heldout_accuracy": 0.75, "heldout_entropy": 1.0}],
                 "grpo": [{"step": 3, "heldout_accuracy": 0.0, "heldout_entropy": 2.5}]}
    assert plot_runs(histories, tmp_path / "p.png") == tmp_path / "p.png"
    assert (tmp_path / "p.png").stat().st_size > 10_000
    (figure,) = figures
    accuracy, entropy = figure.axes
    assert accuracy.get_title() == "Held-out accuracy"
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
            for line in accuracy.lines] == [("luffy", [2, 4], [0.25, 0.75]), ("grpo", [3], [0.0])]
    assert [(line.get_label(), list(line.get_xdata()), list(line.get_ydata()))
            for line in entropy.lines] == [("luffy", [2, 4], [1.5, 1.0]), ("grpo", [3], [2.5])]


def test_sample_problems_refuses_what_it_cannot_sample():
    with pytest.raises(ValueError, match=r"split must be 'train' or 'heldout' \(got 'test'\)"):
        sample_problems(1, 4, "test", seed=0)
    for digits in (0, 11):  # one label per digit: a to j
        with pytest.raises(ValueError, match=rf"num_digits must be between 1 and 10 \(got {digits}\)"):
            sample_problems(1, digits, "train", seed=0)
    # at most half of the ~100 held-out 3-digit strings (10 % of 1000), so that sampling ends
    assert len({p.digits for p in sample_problems(50, 3, "heldout", seed=0)}) == 50
    with pytest.raises(ValueError, match="asked for 51 distinct heldout problems of 3 digits; only "
                                         "about 100 exist"):
        sample_problems(51, 3, "heldout", seed=0)


def test_the_seed_picks_the_problems():
    assert sample_problems(20, 4, "train", seed=1) == sample_problems(20, 4, "train", seed=1)
    assert sample_problems(20, 4, "train", seed=1) != sample_problems(20, 4, "train", seed=2)


def test_the_demo_policy_by_hand():
    """The demo's Qwen2 over the 19-token vocabulary of 4 digits: per layer q (128 x 128 + bias),
    k and v (128 x 64 + bias: 2 key-value heads of 32), o (128 x 128), the MLP (3 x 128 x 256)
    and two norms; the embedding tied to the head, and the final norm."""
    import torch

    from luffy_fast.toy.model import TinyQwen2Config, build_policy

    tokenizer = build_tokenizer(4)
    assert (len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id) == (19, 0, 1)
    layer = (128 * 128 + 128) + 2 * (128 * 64 + 64) + 128 * 128 + 3 * 128 * 256 + 2 * 128
    rng = torch.random.get_rng_state()
    policy = build_policy(tokenizer, TinyQwen2Config(), seed=3)
    assert torch.equal(torch.random.get_rng_state(), rng)  # the caller's random stream untouched
    assert sum(p.numel() for p in policy.parameters()) == 4 * layer + 19 * 128 + 128 == 594_432
    assert policy.config.max_position_embeddings == 128
    assert (policy.config.eos_token_id, policy.generation_config.eos_token_id,
            policy.generation_config.pad_token_id) == (1, 1, 0)
    again = build_policy(tokenizer, TinyQwen2Config(), seed=3)
    other = build_policy(tokenizer, TinyQwen2Config(), seed=4)
    weight = policy.model.embed_tokens.weight
    assert torch.equal(again.model.embed_tokens.weight, weight)
    assert not torch.equal(other.model.embed_tokens.weight, weight)


def test_save_pretrained_pair_loads_back(tmp_path):
    import torch
    from transformers import AutoModelForCausalLM

    from luffy_fast.data import load_tokenizer
    from luffy_fast.toy.model import TinyQwen2Config, build_policy, save_pretrained_pair

    tokenizer = build_tokenizer(3)
    policy = build_policy(tokenizer, TinyQwen2Config(hidden_size=32, intermediate_size=64,
                                                     num_hidden_layers=1, num_attention_heads=2,
                                                     num_key_value_heads=1), seed=0)
    folder = save_pretrained_pair(policy, tokenizer, tmp_path / "a" / "b")
    assert folder == tmp_path / "a" / "b"
    loaded = load_tokenizer(folder)
    assert loaded("3 8 1 > a 3", add_special_tokens=False).input_ids == [5, 10, 3, 12, 15, 5]
    assert torch.equal(AutoModelForCausalLM.from_pretrained(folder).model.embed_tokens.weight,
                       policy.model.embed_tokens.weight)


def test_the_toy_task_builds_what_the_config_says():
    import torch

    from luffy_fast.toy.task import ToyTask

    config = load_config(None, ["model.hidden_size=32", "model.intermediate_size=48",
                                "model.num_hidden_layers=3", "model.num_attention_heads=4",
                                "model.num_key_value_heads=1", "data.max_response_length=100",
                                "data.num_digits=3", "train.seed=7"])
    tokenizer, policy = ToyTask(config).components()
    shape = policy.config
    assert (shape.hidden_size, shape.intermediate_size, shape.num_hidden_layers,
            shape.num_attention_heads, shape.num_key_value_heads, shape.vocab_size,
            shape.max_position_embeddings) == (32, 48, 3, 4, 1, 18, 200)  # window: 2 x 100
    config.train.seed = 8
    _, other = ToyTask(config).components()  # the seed sets the initial weights
    assert not torch.equal(other.model.embed_tokens.weight, policy.model.embed_tokens.weight)


def test_the_toy_task_samples_its_split_of_the_problems():
    from luffy_fast.toy.task import ToyTask

    config = load_config(None, ["data.num_digits=3", "data.heldout_fraction=0.5",
                                "eval.num_problems=7", "train.seed=1"])
    task = ToyTask(config)
    tokenizer = task.components()[0]
    train, heldout = task.train_samples(tokenizer), task.heldout_samples(tokenizer)
    # 40 % of the ~500 training strings; 7 held-out ones, from the held-out half
    assert (len(train), len(heldout)) == (200, 7)
    assert {s.data_source for s in heldout} == {"toy_reverse"}  # names its validation metrics
    digits = ["".join(tokenizer.decode(s.prompt_ids).split()[:3]) for s in heldout]
    assert all(is_heldout(d, 0.5) for d in digits) and not all(is_heldout(d, 0.1) for d in digits)
    config.train.seed = 2  # another seed, other problems
    assert [s.prompt_ids for s in ToyTask(config).train_samples(tokenizer)] != \
        [s.prompt_ids for s in train]
    config.eval.num_problems = None  # "all": the generated default of 200
    assert len(ToyTask(config).heldout_samples(tokenizer)) == 200


def test_the_toy_task_asks_for_40_percent_of_its_training_strings_at_most_20000(monkeypatch):
    from luffy_fast.toy.task import ToyTask

    asked = []
    monkeypatch.setattr("luffy_fast.toy.task.sample_problems",
                        lambda count, digits, split, seed, fraction: asked.append(
                            (count, digits, split, seed, fraction)) or [])
    for digits in (3, 5):
        ToyTask(load_config(None, [f"data.num_digits={digits}"])).train_samples(None)
    # 0.4 x 900 = 360; 0.4 x 90,000 = 36,000 is over the cap
    assert asked == [(360, 3, "train", 0, 0.1), (20_000, 5, "train", 0, 0.1)]


def test_the_toy_task_needs_the_toy_policy():
    from luffy_fast.toy.task import ToyTask

    # a user's task could take a model directory; the toy data cannot
    with pytest.raises(ConfigError, match=r"model.path: the toy policy and the toy data go together "
                                          r"\(model.path='/models/qwen', data.task='toy'\)"):
        ToyTask(load_config(None, ["model.path=/models/qwen"]))
