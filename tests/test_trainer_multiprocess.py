"""Two training processes (gloo), as the DeepSpeed launcher would start them: their averaged
gradient equals one process on the whole mini-batch, their rollouts differ, their metrics are
reduced over both, and a ZeRO-2 run publishes one checkpoint; and the launcher's own command."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

WORKER = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from helpers import tiny_config
    from luffy_fast.rollout import SamplingParams
    from luffy_fast.rollout_batch import assemble_groups
    from luffy_fast.trainer import LuffyTrainer

    # the gradient of two ranks (each half of the groups, averaged) == one process, whole batch
    check = LuffyTrainer(tiny_config(Path({out!r}) / "grad", "loss.entropy_coef=0.01"))
    samples = check.train_samples[:4]  # the same prompts, weights and seed on both ranks
    completions = check.rollout.generate([s.prompt_ids for s in samples], n=3,
                                         params=SamplingParams(24, seed=11))
    rollouts = [c.token_ids for group in completions for c in group]  # each rank its own draw
    shared = [completions]
    torch.distributed.broadcast_object_list(shared, src=0)  # the gradient check's one batch
    batch = assemble_groups(samples, shared[0], n_off=1)
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch))
    mine = [i for i in range(len(batch)) if int(batch.group_ids[i]) % 2 == check.rank]
    policy = check.engine.module.policy
    check.engine.zero_grad()
    check.accumulate_gradients(batch, mine, None)
    averaged = {{n: p.grad.clone() for n, p in policy.named_parameters()}}
    for grad in averaged.values():
        torch.distributed.all_reduce(grad)
        grad /= 2
    check.engine.zero_grad()
    check.world_size = 1
    check.accumulate_gradients(batch, list(range(len(batch))), None)
    worst = max(float((averaged[n] - p.grad).abs().max() / p.grad.abs().max().clamp_min(1e-12))
                for n, p in policy.named_parameters())
    check.world_size = 2

    trainer = LuffyTrainer(tiny_config(Path({out!r}), "train.zero_stage=2", "train.steps=2",
                                       "eval.every=0"))
    prompts = [s.prompt_ids for s in trainer.prompt_batch(0)]
    history = trainer.train()
    print("RESULT " + json.dumps({{"rank": trainer.rank, "prompts": prompts, "worst": worst,
                                   "rollouts": rollouts, "history": history}}))
""")


LOCKSTEP = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    import torch
    sys.path.insert(0, {tests!r})
    from helpers import tiny_config
    from luffy_fast.rollout import SamplingParams
    from luffy_fast.rollout_batch import assemble_groups
    from luffy_fast.trainer import LuffyTrainer

    def trainer(name):  # ZeRO-3 and a small budget: several micro-batches a pass
        return LuffyTrainer(tiny_config(Path({out!r}) / name, "train.zero_stage=3",
                                        "train.token_budget=64"))

    split, whole = trainer("split"), trainer("whole")  # the same initial weights
    samples = split.train_samples[:4]
    completions = [split.rollout.generate([s.prompt_ids for s in samples], n=3,
                                          params=SamplingParams(24, seed=11))]
    torch.distributed.broadcast_object_list(completions, src=0)
    batch = assemble_groups(samples, completions[0], n_off=1)
    batch.advantages = torch.linspace(-1.0, 1.0, len(batch))
    everything = list(range(len(batch)))
    # rank 0: groups 0-2, rank 1: group 3 (4 sequences each): unequal micro-batch counts
    mine = [i for i in everything if (int(batch.group_ids[i]) == 3) == (split.rank == 1)]
    logprobs = split.compute_logprobs(batch, mine)[0]
    result = split.accumulate_gradients(batch, mine, None)
    split_norm = split.nonfinite.optimizer_step(split.engine, 1)
    # the reference: both ranks on the whole batch (one process's gradient, averaged with itself)
    whole.world_size = 1
    reference = whole.compute_logprobs(batch, everything)[0]
    whole.accumulate_gradients(batch, everything, None)
    whole_norm = whole.nonfinite.optimizer_step(whole.engine, 1)
    worst = max(float((logprobs[i] - reference[i]).abs().max()) for i in mine)
    print("RESULT " + json.dumps({{"rank": split.rank, "micro_batches": result["micro_batches"],
                                   "norms": [split_norm, whole_norm], "worst": worst}}))
""")


VALIDATION = textwrap.dedent("""
    import json, sys
    from pathlib import Path
    sys.path.insert(0, {tests!r})
    from helpers import tiny_config
    from luffy_fast.trainer import LuffyTrainer

    # greedy, so that both ranks' samples equal one process's; ZeRO-3: the entropy pass's
    # micro-batch counts differ between the ranks' shares
    trainer = LuffyTrainer(tiny_config(Path({out!r}), "eval.temperature=0", "eval.n=2",
                                       "train.zero_stage=3", "train.token_budget=64"))
    generate, asked = trainer.rollout.generate, []
    trainer.rollout.generate = lambda prompts, **kw: asked.append(len(prompts)) or generate(
        prompts, **kw)
    shared = trainer.evaluate()  # each rank its share of the 8 problems, gathered
    trainer.validation.rank, trainer.validation.world_size = 0, 1
    alone = trainer.evaluate()  # every rank all 8 problems, as one process
    print("RESULT " + json.dumps({{"rank": trainer.rank, "shared": shared, "alone": alone,
                                   "asked": asked}}))
""")


def _run_two_ranks(tmp_path, source: str, timeout: float = 600) -> dict:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    script = tmp_path / "worker.py"
    # once its RESULT line is out, a worker ends without the interpreter's teardown: gloo's and
    # DeepSpeed's threads aborted it there once ("terminate called without an active exception",
    # exit -6, after a correct RESULT)
    script.write_text(source.format(tests=str(Path(__file__).parent), out=str(tmp_path / "out"))
                      + "\nsys.stdout.flush()\nimport os\nos._exit(0)\n")
    workers = []
    for rank in (0, 1):
        env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                   MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), OMP_NUM_THREADS="1")
        workers.append(subprocess.Popen([sys.executable, str(script)], env=env, text=True,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT))
    results = {}
    try:
        for worker in workers:
            output, _ = worker.communicate(timeout=timeout)  # a hang fails here, not forever
            assert worker.returncode == 0, output[-3000:]
            line = next(line for line in output.splitlines() if line.startswith("RESULT "))
            result = json.loads(line[len("RESULT "):])
            results[result["rank"]] = result
    finally:
        for worker in workers:
            worker.kill()
    return results


@pytest.mark.slow
def test_zero_3_ranks_with_unequal_micro_batch_counts_step_together(tmp_path):
    """At ZeRO-3 every forward and backward gathers the parameters on all ranks together; a
    rank with fewer micro-batches runs fillers (no loss token) instead of leaving the others
    waiting in a gather forever. Log-probs and the gradient norm equal the whole batch's."""
    results = _run_two_ranks(tmp_path, LOCKSTEP, timeout=400)
    assert results[0]["micro_batches"] > results[1]["micro_batches"] >= 1  # unequal: fillers ran
    for result in results.values():
        split_norm, whole_norm = result["norms"]
        assert abs(split_norm - whole_norm) <= 1e-5 * whole_norm, result
        assert result["worst"] <= 1e-5, result


@pytest.mark.slow
def test_two_ranks_share_each_step_and_publish_one_checkpoint(tmp_path):
    results = _run_two_ranks(tmp_path, WORKER)
    # 4 prompts per step, mini-batches of 4: each rank takes a different half
    assert len(results[0]["prompts"]) == len(results[1]["prompts"]) == 2
    assert results[0]["prompts"] != results[1]["prompts"]
    # the same prompts and seed: each rank still draws its own samples (rank 0 the seed's own)
    assert results[0]["rollouts"] != results[1]["rollouts"]
    # every rank logs the step's metrics over both ranks (rank 0's file), the same on each
    assert [len(r["history"]) for r in results.values()] == [2, 2]
    assert results[0]["history"] == results[1]["history"]
    assert all(r["worst"] <= 1e-5 for r in results.values()), results
    checkpoints = tmp_path / "out" / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-000002"
    assert (checkpoints / "step-000002" / "hf" / "config.json").exists()
    assert len((tmp_path / "out" / "metrics.jsonl").read_text().splitlines()) == 2  # rank 0 only


@pytest.mark.slow
def test_the_documented_deepspeed_launch(tmp_path):
    """`deepspeed --num_gpus N --module luffy_fast train ...` (README, docs/reproduce.md): the
    launcher adds --local_rank=K to each rank's arguments; two CPU ranks train one step at
    ZeRO-2, and rank 0 alone logs it and says done."""
    from helpers import tiny_config

    config = tmp_path / "run.yaml"
    out = tmp_path / "out"
    config.write_text(tiny_config(out, "train.steps=1", "eval.every=0",
                                  "train.zero_stage=2").to_yaml())
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    launcher = Path(sys.executable).parent / "deepspeed"
    env = dict(os.environ, OMP_NUM_THREADS="1", PATH=f"{launcher.parent}:{os.environ['PATH']}")
    proc = subprocess.run([str(launcher), "--num_gpus", "2", "--master_port", str(port),
                           "--module", "luffy_fast", "train", "--config", str(config)],
                          env=env, cwd=tmp_path, text=True, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert "--local_rank=1" in proc.stdout  # the flag the command line now accepts
    assert proc.stdout.count("done: metrics and checkpoints") == 1
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 1


@pytest.mark.slow
def test_ranks_share_the_validation_problems_and_log_the_whole_sets_metrics(tmp_path):
    """Each of two ranks samples 4 of the 8 held-out problems; the gathered records give the
    metrics one process gets from all 8 (greedy decoding), the same on both ranks."""
    results = _run_two_ranks(tmp_path, VALIDATION, timeout=400)
    for result in results.values():
        assert result["asked"] == [4, 8]  # its share, then everything alone
        shared, alone = result["shared"], result["alone"]
        assert shared.keys() == alone.keys() and "val/macro/avg@2" in shared
        for name, value in alone.items():
            if name.startswith("time/"):
                continue
            assert shared[name] == pytest.approx(value, rel=1e-5, abs=1e-7), name
    assert results[0]["shared"] == results[1]["shared"]  # the same row on both ranks
