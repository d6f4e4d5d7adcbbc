"""The trainer's parts on their own: the LR schedule, the metric accumulator and timer, tasks
loaded by name (the example's user task trained for real), and the rollout engine's step order."""

from __future__ import annotations

import dataclasses
import math
import os
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from helpers import subprocess_env, tiny_config
from luffy_fast.data import Sample
from luffy_fast.distributed import learning_rate_lambda
from luffy_fast.errors import ConfigError
from luffy_fast.metrics import MeanMinMax, PhaseTimer
from luffy_fast.rollout import HFGenerateEngine, RolloutEngine
from luffy_fast.tasks import MathTask, Task, load_task
from luffy_fast.toy.task import ToyTask
from luffy_fast.train_config import load_config
from luffy_fast.trainer import LuffyTrainer

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


# --------------------------------------------------------------------------- LR schedule

def test_learning_rate_schedules_by_hand():
    # the demo's schedule: 10 warm-up steps, then cosine to 10 % over 250 - 10 steps
    cosine = learning_rate_lambda(load_config("configs/demo_luffy.yaml"))
    assert [cosine(k) for k in (0, 4, 9)] == [0.1, 0.5, 1.0]  # (k + 1) / 10
    assert cosine(10) == 1.0  # progress 0
    assert cosine(130) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-15)  # half way: cos(pi/2) = 0
    assert cosine(250) == pytest.approx(0.1, abs=1e-15)  # the end, and it stays there
    assert cosine(400) == pytest.approx(0.1, abs=1e-15)
    constant = learning_rate_lambda(load_config(None, ["optim.warmup_steps=4", "train.steps=20"]))
    assert [constant(k) for k in range(6)] == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    no_warmup = learning_rate_lambda(load_config(None, ["optim.schedule=cosine", "train.steps=8",
                                                        "train.prompts_per_step=4",
                                                        "train.mini_batch_size=2"]))
    # 2 optimizer steps per rollout, 16 in all, min_lr_ratio 0
    assert [no_warmup(k) for k in (0, 8)] == [1.0, pytest.approx(0.5, abs=1e-15)]


def test_a_warm_up_longer_than_the_run_is_named_at_start():
    """warmup_steps 100000 in a 2-step run trained at 3e-8 and 6e-8 of a 3e-3 peak, silently; a
    short trial of a real recipe is not an error, so it is a start-up warning."""
    config = load_config(None, ["optim.warmup_steps=21", "train.steps=10",
                                "train.prompts_per_step=32", "train.mini_batch_size=16"])
    with pytest.warns(RuntimeWarning, match=r"^optim.warmup_steps: 21 is more than the run's 20 "
                                            r"optimizer steps: the learning rate never reaches"):
        learning_rate_lambda(config)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        whole_run = dataclasses.replace(config.optim, warmup_steps=20)
        learning_rate_lambda(dataclasses.replace(config, optim=whole_run))  # allowed, quietly


def test_cosine_after_the_warm_up_is_transformers_cosine_with_min_lr():
    from transformers import get_cosine_with_min_lr_schedule_with_warmup

    config = load_config("configs/demo_luffy.yaml")
    ours = learning_rate_lambda(config)
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=1.0)
    theirs = get_cosine_with_min_lr_schedule_with_warmup(optimizer, 10, 250, min_lr_rate=0.1)
    # transformers' warm-up starts at k / 10 (a first step at lr 0); ours at (k + 1) / 10
    assert [theirs.lr_lambdas[0](k) for k in (0, 9)] == [0.0, 0.9]
    assert all(ours(k) == theirs.lr_lambdas[0](k) for k in range(10, 250))


def test_a_resumed_runs_optim_settings_replace_the_restored_ones_by_hand():
    """apply_optimizer_settings over an AdamW and its schedule restored 2 steps into a 4-step
    warm-up at lr 1e-3: the new peak 2e-3 applies at the schedule's position, 2e-3 * 3/4, and
    the next step goes on from it (2e-3 * 4/4); betas, eps, weight decay and clipping replaced."""
    from luffy_fast.distributed import apply_optimizer_settings

    config = load_config(None, ["optim.warmup_steps=4", "train.steps=20", "optim.lr=1e-3"])
    optimizer = torch.optim.AdamW([torch.zeros(2, requires_grad=True)], lr=1e-3)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, learning_rate_lambda(config))
    for _ in range(2):
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr() == [pytest.approx(1e-3 * 3 / 4)]
    engine = SimpleNamespace(optimizer=SimpleNamespace(clip_grad=1.0))  # a ZeRO wrapper's
    changed = dataclasses.replace(config.optim, lr=2e-3, betas=[0.8, 0.95], eps=1e-6,
                                  weight_decay=0.05, grad_clip=0.5)
    apply_optimizer_settings(engine, scheduler, changed)
    (group,) = optimizer.param_groups
    assert engine.optimizer.clip_grad == 0.5
    assert (group["betas"], group["eps"], group["weight_decay"]) == ((0.8, 0.95), 1e-6, 0.05)
    assert group["lr"] == scheduler.get_last_lr()[0] == pytest.approx(2e-3 * 3 / 4)
    optimizer.step()
    scheduler.step()
    assert group["lr"] == pytest.approx(2e-3)


@pytest.mark.parametrize("zero_stage", [0, 2])
def test_the_optimizer_is_built_with_the_optim_section(tmp_path, zero_stage):
    """ZeRO-0 (CheckedAdamW) and ZeRO-2 (torch's AdamW under DeepSpeed) take optim's betas, eps
    and weight decay, and start at the first warm-up step's lr: 1e-3 * 1/2."""
    trainer = LuffyTrainer(tiny_config(tmp_path, f"train.zero_stage={zero_stage}",
                                       "optim.betas=[0.8,0.95]", "optim.eps=1e-6",
                                       "optim.weight_decay=0.05"))
    try:
        groups = trainer.scheduler.optimizer.param_groups
        assert groups and all((g["betas"], g["eps"], g["weight_decay"], g["lr"])
                              == ((0.8, 0.95), 1e-6, 0.05, 5e-4) for g in groups)
    finally:
        trainer.close()


# --------------------------------------------------------------------------- metrics

def test_mean_min_max_and_phase_timer():
    stats = MeanMinMax(minimum=("ratio_min",), maximum=("ratio_max",))
    stats.add({"loss": 1.0, "ratio_min": 0.9, "ratio_max": 1.1}, weight=3.0)
    stats.add({"loss": 3.0, "ratio_min": 0.8, "ratio_max": 1.05}, weight=1.0)
    # weighted mean (1 * 3 + 3 * 1) / 4 = 1.5; extremes over both
    assert stats.result() == {"loss": 1.5, "ratio_min": 0.8, "ratio_max": 1.1}
    assert MeanMinMax().result() == {}
    zero = MeanMinMax()
    zero.add({"entropy": 0.0}, weight=0.0)
    assert zero.result() == {"entropy": 0.0}
    # token means weighted by their own counts, the counts summed; no tokens: the plain mean
    tokens = MeanMinMax(summed=("loss_tokens", "on"),
                        weighted_by={"entropy": "loss_tokens", "ratio_mean": "on"})
    tokens.add({"entropy": 1.0, "loss_tokens": 30, "ratio_mean": 1.0, "on": 0, "loss": 1.0})
    tokens.add({"entropy": 2.0, "loss_tokens": 10, "ratio_mean": 1.0, "on": 0, "loss": 3.0})
    assert tokens.result() == {"entropy": (1 * 30 + 2 * 10) / 40, "loss_tokens": 40,
                               "ratio_mean": 1.0, "on": 0, "loss": 2.0}
    # extremes leave out the parts without their tokens (the op's 1.0 there), unless all are
    ratios = MeanMinMax(minimum=("ratio_min",), maximum=("ratio_max",),
                        weighted_by={"ratio_min": "on", "ratio_max": "on"})
    ratios.add({"ratio_min": 1.0, "ratio_max": 1.0, "on": 0})
    assert ratios.result() == {"ratio_min": 1.0, "ratio_max": 1.0, "on": 0.0}
    ratios.add({"ratio_min": 1.2, "ratio_max": 1.5, "on": 7})
    ratios.add({"ratio_min": 1.0, "ratio_max": 1.0, "on": 0})
    assert ratios.result() == {"ratio_min": 1.2, "ratio_max": 1.5, "on": 7 / 3}
    timer = PhaseTimer()
    for _ in range(2):
        with timer.phase("generate"):
            pass
    assert list(timer.seconds) == ["time/generate"] and timer.seconds["time/generate"] >= 0


def test_each_phase_reports_its_own_peak_memory_on_a_gpu(monkeypatch):
    """On a GPU the peak is reset as each phase starts: the update's peak is its own, not the
    generation's (vLLM's KV cache, asleep during the update); the step's is the largest. The
    allocator is simulated: each phase allocates up to a known peak."""
    allocator = {"peak": 0.0}
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats",
                        lambda device: allocator.update(peak=100 * 2**20))  # what stays allocated
    monkeypatch.setattr(torch.cuda, "max_memory_allocated", lambda device: allocator["peak"])
    timer = PhaseTimer(torch.device("cuda", 0))
    # a repeated phase keeps its largest peak (350, not the later 300)
    for name, peak_mb in (("generate", 900), ("update", 350), ("update", 300), ("sync", 120)):
        with timer.phase(name):
            allocator["peak"] = max(allocator["peak"], peak_mb * 2**20)
    metrics = timer.metrics()
    assert {k: v for k, v in metrics.items() if k.startswith("peak")} == {
        "peak_memory_mb/generate": 900, "peak_memory_mb/update": 350,
        "peak_memory_mb/sync": 120, "peak_memory_mb": 900}


# --------------------------------------------------------------------------- tasks

def test_step_metrics_over_ranks_by_hand(monkeypatch):
    """Two ranks' metrics (equal shares of the prompts): counts and throughput summed, extremes
    and times the extreme rank's, token means weighted by each rank's count of their tokens,
    other means averaged; a key only one rank has averages over it."""
    from luffy_fast.metrics import over_ranks

    ranks = [{"loss": 0.25, "reward_on_policy": 0.5, "ratio_min": 0.9, "ratio_max": 1.1,
              "reward/errors": 0.0, "tokens_per_second": 100.0, "time/update": 2.0,
              "step_seconds": 3.0, "peak_memory_mb": 50.0, "note": "rank 0", "advantage_mean": 1.0,
              "entropy": 0.5, "clip_fraction": 0.1, "loss_tokens": 300, "ratio_mean": 1.5,
              "on_policy_loss_tokens": 100, "rollout_logprob_gap_mean": 0.2, "sampled_tokens": 90},
             {"loss": 0.75, "reward_on_policy": 1.0, "ratio_min": 0.8, "ratio_max": 1.05,
              "reward/errors": 3.0, "tokens_per_second": 300.0, "time/update": 1.0,
              "step_seconds": 4.0, "peak_memory_mb": 70.0, "note": "rank 1",
              "entropy": 1.5, "clip_fraction": 0.5, "loss_tokens": 100, "ratio_mean": 0.5,
              "on_policy_loss_tokens": 300, "rollout_logprob_gap_mean": 0.4, "sampled_tokens": 10}]

    def all_gather_object(gathered, mine):
        assert mine == ranks[0]  # rank 0's call
        gathered[:] = ranks

    monkeypatch.setattr(torch.distributed, "all_gather_object", all_gather_object)
    assert over_ranks(ranks[0], 2) == {
        "loss": 0.5, "reward_on_policy": 0.75, "ratio_min": 0.8, "ratio_max": 1.1,
        "reward/errors": 3.0, "tokens_per_second": 400.0, "time/update": 2.0,
        "step_seconds": 4.0, "peak_memory_mb": 70.0, "note": "rank 0", "advantage_mean": 1.0,
        # (0.5 * 300 + 1.5 * 100) / 400, (0.1 * 300 + 0.5 * 100) / 400, over 400 loss tokens
        "entropy": 0.75, "clip_fraction": pytest.approx(0.2), "loss_tokens": 400,
        # (1.5 * 100 + 0.5 * 300) / 400 on-policy tokens; (0.2 * 90 + 0.4 * 10) / 100 sampled
        "ratio_mean": 0.75, "on_policy_loss_tokens": 400,
        "rollout_logprob_gap_mean": pytest.approx(0.22), "sampled_tokens": 100}
    assert over_ranks(ranks[1], 1) == ranks[1]  # a world of one: no collective


def test_sample_statistics_over_ranks_are_the_whole_batchs(monkeypatch):
    """Each rank's rollout metrics of its share, the shares unequal (a prompt without traces
    has no off-policy members): over the ranks, advantage_std is the population std of all the
    advantages (not the mean of the ranks' stds), advantage_mean and the off-policy means those
    of all the samples, the counts summed."""
    from luffy_fast.metrics import over_ranks
    from luffy_fast.rollout_batch import rollout_metrics

    sizes, traces = (18, 6), (6, 1)
    advantages = torch.cat([torch.randn(18, generator=torch.Generator().manual_seed(0)),
                            torch.randn(6, generator=torch.Generator().manual_seed(1)) + 4])
    rewards = torch.rand(24, generator=torch.Generator().manual_seed(2))
    off_policy = torch.tensor([i < 6 for i in range(18)] + [i < 1 for i in range(6)])
    lengths = list(range(1, 25))
    parts, start = [], 0
    for size in sizes:
        share = slice(start, start + size)
        parts.append(SimpleNamespace(off_policy=off_policy[share], rewards=rewards[share],
                                     advantages=advantages[share],
                                     response_ids=[[7] * n for n in lengths[share]],
                                     finished=[True] * size))
        start += size
    ranks = [rollout_metrics(part) for part in parts]
    assert [rank["off_policy_samples"] for rank in ranks] == list(traces)
    monkeypatch.setattr(torch.distributed, "all_gather_object",
                        lambda gathered, mine: gathered.__setitem__(slice(None), ranks))
    merged = over_ranks(ranks[0], 2)
    assert merged["advantage_std"] == pytest.approx(float(advantages.std(correction=0)), rel=1e-6)
    assert merged["advantage_mean"] == pytest.approx(float(advantages.mean()), rel=1e-6)
    assert merged["reward_off_policy"] == pytest.approx(float(rewards[off_policy].mean()))
    off_lengths = torch.tensor(lengths, dtype=torch.float)[off_policy]
    assert merged["response_length_off_policy"] == pytest.approx(float(off_lengths.mean()))
    assert (merged["samples"], merged["off_policy_samples"]) == (24, 7)
    assert merged["advantage_std"] > 1.5 * (ranks[0]["advantage_std"] + ranks[1]["advantage_std"]) / 2

def test_tasks_load_by_name(tmp_path, monkeypatch):
    assert isinstance(load_task(load_config(None)), ToyTask)  # data.source toy: the toy task
    data = tmp_path / "d.jsonl"
    data.write_text('{"prompt": "1", "reward_model": {"ground_truth": "1"}}\n')
    math_config = load_config(None, [f"data.source={data}", "model.path=/some/model"])
    assert math_config.data.task is None and isinstance(load_task(math_config), MathTask)
    monkeypatch.syspath_prepend(str(EXAMPLES))
    user = load_task(load_config(None, ["data.task=custom_task:CopyDigits"]))
    assert isinstance(user, Task) and type(user).__name__ == "CopyDigits"
    assert user.reward("= 1 2 3 <eos>", Sample([5], "123")) == 1.0
    assert user.reward("= 1 2 3", Sample([5], "123")) == 0.0  # unfinished
    with pytest.raises(ConfigError, match="data.task: cannot load 'nowhere:Task'"):
        load_task(load_config(None, ["data.task=nowhere:Task"]))
    with pytest.raises(ConfigError, match="data.task: 'luffy_fast.data:Sample' is not"):
        load_task(load_config(None, ["data.task=luffy_fast.data:Sample"]))
    with pytest.raises(ConfigError, match="data.task: must be 'toy', 'math'"):
        load_config(None, ["data.task=mytask"])
    with pytest.raises(ConfigError, match="model.path: 'toy' needs a task that builds"):
        LuffyTrainer(load_config(None, [f"data.source={data}", f"output.dir={tmp_path}/o"]))


def test_the_custom_task_example_trains(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(EXAMPLES))
    import custom_task

    history = custom_task.main(str(tmp_path), "output.progress_bar=false", "train.cpu_threads=1")
    assert [row["step"] for row in history] == [1, 2, 3]
    # the traces are "= d d d <eos>": right by construction, 5 tokens each
    assert all(row["reward_off_policy"] == 1.0 for row in history)
    assert all(row["response_length_off_policy"] == 5.0 for row in history)
    assert all(math.isfinite(row["loss"]) and row["micro_batches"] == 1 for row in history)
    assert (tmp_path / "checkpoints" / "latest").read_text().strip() == "step-000003"


# --------------------------------------------------------------------------- engine interface

class RecordingEngine(RolloutEngine):
    """The hf engine, recording the order of the trainer's calls; its metrics count syncs."""

    def __init__(self, inner: HFGenerateEngine) -> None:
        self.inner, self.calls, self.syncs, self.params = inner, [], 0, []

    def generate(self, prompts, n, params):
        self.calls.append("generate")
        self.params.append((n, params))
        return self.inner.generate(prompts, n, params)

    def sync_weights(self, named_tensors):
        self.calls.append("sync_weights")
        self.syncs += 1
        self.inner.sync_weights(named_tensors)

    def sleep(self):
        self.calls.append("sleep")

    def wake(self):
        self.calls.append("wake")

    def metrics(self):
        self.calls.append("metrics")
        return {"syncs_seen": float(self.syncs), **self.inner.metrics()}

    def close(self):
        self.inner.close()


def test_engine_metrics_are_collected_after_the_sync(tmp_path):
    config = tiny_config(tmp_path, "eval.every=0", "train.steps=2", "output.save_every=0",
                         "rollout.temperature=0.9", "loss.temperature=0.9", "rollout.top_p=0.95")
    tokenizer, policy = ToyTask(config).components()  # seeded: the trainer's own initial weights
    engine = RecordingEngine(HFGenerateEngine(policy, tokenizer.pad_token_id,
                                              tokenizer.eos_token_id))
    trainer = LuffyTrainer(config, rollout_engine=engine)
    history = trainer.train()
    assert engine.calls == ["generate", "sleep", "sync_weights", "wake", "metrics"] * 2
    assert [row["syncs_seen"] for row in history] == [1.0, 2.0]  # this step's sync, not the last
    # n_on samples per prompt with the rollout section's settings, seeded by train.seed (3) and
    # the step, so that a resumed run samples the same
    from luffy_fast.rollout import SamplingParams

    assert engine.params == [(3, SamplingParams(max_new_tokens=24, temperature=0.9, top_p=0.95,
                                                seed=3 * 1_000_003 + step)) for step in (0, 1)]
    # the learning rate each step trained at: the warm-up's 1/2 and 2/2 of optim.lr (1e-3)
    assert [row["learning_rate"] for row in history] == [5e-4, 1e-3]
    assert all(0 < row["rollout_entropy"] for row in history)
    assert all(row[f"time/{phase}"] >= 0 for row in history
               for phase in ("generate", "score", "update", "sync"))


def test_a_steps_throughput_counts_every_token_it_trained_on(tmp_path, monkeypatch):
    """tokens_per_second: the tokens fed to the model (prompt + response - 1 of every member,
    traces included) over the step's seconds, here a clock that reads 10.0 then 12.5."""
    import luffy_fast.trainer as trainer_module

    trainer = LuffyTrainer(tiny_config(tmp_path, "eval.every=0"))
    seen, update = [], trainer.update_policy
    trainer.update_policy = lambda batch, *rest: seen.append(batch) or update(batch, *rest)
    clock = iter([10.0, 12.5])
    monkeypatch.setattr(trainer_module, "time", SimpleNamespace(perf_counter=lambda: next(clock)))
    try:
        metrics = trainer.training_step(0)
    finally:
        trainer.close()
    (batch,) = seen
    tokens = sum(len(p) + len(r) - 1 for p, r in zip(batch.prompt_ids, batch.response_ids))
    assert len(batch) == 16 and metrics["step_seconds"] == 2.5
    assert metrics["tokens_per_second"] == pytest.approx(tokens / 2.5)


def test_a_world_of_one_retries_when_its_port_is_taken(monkeypatch):
    """The free port found by the probe can be taken before the store binds it: retry on a new
    one; a launcher's own settings are never rewritten."""
    import deepspeed

    from luffy_fast.distributed import join_process_group

    ports, calls = [], []

    def fake_init(dist_backend, verbose):
        calls.append(dist_backend)
        ports.append(os.environ["MASTER_PORT"])
        if len(calls) < 3:
            raise RuntimeError("The server socket has failed to listen: EADDRINUSE")

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    for name in ("RANK", "LOCAL_RANK", "WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    join_process_group("cpu")
    assert calls == ["gloo"] * 3 and os.environ["WORLD_SIZE"] == "1"

    calls.clear()
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("MASTER_PORT", "29500")
    with pytest.raises(RuntimeError, match="EADDRINUSE"):
        join_process_group("cpu")  # launched: the launcher's port is not ours to change
    assert calls == ["gloo"] and os.environ["MASTER_PORT"] == "29500"


def test_a_world_of_one_gives_up_after_five_ports_and_retries_nothing_else(monkeypatch):
    """Both wordings of a taken port are retried, up to 5 attempts, after which the error is
    raised (not a return without a process group); any other error is raised at once."""
    import deepspeed

    from luffy_fast.distributed import join_process_group

    calls, error = [], {}

    def fake_init(dist_backend, verbose):
        calls.append(os.environ["MASTER_PORT"])
        raise RuntimeError(error["message"])

    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: False)
    monkeypatch.setattr(deepspeed, "init_distributed", fake_init)
    monkeypatch.setattr(os, "environ", subprocess_env())  # unlaunched; restored afterwards
    error["message"] = "bind: address already in use"
    with pytest.raises(RuntimeError, match="address already in use"):
        join_process_group("cpu")
    assert len(calls) == 5
    calls.clear()
    monkeypatch.setattr(os, "environ", subprocess_env())  # the failure left RANK=0 set
    error["message"] = "Connection reset by peer"  # not a port taken: no new port helps
    with pytest.raises(RuntimeError, match="Connection reset"):
        join_process_group("cpu")
    assert len(calls) == 1


def test_the_head_passes_the_advantages_in_float32_under_bf16():
    """Under bf16 the head hands the op the micro-batch's float32 advantages (the op computes in
    float32): rounded to bf16 first, 1.2910 became 1.2891 (0.15 % off every term)."""
    from luffy_fast import LuffyLossConfig, fused_luffy_loss
    from luffy_fast.policy import FusedLossHead

    generator = torch.Generator().manual_seed(0)
    hidden = torch.randn(6, 8, generator=generator).bfloat16()
    head = FusedLossHead(torch.nn.Linear(8, 16, bias=False).bfloat16(),
                         LuffyLossConfig(normalizer="token"), backend="torch")
    micro = SimpleNamespace(targets=torch.randint(0, 16, (6,), generator=generator),
                            advantages=torch.full((6,), 1.2910), loss_mask=torch.ones(6, dtype=bool),
                            off_policy_mask=torch.zeros(6, dtype=bool), old_logprobs=None,
                            seq_ids=torch.zeros(6, dtype=torch.long))
    loss, _ = head(hidden, micro)
    expected, _ = fused_luffy_loss(hidden, head.weight, micro.targets, micro.advantages,
                                   micro.loss_mask, micro.off_policy_mask, config=head.loss_config,
                                   seq_ids=micro.seq_ids, backend="torch")
    assert float(loss) == float(expected) == pytest.approx(-1.2910, rel=1e-6)


def test_a_loss_backend_that_cannot_run_here_stops_the_start(monkeypatch):
    """train.loss_backend=triton off CUDA, and the gradient filter on the torch backend, failed
    after the model loaded and the first validation ran, leaving a folder to --overwrite."""
    from luffy_fast.distributed import training_device
    from luffy_fast.errors import ConfigError

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    cpu = torch.device("cpu")
    with pytest.raises(ConfigError, match=r"^train.loss_backend: 'triton' needs a CUDA device; "
                                          r"this run trains on cpu"):
        training_device(load_config(None, ["train.loss_backend=triton"]), cpu)
    with pytest.raises(ConfigError, match=r"^loss.grad_filter: .* on the 'torch' backend "
                                          r"\(train.loss_backend='auto' on cpu\)$"):
        training_device(load_config(None, ["loss.grad_filter=0.5"]), cpu)
    with pytest.raises(ConfigError, match=r"^loss.grad_filter: .* on the 'reference' backend"):
        training_device(load_config(None, ["loss.grad_filter=0.5", "train.loss_backend=reference"]),
                        cpu)
    assert training_device(load_config(None, ["train.loss_backend=torch"]), cpu)[0] == cpu
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the kernels on the CPU interpreter
    assert training_device(load_config(None, ["loss.grad_filter=0.5",
                                              "train.loss_backend=triton"]), cpu)[0] == cpu


def test_train_cpu_threads_sets_torchs_thread_count_on_the_cpu(monkeypatch):
    from luffy_fast.distributed import training_device

    threads = []
    monkeypatch.setattr(torch, "set_num_threads", threads.append)
    training_device(load_config(None, ["train.cpu_threads=3"]), torch.device("cpu"))
    training_device(load_config(None, ["train.cpu_threads=0"]), torch.device("cpu"))  # torch's own
    assert threads == [3]


def test_zero_3_lockstep_takes_the_largest_count_of_any_rank(monkeypatch):
    """lockstep_counts at ZeRO-3 over 2 ranks: this rank's micro-batch count against the other
    rank's 5 (the all-reduce stood in, applying the reduction it is asked for): max(3, 5) = 5,
    max(7, 5) = 7; more would only add filler passes. Below ZeRO-3, or alone: no lockstep."""
    from luffy_fast.distributed import lockstep_counts

    reductions = {torch.distributed.ReduceOp.MAX: max, torch.distributed.ReduceOp.SUM: sum}

    def all_reduce(value, op=torch.distributed.ReduceOp.SUM):
        value.fill_(reductions[op]([int(value), 5]))

    monkeypatch.setattr(torch.distributed, "all_reduce", all_reduce)
    largest = lockstep_counts(3, 2, torch.device("cpu"))
    assert (largest(3), largest(7)) == (5, 7)
    assert lockstep_counts(2, 2, torch.device("cpu")) is None
    assert lockstep_counts(3, 1, torch.device("cpu")) is None
