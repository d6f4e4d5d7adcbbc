"""In-training validation (the eval command's code) and the best checkpoint; rewards scored
through the trainer's reward pool."""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import pytest
import torch

from helpers import tiny_config
from luffy_fast.data import Sample
from luffy_fast.errors import ConfigError
from luffy_fast.reward_pool import RewardPool
from luffy_fast.rollout import Completion, HFGenerateEngine, RolloutEngine
from luffy_fast.toy.task import ToyTask
from luffy_fast.train_config import load_config
from luffy_fast.validation import Validation, check_validation

# prompt token -> the rewards its 4 samples get (token 1 decodes to "right", 0 to "wrong")
SCRIPTS = {10: [1, 0, 0, 0], 11: [1, 1, 1, 0], 12: [1, 1, 1, 1], 13: [0, 0, 0, 0]}


class ScriptedEngine(RolloutEngine):
    def generate(self, prompts, n, params):
        return [[Completion([t], [0.0]) for t in SCRIPTS[p[0]][:n]] for p in prompts]

    def sync_weights(self, named_tensors):
        pass

    def close(self):
        pass


def exact_match(response: str, sample: Sample) -> float:
    return float(response == sample.ground_truth)


def validation(tmp_path, **eval_options) -> Validation:
    # with traces, as the toy task's held-out problems have: validation never scores them
    samples = [Sample([10 + i], "right", traces=[[1, 1]], data_source=source)
               for i, source in enumerate(["aime", "aime", "amc", "amc"])]
    config = load_config(None, [f"eval.{key}={value}" for key, value in eval_options.items()])
    return Validation(samples, config, pool=RewardPool(exact_match, workers=0),
                      checkpoint_root=tmp_path)


def test_validation_metrics_by_hand(tmp_path):
    batches = []

    def entropy(batch):  # the policy's entropy at each response token: 0.25 per token here
        batches.append(batch)
        return torch.full((sum(len(r) for r in batch.response_ids),), 0.25)

    metrics = validation(tmp_path, n=4).run(
        ScriptedEngine(), lambda ids: "right" if ids == [1] else "wrong", entropy)
    assert len(batches[0]) == 16 and batches[0].group_ids.tolist() == sorted([0, 1, 2, 3] * 4)
    assert metrics["heldout_entropy"] == 0.25
    # avg@4: aime (1/4 + 3/4) / 2 = 0.5, amc (4/4 + 0/4) / 2 = 0.5; macro 0.5
    assert metrics["val/aime/avg@4"] == pytest.approx(0.5)
    assert metrics["val/amc/avg@4"] == pytest.approx(0.5)
    # pass@2 = 1 - C(4-c, 2) / C(4, 2): aime (0.5 + 1) / 2 = 0.75, amc (1 + 0) / 2 = 0.5
    assert metrics["val/aime/pass@2"] == pytest.approx(0.75)
    assert metrics["val/macro/pass@2"] == pytest.approx(0.625)
    assert metrics["val/macro/pass@4"] == pytest.approx((1.0 + 0.5) / 2)
    assert metrics["heldout_accuracy"] == pytest.approx(8 / 16)  # correct samples of all 16
    assert metrics["val_reward/timeouts"] == 0.0


def test_fewer_problems_than_ranks_are_validated_whole_on_every_rank(tmp_path, monkeypatch):
    """4 problems, 8 ranks: no share for some ranks, so each rank samples all 4 (no gather)."""
    def no_collective(*args):
        raise AssertionError("a collective in a validation that every rank runs alone")

    monkeypatch.setattr(torch.distributed, "all_gather_object", no_collective)
    config = load_config(None, ["eval.n=4"])
    samples = [Sample([10 + i], "right", data_source="aime") for i in range(4)]
    check = Validation(samples, config, pool=RewardPool(exact_match, workers=0),
                       checkpoint_root=tmp_path, rank=5, world_size=8)
    metrics = check.run(ScriptedEngine(), lambda ids: "right" if ids == [1] else "wrong")
    assert metrics["heldout_accuracy"] == pytest.approx(8 / 16)  # all 16 samples, by hand


def test_each_of_two_ranks_validates_its_share_and_logs_the_whole_sets_metrics(tmp_path,
                                                                              monkeypatch):
    """Rank r of 2 samples problems r and r + 2; the gathered records keep each problem's own
    index, so rank 1 logs the metrics of all 4 problems, as in test_validation_metrics_by_hand
    (its own share alone: aime avg@4 3/4, from problem 11's 3 right samples of 4)."""
    import luffy_fast.validation as validation_module

    shares, prompts = [], []

    class Recording(ScriptedEngine):
        def generate(self, prompts_, n, params):
            prompts.append([p[0] for p in prompts_])
            return super().generate(prompts_, n, params)

    def gathered(value, world):  # rank 0 runs first (and gathers nothing from rank 1)
        assert world == 2
        if not shares:
            shares.append(value)
            return [value, ([], (0.0, 0))]
        return [shares[0], value]

    monkeypatch.setattr(validation_module, "from_every_rank", gathered)
    monkeypatch.setattr(validation_module, "over_ranks", lambda metrics, world: metrics)
    ranks = [validation(tmp_path, n=4) for _ in range(2)]
    for rank, check in enumerate(ranks):
        check.rank, check.world_size = rank, 2
        metrics = check.run(Recording(), lambda ids: "right" if ids == [1] else "wrong")
    assert prompts == [[10, 12], [11, 13]]
    # avg@4: aime (1/4 + 3/4) / 2, amc (4/4 + 0/4) / 2; pass@2: aime (0.5 + 1) / 2, amc 1/2
    assert (metrics["val/aime/avg@4"], metrics["val/amc/avg@4"]) == (0.5, 0.5)
    assert metrics["val/aime/pass@2"] == pytest.approx(0.75)
    assert metrics["val/macro/pass@4"] == pytest.approx(0.75)
    assert metrics["heldout_accuracy"] == 8 / 16


def test_the_best_checkpoint_is_kept_by_the_chosen_metric(tmp_path):
    saved = []

    def save(engine, tokenizer, step, config_dict):  # CheckpointManager.save
        saved.append(step)
        return tmp_path / "best" / f"step-{step:06d}"

    check = validation(tmp_path, n=1, best_metric="val/macro/avg@1")
    check.start(resuming=False)
    check.best.save = save
    name = "val/macro/avg@1"
    for step, value in enumerate([0.5, 0.25, 0.75, 0.75, 0.6], start=1):
        check.keep_best({name: value, "val/aime/avg@1": 0.0}, step, None, None)
    assert saved == [1, 3]  # 0.5 at step 1, then 0.75 at step 3 (a tie does not replace it)
    info = json.loads((tmp_path / "best" / "best.json").read_text())
    assert (info["metric"], info["value"], info["step"]) == (name, 0.75, 3)
    resumed = validation(tmp_path, n=1, best_metric=name)
    resumed.start(resuming=True)
    assert resumed.best_value == 0.75
    other = validation(tmp_path, n=1, best_metric="val/aime/avg@1")
    other.start(resuming=True)
    assert other.best_value is None  # best.json's 0.75 is another metric's value
    fresh = validation(tmp_path, n=1, best_metric=name)
    fresh.start(resuming=False)
    assert fresh.best_value is None
    with pytest.raises(ConfigError, match="eval.best_metric.*val/aime/avg@1"):
        validation(tmp_path, n=1, best_metric="val/gsm8k/avg@1").keep_best(
            {"val/aime/avg@1": 1.0}, 1, None, None)


class RecordingEngine(ScriptedEngine):
    def __init__(self) -> None:
        self.calls = []

    def generate(self, prompts, n, params):
        self.calls.append((n, params))
        return super().generate(prompts, n, params)


def test_validation_samples_with_the_eval_sections_settings(tmp_path):
    """eval.n, eval.temperature and eval.top_p (not the rollout's), the response limit and the
    run's seed, as set here."""
    from luffy_fast.rollout import SamplingParams

    config = load_config(None, ["eval.n=3", "eval.temperature=0.6", "eval.top_p=0.9",
                                "rollout.temperature=0.8", "loss.temperature=0.8",
                                "rollout.top_p=0.95", "data.max_prompt_length=16",
                                "data.max_response_length=48", "train.seed=7"])
    engine = RecordingEngine()
    Validation([Sample([10], "right")], config, RewardPool(exact_match, workers=0),
               tmp_path).run(engine, lambda ids: "right")
    assert engine.calls == [(3, SamplingParams(max_new_tokens=48, temperature=0.6, top_p=0.9,
                                               seed=7))]


def test_heldout_accuracy_counts_only_full_rewards(tmp_path):
    """A partial reward (0.5) counts in avg@n but is not a correct sample: 4 samples of problem
    10 score 1, 0.5, 0.5, 0.5 (token 1 "right", 0 "half"); accuracy 1/4, avg@4 2.5/4."""
    def reward(response: str, sample: Sample) -> float:
        return {"right": 1.0, "half": 0.5}[response]

    config = load_config(None, ["eval.n=4"])
    check = Validation([Sample([10], "right")], config, RewardPool(reward, workers=0), tmp_path)
    metrics = check.run(ScriptedEngine(), lambda ids: "right" if ids == [1] else "half")
    assert metrics["val/macro/avg@4"] == pytest.approx(2.5 / 4)
    assert metrics["heldout_accuracy"] == 0.25


def test_without_held_out_problems_no_best_checkpoint_is_kept(tmp_path):
    """eval.best_metric with no held-out problems is reported at start-up as keeping nothing;
    each validation's empty metrics must then not stop the run."""
    config = load_config(None, ["eval.best_metric=val/macro/avg@1"])
    check = Validation([], config, RewardPool(exact_match, workers=0), tmp_path)
    assert check.run(ScriptedEngine(), str) == {}
    assert check.keep_best({"step": 1}, 1, None, None) is None
    assert not (tmp_path / "best").exists()


class ScriptedValidationEngine(RolloutEngine):
    """Training rollouts from the hf engine on a copy of the trainer's initial policy; each
    validation pass (its prompts are the held-out ones, never trained on) scripted: problem i's
    first right[i] samples are its trace (rewarded 1), the others a bare <eos> (0)."""

    def __init__(self, config, right_per_pass) -> None:
        task = ToyTask(config)
        tokenizer, policy = task.components()
        self.inner = HFGenerateEngine(policy, tokenizer.pad_token_id, tokenizer.eos_token_id)
        self.traces = {tuple(s.prompt_ids): s.traces[0] for s in task.heldout_samples(tokenizer)}
        self.eos, self.passes = tokenizer.eos_token_id, iter(right_per_pass)

    def generate(self, prompts, n, params):
        if tuple(prompts[0]) not in self.traces:
            return self.inner.generate(prompts, n, params)
        right = next(self.passes)
        responses = [[self.traces[tuple(p)] if j < right[i] else [self.eos] for j in range(n)]
                     for i, p in enumerate(prompts)]
        return [[Completion(r, [0.0] * len(r)) for r in group] for group in responses]

    def sync_weights(self, named_tensors):
        self.inner.sync_weights(named_tensors)

    def close(self):
        self.inner.close()


def test_training_validates_and_keeps_the_best_checkpoint(tmp_path):
    from luffy_fast.metrics import read_metrics
    from luffy_fast.trainer import LuffyTrainer

    name = "val/macro/avg@2"
    config = tiny_config(tmp_path, "train.steps=3", "eval.every=1", "eval.n=2",
                         f"eval.best_metric={name}", "output.save_every=1",
                         "output.keep_checkpoints=1", "optim.lr=1e-2")
    # right samples (of 2) of each of the 8 held-out problems, at steps 0 to 3
    right = [[2] * 8, [1, 1, 1, 1, 0, 0, 0, 0], [2, 2, 2, 2, 1, 1, 1, 1], [2, 2, 2, 2, 0, 0, 0, 0]]
    trainer = LuffyTrainer(config, rollout_engine=ScriptedValidationEngine(config, right))
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [0, 1, 2, 3]
    # avg@2 = right samples / 16: 16, 4, 12, 8; one source, so the macro value is its value and
    # heldout_accuracy (binary rewards) the same fraction
    avg = [1.0, 0.25, 0.75, 0.5]
    # pass@2 = problems with a right sample / 8: 8, 4, 8, 4 (1 - C(2 - c, 2) / C(2, 2) = [c > 0])
    pass_at_2 = [1.0, 0.5, 1.0, 0.5]
    for key, expected in ((name, avg), ("val/toy_reverse/avg@2", avg),
                          ("heldout_accuracy", avg), ("val/macro/pass@1", avg),
                          ("val/macro/pass@2", pass_at_2)):
        assert [r[key] for r in rows] == pytest.approx(expected), key
    assert all(r["reward/timeouts"] == 0 and r["reward/errors"] == 0 for r in rows[1:])
    # the best of steps 1-3 is step 2's 0.75, kept over step 1's 0.25 and not replaced by step
    # 3's 0.5; step 0 (the initial weights, 1.0) is not a candidate
    info = json.loads((tmp_path / "checkpoints" / "best" / "best.json").read_text())
    assert (info["metric"], info["value"], info["step"]) == (name, 0.75, 2)
    best = tmp_path / "checkpoints" / "best" / (tmp_path / "checkpoints" / "best" / "latest"
                                                ).read_text().strip()
    assert best.name == "step-000002" and (best / "hf" / "config.json").is_file()
    assert [p.name for p in (tmp_path / "checkpoints" / "best").glob("step-*")] == ["step-000002"]
    # the regular checkpoints are pruned to one; the best one stays
    assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-000003"]


def test_the_best_checkpoint_shares_its_steps_files_and_outlives_their_rotation(tmp_path):
    """Step 1 is the best: its best and regular checkpoints are one serialization, hard-linked;
    the regular one is pruned at step 2 (keep 1) and the best still loads step 1's weights."""
    from safetensors.torch import load_file

    from luffy_fast.trainer import LuffyTrainer

    name = "val/macro/avg@2"
    trainer = LuffyTrainer(tiny_config(tmp_path, "train.steps=3", "eval.every=1", "eval.n=2",
                                       f"eval.best_metric={name}", "output.save_every=1",
                                       "output.keep_checkpoints=1", "optim.lr=1e-2"))
    values = iter([0.0, 0.5, 0.25, 0.1])  # steps 0 (not a candidate), 1 (the best), 2, 3
    trainer.evaluate = lambda: {name: next(values)}
    serialized, at_step_1 = [], {}
    save_checkpoint, save = trainer.engine.save_checkpoint, trainer.checkpoints.save
    trainer.engine.save_checkpoint = lambda path, **kw: serialized.append(path) or save_checkpoint(
        path, **kw)

    def regular_save(engine, tokenizer, step, *args, **kwargs):
        folder = save(engine, tokenizer, step, *args, **kwargs)
        if step == 1:
            best = tmp_path / "checkpoints" / "best" / folder.name
            files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
            at_step_1.update(
                files=files, best_files=sorted(p.relative_to(best) for p in best.rglob("*")
                                               if p.is_file()),
                shared=[(folder / f).stat().st_ino == (best / f).stat().st_ino
                        and (folder / f).stat().st_nlink == 2 for f in files],
                sampler="sampler" in json.loads((folder / "trainer_state.json").read_text()),
                weights={n: t.detach().clone()
                         for n, t in engine.module.policy.state_dict().items()})
        return folder

    trainer.checkpoints.save = regular_save
    try:
        trainer.train()
        # one serialization per state: the best of step 1, the regular ones of steps 2 and 3
        assert [Path(p).name for p in serialized] == [".staging-step-000001",
                                                     ".staging-step-000002",
                                                     ".staging-step-000003"]
        assert at_step_1["files"] == at_step_1["best_files"]
        assert Path("trainer_state.json") in at_step_1["files"] and at_step_1["sampler"]
        # every file but the trainer state (the regular one adds the sampler's) is one inode
        assert at_step_1["shared"] == [f.name != "trainer_state.json" for f in at_step_1["files"]]
        best = tmp_path / "checkpoints" / "best" / "step-000001"
        assert [p.name for p in (tmp_path / "checkpoints").glob("step-*")] == ["step-000003"]
        assert all(p.stat().st_nlink == 1 for p in best.rglob("*") if p.is_file())
        trained = trainer.engine.module.policy.state_dict()
        assert any(not torch.equal(trained[k], t) for k, t in at_step_1["weights"].items())
        assert trainer.checkpoints.load(trainer.engine, best) == 1
        for key, tensor in trainer.engine.module.policy.state_dict().items():
            assert torch.equal(tensor, at_step_1["weights"][key]), key
        export = load_file(best / "hf" / "model.safetensors")
        assert export and all(torch.equal(t, at_step_1["weights"][n]) for n, t in export.items())
    finally:
        trainer.close()


def test_validation_runs_every_n_steps_and_after_the_last_and_its_best_outlives_a_resume(tmp_path):
    """eval.every=2 over 3 steps validates at steps 0, 2 and 3 (the last); the best of steps 2
    and 3 (step 2's 0.5) is still the value to beat after a resume: step 4's 0.4 keeps none."""
    from luffy_fast.trainer import LuffyTrainer

    name = "val/macro/avg@1"
    overrides = ("eval.every=2", f"eval.best_metric={name}", "output.save_every=1")
    first = LuffyTrainer(tiny_config(tmp_path, "train.steps=3", *overrides))
    values = iter([0.9, 0.5, 0.25])  # steps 0 (the initial weights: not a candidate), 2 and 3
    first.evaluate = lambda: {name: next(values)}
    try:
        history = first.train()
    finally:
        first.close()
    assert [row.get(name) for row in history] == [None, 0.5, 0.25]
    best = tmp_path / "checkpoints" / "best" / "best.json"
    assert json.loads(best.read_text())["step"] == 2
    resumed = LuffyTrainer(tiny_config(tmp_path, "train.steps=4", *overrides))
    resumed.evaluate = lambda: {name: 0.4}
    try:
        with pytest.warns(RuntimeWarning, match="changed settings"):
            assert [row.get(name) for row in resumed.train(resume=True)] == [0.4]
    finally:
        resumed.close()
    assert (json.loads(best.read_text())["step"], json.loads(best.read_text())["value"]) == (2, 0.5)


def test_heldout_entropy_is_the_policys_mean_token_entropy_in_float64(tmp_path):
    """The trainer's validation entropy against the policy's own logits in float64: the mean,
    over every response token of the 8 held-out problems (each answered with its trace), of
    -sum p log p of the next-token distribution."""
    from luffy_fast.trainer import LuffyTrainer

    config = tiny_config(tmp_path, "eval.n=1")
    engine = ScriptedValidationEngine(config, [[1] * 8])
    trainer = LuffyTrainer(config, rollout_engine=engine)
    try:
        metrics = trainer.evaluate()
        policy, entropies = trainer.engine.module.policy.double(), []
        with torch.no_grad():
            for prompt, trace in engine.traces.items():
                logits = policy(torch.tensor([[*prompt, *trace]])).logits[0, len(prompt) - 1:-1]
                entropies.append(-(logits.softmax(-1) * logits.log_softmax(-1)).sum(-1))
    finally:
        trainer.close()
    expected = torch.cat(entropies)
    assert expected.numel() == sum(len(t) for t in engine.traces.values()) and len(entropies) == 8
    assert metrics["heldout_entropy"] == pytest.approx(float(expected.mean()), rel=1e-5)
    assert metrics["heldout_accuracy"] == 1.0  # the traces are right


class FailingReward:
    """Raises on every response: each is counted as an error and scores 0."""

    def __call__(self, response: str, sample: Sample) -> float:
        raise RuntimeError("the verifier broke")


class FailingRewardTask(ToyTask):
    reward_workers = 1

    def reward_function(self):
        return FailingReward()


def test_reward_errors_in_worker_processes_score_zero_and_the_run_goes_on(tmp_path):
    from luffy_fast.trainer import LuffyTrainer

    config = tiny_config(tmp_path, "train.steps=1", "eval.every=0", "output.save_every=0")
    trainer = LuffyTrainer(config, task=FailingRewardTask(config))
    try:
        metrics = trainer.train()[0]
    finally:
        trainer.close()
    assert trainer.rewards._workers == []  # closed
    # 4 prompts x (3 rollouts + 1 trace), every one an error scored 0
    assert metrics["reward/errors"] == 16 and metrics["reward/timeouts"] == 0
    assert metrics["reward_on_policy"] == 0.0 and metrics["reward_off_policy"] == 0.0


def _keep_best_on_rank(rank: int, init_file: str, root: str, results) -> None:
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        config = load_config(None, ["eval.best_metric=val/macro/avg@1"])
        check = Validation([Sample([10], "right", data_source="aime")], config,
                           RewardPool(exact_match, workers=0), root, rank=rank, world_size=2)
        saves = []
        check.best.save = lambda *args: saves.append(args[2]) or check.best.root / "step"
        # each rank sampled its own value; rank 0's decides for both (0.5, 0.4, 0.6 logged)
        for step, values in enumerate([(0.5, 0.1), (0.4, 0.9), (0.6, 0.2)], start=1):
            check.keep_best({"val/macro/avg@1": values[rank]}, step, None, None)
        results[rank] = (saves, check.best_value)
    finally:
        dist.destroy_process_group()


@pytest.mark.slow
def test_ranks_agree_on_the_best_checkpoint(tmp_path):
    """Saving is collective: every rank decides on rank 0's value, whatever it sampled."""
    import torch.multiprocessing as mp

    results = mp.Manager().dict()
    mp.spawn(_keep_best_on_rank, args=(str(tmp_path / "init"), str(tmp_path / "ckpt"), results),
             nprocs=2)
    assert results[0] == results[1] == ([1, 3], 0.6)


def test_the_eval_section_is_checked_against_the_held_out_problems_at_start_up():
    problems = [Sample([10], "x", data_source="aime"), Sample([11], "y", data_source="amc"),
                Sample([12], "z")]  # no data source: counted under "heldout"
    config = lambda *o: load_config(None, ["eval.every=5", "eval.n=2", *o])  # noqa: E731

    def reported(problems, config) -> list[str]:
        messages = []
        check_validation(problems, config, report=messages.append)
        return messages

    assert reported(problems, config("eval.best_metric=val/amc/pass@2")) == []
    # the names a validation pass logs, known before anything is generated
    names = [f"val/{s}/{m}" for s in ("aime", "amc", "heldout", "macro")
             for m in ("avg@2", "pass@1", "pass@2")]
    with pytest.raises(ConfigError) as error:
        reported(problems, config("eval.best_metric=val/macro/avg@4"))
    assert str(error.value) == ("eval.best_metric: 'val/macro/avg@4' is not among the validation "
                                f"metrics of this run's held-out problems ({', '.join(names)})")
    # settings that would silently do nothing
    (message,) = reported([], config("eval.best_metric=val/macro/avg@2"))
    assert message.startswith("eval.every=5, but the task has no held-out problems")
    assert message.endswith("no checkpoint is kept as the best by eval.best_metric")
    (message,) = reported(problems, config("eval.every=0", "eval.best_metric=val/macro/avg@2"))
    assert message.startswith("eval.best_metric='val/macro/avg@2', but eval.every=0")
    assert reported([], config("eval.every=0")) == []


def test_a_start_up_warning_comes_from_rank_zero_only(monkeypatch):
    from luffy_fast.run_files import warn_at_start

    monkeypatch.setenv("RANK", "1")  # a launched rank other than 0
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        warn_at_start("not shown")
    monkeypatch.setenv("RANK", "0")
    with pytest.warns(RuntimeWarning, match="shown once"):
        warn_at_start("shown once")


def test_a_wrong_best_metric_stops_the_run_before_the_policy_loads(tmp_path, monkeypatch):
    from luffy_fast import trainer as trainer_module

    def no_policy(*args):
        raise AssertionError("the policy was loaded")

    monkeypatch.setattr(trainer_module, "prepare_policy", no_policy)
    with pytest.raises(ConfigError, match="eval.best_metric: 'val/macro/avg@4' is not among"):
        trainer_module.LuffyTrainer(tiny_config(tmp_path, "eval.every=1", "eval.n=2",
                                                "eval.best_metric=val/macro/avg@4"))


class NoHeldOutTask(ToyTask):
    def heldout_samples(self, tokenizer):
        return []


def test_validation_without_held_out_problems_warns_once_and_logs_no_empty_row(tmp_path):
    from luffy_fast.metrics import read_metrics
    from luffy_fast.trainer import LuffyTrainer

    config = tiny_config(tmp_path, "train.steps=1", "eval.every=1", "output.save_every=0")
    with pytest.warns(RuntimeWarning) as warned:
        trainer = LuffyTrainer(config, task=NoHeldOutTask(config))
    assert [str(w.message) for w in warned if "held-out" in str(w.message)] == [
        "eval.every=1, but the task has no held-out problems (data.heldout_source is not set): "
        "no validation will run"]
    try:
        trainer.train()
    finally:
        trainer.close()
    rows = read_metrics(tmp_path / "metrics.jsonl")
    assert [r["step"] for r in rows] == [1] and not any(k.startswith("val/") for k in rows[0])


def test_groups_of_traces_alone_are_warned_of_before_the_policy_loads(tmp_path, monkeypatch):
    from luffy_fast import trainer as trainer_module

    class Loaded(Exception):
        pass

    def policy_loads(*args):
        raise Loaded

    monkeypatch.setattr(trainer_module, "prepare_policy", policy_loads)
    for n_on, expected in ((0, ["rollout.n_on=0: each group is its traces alone, and traces that all "
                                "score the same (the official data's are all correct) have zero "
                                "advantage"]), (1, [])):
        with warnings.catch_warnings(record=True) as warned, pytest.raises(Loaded):
            warnings.simplefilter("always")
            trainer_module.LuffyTrainer(tiny_config(tmp_path / str(n_on), f"rollout.n_on={n_on}",
                                                    "rollout.n_off=2"))
        assert [str(w.message) for w in warned if "n_on" in str(w.message)] == expected
